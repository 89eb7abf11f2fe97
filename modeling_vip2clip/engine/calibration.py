"""`vip2clip calibrate --model M --dataset D [--categories ...] --out M2`: thresholds that travel with the model.

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

The weights are not touched: M2 is M's folder copied (its config rewritten), written to a temporary folder beside
M2 and renamed into place. The pattern is anomalib's post-processor: thresholds stored with the model.

Zero-shot means that the model was never *trained* on the target domain; nothing here trains either. Calibrating
the two thresholds on a few labelled target images is the user's explicit choice (a handful of normal and
anomalous images, with masks for the pixel threshold, is enough to place a threshold); without it the model
keeps the uncalibrated default of 0.5. Memory: the anomaly maps of the images that enter the pixel threshold are
kept (S² float32 each, ~1 MB at 518 px), so calibrate on hundreds of images, not on a whole production line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
from pathlib import Path

from ..errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["calibrate"]


def _dataset_name(args) -> str:
    if args.dataset_name:
        return args.dataset_name
    path = Path(args.dataset)
    return path.resolve().name if path.exists() else str(args.dataset)


def _check_out(args, model_source: str) -> Path:
    out = Path(args.out).expanduser()
    if out.exists() and Path(model_source).exists() and out.resolve() == Path(model_source).resolve():
        raise UsageError(f"--out {args.out}: is the --model folder itself; pass another folder (the original stays "
                         "uncalibrated).")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out}: is a file; pass a folder.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {args.out}: exists and is not empty; pass --overwrite to replace it, or another folder.")
    return out


def calibrate(args: argparse.Namespace, model=None, processor=None) -> dict:
    """Score the dataset, compute the thresholds and write `--out`; returns the calibration info (with the
    thresholds under `image_threshold` / `pixel_threshold`). `--normal-images`, or a dataset whose usable rows
    are all normal, takes the normal-only route (`calibrate_from_normal_images`)."""
    if getattr(args, "normal_images", None):
        return calibrate_from_normal_images(args, model, processor)
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ..post_processing.metrics import f1_max_threshold, pixel_f1_max_threshold
    from ..data.dataset_parts import open_dataset_parts
    from ..data.streams import Prepare, RowImages, StreamImages, dataset_rows, make_loader
    from ..weights.loader import load_model_and_processor
    from ..resolve import resolve_source

    source = resolve_source(args.model, "--model")
    out = _check_out(args, source)
    parts = open_dataset_parts(
        args.dataset, args.split, image_column=args.image_column, label_column=args.label_column,
        mask_column=args.mask_column, category_column=args.category_column, categories=args.categories,
        streaming=args.streaming,
    )
    for part in parts:
        columns = list(part.dataset.column_names or [])
        if "label" not in columns:
            raise UsageError(f"--label-column: --dataset {args.dataset} (split {part.name}) has no label column "
                             f"(it has: {', '.join(columns)}); pass --label-column NAME — calibration needs labels.")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, processor = load_model_and_processor(args.model, device=device)
    model = model.to(device).eval()
    prepare = Prepare(processor, with_masks=True)
    if args.streaming:
        dataset, total = StreamImages(parts, set(), 0, 1, prepare), None
    else:
        rows, ids = dataset_rows(parts)
        dataset, total = RowImages(parts, rows, ids, prepare), len(ids)
    loader = make_loader(dataset, args.batch_size, args.num_workers, pin_memory=device.type == "cuda")
    autocast = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]

    labels, scores, categories, skipped = [], [], [], []
    pixel_maps, pixel_masks = [], []
    with_mask = 0
    for batch in tqdm(loader, total=None if total is None else math.ceil(total / args.batch_size), unit="batch",
                      desc="calibrating", disable=args.no_progress):
        skipped.extend(batch["bad"])
        if not batch["items"]:
            continue
        precision = contextlib.nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast)
        with torch.inference_mode(), precision:
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
    for item_id, reason in skipped:
        print(f"skipped {item_id}: {reason}", file=sys.stderr)

    labels_array = np.asarray(labels, dtype=np.int64)
    num_normal, num_anomalous = int((labels_array == 0).sum()), int((labels_array == 1).sum())
    if num_normal and not num_anomalous:  # good parts only: a false-alarm-rate quantile instead of F1-max
        from ..post_processing.thresholds import PixelQuantile

        pixels = PixelQuantile()
        for anomaly_map in pixel_maps:
            pixels.add(anomaly_map)
        info = {"dataset": _dataset_name(args), "split": args.split, "splits": [part.name for part in parts],
                "categories": sorted(set(categories)) if any(categories) else None}
        return _write_normal_only(args, source, out, model, processor, scores, pixels, len(skipped), info)
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
        "splits": [part.name for part in parts],
        "categories": sorted(set(categories)) if any(categories) else None,
        "num_images": len(labels),
        "num_normal": num_normal,
        "num_anomalous": num_anomalous,
        "num_anomalous_with_mask": with_mask,
        "num_skipped": len(skipped),
        "image_f1_max": float(image_f1),
        "pixel_f1_max": None if pixel_f1 is None else float(pixel_f1),
        "method": "F1-max thresholds (modeling_vip2clip.post_processing.metrics.f1_max_threshold / pixel_f1_max_threshold)",
        "calibrated_from": str(args.model),
    }
    config = model.config
    config.image_threshold = float(image_threshold)
    config.pixel_threshold = None if pixel_threshold is None else float(pixel_threshold)
    config.calibration = info
    _write_model_folder(source, out, model, processor)
    return {**info, "image_threshold": config.image_threshold, "pixel_threshold": config.pixel_threshold}


def calibrate_from_normal_images(args: argparse.Namespace, model=None, processor=None) -> dict:
    """`calibrate --normal-images INPUT...`: score good parts only (files, folders, globs, @lists, as `predict`
    takes them) and place the thresholds at the `--false-alarm-rate` quantiles of their scores and map pixels
    (`post_processing.thresholds`); writes `--out` like `calibrate` and returns the calibration info."""
    import torch
    from tqdm.auto import tqdm

    from ..data.images import collect_inputs
    from ..data.streams import FileImages, Prepare, make_loader
    from ..post_processing.thresholds import PixelQuantile, check_rate
    from ..resolve import resolve_source
    from ..weights.loader import load_model_and_processor

    try:
        check_rate(args.false_alarm_rate)
    except ValueError as error:
        raise UsageError(f"--false-alarm-rate {args.false_alarm_rate}: {error}") from None
    source = resolve_source(args.model, "--model")
    out = _check_out(args, source)
    items, problems = collect_inputs(args.normal_images)
    if not items:
        raise UsageError(f"--normal-images {' '.join(args.normal_images)}: no image files found; pass a folder, a "
                         "glob or an @list of good-part images.")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, processor = load_model_and_processor(args.model, device=device)
    model = model.to(device).eval()
    loader = make_loader(FileImages(items, Prepare(processor)), args.batch_size, args.num_workers,
                         pin_memory=device.type == "cuda")
    autocast = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    scores, skipped, pixels = [], list(problems), PixelQuantile()
    for batch in tqdm(loader, total=math.ceil(len(items) / args.batch_size), unit="batch", desc="calibrating",
                      disable=args.no_progress):
        skipped.extend(batch["bad"])
        if not batch["items"]:
            continue
        precision = contextlib.nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast)
        with torch.inference_mode(), precision:
            output = model(pixel_values=batch["pixel_values"].to(device))
        for item, score, anomaly_map in zip(batch["items"], output.anomaly_score.float().cpu().tolist(),
                                            output.anomaly_map.float().cpu()):
            if not (math.isfinite(score) and bool(torch.isfinite(anomaly_map).all())):
                skipped.append((item["id"], "the model's score or map is not finite (NaN/inf)"))
                continue
            scores.append(score)
            pixels.add(anomaly_map.numpy())
    for item_id, reason in skipped:
        print(f"skipped {item_id}: {reason}", file=sys.stderr)
    if not scores:
        raise UsageError(f"--normal-images {' '.join(args.normal_images)}: none of the {len(items)} images could be "
                         "scored (see the skipped lines above).")
    info = {"normal_images": list(args.normal_images)}
    return _write_normal_only(args, source, out, model, processor, scores, pixels, len(skipped), info)


def _write_normal_only(args, source: str, out: Path, model, processor, scores: list[float], pixels, num_skipped: int,
                       info: dict) -> dict:
    """Thresholds at the false-alarm-rate quantiles of normal scores and pixels, their provenance, `--out`."""
    from ..post_processing.thresholds import false_alarm_threshold, min_images_for_rate

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
        "calibrated_from": str(args.model),
    }
    config = model.config
    config.image_threshold = float(image_threshold)
    config.pixel_threshold = float(pixel_threshold)
    config.calibration = info
    _write_model_folder(source, out, model, processor)
    return {**info, "image_threshold": config.image_threshold, "pixel_threshold": config.pixel_threshold}


def _write_model_folder(source: str, out: Path, model, processor) -> None:
    """M's folder copied to a temporary folder beside `out`, its config rewritten, renamed into place (a model
    loaded from the Hub without a local copy is saved with save_pretrained instead)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if Path(source).is_dir():
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".cache", ".git"))
            model.config.save_pretrained(tmp)  # config.json only: the weights stay byte for byte
        else:
            model.save_pretrained(tmp)
        if not (tmp / "preprocessor_config.json").is_file():
            processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
