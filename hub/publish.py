"""Turn a trained / converted ViP²-CLIP folder into a Hub-ready repository folder and upload it.

    python hub/publish.py --model my-model --repo-id <your-name>/<model-name> \
        --eval-json results_visa.json [--train-dataset mvtec] [--license cc-by-nc-sa-4.0] [--out DIR] [--dry-run]

It publishes a model *you* trained or converted, under *your* namespace (the project publishes no weights; the
authors' release is downloaded by each user, `vip2clip download-authors`). The folder is written by the package's one
model-folder writer (`modeling_vip2clip.weights.folder.save_model_folder`, the same as `train`, `calibrate`, the
converter and `download-authors` use): safetensors weights, config.json (auto_map + custom_pipelines), every Hub file
(`configuration_`, `modeling_`, `processing_`, `pipeline_`, `cpu_fast_path_`, `reference_bank_vip2clip.py`),
preprocessor_config.json — plus a generated model card (README.md). Before anything is uploaded the folder is
loaded in a *fresh* Python process — offline (HF_HUB_OFFLINE=1), with an empty remote-code cache and this
repository's package made unimportable — through `AutoModel` / `AutoImageProcessor` / `AutoProcessor`
(`trust_remote_code=True`) and the `pipeline()` task, and must reproduce the source model's outputs on fixed inputs
to 1e-6 (max abs diff); otherwise nothing is uploaded (exit code 3).
`--dry-run` builds and checks the folder only. Uploading needs a token (`hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from os import PathLike
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python hub/publish.py` from a checkout
    sys.path.insert(0, str(ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model_card import DEFAULT_REPO_ID, TRAIN_DATASETS, build_model_card, load_eval_results  # noqa: E402

from modeling_vip2clip.errors import UsageError  # noqa: E402

__all__ = ["ParityError", "PARITY_ATOL", "build_hub_folder", "check_parity", "parity_inputs", "upload", "main"]

PARITY_ATOL = 1e-6
_PIPELINE_FILE = "pipeline_vip2clip.py"


class ParityError(RuntimeError):
    """The built folder does not reproduce the source model: it must not be uploaded."""


# ---------------------------------------------------------------------------------------------- fixed inputs
def parity_inputs(seed: int = 1234) -> list[Image.Image]:
    """Deterministic test images of different sizes and modes (RGB noise + gradient, grayscale checkerboard with a
    bright defect, 16-bit ramp), so the processor's conversions are part of the check."""
    rng = np.random.default_rng(seed)
    height, width = 61, 83
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 3 % 256, y * 4 % 256, (x + y) * 2 % 256], axis=-1).astype(np.float64)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    checker = (((np.mgrid[0:72, 0:50][0] // 6) + (np.mgrid[0:72, 0:50][1] // 6)) % 2 * 180 + 40).astype(np.uint8)
    checker[30:40, 20:28] = 255
    ramp = (np.linspace(0, 65535, 48 * 48).reshape(48, 48)).astype(np.uint16)
    return [Image.fromarray(rgb, mode="RGB"), Image.fromarray(checker, mode="L"), Image.fromarray(ramp)]


# ---------------------------------------------------------------------------------------------- building
def _load_source(model_dir: Path):
    """The source model and processor, through the package's one loader (`weights.loader.load_model_and_processor`):
    a folder whose weights do not fit its config, or whose processor has another input size, is refused."""
    from modeling_vip2clip.weights.loader import load_model_and_processor

    return load_model_and_processor(str(model_dir))


def _prepare_out(out: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse an `--out` that may not be replaced; the writer replaces an allowed one once the new folder is complete."""
    if out.resolve() == model_dir.resolve():
        raise ValueError("--out must differ from --model (the source folder is never modified).")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out.")
        if not (out / "config.json").is_file():
            raise FileExistsError(f"{out} does not look like an earlier build (no config.json); refusing to clear it.")


def build_hub_folder(
    model_dir: str | PathLike,
    out: str | PathLike,
    repo_id: str = DEFAULT_REPO_ID,
    eval_json: str | PathLike | dict | None = None,
    train_dataset: str = "mvtec",
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the Hub folder for `model_dir` into `out` and return `out` (no parity check, no upload): the package's
    one model-folder writer (`weights.folder.save_model_folder`) plus the model card and the evaluation results."""
    from modeling_vip2clip.weights.folder import save_model_folder

    model_dir, out = Path(model_dir), Path(out)
    eval_results = load_eval_results(eval_json) if eval_json is not None else None  # fail before writing
    model, processor = _load_source(model_dir)
    _prepare_out(out, model_dir, overwrite)
    card = build_model_card(
        model.config, repo_id=repo_id, train_dataset=train_dataset, license=license,
        eval_results=eval_results, has_pipeline=True,
    )
    extra_files = {"README.md": str(card)}
    if eval_results is not None:
        extra_files["eval_results.json"] = json.dumps(eval_results, indent=2) + "\n"
    return save_model_folder(model, processor, out, extra_files=extra_files)


# ---------------------------------------------------------------------------------------------- parity
_CHILD = textwrap.dedent(
    r"""
    import importlib.abc, json, sys
    from pathlib import Path

    class _Block(importlib.abc.MetaPathFinder):
        # the published folder must be self-contained: this repository's package may not be imported
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_vip2clip", "model_card", "publish"):
                raise ImportError(f"{name} is not available to the published folder's code")
            return None

    sys.meta_path.insert(0, _Block())
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, pipeline

    folder, work, with_pipeline = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    torch.set_num_threads(int(sys.argv[4]))  # same reduction order as the parent
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [Image.open(path) for path in sorted((work / "inputs").glob("*.png"))]
    inputs = processor(images=images)
    with torch.inference_mode():
        outputs = model(pixel_values=inputs["pixel_values"])
    maps = processor.post_process_anomaly_maps(outputs, target_sizes=inputs["original_sizes"])
    tensors = {
        "pixel_values": inputs["pixel_values"], "anomaly_score": outputs.anomaly_score,
        "anomaly_map": outputs.anomaly_map, "image_logits": outputs.image_logits,
    }
    tensors.update({f"resized_map_{i}": m.contiguous() for i, m in enumerate(maps)})
    info = {"model_class": f"{type(model).__module__}.{type(model).__name__}",
            "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
            "image_processor_class": f"{type(image_processor).__module__}.{type(image_processor).__name__}"}
    if with_pipeline:
        detector = pipeline(model=str(folder), trust_remote_code=True, device="cpu")
        info["pipeline_class"] = f"{type(detector).__module__}.{type(detector).__name__}"
        info["pipeline_task"] = detector.task
        for i, image in enumerate(images):
            result = detector(image)
            tensors[f"pipeline_score_{i}"] = torch.tensor([result["score"]])
            tensors[f"pipeline_map_{i}"] = torch.from_numpy(np.ascontiguousarray(result["anomaly_map"]))
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, str(work / "published.safetensors"))
    (work / "info.json").write_text(json.dumps(info))
    """
)


def _child_env(modules_cache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        HF_MODULES_CACHE=str(modules_cache), PYTHONDONTWRITEBYTECODE="1", TOKENIZERS_PARALLELISM="false",
    )
    return env


def check_parity(
    source: str | PathLike,
    folder: str | PathLike,
    atol: float = PARITY_ATOL,
    with_pipeline: bool | None = None,
    timeout: float = 900,
) -> dict[str, float]:
    """Load `folder` in a fresh offline subprocess (AutoModel / AutoImageProcessor / AutoProcessor / pipeline,
    trust_remote_code) and
    compare its outputs on `parity_inputs()` with the source model's (loaded from `source` with this package).

    Returns the max abs differences per output; raises `ParityError` if any exceeds `atol` or the folder cannot be
    loaded on its own.
    """
    from safetensors.torch import load_file

    folder = Path(folder).resolve()
    if with_pipeline is None:
        with_pipeline = (folder / _PIPELINE_FILE).is_file()
    model, processor = _load_source(Path(source))
    images = parity_inputs()
    inputs = processor(images=images)
    with torch.inference_mode():
        outputs = model(pixel_values=inputs["pixel_values"])
    expected = {
        "pixel_values": inputs["pixel_values"], "anomaly_score": outputs.anomaly_score,
        "anomaly_map": outputs.anomaly_map, "image_logits": outputs.image_logits,
    }
    resized = processor.post_process_anomaly_maps(outputs, target_sizes=inputs["original_sizes"])
    expected.update({f"resized_map_{i}": m for i, m in enumerate(resized)})
    if with_pipeline:  # the pipeline runs one image at a time: compare with batch-of-one runs
        for i in range(len(images)):
            with torch.inference_mode():
                single = model(pixel_values=inputs["pixel_values"][i : i + 1])
            expected[f"pipeline_score_{i}"] = single.anomaly_score
            expected[f"pipeline_map_{i}"] = processor.post_process_anomaly_maps(
                single, target_sizes=inputs["original_sizes"][i : i + 1]
            )[0]

    with tempfile.TemporaryDirectory(prefix="vip2clip-parity-") as tmp:
        work = Path(tmp)
        (work / "inputs").mkdir()
        for i, image in enumerate(images):
            image.save(work / "inputs" / f"{i:02d}.png")
        # the folder is copied under a fixed, importable name so a dotted or dashed --out cannot matter
        staged = work / "published_model"
        shutil.copytree(folder, staged)
        command = [
            sys.executable, "-c", _CHILD, str(staged), str(work), "1" if with_pipeline else "0",
            str(torch.get_num_threads()),
        ]
        try:
            run = subprocess.run(
                command, cwd=work, env=_child_env(work / "hf_modules"), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise ParityError(f"Loading {folder} in a fresh process took more than {timeout:.0f} s.") from None
        if run.returncode != 0:
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-15:])
            raise ParityError(f"{folder} does not load on its own (AutoModel/AutoImageProcessor/AutoProcessor, offline):\n{tail}")
        published = load_file(str(work / "published.safetensors"))
        info = json.loads((work / "info.json").read_text())

    for key in ("model_class", "processor_class", "image_processor_class") + (("pipeline_class",) if with_pipeline else ()):
        if not info[key].startswith("transformers_modules."):
            raise ParityError(f"The fresh process got {key} {info[key]} instead of the folder's remote code.")
    diffs: dict[str, float] = {}
    for key, reference in expected.items():
        if key not in published:
            raise ParityError(f"The published folder produced no {key!r}.")
        got = published[key]
        reference = reference.detach().float()
        if tuple(got.shape) != tuple(reference.shape):
            raise ParityError(f"{key}: shape {tuple(got.shape)} from the published folder, {tuple(reference.shape)} expected.")
        diffs[key] = float((got - reference).abs().max()) if got.numel() else 0.0
    worst = max(diffs, key=diffs.get)
    if not all(np.isfinite(list(diffs.values()))) or diffs[worst] > atol:
        bad = {key: value for key, value in diffs.items() if not value <= atol}
        raise ParityError(
            f"The built folder {folder} does NOT reproduce the source model {source}: max abs diff "
            f"{diffs[worst]:.3g} on {worst} (tolerance {atol:g}); failing outputs: "
            + ", ".join(f"{key}={value:.3g}" for key, value in bad.items())
        )
    return diffs


# ---------------------------------------------------------------------------------------------- upload
def upload(folder: str | PathLike, repo_id: str, private: bool = False, token: str | None = None, commit_message: str | None = None) -> str:
    """Create the repo if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            "No Hugging Face token: run `hf auth login` or set HF_TOKEN (write access to the repo's namespace), "
            "or pass --dry-run to only build the folder."
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model",
        commit_message=commit_message or "Upload ViP²-CLIP checkpoint (parity-checked with hub/publish.py)",
    )
    return str(getattr(info, "commit_url", info))


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`_main` inside the package's error boundary (docs/reliability.md): one `error:` line for expected faults."""
    from modeling_vip2clip.cli.boundary import guarded

    return guarded(lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="trained or converted model folder (save_pretrained output)")
    parser.add_argument("--repo-id", default=None,
                        help="your Hub repo id, <your-name>/<model-name> (needed to upload; a dry run without it uses "
                        f"{DEFAULT_REPO_ID} in the card)")
    parser.add_argument("--eval-json", help="evaluation results JSON → model-index and a results table")
    parser.add_argument("--train-dataset", choices=sorted(TRAIN_DATASETS), default="mvtec",
                        help="auxiliary training set: sets the licence (mvtec → cc-by-nc-sa-4.0, visa → cc-by-4.0)")
    parser.add_argument("--license", help="Hub licence id (default: the training set's)")
    parser.add_argument("--out", help="folder to build (default build/hub/<repo name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    parser.add_argument("--dry-run", action="store_true", help="build and parity-check the folder, do not upload")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--skip-parity", action="store_true", help=argparse.SUPPRESS)  # never allowed with upload
    args = parser.parse_args(argv)

    if args.repo_id is None:
        if not args.dry_run:
            print("error: --repo-id is needed to upload: pass <your-name>/<model-name> (or --dry-run to only build "
                  "and check the folder)", file=sys.stderr)
            return 2
        args.repo_id = DEFAULT_REPO_ID
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        print(f"error: --repo-id must look like ORG/NAME, got {args.repo_id!r}", file=sys.stderr)
        return 2
    if args.skip_parity and not args.dry_run:
        print("error: --skip-parity is only allowed with --dry-run (nothing is uploaded unchecked)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ROOT / "build" / "hub" / args.repo_id.split("/")[1]
    try:
        build_hub_folder(
            args.model, out, repo_id=args.repo_id, eval_json=args.eval_json, train_dataset=args.train_dataset,
            license=args.license, overwrite=args.overwrite,
        )
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"built {out}: " + ", ".join(sorted(path.name for path in out.iterdir())))

    if not args.skip_parity:
        try:
            diffs = check_parity(args.model, out)
        except ParityError as error:
            print(f"PARITY FAILED — not uploading.\n{error}", file=sys.stderr)
            return 3
        print(f"parity OK: max abs diff {max(diffs.values()):.2e} over {len(diffs)} outputs "
              f"(AutoModel/AutoImageProcessor/AutoProcessor/pipeline in a fresh offline process, tolerance {PARITY_ATOL:g})")
    if args.dry_run:
        print(f"dry run: nothing uploaded; upload later with `hf upload {args.repo_id} {out} .`")
        return 0
    try:
        url = upload(out, args.repo_id, private=args.private)
    except PermissionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 4
    print(f"uploaded to https://huggingface.co/{args.repo_id} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
