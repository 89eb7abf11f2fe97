"""Export a ViP²-CLIP model for deployment: `vip2clip export --model M --format onnx|openvino --out DIR`, or from
Python `export(model, out, format="onnx", ...)` (`modeling_vip2clip.export`).

    vip2clip export --model runs/mvtec/model --format onnx --out M-onnx
    vip2clip export --model runs/mvtec/model --format openvino --out M-ov-int8 \\
        --int8 --calibration-dataset /data/mvtec --calibration-size 300

Graph contract (both formats): one input `pixel_values` (B, 3, S, S) float32 with a dynamic batch; outputs
`anomaly_score` (B,) and `anomaly_map` (B, S, S) — exactly what `ViP2CLIPModel.forward` returns, Gaussian blur
included, so an exported model needs only the processor's image preprocessing (docs/method.md §7) around it.

The whole model is traced by the TorchScript ONNX exporter (`torch.onnx.export(..., dynamo=False)`) with the
CPU oneDNN fast path switched off (`model.cpu_onednn_vision = False`: its mkldnn ops have no ONNX form; the
plain transformers layers compute the same function). OpenVINO converts that ONNX graph and saves it in f32
(`compress_to_fp16=False`). `--int8` quantises the OpenVINO model with NNCF post-training quantisation on
calibration images, keeping in floating point everything that measurement showed must stay (see
`INT8_IGNORED_PATTERNS`), and records its accuracy against the f32 export in export_info.json.

The folder written: the model (`model.onnx` [+ `model.onnx_data` over 2 GB] or `openvino_model.xml/.bin`),
`config.json`, `preprocessor_config.json`, `export_info.json`, a README.md, and `vip2clip_runtime.py` (a copy of
`modeling_vip2clip/exported_runtime.py`, which runs the folder with numpy + Pillow + the runtime, no torch).
"""

from __future__ import annotations

import glob
import logging
import os
import platform
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError, require_extra, writing
from ..files import atomic_write_json, atomic_write_text
from ..resolve import looks_like_path
from .exported_runtime import (
    INFO_FILE,
    INPUT_NAME,
    ONNX_DATA_FILE,
    ONNX_FILE,
    OPENVINO_FILE,
    OUTPUT_NAMES,
    RUNTIME_FILE,
    is_exported_folder,
)

logger = logging.getLogger("modeling_vip2clip.deploy.export")

__all__ = [
    "DEFAULT_OPSET",
    "INT8_IGNORED_PATTERNS",
    "export",
    "load_calibration_images",
    "accuracy_figures",
    "quantize_int8",
]

DEFAULT_OPSET = 17
# protobuf caps one message at 2 GiB: weights beyond this (with headroom for the graph) go to external data.
_PROTOBUF_LIMIT = 2**31 - 2**26

# NNCF node-name patterns (regular expressions matched at the start of the node name) kept in floating point by
# `--int8`. The TorchScript exporter names nodes by module scope: the vision tower's blocks are `/model/layers.N/`
# (encode_image calls them directly), the text tower's `/model/encoder/layers.N/`. Only the vision blocks are
# quantised: everything else — patch embedding, the text encoder on the ICA prompts, ICA, FGP, the projections
# and the UTPA similarities, blur — is a small share of the work and sits right before the outputs.
INT8_IGNORED_PATTERNS = (r"(?!/model/layers\.\d+/)",)




def _wrap(model):
    import torch

    class ExportWrapper(torch.nn.Module):
        """`pixel_values` → (`anomaly_score`, `anomaly_map`): the two outputs of the graph contract."""

        def __init__(self, vip2clip):
            super().__init__()
            self.model = vip2clip  # node names start with "/model/" (INT8_IGNORED_PATTERNS relies on it)

        def forward(self, pixel_values):
            output = self.model(pixel_values=pixel_values, return_dict=True)
            return output.anomaly_score, output.anomaly_map

    return ExportWrapper(model).eval()


# ---------------------------------------------------------------------------------------------- calibration images
def load_calibration_images(source: Any, count: int, seed: int = 0, *, split: str | None = "all",
                            **dataset_options: Any) -> list:
    """`count` images (PIL, as stored) drawn without replacement (seeded) from a dataset — opened by the one
    loader every command uses (`data.load_anomaly_dataset`: a saved dataset folder, a raw benchmark folder, data
    files or a Hub id; `split` and `dataset_options` as there; its images, never its masks) — or from a plain image
    folder (recursive) or glob pattern (`data.collect_inputs`); all when there are fewer."""
    path = Path(str(source))
    rng = random.Random(seed)
    from ..data.images import collect_inputs

    if not path.is_dir() and glob.has_magic(str(source)) or path.is_dir() and not _is_dataset_folder(path):
        files = [file for file, _ in collect_inputs([str(source)])[0]]
        if not files:
            raise UsageError(f"--calibration-dataset {source}: no image files found; point it at a folder of images")
        return _readable(source, [(file, file) for file in sorted(rng.sample(files, min(count, len(files))))])
    if not path.exists() and looks_like_path(str(source)):
        raise UsageError(f"--calibration-dataset {source}: no such folder or pattern; pass a saved dataset folder "
                         "(vip2clip convert), an image folder or a quoted glob such as 'images/**/*.png'")
    require_extra("datasets", "train", "a dataset as --calibration-dataset")
    from ..data import load_anomaly_dataset, without_decoding

    dataset = load_anomaly_dataset(str(source), split, require_labels=False, flag="--calibration-dataset",
                                   progress=False, **dataset_options)
    dataset = without_decoding(dataset)  # decode only the rows drawn
    rows = sorted(rng.sample(range(len(dataset)), min(count, len(dataset))))
    drawn = dataset.select(rows)
    return _readable(source, [(str(where), value) for value, where in zip(drawn["image"], drawn["image_path"])])


def _readable(source: Any, named: list) -> list:
    """The images of `named` ((name, value) pairs) that decode; the others are reported by name and skipped (one
    unreadable calibration image never ends an export); none readable is a usage error."""
    from ..data.images import read_image

    images, skipped = [], []
    for name, value in named:
        try:
            images.append(read_image(value, what=name))
        except Exception as error:  # noqa: BLE001 - the reader's errors (truncated, not an image, bomb) are reported
            skipped.append(name)
            logger.warning("skipped calibration image %s: %s", name, " ".join(str(error).split())[:160])
    if not images:
        raise UsageError(f"--calibration-dataset {source}: none of its {len(named)} images could be read (e.g. "
                         f"{skipped[0] if skipped else '?'}); point it at readable images")
    return images


def _is_dataset_folder(path: Path) -> bool:
    try:
        from ..data.sources import is_dataset_folder
    except ImportError:  # the data module needs the `train` extra (datasets): plain folders only
        return False
    return is_dataset_folder(path)


# ---------------------------------------------------------------------------------------------- export steps
def _versions() -> dict:
    import torch
    import transformers

    from .. import __version__

    versions = {"vip2clip": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    for module in ("onnx", "onnxruntime", "openvino", "nncf"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    return versions


def _export_onnx(model, image_size: int, path: Path, opset: int, external_data: bool | None) -> bool:
    """Trace the model to `path` (weights next to it in ONNX_DATA_FILE when over 2 GB); returns whether they are."""
    import onnx
    import torch

    wrapper = _wrap(model)
    example = torch.randn(2, 3, image_size, image_size)  # batch 2: the tracer must not specialise the batch to 1
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    if external_data is None:
        external_data = weight_bytes > _PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export_") as scratch:
        traced = Path(scratch) / ONNX_FILE
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks, constant here
            torch.onnx.export(
                wrapper, (example,), str(traced),
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        # Re-save in one place: the exporter writes one file per tensor when it has to go external.
        proto = onnx.load(str(traced))
        proto.producer_name, proto.doc_string = "vip2clip export", "ViP2-CLIP anomaly detection (docs/deployment.md)"
        if external_data:
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=ONNX_DATA_FILE, size_threshold=1024)
        else:
            onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path))
    return external_data


def _compile_openvino(ov_model, precision: str = "f32"):
    import openvino

    return openvino.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": precision})


def _run_compiled(compiled, batches: list) -> tuple:
    import numpy as np

    scores, maps = [], []
    request = compiled.create_infer_request()
    for pixel_values in batches:
        result = request.infer({INPUT_NAME: pixel_values})
        scores.append(np.array(result[compiled.output(OUTPUT_NAMES[0])]))
        maps.append(np.array(result[compiled.output(OUTPUT_NAMES[1])]))
    return np.concatenate(scores), np.concatenate(maps)


def accuracy_figures(reference: tuple, candidate: tuple) -> dict:
    """Per-image map Pearson correlation (min, mean) and |Δscore| (max, mean) of `candidate` against
    `reference`, each an (anomaly_score (N,), anomaly_map (N, S, S)) pair."""
    import numpy as np

    ref_maps = reference[1].reshape(len(reference[1]), -1).astype(np.float64)
    maps = candidate[1].reshape(len(candidate[1]), -1).astype(np.float64)
    ref_maps = ref_maps - ref_maps.mean(1, keepdims=True)
    maps = maps - maps.mean(1, keepdims=True)
    pearson = (ref_maps * maps).sum(1) / np.maximum(np.linalg.norm(ref_maps, axis=1) * np.linalg.norm(maps, axis=1),
                                                     1e-300)
    delta = np.abs(candidate[0].astype(np.float64) - reference[0].astype(np.float64))
    return {
        "images": int(len(delta)),
        "map_pearson_min": round(float(pearson.min()), 6),
        "map_pearson_mean": round(float(pearson.mean()), 6),
        "map_abs_diff_max": round(float(np.abs(candidate[1] - reference[1]).max()), 6),
        "score_abs_diff_max": round(float(delta.max()), 6),
        "score_abs_diff_mean": round(float(delta.mean()), 6),
    }


def quantize_int8(ov_model, calibration: list, ignored_patterns: Sequence[str] = INT8_IGNORED_PATTERNS,
                  advanced: dict | None = None, subset_size: int | None = None):
    """NNCF post-training INT8 quantisation of an OpenVINO model on `calibration` (a list of `pixel_values`
    arrays); nodes matching `ignored_patterns` stay in floating point; `advanced`: keyword arguments of
    `nncf.AdvancedQuantizationParameters`."""
    import nncf

    advanced_parameters = nncf.AdvancedQuantizationParameters(**advanced) if advanced else None
    nncf.set_log_level(logging.WARNING)  # its INFO lines list every node it leaves alone; progress bars remain
    return nncf.quantize(
        ov_model,
        nncf.Dataset(calibration, lambda pixel_values: {INPUT_NAME: pixel_values}),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=subset_size or len(calibration),
        ignored_scope=nncf.IgnoredScope(patterns=list(ignored_patterns), validate=False) if ignored_patterns else None,
        advanced_parameters=advanced_parameters,
    )


def _readme(info: dict) -> str:
    size = info["image_size"]
    runtime = "onnxruntime" if info["format"] == "onnx" else "openvino"
    model_file = ONNX_FILE if info["format"] == "onnx" else OPENVINO_FILE
    lines = [
        f"# ViP²-CLIP anomaly detector — {info['format']} {info['precision']} export",
        "",
        f"Exported by `vip2clip export` from `{info['source']}` ({info['exported_at']}).",
        "",
        "## What is inside",
        f"- `{model_file}`" + (f" (+ `{ONNX_DATA_FILE}`, external weights)" if info.get("external_data") else "")
        + (" (+ `openvino_model.bin`)" if info["format"] == "openvino" else "")
        + f": one input `{INPUT_NAME}` (B, 3, {size}, {size}) float32, any batch B; outputs "
        f"`anomaly_score` (B,) in [0, 1] and `anomaly_map` (B, {size}, {size}) in [0, 1] (blurred).",
        "- `preprocessor_config.json`: the preprocessing — RGB, PIL bicubic resize to "
        f"{size}×{size}, /255, OpenAI CLIP mean/std.",
        "- `config.json`: the model's ViP2CLIPConfig (thresholds included when calibrated); "
        "`configuration_vip2clip.py` and `processing_vip2clip.py` are transformers' remote-code copies, for "
        "`AutoConfig` / `AutoProcessor` (they need torch; the inferencer below does not).",
        f"- `{INFO_FILE}`: format, precision, opset, source, versions" + (", INT8 accuracy" if info.get("int8") else "") + ".",
        f"- `{RUNTIME_FILE}`: a torch-free inferencer (numpy, Pillow, {runtime}).",
        "",
        "## How to run it",
        "```bash",
        f"pip install numpy pillow {runtime}",
        f"python {RUNTIME_FILE} . part.png        # one JSON line per image: score, map maximum",
        "```",
        "```python",
        "from PIL import Image",
        "from vip2clip_runtime import ExportedViP2CLIP",
        "model = ExportedViP2CLIP.from_folder('.')",
        "output = model(model.preprocess([Image.open('part.png')]))",
        "output.anomaly_score, output.anomaly_map   # numpy",
        "```",
        "With the vip2clip package installed, `vip2clip predict --model THIS_FOLDER images/` and the demo accept this",
        "folder like a model folder.",
    ]
    if info.get("int8"):
        accuracy = info["int8"]["accuracy_vs_fp32"]
        lines += [
            "",
            "## INT8 accuracy",
            f"Against the f32 export on {accuracy['images']} {info['int8']['accuracy_on']}: minimum per-image map "
            f"Pearson {accuracy['map_pearson_min']}, maximum |Δscore| {accuracy['score_abs_diff_max']}. "
            f"Calibrated on {info['int8']['calibration_images']} images from `{info['int8']['calibration_source']}`.",
        ]
    return "\n".join(lines) + "\n"


def export(
    model,
    out_dir: Any,
    *,
    processor=None,
    format: str = "onnx",
    int8: bool = False,
    calibration_images: Any = None,
    calibration_size: int = 300,
    calibration_options: dict | None = None,
    opset: int = DEFAULT_OPSET,
    source: str | None = None,
    external_data: bool | None = None,
    int8_ignored_patterns: Sequence[str] = INT8_IGNORED_PATTERNS,
    int8_advanced_parameters: dict | None = None,
    accuracy_images: int = 16,
    overwrite: bool = False,
    progress: bool = True,
    two_graphs: bool = False,
) -> Path:
    """Export `model` (a model folder or Hub id, loaded in float32 on CPU; or a loaded float32 `ViP2CLIPModel` on
    CPU with its `processor`) to `out_dir`; returns the folder.

    Args:
        format: "onnx" (ONNX Runtime) or "openvino" (OpenVINO IR, f32 weights).
        int8: OpenVINO only — NNCF post-training quantisation on `calibration_images`.
        two_graphs: with `int8`, the INT8 tower and the f32 heads as two OpenVINO graphs, the tower's float ops in
            bf16 where the CPU has it (`export_two_graphs.py`; docs/deployment.md).
        calibration_images: a list of images (PIL / arrays), or a saved dataset folder, an image folder or a
            glob; `calibration_size` of them are used (all when fewer). Extra images (up to `accuracy_images`)
            are held out to measure the INT8 accuracy; without extras it is measured on calibration images.
        calibration_options: for a dataset, the keywords of `data.load_anomaly_dataset` (`split`, the columns and
            `normal_labels` of `data.schema_options`): it is opened like every command opens a dataset.
        opset: ONNX opset of the traced graph.
        source: recorded in export_info.json (default: the folder / Hub id given as `model`).
        external_data: ONNX weights in a separate file; `None` = only when over protobuf's 2 GB.
        int8_ignored_patterns: NNCF node-name patterns kept in floating point (default `INT8_IGNORED_PATTERNS`).
        int8_advanced_parameters: keyword arguments of `nncf.AdvancedQuantizationParameters` (e.g.
            `{"smooth_quant_alpha": 0.5}`), for experiments.
    """
    if calibration_size < 1:
        raise UsageError(f"--calibration-size {calibration_size} must be at least 1")
    if calibration_images is not None and not int8:
        raise UsageError("--calibration-dataset is only used with --int8; add --int8 or drop it")
    import torch

    if format not in ("onnx", "openvino"):
        raise UsageError(f"--format {format!r} is not supported; use onnx or openvino")
    if int8 and format != "openvino":
        raise UsageError("--int8 needs --format openvino (the quantised graph is OpenVINO's)")
    if int8 and calibration_images is None:
        raise UsageError("--int8 needs calibration images; pass --calibration-dataset DIR (a saved dataset, an image "
                         "folder or a glob of images like the ones the model will see)")
    require_extra("onnx", "onnx", "exporting to ONNX")
    if format == "openvino":
        require_extra("openvino", "openvino", "exporting to OpenVINO")
    if two_graphs and not (int8 and format == "openvino"):
        raise UsageError("--two-graphs needs --format openvino --int8")
    images, calibration_source = [], None
    if int8:
        require_extra("nncf", "openvino", "INT8 quantisation")
        # Read before the (slow) export, so that a dataset that cannot be used fails at once.
        if isinstance(calibration_images, (str, os.PathLike)):
            calibration_source = str(calibration_images)
            images = load_calibration_images(calibration_images, calibration_size + accuracy_images,
                                             **(calibration_options or {}))
        else:
            calibration_source = f"{len(calibration_images)} images passed to export"
            images = list(calibration_images)
    if isinstance(model, (str, os.PathLike)):
        if is_exported_folder(str(model)):
            raise UsageError(f"--model {model} is already an exported folder; export the torch model folder")
        from ..weights.loader import job_model_and_processor

        source = str(model) if source is None else source
        model, processor = job_model_and_processor(str(model), processor, device="cpu")
    elif processor is None:
        from ..weights.loader import job_model_and_processor

        model, processor = job_model_and_processor(model)
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32 or parameter.device.type != "cpu":
        raise UsageError(f"the model is {parameter.dtype} on {parameter.device}; export a float32 model on CPU "
                         "(load it with dtype=torch.float32, device='cpu')")
    image_size = int(model.config.image_size)
    if int(processor.image_size) != image_size:
        raise UsageError(f"the processor's image_size {processor.image_size} differs from the model's {image_size}")
    from ..run_folder import claim_output_folder, model_identity, move_into_place, staging_folder

    # Owned output folder (run_folder.py): never the model's folder; --overwrite removes only what an export wrote;
    # everything is staged inside it and renamed into place, so a failed export leaves nothing that blocks a rerun.
    manifest = {"written_by": "vip2clip export",
                "model": model_identity(source) if source is not None else {"source": type(model).__name__},
                "inputs": {"calibration": str(calibration_images) if isinstance(calibration_images, (str, os.PathLike))
                           else None},
                "options": {"format": format, "int8": int8, "opset": opset, "calibration_size": calibration_size}}
    folder = claim_output_folder(out_dir, manifest, overwrite=overwrite, model_dirs=[source], flag="--out",
                                 can_resume=False, writes=(ONNX_FILE, ONNX_DATA_FILE, OPENVINO_FILE, "openvino_model.bin",
                                                           "openvino_tower.*", "openvino_heads.*",
                                                           "config.json", "preprocessor_config.json", INFO_FILE,
                                                           "README.md", RUNTIME_FILE))
    final_dir = folder.path
    out_dir = staging_folder(folder)
    try:
        with writing(final_dir):  # a full disk's write() names no file: name the folder
            if two_graphs:  # the INT8 tower and the f32 heads as two graphs (export_two_graphs.py)
                from .export_two_graphs import export_openvino_two_graphs

                export_openvino_two_graphs(model, processor, out_dir, images, calibration_size=calibration_size,
                                           accuracy_images=accuracy_images, opset=opset, source=source, progress=progress)
            else:
                _export_into(model, processor, out_dir, format, int8, images, calibration_source, calibration_size, opset,
                             source, external_data, int8_ignored_patterns, int8_advanced_parameters, accuracy_images,
                             progress, image_size)
            move_into_place(folder, out_dir)
            folder.finish()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        folder.release()
    return final_dir


def _export_into(model, processor, out_dir: Path, format, int8, images, calibration_source, calibration_size, opset, source,
                 external_data, int8_ignored_patterns, int8_advanced_parameters, accuracy_images, progress,
                 image_size) -> None:
    """The export itself, written into `out_dir` (the staging folder)."""
    model.eval()
    fast_path = getattr(model, "cpu_onednn_vision", True)
    model.cpu_onednn_vision = False  # the mkldnn ops of the CPU fast path have no ONNX form
    started = time.time()
    try:
        onnx_path = out_dir / ONNX_FILE if format == "onnx" else out_dir / ".traced" / ONNX_FILE
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("tracing the model to ONNX (opset %d) ...", opset)
        external = _export_onnx(model, image_size, onnx_path, opset, external_data)
    finally:
        model.cpu_onednn_vision = fast_path

    info: dict = {
        "format": format,
        "precision": "int8" if int8 else "fp32",
        "opset": opset,
        "image_size": image_size,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, image_size, image_size], "dtype": "float32"},
        "outputs": {OUTPUT_NAMES[0]: ["batch"], OUTPUT_NAMES[1]: ["batch", image_size, image_size]},
        "source": str(source) if source is not None else type(model).__name__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "external_data": bool(external) if format == "onnx" else False,
    }
    if format == "openvino":
        import openvino

        ov_model = openvino.convert_model(str(onnx_path))
        info["inference_precision"] = "f32"
        if int8:
            from tqdm.auto import tqdm

            calibration = [processor(images=[image])["pixel_values"].numpy()
                           for image in tqdm(images[:calibration_size], desc="calibration images", disable=not progress)]
            held_out = images[calibration_size:calibration_size + accuracy_images]
            evaluation_images = held_out or images[:accuracy_images]
            evaluation = [processor(images=evaluation_images[i:i + 4])["pixel_values"].numpy()
                          for i in range(0, len(evaluation_images), 4)]
            logger.info("quantising to INT8 on %d calibration images ...", len(calibration))
            reference = _run_compiled(_compile_openvino(ov_model, "f32"), evaluation)
            ov_model = quantize_int8(ov_model, calibration, int8_ignored_patterns, int8_advanced_parameters)
            accuracy = accuracy_figures(reference, _run_compiled(_compile_openvino(ov_model, "f32"), evaluation))
            info["int8"] = {
                "method": "nncf.quantize (post-training, model_type=TRANSFORMER)",
                "calibration_source": calibration_source,
                "calibration_images": len(calibration),
                "ignored_patterns": list(int8_ignored_patterns),
                "advanced_parameters": int8_advanced_parameters or {},
                "accuracy_on": "held-out images" if held_out else "calibration images",
                "accuracy_vs_fp32": accuracy,
            }
            logger.info("INT8 vs f32: %s", accuracy)
        openvino.save_model(ov_model, str(out_dir / OPENVINO_FILE), compress_to_fp16=False)
        shutil.rmtree(onnx_path.parent)
    info["export_seconds"] = round(time.time() - started, 1)

    model.config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    shutil.copyfile(Path(__file__).with_name("exported_runtime.py"), out_dir / RUNTIME_FILE)
    atomic_write_json(out_dir / INFO_FILE, info)
    atomic_write_text(out_dir / "README.md", _readme(info))
    return out_dir
