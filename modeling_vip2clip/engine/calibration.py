"""`vip2clip calibrate --model M --dataset D [--categories ...] --out M2`: thresholds that travel with the model.
From Python: `calibrate(model, dataset, out, *, categories=None, ...)` (`modeling_vip2clip.calibrate`).

    vip2clip calibrate --model runs/mvtec/model --dataset my_labelled_set --out runs/mvtec/model-calibrated
    vip2clip predict --model runs/mvtec/model-calibrated /data/line3/      # uses the calibrated thresholds

Scores every image of a labelled dataset D (any schema: `--image-column`, `--label-column`, `--mask-column`,
`--category-column`; `--split test` also takes every `<category>.test` split) and writes a copy of the model
folder M to M2 whose config carries

* `image_threshold`: the F1-max threshold of the image score on D (`metrics.f1_max_threshold`: the lowest score t
  at which "anomalous when score >= t" reaches the best F1), which `vip2clip predict` and the pipeline use as their
  default verdict threshold (instead of 0.5);
* `pixel_threshold`: the F1-max threshold of the anomaly maps over all pixels (`metrics.pixel_f1_max_threshold`),
  when some anomalous images of D have masks (normal images count as all-normal pixels) — the default of
  `--save-masks` and of the pipeline's `mask`;
* `calibration`: where they came from — the dataset, split, categories, the counts of images (normal,
  anomalous, with a mask, skipped) and the F1 reached.

Good parts only — `vip2clip calibrate --model M --normal-images good_parts/ --false-alarm-rate 0.01 --out M2`
(or a `--dataset` whose usable rows are all normal): `image_threshold` is the (1 − rate) quantile of the normal
images' scores and `pixel_threshold` the same quantile of their map pixels (`post_processing.thresholds`), so
about `rate` of such images would be flagged; `calibration` records the method, the rate and the count, and a
warning when there are fewer than 10 / rate images. Use it when defects are rare or not yet seen (a production
line); use the labelled F1-max route when you have anomalous examples, since it balances misses against alarms.

The weights are not touched: M2 is M's folder copied (its config rewritten) by the one model-folder writer
(`weights.folder.save_model_folder`), which also makes it a complete Hub folder, staged inside the claimed M2 and
renamed into place. The pattern is anomalib's post-processor: thresholds stored with the model.

Zero-shot means that the model was never *trained* on the target domain; nothing here trains either. Calibrating
the two thresholds on a few labelled target images is the user's explicit choice (a handful of normal and
anomalous images, with masks for the pixel threshold, is enough to place a threshold); without it the model
keeps the uncalibrated default of 0.5. Under `accelerate launch` the images are sharded over the processes
(`distributed.process_state`, as in predict) and their scores gathered on every process; the main one writes M2.
Memory: the anomaly maps of the images that enter the pixel threshold are
kept (S² float32 each, ~1 MB at 518 px), so calibrate on hundreds of images, not on a whole production line.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..data.options import DatasetColumns

logger = logging.getLogger(__name__)

__all__ = ["CalibrateOptions", "calibrate"]


@dataclass
class CalibrateOptions(DatasetColumns):
    """The options of :func:`calibrate` (each one a `vip2clip calibrate` flag of the same name; `progress` is the
    negation of `--no-progress`)."""

    model: Any
    dataset: str | None
    out: str | os.PathLike
    normal_images: Sequence[str] | None = None
    false_alarm_rate: float = 0.01
    overwrite: bool = False
    split: str = "test"
    categories: Sequence[str] | None = None
    dataset_name: str | None = None
    streaming: bool = False
    device: str | None = None
    batch_size: int = 8
    num_workers: int = 2
    mixed_precision: str = "no"
    progress: bool = True


def _dataset_name(args) -> str:
    if args.dataset_name:
        return args.dataset_name
    path = Path(args.dataset)
    return path.resolve().name if path.exists() else str(args.dataset)


def _claim_out(args, model_source: str):
    """`--out`, claimed (run_folder.py): never the model folder, inside it or around it; a folder with files
    only with --overwrite, which then removes only what vip2clip wrote there."""
    from ..run_folder import claim_output_folder, model_identity
    from ..weights.loader import model_name

    manifest = {"written_by": "vip2clip calibrate", "model": model_identity(model_source or model_name(args.model)),
                "inputs": {"dataset": str(args.dataset), "split": args.split, "categories": args.categories},
                "options": {}}
    # Without a manifest (a folder from an older version), --overwrite removes only model-folder names.
    writes = ["config.json", "model*.safetensors*", "preprocessor_config.json", "*_vip2clip.py", "README.md"]
    if model_source and Path(model_source).is_dir():
        writes += [entry.name for entry in Path(model_source).iterdir()]
    return claim_output_folder(args.out, manifest, overwrite=args.overwrite, writes=writes,
                               model_dirs=[model_source], flag="--out", can_resume=False)


def calibrate(model, dataset: str | None = None, out: str | os.PathLike = "", *, processor=None, **options) -> dict:
    """Score the labelled `dataset` (a saved/converted folder, raw benchmark folder, parquet folder or Hub id) — or,
    with `normal_images=[...]` (files, folders, globs, @lists), good parts only — with `model` (a model folder or Hub
    id, or a loaded model with its `processor`), compute the thresholds (F1-max on a labelled set; the
    `false_alarm_rate` quantiles on normal images, also for a dataset whose usable rows are all normal) and write
    the calibrated copy of the model to `out`. `options` are :class:`CalibrateOptions` (the flags of
    `vip2clip calibrate`). Returns the calibration info with the thresholds under `image_threshold` /
    `pixel_threshold` (on every process of a distributed run; the main one claims and writes `out`)."""
    from ..distributed import process_state
    from ..resolve import resolve_source

    args = CalibrateOptions(model=model, dataset=dataset, out=out, **options)
    if bool(args.dataset) == bool(args.normal_images):
        raise UsageError("give either --dataset D (labelled images) or --normal-images INPUT... (good parts only), "
                         "not both, not neither.")
    if args.normal_images:
        from ..post_processing.thresholds import check_rate

        try:
            check_rate(args.false_alarm_rate)
        except ValueError as error:
            raise UsageError(f"--false-alarm-rate {args.false_alarm_rate}: {error}") from None
    source = resolve_source(str(model), "--model") if isinstance(model, (str, os.PathLike)) else ""
    procs = process_state()
    folder = _claim_out(args, source) if procs.is_main_process else None
    try:
        if args.normal_images:
            return calibrate_from_normal_images(args, source, folder, procs, model, processor)
        return _calibrate(args, source, folder, procs, model, processor)
    finally:
        if folder is not None:
            folder.release()


def _calibrate(args, source: str, folder, procs, model, processor) -> dict:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ..post_processing.metrics import f1_max_threshold, pixel_f1_max_threshold
    from ..data import load_anomaly_dataset, schema_options
    from ..data.transforms import RowImages, SampleTransform, StreamImages, dataset_rows, make_loader
    from ..weights.loader import job_model_and_processor, load_model_and_processor, model_name, precision_dtype

    dataset = load_anomaly_dataset(args.dataset, args.split, args.categories, streaming=args.streaming,
                                   **schema_options(args))
    device = torch.device(args.device or procs.device)  # Accelerate's: this process's GPU, else the CPU
    model, processor = job_model_and_processor(model, processor, device=device, mixed_precision=args.mixed_precision)
    prepare = SampleTransform(processor, with_masks=True)
    if args.streaming:
        scored, total = StreamImages(dataset, set(), procs.process_index, procs.num_processes, prepare), None
    else:
        ids, keys = dataset_rows(dataset)
        mine = list(range(len(ids)))[procs.process_index::procs.num_processes]
        scored, total = RowImages(dataset, mine, [ids[i] for i in mine], [keys[i] for i in mine], prepare), len(mine)
    loader = make_loader(scored, args.batch_size, args.num_workers, pin_memory=device.type == "cuda")

    labels, scores, categories, skipped = [], [], [], []
    pixel_maps, pixel_masks = [], []
    with_mask = 0
    for batch in tqdm(loader, total=None if total is None else math.ceil(total / args.batch_size), unit="batch",
                      desc="calibrating", disable=not args.progress or not procs.is_main_process):
        skipped.extend(batch["bad"])
        if not batch["items"]:
            continue
        with torch.inference_mode():
            output = model(pixel_values=batch["pixel_values"].to(device))
        for item, score, anomaly_map, mask in zip(batch["items"], output.anomaly_score.float().cpu().tolist(),
                                                  output.anomaly_map.float().cpu(), batch["masks"]):
            if item["label"] is None:
                skipped.append((item["id"], "no label"))
                continue
            if not (math.isfinite(score) and bool(torch.isfinite(anomaly_map).all())):
                skipped.append((item["id"], "the model's score or map is not finite (NaN/inf)"))
                continue
            labels.append(item["label"])
            scores.append(score)
            categories.append(item["category"])
            if item["label"] == 0 or item["has_mask"]:  # as the pixel metrics: normal = all-normal pixels
                pixel_maps.append(anomaly_map.numpy())
                pixel_masks.append(mask.numpy())
                with_mask += int(item["label"] == 1)
    if procs.num_processes > 1:  # every process gets every shard's results (and raises the same errors)
        from accelerate.utils import gather_object

        shards = gather_object([(labels, scores, categories, skipped, pixel_maps, pixel_masks, with_mask)])
        labels, scores, categories, skipped = ([x for shard in shards for x in shard[i]] for i in range(4))
        pixel_maps, pixel_masks = ([x for shard in shards for x in shard[i]] for i in (4, 5))
        with_mask = sum(shard[6] for shard in shards)
    if procs.is_main_process:
        for item_id, reason in skipped:
            print(f"skipped {item_id}: {reason}", file=sys.stderr)

    labels_array = np.asarray(labels, dtype=np.int64)
    num_normal, num_anomalous = int((labels_array == 0).sum()), int((labels_array == 1).sum())
    if num_normal and not num_anomalous:  # good parts only: a false-alarm-rate quantile instead of F1-max
        from ..post_processing.thresholds import PixelQuantile

        pixels = PixelQuantile()
        for anomaly_map in pixel_maps:
            pixels.add(anomaly_map)
        info = {"dataset": _dataset_name(args), "split": args.split,
                "splits": None if args.streaming else sorted({f"{category}.{split}" for category, split in zip(
                    dataset["category"], dataset["split"])}),
                "categories": sorted(set(categories)) if any(categories) else None}
        return _write_normal_only(args, source, folder, procs, model, processor, scores, pixels, len(skipped), info)
    if not num_normal or not num_anomalous:
        raise UsageError(f"--dataset {args.dataset}: {num_normal} normal and {num_anomalous} anomalous usable images "
                         f"(split {args.split}); an F1-max threshold needs both kinds — add labelled images of the "
                         "missing kind, or check --label-column / --categories.")
    image_f1, image_threshold = f1_max_threshold(labels_array, np.asarray(scores, dtype=np.float32))
    pixel_f1 = pixel_threshold = None
    if with_mask:
        pixel_f1, pixel_threshold = pixel_f1_max_threshold(np.stack(pixel_masks), np.stack(pixel_maps))
        if math.isnan(pixel_threshold):  # masks without any defect pixel
            pixel_f1 = pixel_threshold = None
    if pixel_threshold is None:
        logger.warning("no anomalous image of %s has a defect mask: pixel_threshold is left unset", args.dataset)

    info = {
        "dataset": _dataset_name(args),
        "split": args.split,
        "splits": None if args.streaming else sorted({f"{category}.{split}" for category, split in zip(
            dataset["category"], dataset["split"])}),  # <category>.<split> of the rows used
        "categories": sorted(set(categories)) if any(categories) else None,
        "num_images": len(labels),
        "num_normal": num_normal,
        "num_anomalous": num_anomalous,
        "num_anomalous_with_mask": with_mask,
        "num_skipped": len(skipped),
        "image_f1_max": float(image_f1),
        "pixel_f1_max": None if pixel_f1 is None else float(pixel_f1),
        "method": "F1-max thresholds (modeling_vip2clip.post_processing.metrics.f1_max_threshold / pixel_f1_max_threshold)",
        "calibrated_from": model_name(args.model),
    }
    if procs.is_main_process and source and precision_dtype(args.mixed_precision) is not None:
        # Scored with reduced-precision towers; the copy keeps the model's own fp32 weights and config.
        model, _ = load_model_and_processor(source)
    config = model.config
    config.image_threshold = float(image_threshold)
    config.pixel_threshold = None if pixel_threshold is None else float(pixel_threshold)
    config.calibration = info
    if folder is not None:
        _write_model_folder(source, folder, model, processor)
    procs.wait_for_everyone()
    return {**info, "image_threshold": config.image_threshold, "pixel_threshold": config.pixel_threshold}


def calibrate_from_normal_images(args, source: str, folder, procs, model, processor) -> dict:
    """`calibrate --normal-images INPUT...`: score good parts only (files, folders, globs, @lists, as `predict`
    takes them) and place the thresholds at the `--false-alarm-rate` quantiles of their scores and map pixels
    (`post_processing.thresholds`); writes `--out` like `calibrate` and returns the calibration info."""
    import torch
    from tqdm.auto import tqdm

    from ..data.images import collect_inputs
    from ..data.transforms import FileImages, SampleTransform, make_loader
    from ..post_processing.thresholds import PixelQuantile
    from ..weights.loader import job_model_and_processor

    items, problems = collect_inputs(args.normal_images)
    if not items:
        raise UsageError(f"--normal-images {' '.join(args.normal_images)}: no image files found; pass a folder, a "
                         "glob or an @list of good-part images.")
    items = items[procs.process_index::procs.num_processes]
    device = torch.device(args.device or procs.device)  # Accelerate's: this process's GPU, else the CPU
    model, processor = job_model_and_processor(model, processor, device=device, mixed_precision=args.mixed_precision)
    loader = make_loader(FileImages(items, SampleTransform(processor, with_masks=False)), args.batch_size,
                         args.num_workers, pin_memory=device.type == "cuda")
    input_dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else torch.float32
    scores, skipped, pixels = [], list(problems), PixelQuantile()
    for batch in tqdm(loader, total=math.ceil(len(items) / args.batch_size), unit="batch", desc="calibrating",
                      disable=not args.progress):
        skipped.extend(batch["bad"])
        if not batch["items"]:
            continue
        with torch.inference_mode():
            output = model(pixel_values=batch["pixel_values"].to(device=device, dtype=input_dtype))
        for item, score, anomaly_map in zip(batch["items"], output.anomaly_score.float().cpu().tolist(),
                                            output.anomaly_map.float().cpu()):
            if not (math.isfinite(score) and bool(torch.isfinite(anomaly_map).all())):
                skipped.append((item["id"], "the model's score or map is not finite (NaN/inf)"))
                continue
            scores.append(score)
            pixels.add(anomaly_map.numpy())
    for item_id, reason in skipped:
        print(f"skipped {item_id}: {reason}", file=sys.stderr)
    if procs.num_processes > 1:  # every process's scores and pixel histogram to the main one
        from accelerate.utils import gather_object

        scores = [value for part in gather_object([scores]) for value in part]
        skipped = [entry for part in gather_object([skipped]) for entry in part]
        histograms = gather_object([pixels])
        pixels = histograms[0]
        for other in histograms[1:]:
            pixels.merge(other)
    if not scores:
        raise UsageError(f"--normal-images {' '.join(args.normal_images)}: none of the {len(items)} images could be "
                         "scored (see the skipped lines above).")
    info = {"normal_images": list(args.normal_images)}
    return _write_normal_only(args, source, folder, procs, model, processor, scores, pixels, len(skipped), info)


def _write_normal_only(args, source: str, folder, procs, model, processor, scores: list[float], pixels,
                       num_skipped: int, info: dict) -> dict:
    """Thresholds at the false-alarm-rate quantiles of normal scores and pixels, their provenance, `--out`."""
    from ..post_processing.thresholds import false_alarm_threshold, min_images_for_rate
    from ..weights.loader import load_model_and_processor, model_name, precision_dtype

    rate = float(getattr(args, "false_alarm_rate", None) or 0.01)
    image_threshold = false_alarm_threshold(scores, rate)
    pixel_threshold = pixels.threshold(rate)
    needed = min_images_for_rate(rate)
    warning = None
    if len(scores) < needed:
        warning = (f"only {len(scores)} normal images for a false-alarm rate of {rate:g}: the threshold rests on the "
                   f"{max(1, round(rate * len(scores)))} highest score(s); use at least {needed} (10 / rate) images")
        logger.warning(warning)
    info = {
        **info,
        "method": "normal-only quantile (modeling_vip2clip.post_processing.thresholds): image_threshold = the "
                  "(1 - false_alarm_rate) quantile of the normal images' scores, pixel_threshold = that quantile of "
                  "their map pixels",
        "false_alarm_rate": rate,
        "num_images": len(scores),
        "num_normal": len(scores),
        "num_anomalous": 0,
        "num_skipped": num_skipped,
        "min_images_for_rate": needed,
        "warning": warning,
        "calibrated_from": model_name(args.model),
    }
    if procs.is_main_process and source and precision_dtype(args.mixed_precision) is not None:
        # Scored with reduced-precision towers; the copy keeps the model's own fp32 weights and config.
        model, _ = load_model_and_processor(source)
    config = model.config
    config.image_threshold = float(image_threshold)
    config.pixel_threshold = float(pixel_threshold)
    config.calibration = info
    if folder is not None:
        _write_model_folder(source, folder, model, processor)
    procs.wait_for_everyone()
    return {**info, "image_threshold": config.image_threshold, "pixel_threshold": config.pixel_threshold}


def _write_model_folder(source: str, folder, model, processor) -> None:
    """The calibrated model written by the one model-folder writer (`weights.folder.save_model_folder`: M's weights
    byte for byte when M is a local folder, the config rewritten, a complete Hub folder) into a staging folder
    inside the claimed `--out`, then each entry renamed into place (run_folder.py)."""
    from ..run_folder import move_into_place, staging_folder
    from ..weights.folder import save_model_folder

    staged = staging_folder(folder)
    try:
        tmp = staged / "model"
        save_model_folder(model, processor, tmp, source_folder=source if source and Path(source).is_dir() else None)
        move_into_place(folder, tmp)
        folder.finish()
    finally:
        shutil.rmtree(staged, ignore_errors=True)
