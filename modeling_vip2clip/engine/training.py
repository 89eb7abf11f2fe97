"""The training loop of the ViP²-CLIP heads (ICA + FGP) under 🤗 Accelerate (docs/method.md §6, docs/training.md).

`train(dataset, output_dir, *, clip=... | model=..., epochs=10, ...)` is the job behind `vip2clip train`
(`modeling_vip2clip.cli.train`), also callable from Python (`modeling_vip2clip.train`); the pieces it relies on
live under their own names: checkpoints in `checkpointing`, the backbone-feature cache and its pre-pass in
`feature_cache`, the model loader in `weights.loader`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .checkpointing import (
    check_checkpoint_keys,
    clean_checkpoint_root,
    drop_backbone_weights,
    prepare_checkpoint_root,
    read_trainer_state,
    save_checkpoint,
)
from ..errors import UsageError
from ..files import atomic_write_json
from ..distributed import check_distributed_setup
from ..weights.folder import save_model_folder
from ..weights.loader import load_model_and_processor
from ..resolve import resolve_source
from ..data.options import DatasetColumns

logger = logging.getLogger("modeling_vip2clip.cli.train")

__all__ = ["NonFiniteLossError", "EpochShuffleSampler", "PAPER_MODEL_OPTIONS", "TrainOptions", "model_options_from_args",
           "load_training_model", "train"]


@dataclass
class TrainOptions(DatasetColumns):
    """The options of :func:`train` (each one a `vip2clip train` flag of the same name; `progress` is the negation
    of `--no-progress`). `clip` or `model` (not both) says where the run starts; `image_size` ... `top_k` apply
    with `clip` (None: the paper's, `PAPER_MODEL_OPTIONS`). `mixed_precision` is Accelerate's autocast of the
    training forward (the fp32 master weights stay fp32), unlike the weight precision of predict / evaluate /
    calibrate."""

    dataset: str | None = None
    output_dir: str | os.PathLike = "vip2clip-train"
    clip: str | None = None
    model: str | None = None
    image_size: int | None = None
    feature_layers: Sequence[int] | None = None
    n_ctx: int | None = None
    n_cls: int | None = None
    top_k: int | None = None
    split: str = "test"
    categories: Sequence[str] | None = None
    epochs: int = 10
    lr: float = 1e-3
    fgp_lr_scale: float = 0.01
    gradient_accumulation_steps: int = 1
    seed: int = 111
    batch_size: int = 8
    num_workers: int = 2
    mixed_precision: str = "no"
    progress: bool = True
    resume: str | None = None
    overwrite_output_dir: bool = False
    cache_features: str | None = None
    cache_dtype: str = "float32"
    report_to: str = "tensorboard"


class NonFiniteLossError(UsageError):
    """The training loss became NaN or infinite; the message names the epoch, step and batch."""


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


def _describe_batch(batch: dict, limit: int = 16) -> str:
    paths = list(batch.get("image_path", []))
    indices = list(batch.get("index", []))
    pairs = [f"{path} (index {index})" for path, index in zip(paths, indices)]
    more = f" ... and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return ", ".join(pairs[:limit]) + more


def _batch_size_of(batch: dict) -> int:
    return int(batch["labels"].shape[0])


PAPER_MODEL_OPTIONS = {"image_size": 518, "feature_layers": [6, 12, 18, 24], "n_ctx": 7, "n_cls": 3, "top_k": 50}


def model_options_from_args(args) -> dict[str, Any]:
    """The new model's geometry with `--clip`: each option given, else the paper's (docs/method.md §2, §3, §5;
    the authors' train.sh)."""
    return {key: (default if getattr(args, key) is None else getattr(args, key))
            for key, default in PAPER_MODEL_OPTIONS.items()}


def load_training_model(args):
    """The model and processor a run starts from: `--clip` (untrained heads, seeded) or `--model` (a saved one)."""
    from ..modeling_vip2clip import ViP2CLIPModel
    from ..processing_vip2clip import ViP2CLIPProcessor

    if args.clip:
        config_kwargs = model_options_from_args(args)
        image_size = config_kwargs.pop("image_size")
        source = resolve_source(args.clip, "--clip")
        try:
            model = ViP2CLIPModel.from_clip(source, image_size=image_size, **config_kwargs)
        except (OSError, ValueError) as error:
            raise UsageError(f"--clip {args.clip}: cannot build a ViP2-CLIP model from it ({error}); pass a "
                             "transformers CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336).") from error
        processor = ViP2CLIPProcessor(image_size=image_size)
    else:
        ignored = [flag for flag, value in (("--image-size", args.image_size), ("--feature-layers", args.feature_layers),
                                              ("--n-ctx", args.n_ctx), ("--n-cls", args.n_cls), ("--top-k", args.top_k))
                   if value is not None]
        if ignored:
            logger.warning("%s ignored with --model: the saved model's config decides them.", ", ".join(ignored))
        model, processor = load_model_and_processor(args.model)
    return model, processor


def _tracker_config(args) -> dict[str, Any]:
    config = {}
    for key, value in vars(args).items():
        if isinstance(value, (int, float, str, bool)):
            config[key] = value
        elif value is not None:
            config[key] = str(value)
    return config


def train(
    dataset: str | None = None,
    output_dir: str | os.PathLike = "vip2clip-train",
    *,
    clip: str | None = None,
    model: Any = None,
    processor: Any | None = None,
    train_dataset: Any | None = None,
    **options,
) -> dict[str, Any]:
    """Train the ICA/FGP heads on `dataset` (a raw benchmark folder, a converted/saved folder, parquet files or a
    Hub id), starting from `clip` (a transformers CLIP id or folder: heads initialised at random, seeded) or
    `model` (a ViP2-CLIP model folder / Hub id, or a loaded model with its `processor`); checkpoints, logs and the
    final model go to `output_dir`. `options` are :class:`TrainOptions` (the flags of `vip2clip train`).

    `train_dataset` replaces the torch dataset built from `dataset` (benchmarks, tests: any map-style dataset
    yielding the rows of `modeling_vip2clip.data.TorchAnomalyDataset`; the feature cache needs `dataset`).

    Returns: `history` (one entry per optimiser step of this invocation: epoch, step, loss, pixel_loss,
    image_loss), `epochs` (per epoch: mean losses and seconds, including those restored from a checkpoint),
    `global_step`, `prepass_seconds`, `model_dir`, `resumed_from`, `skipped` (the unusable samples met: index,
    image_path, reason) and `model` (the trained model).
    """
    given = None if model is None or isinstance(model, (str, os.PathLike)) else model
    args = TrainOptions(dataset=dataset, output_dir=output_dir, clip=clip,
                        model=None if model is None or given is not None else str(model), **options)
    model = given
    if model is None and bool(args.clip) == bool(args.model):
        raise UsageError("train: give either clip= (--clip, a CLIP checkpoint to start from) or model= (--model, a "
                         "ViP2-CLIP model to fine-tune), not both, not neither.")
    if train_dataset is None and args.dataset is None:
        raise UsageError("train: give the training data, dataset= (--dataset ID_OR_PATH).")
    if args.epochs < 1 or args.batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise UsageError(f"--epochs {args.epochs}, --batch-size {args.batch_size}, --gradient-accumulation-steps "
                         f"{args.gradient_accumulation_steps}: each must be >= 1.")
    # ---- owned output folder (run_folder.py, docs/reliability.md): manifest + lock, on the main process only ----
    folder = _claim_output_dir(args, given) if int(os.environ.get("RANK", "0") or 0) == 0 else None
    try:
        result = _train(args, given, model, processor, train_dataset)
        if folder is not None:
            folder.finish()
        return result
    finally:
        if folder is not None:
            folder.release()


# What a run writes at the top of OUTPUT_DIR (all that --overwrite-output-dir may remove from a folder written
# before manifests existed), and the feature cache: checked before each use, kept across runs.
_RUN_ENTRIES = ("checkpoints", "logs", "model", "train_summary.json")
_CACHE_ENTRIES = ("feature_cache",)
# The options that fix the trained heads' shapes: a resume with others cannot load the checkpoint.
_GEOMETRY = ("image_size", "feature_layers", "n_ctx", "n_cls", "top_k")


def _listed(value: Sequence | None) -> list | None:
    """A tuple or list as the list its JSON reads back as (so a resume compares equal)."""
    return None if value is None else list(value)


def _claim_output_dir(args: TrainOptions, given: Any):
    """Claim `output_dir` for this run: a held folder is refused; `--resume` only with the same starting model,
    data and head geometry (named otherwise); a fresh run over results only with `--overwrite-output-dir`, which
    removes what vip2clip wrote there (checkpoints, logs, model, summary) and keeps the rest and the feature cache;
    never the model or the dataset folder, inside it or around it."""
    from ..run_folder import claim_output_folder, model_identity
    from ..weights.loader import model_name

    start = args.clip or args.model
    dataset = args.dataset
    if dataset is not None and os.path.exists(dataset):
        dataset = os.path.abspath(dataset)
    manifest = {"written_by": "vip2clip train",
                "model": model_identity(start) if start else {"source": model_name(given)},
                "inputs": {"dataset": dataset, "split": args.split, "categories": _listed(args.categories)},
                "options": {key: _listed(getattr(args, key)) if key == "feature_layers" else getattr(args, key)
                            for key in _GEOMETRY}}
    caches = list(_CACHE_ENTRIES)
    if args.cache_features and args.cache_features != "auto":  # `--cache-features OUTPUT_DIR/NAME`: a cache too
        cache = Path(args.cache_features).expanduser().resolve()
        if cache.parent == Path(args.output_dir).expanduser().resolve():
            caches.append(cache.name)
    folder = claim_output_folder(args.output_dir, manifest, resume=bool(args.resume),
                                 overwrite=args.overwrite_output_dir, writes=_RUN_ENTRIES, model_dirs=[start],
                                 input_dirs=[args.dataset], overwrite_flag="--overwrite-output-dir",
                                 reusable=caches)
    folder.record(*_RUN_ENTRIES)  # before any of them appears: a run killed while writing still owns them
    return folder


def _train(args: TrainOptions, given: Any, model: Any, processor: Any, train_dataset: Any) -> dict[str, Any]:
    """The run itself, once `train` has checked the options and claimed the folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from ..data import SkipBadCollate, load_anomaly_dataset, schema_options, to_torch_dataset
    from .feature_cache import (
        CachedFeatureDataset,
        build_feature_cache,
        cached_bad_samples,
        collate_cached,
        dataset_fingerprint,
    )

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

    # ---- where to start from (checked by every process, so all of them stop on an error)
    resume_dir, start_over = prepare_checkpoint_root(checkpoint_root, args.resume, args.overwrite_output_dir,
                                                   log=logger)
    if args.resume and resume_dir is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch.", checkpoint_root)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_checkpoint_root(checkpoint_root, start_over, logger)
    accelerator.wait_for_everyone()

    # ---- model, data, optimiser
    set_seed(args.seed)
    if model is None:
        model, processor = load_training_model(args)
    elif processor is None:
        from ..processing_vip2clip import ViP2CLIPProcessor

        processor = ViP2CLIPProcessor.for_model(model.config)
    model = model.float()
    # The reference FGP owns a temperature it never uses (docs/method.md §4): no gradient ever reaches it, and DDP refuses
    # trainable parameters that get none, so it is frozen during training (Adam would leave it unchanged anyway).
    unused = [parameter for name, parameter in model.named_parameters() if name.endswith("unused_temperature")]
    for parameter in unused:
        parameter.requires_grad_(False)

    dataset = None
    dataset_fp = None
    if train_dataset is None:
        source = resolve_source(args.dataset, "--dataset", repo_type="dataset")
        dataset = load_anomaly_dataset(source, split=args.split, categories=args.categories, **schema_options(args))
        if len(dataset) == 0:
            raise UsageError(f"--dataset {args.dataset} (--split {args.split}): no samples to train on; check the "
                             "split and --categories names.")
        dataset_fp = dataset_fingerprint(dataset)
        train_dataset = to_torch_dataset(dataset, processor)
    num_samples = len(train_dataset)

    skipped: dict[int, dict] = {}  # unusable samples met by this process: index -> {index, image_path, reason}
    prepass_seconds = 0.0
    if args.cache_features:
        if dataset is None:
            raise ValueError("--cache-features needs the dataset given by --dataset (not a custom train_dataset).")
        model.to(accelerator.device)
        directory = output_dir / "feature_cache" if args.cache_features == "auto" else Path(args.cache_features)
        cache, prepass_seconds = build_feature_cache(
            accelerator, model, processor, dataset, train_dataset, directory, batch_size=args.batch_size,
            num_workers=args.num_workers, cache_dtype=args.cache_dtype, collate_fn=SkipBadCollate(),
            dataset_fp=dataset_fp, show_progress=args.progress,
        )
        loader_dataset = CachedFeatureDataset(cache, image_paths=dataset["image_path"])
        collate = collate_cached
        skipped = cached_bad_samples(cache, dataset["image_path"])
    else:
        loader_dataset = train_dataset
        collate = SkipBadCollate()
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
    accelerator.register_save_state_pre_hook(drop_backbone_weights)
    accelerator.register_load_state_pre_hook(check_checkpoint_keys)

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
        saved = read_trainer_state(resume_dir)
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
                disable=not args.progress or not accelerator.is_local_main_process,
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
            save_checkpoint(accelerator, checkpoint_root, epoch + 1,
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
        save_model_folder(final_model, processor, model_dir)
        atomic_write_json(output_dir / "train_summary.json", {
            "args": {**vars(args), "model": args.model or (None if given is None else type(given).__name__)},
            "epochs": epoch_log, "global_step": global_step,
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


