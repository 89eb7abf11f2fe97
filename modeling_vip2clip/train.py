"""Train the ViP²-CLIP heads (ICA + FGP) on an auxiliary anomaly dataset (SPEC §1, §6) with 🤗 Accelerate.

The paper's protocol trains once on the *test* split of an auxiliary dataset (MVTec AD to evaluate everything
else, VisA to evaluate MVTec AD) and evaluates zero-shot on unseen datasets:

    vip2clip train --clip openai/clip-vit-large-patch14-336 --dataset /data/mvtec --output-dir runs/mvtec
    # the same, as a module, through accelerate (one or many GPUs, see below):
    accelerate launch -m modeling_vip2clip.train --clip openai/clip-vit-large-patch14-336 \\
        --dataset /data/mvtec --output-dir runs/mvtec --mixed-precision bf16

Defaults follow SPEC §6 / the authors' `train.sh`: input 518, feature layers 6 12 18 24, n_ctx 7, n_cls 3,
top-k 50, Adam with lr 1e-3 for the ICA and 1e-5 (`--fgp-lr-scale 0.01`) for the FGP, batch 8, 10 epochs,
seed 111, no augmentation. The frozen CLIP runs in eval mode under `no_grad` (the model does that).

What a run writes under `--output-dir`:

* `checkpoints/epoch_N/`: `accelerator.save_state` after every epoch, with only the trainable weights (a save
  pre-hook drops every `clip.*` tensor: a few MB instead of 1.7 GB), the Adam state, the RNG states and
  `trainer_state.json`. Each is written to `epoch_N.tmp` and renamed, so a crash mid-save never leaves a
  half-written checkpoint as the newest one; `--resume` (newest complete checkpoint, or a path) restores the
  weights, optimiser, RNG states and epoch/step counters. The per-epoch sample order comes from a
  `torch.Generator` seeded with `seed + epoch`, so a resumed run sees the same batches as an uninterrupted one
  and ends with the same weights.
* `model/`: the final model (`save_pretrained`, loadable with `AutoModel.from_pretrained(..., trust_remote_code=
  True)`) and its processor; `train_summary.json` (arguments, per-epoch losses and timings, and `num_skipped` /
  `skipped`: the unusable samples — undecodable image or mask, rejected by the processor — with path and reason,
  also logged at the end of the run; each is logged when met and left out of every epoch).
* `logs/`: tracker logs (`--report-to tensorboard`): loss, pixel_loss, image_loss per optimiser step and per epoch.
* `feature_cache/` with `--cache-features`: the frozen backbone's features of every sample (see
  `modeling_vip2clip.feature_cache`), computed in a pre-pass; every epoch then skips the vision tower.

A non-finite loss stops the run at once with an error naming the epoch, the step and the batch's images.

Multi-GPU / multi-node (DDP) — answer `accelerate config` once per machine, or write the file yourself, e.g.
`~/.cache/huggingface/accelerate/default_config.yaml` for one machine with 4 GPUs:

    compute_environment: LOCAL_MACHINE
    distributed_type: MULTI_GPU
    num_machines: 1
    num_processes: 4
    machine_rank: 0
    mixed_precision: bf16
    gpu_ids: all

then `accelerate launch -m modeling_vip2clip.train ...` (or `--config_file my.yaml`). For two machines, set
`num_machines: 2`, `num_processes: 8` (all GPUs in total), `main_process_ip`, `main_process_port` and
`machine_rank: 0`/`1` on each machine. `--batch-size` is per process: the effective batch is batch-size ×
processes × gradient-accumulation-steps (8 = the paper's: e.g. 2 GPUs × batch 4, or 1 GPU × 2 × accumulation 4).
Checkpoints, the feature cache and the output folder must be on a filesystem all processes share. Without GPUs,
`accelerate launch --cpu --num_processes 2 -m modeling_vip2clip.train ...` runs the same code on 2 CPU processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger("modeling_vip2clip.train")

__all__ = [
    "NonFiniteLossError",
    "EpochShuffleSampler",
    "build_parser",
    "add_arguments",
    "run_training",
    "run",
    "find_latest_checkpoint",
    "setup_logging",
    "main",
]

DEFAULT_FEATURE_LAYERS = [6, 12, 18, 24]
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)$")
TRAINER_STATE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch, step and batch."""


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `train` options to `parser` (shared by `vip2clip train` and `python -m modeling_vip2clip.train`)."""
    source = parser.add_argument_group("model (one of --clip / --model)")
    start = source.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--clip", metavar="CLIP_ID_OR_DIR",
        help="start from this transformers CLIP checkpoint (Hub id or folder), e.g. "
        "openai/clip-vit-large-patch14-336; the heads are initialised at random (seeded by --seed).",
    )
    start.add_argument(
        "--model", metavar="DIR",
        help="fine-tune a saved ViP2CLIP model folder (save_pretrained output or Hub id); "
        "--image-size/--feature-layers/--n-ctx/--n-cls/--top-k are then read from it.",
    )
    source.add_argument("--image-size", type=int, default=None, help="input side S with --clip (default: 518).")
    source.add_argument(
        "--feature-layers", type=int, nargs="+", default=None, metavar="L",
        help="1-based vision blocks feeding the patch features, with --clip (default: 6 12 18 24).",
    )
    source.add_argument("--n-ctx", type=int, default=None, help="learnable context tokens per state prompt, with --clip (default: 7).")
    source.add_argument("--n-cls", type=int, default=None, help="image-conditioned class tokens, with --clip (default: 3).")
    source.add_argument("--top-k", type=int, default=None, help="patches per layer behind the image score, with --clip (default: 50).")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", required=True, metavar="ID_OR_PATH",
        help="training data: a raw benchmark folder (MVTec tree, VisA split_csv, meta.json, good/bad folders), a "
        "folder written by `vip2clip convert`/save_to_disk, or a Hub dataset id.",
    )
    data.add_argument(
        "--split", default="test",
        help="split to train on (default: test — the paper trains on the auxiliary dataset's test split).",
    )
    data.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="train on these categories only (default: all).")
    data.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (default: 2).")

    optim = parser.add_argument_group("optimisation (SPEC §6)")
    optim.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10).")
    optim.add_argument("--batch-size", type=int, default=8, help="images per batch and process (default: 8).")
    optim.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the ICA (default: 1e-3).")
    optim.add_argument(
        "--fgp-lr-scale", type=float, default=0.01,
        help="FGP learning rate = lr x this (default: 0.01, i.e. 1e-5).",
    )
    optim.add_argument(
        "--gradient-accumulation-steps", type=int, default=1,
        help="micro-batches per optimiser step (default: 1).",
    )
    optim.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
        help="autocast precision of the forward pass (default: no, fp32 like the reference).",
    )
    optim.add_argument("--seed", type=int, default=111, help="seed of the head init and of the sample order (default: 111).")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="vip2clip-train", help="where checkpoints, logs and the final model go (default: vip2clip-train).")
    run.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints (no value), or from the given "
        "checkpoint folder; starts from scratch, with a warning, when there is none.",
    )
    run.add_argument(
        "--overwrite-output-dir", action="store_true",
        help="delete existing checkpoints in OUTPUT_DIR when not resuming (default: refuse to start).",
    )
    run.add_argument(
        "--cache-features", nargs="?", const="auto", default=None, metavar="DIR",
        help="cache the frozen backbone's features on disk (default folder: OUTPUT_DIR/feature_cache) in a pre-pass "
        "and train every epoch from the cache, skipping the vision tower; a stale cache (other backbone, "
        "processor, dataset or dtype) is rebuilt. Off by default.",
    )
    run.add_argument(
        "--cache-dtype", choices=["float32", "float16"], default="float32",
        help="storage dtype of cached features (default: float32, identical losses; float16 halves the disk size).",
    )
    run.add_argument(
        "--report-to", default="tensorboard", choices=["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "all", "none"],
        help="experiment tracker for loss/pixel_loss/image_loss (default: tensorboard, in OUTPUT_DIR/logs; none disables).",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars.")
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "vip2clip train",
        description="Train the ViP2-CLIP prompt heads (ICA, FGP) on an auxiliary anomaly dataset with Accelerate. "
        "Run it directly, or under `accelerate launch -m modeling_vip2clip.train` for multi-GPU / multi-node.",
    )
    return add_arguments(parser)


def setup_logging() -> None:
    """Console logging for the command-line entry points: our INFO messages, Accelerate's warnings only."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("accelerate", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------------- pieces


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A random permutation per epoch from `torch.Generator().manual_seed(seed + epoch)`.

    Deterministic in (seed, epoch) alone, so a run resumed at epoch e reproduces the order of an uninterrupted
    run; Accelerate calls `set_epoch` on it through the prepared DataLoader. (No `generator` attribute on
    purpose: Accelerate would otherwise re-seed it.)
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=rng).tolist())

    def __len__(self) -> int:
        return self.num_samples


class _TrainStep(nn.Module):
    """What Accelerate prepares (and DDP wraps): one forward from images *or* from cached backbone features.

    DDP only synchronises gradients of forwards that go through its wrapper, so the cached path
    (`score_features`) needs this module rather than a direct call on the model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, labels, masks, pixel_values=None, image_embeds=None, patch_embeds=None):
        if pixel_values is not None:
            output = self.model(pixel_values=pixel_values, labels=labels, masks=masks)
        else:
            output = self.model.score_features(image_embeds, patch_embeds, labels=labels, masks=masks)
        return output.loss, output.pixel_loss, output.image_loss


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def is_backbone_key(key: str) -> bool:
    """True for a state-dict key of the frozen CLIP (also under the DDP / step-wrapper prefixes)."""
    return _strip_prefixes(key).startswith("clip.")


def _drop_backbone_weights(models: list, weights: list, output_dir: str) -> None:
    """`save_state` pre-hook: keep only the heads (CLIP is frozen and re-loaded from --clip/--model)."""
    for state in weights:
        for key in [key for key in state if is_backbone_key(key)]:
            del state[key]


def _check_checkpoint_keys(models: list, input_dir: str) -> None:
    """`load_state` pre-hook: every head weight must be in the checkpoint, since it is loaded non-strictly."""
    from safetensors import safe_open

    for position, model in enumerate(models):
        name = "model.safetensors" if position == 0 else f"model_{position}.safetensors"
        path = Path(input_dir) / name
        if not path.is_file():
            continue  # accelerate falls back to pytorch_model.bin, loaded non-strictly as well
        with safe_open(str(path), framework="pt") as handle:
            saved = set(handle.keys())
        wanted = {key for key in model.state_dict() if not is_backbone_key(key)}
        missing = sorted(wanted - saved)
        if missing:
            raise ValueError(
                f"checkpoint {input_dir} lacks {len(missing)} head weights (e.g. {missing[:3]}); it was written by a "
                "model with another architecture (--n-ctx/--n-cls/...) — resume with the original settings."
            )


def find_latest_checkpoint(checkpoint_root: str | os.PathLike) -> Path | None:
    """Newest complete `epoch_N` folder (a `.tmp` one, or one without trainer_state.json, is never picked)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return None
    found = []
    for entry in root.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and (entry / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), entry))
    return max(found)[1] if found else None


def _describe_batch(batch: dict, limit: int = 16) -> str:
    paths = list(batch.get("image_path", []))
    indices = list(batch.get("index", []))
    pairs = [f"{path} (index {index})" for path, index in zip(paths, indices)]
    more = f" ... and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return ", ".join(pairs[:limit]) + more


def _batch_size_of(batch: dict) -> int:
    return int(batch["labels"].shape[0])


def _load_model_and_processor(args):
    from .modeling_vip2clip import ViP2CLIPModel
    from .processing_vip2clip import ViP2CLIPProcessor

    if args.clip:
        config_kwargs = {
            "feature_layers": args.feature_layers or DEFAULT_FEATURE_LAYERS,
            "n_ctx": 7 if args.n_ctx is None else args.n_ctx,
            "n_cls": 3 if args.n_cls is None else args.n_cls,
            "top_k": 50 if args.top_k is None else args.top_k,
        }
        image_size = 518 if args.image_size is None else args.image_size
        model = ViP2CLIPModel.from_clip(args.clip, image_size=image_size, **config_kwargs)
        processor = ViP2CLIPProcessor(image_size=image_size)
    else:
        ignored = [flag for flag, value in (("--image-size", args.image_size), ("--feature-layers", args.feature_layers),
                                              ("--n-ctx", args.n_ctx), ("--n-cls", args.n_cls), ("--top-k", args.top_k))
                   if value is not None]
        if ignored:
            logger.warning("%s ignored with --model: the saved model's config decides them.", ", ".join(ignored))
        model = ViP2CLIPModel.from_pretrained(args.model, dtype=torch.float32)
        try:
            processor = ViP2CLIPProcessor.from_pretrained(args.model)
        except (OSError, ValueError):
            processor = ViP2CLIPProcessor(image_size=model.config.image_size)
    if int(processor.image_size) != model.config.image_size:
        raise ValueError(f"processor image_size {processor.image_size} != model input size {model.config.image_size}.")
    return model, processor


def _tracker_config(args) -> dict[str, Any]:
    config = {}
    for key, value in vars(args).items():
        if isinstance(value, (int, float, str, bool)):
            config[key] = value
        elif value is not None:
            config[key] = str(value)
    return config


def check_distributed_setup(accelerator) -> None:
    """Refuse a launcher that started several processes that Accelerate does not see as one distributed job.

    E.g. `accelerate launch --multi_gpu` (torchrun) on a machine without GPUs: every process would train alone and
    overwrite the others' checkpoints. On CPUs set `ACCELERATE_USE_CPU=true` (see docs/training.md).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"the launcher started {world_size} processes (WORLD_SIZE={world_size}) but Accelerate runs this one "
            "alone (no GPU found?). For several CPU processes use `ACCELERATE_USE_CPU=true accelerate launch "
            "--multi_gpu --num_processes N -m ...` (or torchrun with ACCELERATE_USE_CPU=1)."
        )


def _test_pause(variable: str, at: int) -> None:
    """TEST-ONLY hook (tests/test_interruptions.py), a no-op unless `variable` is set in the environment.

    With `variable="N:SECONDS"`, print one line to stderr and sleep SECONDS when `at == N`, so that a test can
    SIGKILL the process at that exact point (in the middle of an epoch, while a checkpoint is being written, in the
    middle of an evaluation). Variables: VIP2CLIP_TEST_PAUSE_AFTER_STEP (after optimiser step N),
    VIP2CLIP_TEST_PAUSE_IN_CHECKPOINT (while epoch_N.tmp is written, before its rename),
    VIP2CLIP_TEST_PAUSE_AFTER_BATCH (evaluate: after batch N's partial results are written).
    """
    spec = os.environ.get(variable)
    if not spec:
        return
    target, _, seconds = spec.partition(":")
    if int(target) == int(at):
        print(f"[test hook] {variable}: pausing {seconds} s at {at}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 0))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- feature cache


class _CollateRecordingBad:
    """`collate_skip_bad` that also returns the rows it dropped: `bad_index` (for the cache's status) and
    `bad_samples` ({index, image_path, reason}, for the end-of-run summary; the collate may run in a worker)."""

    def __init__(self):
        from .data import SkipBadCollate

        self.inner = SkipBadCollate()

    def __call__(self, rows):
        bad_rows = [row for row in rows if bool(row.get("bad", False))]
        out = self.inner(rows)
        out["bad_index"] = [int(row["index"]) for row in bad_rows]
        out["bad_samples"] = [{"index": int(row["index"]), "image_path": str(row.get("image_path", "")),
                               "reason": str(row.get("error", ""))} for row in bad_rows]
        return out


def _build_feature_cache(accelerator, model, processor, dataset, torch_dataset, args, dataset_fp: str):
    """Pre-pass: each process encodes its share of the samples once and writes them to the shared memory maps."""
    from .feature_cache import FeatureCache, cache_key

    directory = Path(args.output_dir) / "feature_cache" if args.cache_features == "auto" else Path(args.cache_features)
    key = cache_key(model, processor, dataset, args.cache_dtype, accelerator.mixed_precision, dataset_fp=dataset_fp)
    cache = FeatureCache(directory)
    if cache.is_valid(key):
        logger.info("reusing the feature cache in %s", directory)
        return cache.open("r"), 0.0
    reason = cache.stale_reason(key)
    accelerator.wait_for_everyone()  # everyone has read the old index before the main process deletes it
    config = model.config
    if accelerator.is_main_process:
        logger.info("building the feature cache in %s (%s)", directory, reason)
        cache.create(key, len(dataset), config.projection_dim,
                     (len(config.feature_layers), config.num_patches, config.projection_dim), config.image_size)
    accelerator.wait_for_everyone()
    cache.open("r+")
    started = time.perf_counter()
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch_dataset, batch_size=args.batch_size, sampler=mine, collate_fn=_CollateRecordingBad(),
        num_workers=args.num_workers,
    )
    from tqdm.auto import tqdm

    encoder = model  # the bare model: no gradients, no DDP
    with torch.no_grad():
        for batch in tqdm(loader, desc="caching features", disable=args.no_progress or not accelerator.is_local_main_process):
            cache.mark_bad(batch["bad_index"])
            if not batch["index"]:
                continue
            with accelerator.autocast():
                image_embeds, patch_embeds = encoder.encode_image(batch["pixel_values"].to(accelerator.device))
            cache.write(batch["index"], image_embeds, patch_embeds, batch["masks"], batch["labels"], batch["has_mask"])
    cache.flush()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        index = cache.finalize()
        logger.info("feature cache complete: %d samples, %d unusable", index["num_ok"], index["num_bad"])
    accelerator.wait_for_everyone()
    return cache.open("r"), time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------- training


def _save_checkpoint(accelerator, checkpoint_root: Path, epoch: int, trainer_state: dict) -> Path:
    """`save_state` into epoch_N.tmp, then an atomic rename to epoch_N (all processes call this)."""
    final = checkpoint_root / f"epoch_{epoch}"
    tmp = checkpoint_root / f"epoch_{epoch}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / TRAINER_STATE, trainer_state)  # written last: marks the folder complete
        _test_pause("VIP2CLIP_TEST_PAUSE_IN_CHECKPOINT", epoch)  # test-only, no-op unless set
        if final.exists():  # re-training over an old run (--overwrite-output-dir)
            old = checkpoint_root / f"epoch_{epoch}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def run_training(
    args: argparse.Namespace,
    model: nn.Module | None = None,
    processor: Any | None = None,
    train_dataset: Any | None = None,
) -> dict[str, Any]:
    """Train with the options of :func:`build_parser`; returns a summary dict.

    `model`/`processor` replace the ones `--clip`/`--model` would load (benchmarks, tests); `train_dataset`
    replaces the torch dataset built from `--dataset` (any map-style dataset yielding the rows of
    `modeling_vip2clip.data.TorchAnomalyDataset`; the feature cache needs the `--dataset` one).

    Summary: `history` (one entry per optimiser step of this invocation: epoch, step, loss, pixel_loss,
    image_loss), `epochs` (per epoch: mean losses and seconds, including those restored from a checkpoint),
    `global_step`, `prepass_seconds`, `model_dir`, `resumed_from`, `skipped` (the unusable samples met: index,
    image_path, reason).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from .data import load_anomaly_dataset, to_torch_dataset
    from .feature_cache import CachedFeatureDataset, collate_cached, dataset_fingerprint

    if args.epochs < 0 or args.batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise ValueError("--epochs must be >= 0, --batch-size and --gradient-accumulation-steps >= 1.")
    output_dir = Path(args.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    check_distributed_setup(accelerator)

    # ---- where to start from
    resume_dir: Path | None = None
    if args.resume:
        resume_dir = find_latest_checkpoint(checkpoint_root) if args.resume == "latest" else Path(args.resume)
        if resume_dir is None:
            logger.warning("--resume: no complete checkpoint in %s, starting from scratch.", checkpoint_root)
        elif not (resume_dir / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"--resume {resume_dir}: not a complete checkpoint (no {TRAINER_STATE}).")
    start_over = resume_dir is None and find_latest_checkpoint(checkpoint_root) is not None
    if start_over and not args.overwrite_output_dir:  # checked by every process, so all of them stop
        raise FileExistsError(
            f"{checkpoint_root} already holds checkpoints: pass --resume to continue that run or "
            "--overwrite-output-dir to start over."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint_root.is_dir():
            for stale in checkpoint_root.glob("*.tmp"):
                logger.warning("removing %s, left by a run interrupted while saving a checkpoint", stale)
                shutil.rmtree(stale)
            if start_over:
                shutil.rmtree(checkpoint_root)
    accelerator.wait_for_everyone()

    # ---- model, data, optimiser
    set_seed(args.seed)
    if model is None:
        model, processor = _load_model_and_processor(args)
    elif processor is None:
        from .processing_vip2clip import ViP2CLIPProcessor

        processor = ViP2CLIPProcessor(image_size=model.config.image_size)
    model = model.float()
    # The reference FGP owns a temperature it never uses (SPEC §4): no gradient ever reaches it, and DDP refuses
    # trainable parameters that get none, so it is frozen during training (Adam would leave it unchanged anyway).
    unused = [parameter for name, parameter in model.named_parameters() if name.endswith("unused_temperature")]
    for parameter in unused:
        parameter.requires_grad_(False)

    dataset = None
    dataset_fp = None
    if train_dataset is None:
        dataset = load_anomaly_dataset(args.dataset, split=args.split, categories=args.categories)
        if len(dataset) == 0:
            raise ValueError(f"{args.dataset} (split {args.split!r}) has no samples to train on.")
        dataset_fp = dataset_fingerprint(dataset)
        train_dataset = to_torch_dataset(dataset, processor)
    num_samples = len(train_dataset)

    skipped: dict[int, dict] = {}  # unusable samples met by this process: index -> {index, image_path, reason}
    prepass_seconds = 0.0
    if args.cache_features:
        if dataset is None:
            raise ValueError("--cache-features needs the dataset given by --dataset (not a custom train_dataset).")
        model.to(accelerator.device)
        cache, prepass_seconds = _build_feature_cache(accelerator, model, processor, dataset, train_dataset, args, dataset_fp)
        loader_dataset = CachedFeatureDataset(cache, image_paths=dataset["image_path"])
        collate = collate_cached
        import numpy as np

        from .feature_cache import STATUS_BAD

        paths = dataset["image_path"]
        skipped = {int(i): {"index": int(i), "image_path": str(paths[int(i)]),
                            "reason": "unusable when the feature cache was built (its pre-pass log has the reason)"}
                   for i in np.flatnonzero(np.asarray(cache["status"]) == STATUS_BAD)}
    else:
        loader_dataset = train_dataset
        collate = _CollateRecordingBad()
    sampler = EpochShuffleSampler(num_samples, args.seed)
    loader = torch.utils.data.DataLoader(
        loader_dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
        num_workers=args.num_workers, persistent_workers=False,
    )

    groups = model.trainable_parameter_groups()
    optimizer = torch.optim.Adam(
        [
            {"params": [p for p in groups["ica"] if p.requires_grad], "lr": args.lr},
            {"params": [p for p in groups["fgp"] if p.requires_grad], "lr": args.lr * args.fgp_lr_scale},
        ]
    )
    step_module = _TrainStep(model)
    step_module, optimizer, loader = accelerator.prepare(step_module, optimizer, loader)
    accelerator.register_save_state_pre_hook(_drop_backbone_weights)
    accelerator.register_load_state_pre_hook(_check_checkpoint_keys)

    run_state = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "num_samples": num_samples,
        "dataset_fingerprint": dataset_fp,
        "model_config": model.config.to_diff_dict() if hasattr(model.config, "to_diff_dict") else None,
    }
    start_epoch, global_step, epoch_log = 0, 0, []
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir), strict=False)
        saved = json.loads((resume_dir / TRAINER_STATE).read_text(encoding="utf-8"))
        start_epoch, global_step, epoch_log = int(saved["epoch"]), int(saved["global_step"]), list(saved.get("epochs", []))
        for key in ("seed", "batch_size", "gradient_accumulation_steps", "num_processes", "num_samples", "dataset_fingerprint"):
            if key in saved and saved[key] != run_state[key]:
                logger.warning("resuming with %s=%r but the checkpoint was written with %r: the run will not match an "
                               "uninterrupted one exactly.", key, run_state[key], saved[key])
        logger.info("resumed from %s: %d epochs done, %d optimiser steps", resume_dir, start_epoch, global_step)

    if log_with:
        accelerator.init_trackers("vip2clip", config=_tracker_config(args))

    # ---- loop
    history: list[dict[str, Any]] = []
    window: list[torch.Tensor] = []  # per micro-batch (loss, pixel_loss, image_loss) since the last optimiser step
    step_module.train()
    try:
        for epoch in range(start_epoch, args.epochs):
            loader.set_epoch(epoch)
            epoch_started = time.perf_counter()
            sums = torch.zeros(3, dtype=torch.float64)
            batches = 0
            progress = tqdm(
                loader, desc=f"epoch {epoch + 1}/{args.epochs}",
                disable=args.no_progress or not accelerator.is_local_main_process,
            )
            for batch_number, batch in enumerate(progress, start=1):
                for item in batch.get("bad_samples", ()):
                    skipped.setdefault(int(item["index"]), item)
                empty = _batch_size_of(batch) == 0
                if empty and accelerator.num_processes == 1:
                    logger.warning("epoch %d batch %d: every sample was unusable, skipped", epoch + 1, batch_number)
                    continue
                with accelerator.accumulate(step_module):
                    if empty:  # keep the DDP collectives in step with the other processes: a zero contribution
                        loss = sum(p.sum() * 0.0 for p in step_module.parameters() if p.requires_grad)
                        parts = torch.zeros(3, device=accelerator.device)
                    else:
                        inputs = {"labels": batch["labels"], "masks": batch["masks"]}
                        if "pixel_values" in batch:
                            inputs["pixel_values"] = batch["pixel_values"]
                        else:
                            inputs["image_embeds"] = batch["image_embeds"]
                            inputs["patch_embeds"] = batch["patch_embeds"]
                        loss, pixel_loss, image_loss = step_module(**inputs)
                        parts = torch.stack([loss.detach(), pixel_loss.detach(), image_loss.detach()]).float()
                    not_finite = torch.tensor(0.0 if bool(torch.isfinite(parts).all()) else 1.0, device=accelerator.device)
                    if accelerator.num_processes > 1:
                        not_finite = accelerator.reduce(not_finite, "sum")
                    if not_finite.item() > 0:
                        where = (
                            f"epoch {epoch + 1}, step {global_step + 1} (batch {batch_number} of the epoch)"
                        )
                        if bool(torch.isfinite(parts).all()):
                            message = f"non-finite training loss on another process at {where}."
                        else:
                            message = (
                                f"non-finite training loss at {where}: loss={parts[0].item()}, "
                                f"pixel_loss={parts[1].item()}, image_loss={parts[2].item()}; batch images: "
                                f"{_describe_batch(batch)}. Check these images and the learning rate; "
                                "training stopped."
                            )
                        raise NonFiniteLossError(message)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.append(parts)
                if not empty:
                    sums += parts.double().cpu()
                    batches += 1
                if accelerator.sync_gradients:
                    global_step += 1
                    mean = torch.stack(window).mean(0)
                    window.clear()
                    if accelerator.num_processes > 1:
                        mean = accelerator.reduce(mean, "mean")
                    record = {"epoch": epoch + 1, "step": global_step, "loss": mean[0].item(),
                              "pixel_loss": mean[1].item(), "image_loss": mean[2].item()}
                    history.append(record)
                    if log_with:
                        accelerator.log({k: record[k] for k in ("loss", "pixel_loss", "image_loss")}, step=global_step)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", step=global_step)
                    _test_pause("VIP2CLIP_TEST_PAUSE_AFTER_STEP", global_step)  # test-only, no-op unless set
            seconds = time.perf_counter() - epoch_started
            means = sums / max(batches, 1)
            if accelerator.num_processes > 1:
                means = accelerator.reduce(means.to(accelerator.device), "mean").cpu()
            entry = {"epoch": epoch + 1, "loss": means[0].item(), "pixel_loss": means[1].item(),
                     "image_loss": means[2].item(), "seconds": seconds, "global_step": global_step}
            epoch_log.append(entry)
            logger.info("epoch [%d/%d] loss %.4f pixel_loss %.4f image_loss %.4f (%.1f s)", epoch + 1, args.epochs,
                        entry["loss"], entry["pixel_loss"], entry["image_loss"], seconds)
            if log_with:
                accelerator.log({"epoch_loss": entry["loss"], "epoch_pixel_loss": entry["pixel_loss"],
                                 "epoch_image_loss": entry["image_loss"], "epoch": epoch + 1}, step=global_step)
            _save_checkpoint(accelerator, checkpoint_root, epoch + 1,
                             {**run_state, "epoch": epoch + 1, "global_step": global_step, "epochs": epoch_log})
    finally:
        for parameter in unused:
            parameter.requires_grad_(True)
        if log_with:
            # Trackers only: `end_training` would also destroy the process group that the gather and the final save
            # below still need; `run` tears it down once training has returned.
            for tracker in accelerator.trackers:
                tracker.finish()

    # ---- unusable samples, over all processes
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        for item in gather_object(list(skipped.values())):
            skipped.setdefault(int(item["index"]), item)
    skipped_list = [skipped[index] for index in sorted(skipped)]
    if skipped_list:
        logger.warning(
            "%d unusable training sample(s) skipped in every epoch: %s", len(skipped_list),
            "; ".join(f"{item['image_path']} (index {item['index']}): {item['reason']}" for item in skipped_list),
        )

    # ---- final model
    model_dir = output_dir / "model"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(step_module).model
        final_model.save_pretrained(str(model_dir))
        processor.save_pretrained(str(model_dir))
        _write_json(output_dir / "train_summary.json", {
            "args": vars(args), "epochs": epoch_log, "global_step": global_step,
            "prepass_seconds": prepass_seconds, "resumed_from": str(resume_dir) if resume_dir else None,
            "num_processes": accelerator.num_processes, "model_dir": str(model_dir),
            "num_skipped": len(skipped_list), "skipped": skipped_list,
        })
        logger.info("saved the trained model to %s", model_dir)
    accelerator.wait_for_everyone()
    return {
        "history": history,
        "epochs": epoch_log,
        "global_step": global_step,
        "prepass_seconds": prepass_seconds,
        "model_dir": str(model_dir),
        "resumed_from": str(resume_dir) if resume_dir else None,
        "skipped": skipped_list,
        "model": accelerator.unwrap_model(step_module).model,
    }


def run(args: argparse.Namespace) -> int:
    """Entry point of `vip2clip train` once the arguments are parsed: logging, training, exit status."""
    setup_logging()
    try:
        run_training(args)
    except (NonFiniteLossError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        teardown_distributed()
    return 0


def teardown_distributed() -> None:
    """Destroy the process group of an `accelerate launch` run before the interpreter exits.

    A group left alive at exit lets gloo's threads be destroyed while still joinable: the process then aborts
    ("terminate called without an active exception", SIGABRT) after a run that succeeded, and the launcher reports
    a failure.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_vip2clip.train` / `accelerate launch -m modeling_vip2clip.train`."""
    return run(build_parser(prog="modeling_vip2clip.train").parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
