"""The evaluation loop (docs/method.md §1, §7): score a benchmark with a model, shard it over Accelerate's processes,
keep every batch in the resumable store, then compute per-category metrics and write the report.

`evaluate(model, dataset, output_dir, *, categories=None, save_maps=False, resume=False, k_shot=0, ...)` is the job
behind `vip2clip evaluate` (`modeling_vip2clip.cli.evaluate`, whose docstring describes `results.json`), also
callable from Python (`modeling_vip2clip.evaluate`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .results_store import PARTIAL_DIR, PartialResults
from ..errors import UsageError, sentence
from ..files import atomic_save, atomic_write_json, atomic_write_text
from ..distributed import check_distributed_setup
from ..data.options import DatasetColumns

logger = logging.getLogger("modeling_vip2clip.cli.evaluate")

__all__ = ["EvaluateOptions", "compute_results", "evaluate"]


@dataclass
class EvaluateOptions(DatasetColumns):
    """The options of :func:`evaluate` (each one a `vip2clip evaluate` flag of the same name; `progress` is the
    negation of `--no-progress`)."""

    model: Any
    dataset: str
    output_dir: str | os.PathLike = "vip2clip-eval"
    split: str = "test"
    categories: Sequence[str] | None = None
    dataset_name: str | None = None
    save_maps: bool = False
    pro_mode: str = "exact"
    resume: bool = False
    overwrite: bool = False
    max_batches: int | None = None
    k_shot: int = 0
    shot_seeds: Sequence[int] = (0,)
    reference_split: str = "train"
    batch_size: int = 8
    num_workers: int = 2
    mixed_precision: str = "no"
    progress: bool = True


def _collate_keep_bad(rows: list[dict]) -> dict:
    """Stack a batch, keeping unusable rows (flag `bad`) so every process has equal batch shapes for the gather."""
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
        "masks": torch.stack([row["masks"] for row in rows]),
        "labels": torch.as_tensor([int(row["labels"]) for row in rows], dtype=torch.long),
        "has_mask": torch.as_tensor([bool(row.get("has_mask", True)) for row in rows], dtype=torch.bool),
        "bad": torch.as_tensor([bool(row.get("bad", False)) for row in rows], dtype=torch.bool),
        "index": torch.as_tensor([int(row["index"]) for row in rows], dtype=torch.long),
        "category": [str(row.get("category", "")) for row in rows],
        "image_path": [str(row.get("image_path", "")) for row in rows],
        "error": [str(row.get("error", "")) for row in rows],
    }


def _safe_name(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__").replace("\\", "__")).strip("._")
    return text or "image"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _dataset_name(args) -> str:
    if args.dataset_name:
        return args.dataset_name
    path = Path(args.dataset)
    return path.resolve().name if path.exists() else str(args.dataset)


def _save_overlays(output_dir: Path, raw_dataset, processor, batch: dict, maps: torch.Tensor, scores: torch.Tensor) -> None:
    from ..processing_vip2clip import annotate_overlay

    for position, index in enumerate(batch["index"].tolist()):
        if bool(batch["bad"][position]):
            continue
        try:
            image = raw_dataset[int(index)]["image"]
            overlay = annotate_overlay(processor.overlay(image, maps[position].float().cpu()), float(scores[position]))
        except Exception as error:  # noqa: BLE001 - an overlay must never stop the evaluation
            logger.warning("no overlay for %s: %s", batch["image_path"][position], error)
            continue
        folder = output_dir / "maps" / _safe_name(batch["category"][position] or "all")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{_safe_name(Path(batch['image_path'][position]).with_suffix('').as_posix())}.overlay.png"
        # Atomic: in a distributed run the samples Accelerate repeats to even out the last batch are written twice.
        atomic_save(target, lambda handle: overlay.save(handle, format="PNG"))


# ---------------------------------------------------------------------------------------------------- evaluation


def compute_results(records: "OrderedDict[int, dict]", pro_mode: str = "exact") -> dict[str, Any]:
    """Per-category metrics, their mean, counts and skipped samples from the deduplicated records."""
    from ..post_processing.metrics import MetricUndefinedWarning, compute_category_metrics, summarize

    skipped = [{"index": index, "image_path": r["image_path"], "reason": r["error"]}
               for index, r in records.items() if r["bad"]]
    by_category: "OrderedDict[str, list[dict]]" = OrderedDict()
    for index in sorted(records):
        record = records[index]
        if not record["bad"]:
            by_category.setdefault(record["category"], []).append(record)
    per_category: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for category in sorted(by_category):
        rows = by_category[category]
        labels = np.array([r["label"] for r in rows], dtype=np.int64)
        scores = np.array([r["score"] for r in rows], dtype=np.float64)
        # Pixel metrics: normal images (mask = all zeros) and anomalous images that have a mask.
        pixel_rows = [r for r in rows if r["label"] == 0 or r["has_mask"]]
        with_mask = sum(1 for r in rows if r["label"] == 1 and r["has_mask"])
        counts[category] = {"normal": int((labels == 0).sum()), "anomalous": int((labels == 1).sum()), "with_mask": with_mask}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MetricUndefinedWarning)
            if with_mask:
                masks, maps = PartialResults.load_pixels(pixel_rows)
                metrics = compute_category_metrics(labels, scores, masks, maps, pro_mode=pro_mode)
            else:
                metrics = compute_category_metrics(labels, scores, pro_mode=pro_mode)
        for warning in caught:
            logger.warning("category %r: %s", category, warning.message)
            if not issubclass(warning.category, MetricUndefinedWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        if not with_mask:
            logger.warning("category %r: no anomalous image has a ground-truth mask, the pixel metrics are nan", category)
        per_category[category] = {key: float(value) for key, value in metrics.items()}
    summary = summarize(per_category) if per_category else {"mean": {}}
    return {"per_category": {k: v for k, v in summary.items() if k != "mean"}, "mean": summary["mean"],
            "counts": counts, "skipped": skipped}


def _forward(model, pixel_values: torch.Tensor, categories: list[str], banks: dict | None):
    """Scores `(B,)` and maps `(B, S, S)`: zero-shot, or with each image's category's reference bank."""
    if not banks:
        output = model(pixel_values=pixel_values)
        return output.anomaly_score, output.anomaly_map
    image_embeds, patch_embeds = model.encode_image(pixel_values)  # the tower once for the whole batch
    scores = pixel_values.new_zeros(len(categories))
    maps = pixel_values.new_zeros((len(categories), *pixel_values.shape[-2:]))
    for category in sorted(set(categories)):
        rows = [i for i, c in enumerate(categories) if c == category]
        if category not in banks:
            raise UsageError(f"--k-shot: no reference images for category {category!r}; the reference split has no "
                             "such category (check --reference-split and --categories).")
        index = torch.as_tensor(rows, device=pixel_values.device)
        output = model.score_features(image_embeds[index], patch_embeds[index], reference_bank=banks[category])
        scores[index], maps[index] = output.anomaly_score.to(scores.dtype), output.anomaly_map.to(maps.dtype)
    return scores, maps


def _score_pass(args, accelerator, model, processor, dataset, partial: PartialResults, meta: dict, banks=None) -> bool:
    """Score every row of `dataset` not yet in `partial` (resumable); False when `--max-batches` stopped early."""
    from tqdm.auto import tqdm

    from ..data import to_torch_dataset

    output_dir = Path(args.output_dir)
    num_samples = len(dataset)
    resume = bool(args.resume) and partial.meta_matches(meta)
    if args.resume and not resume and partial.batch_dirs():
        logger.warning("--resume: the partial results in %s belong to another model/dataset; starting over", partial.directory)
    accelerator.wait_for_everyone()
    done = partial.done_indices() if resume else set()
    accelerator.wait_for_everyone()  # everyone has read the partial results before the main process touches them
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        partial.start(meta, keep=resume)
    accelerator.wait_for_everyone()
    remaining = [row for row in range(num_samples) if row not in done]
    if done:
        logger.info("resuming: %d of %d samples already evaluated, %d to go", len(done), num_samples, len(remaining))
    if not remaining:
        return True
    torch_dataset = torch.utils.data.Subset(to_torch_dataset(dataset, processor), remaining)
    loader = torch.utils.data.DataLoader(torch_dataset, batch_size=args.batch_size, shuffle=False,
                                         collate_fn=_collate_keep_bad, num_workers=args.num_workers)
    loader = accelerator.prepare(loader)
    run_number = partial.next_run_number()
    progress = tqdm(loader, desc="evaluating", disable=not args.progress or not accelerator.is_local_main_process)
    for batch_number, batch in enumerate(progress, start=1):
        with torch.no_grad():  # --mixed-precision: the towers' weights (weights.loader.precision_dtype), no autocast
            scores, maps = _forward(model, batch["pixel_values"], batch["category"], banks)
        scores, maps = scores.float(), maps.float()
        # A NaN/inf output (e.g. an image whose pixels break the model) is reported, not fed to the metrics.
        finite = torch.isfinite(scores) & torch.isfinite(maps).flatten(1).all(dim=1)
        for position in torch.nonzero(~finite & ~batch["bad"]).flatten().tolist():
            batch["error"][position] = "the model's score or map is not finite (NaN/inf)"
        batch["bad"] = batch["bad"] | ~finite
        if args.save_maps:
            _save_overlays(output_dir, dataset, processor, batch, maps, scores)
        gathered = accelerator.gather_for_metrics(
            (batch["index"], scores, maps, (batch["masks"] > 0.5).to(torch.uint8), batch["labels"],
             batch["has_mask"], batch["bad"])
        )
        strings = accelerator.gather_for_metrics(
            list(zip(batch["category"], batch["image_path"], batch["error"])), use_gather_object=True
        )
        if accelerator.is_main_process:
            index, score, anomaly_map, mask, label, has_mask, bad = (t.cpu().numpy() for t in gathered)
            partial.write(
                f"r{run_number:03d}_b{batch_number:06d}",
                {"index": index.astype(np.int64), "score": score.astype(np.float64), "map": anomaly_map.astype(np.float32),
                 "mask": mask.astype(np.uint8), "label": label.astype(np.int64), "has_mask": has_mask.astype(bool),
                 "bad": bad.astype(bool)},
                {"category": [s[0] for s in strings], "image_path": [s[1] for s in strings],
                 "error": [s[2] for s in strings]},
            )
        if args.max_batches is not None and batch_number >= args.max_batches:
            if batch_number < len(loader):
                accelerator.wait_for_everyone()
                return False
            break
    accelerator.wait_for_everyone()
    return True


def _mean_and_std(runs: list[dict[str, dict[str, float]]]) -> tuple[dict, dict]:
    """Per key of per-category metrics: the mean and the (population) std over the seeds' runs, NaN-aware."""
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for name in runs[0]:
        mean[name], std[name] = {}, {}
        for key in runs[0][name]:
            values = np.array([float(run[name][key]) for run in runs], dtype=np.float64)
            finite = values[np.isfinite(values)]
            mean[name][key] = float(finite.mean()) if finite.size else float("nan")
            std[name][key] = float(finite.std()) if finite.size else float("nan")
    return mean, std


def evaluate(model, dataset: str, output_dir: str | os.PathLike = "vip2clip-eval", *, processor=None,
             **options) -> dict[str, Any] | None:
    """Evaluate `model` (a model folder or Hub id, or a loaded model with its `processor`) on `dataset` (a raw
    benchmark folder, a converted/saved folder, parquet files or a Hub id), writing `results.json` / `results.md`
    (and with `save_maps=True` the overlays and ROC curves) to `output_dir`. `options` are
    :class:`EvaluateOptions` (the flags of `vip2clip evaluate`). Returns the results dict (as written to
    results.json) on the main process, None on the others or when `max_batches` stopped the run early (the partial
    results stay for `resume=True`).

    With `k_shot=K` every seed of `shot_seeds` is one pass with per-category reference banks of K normal
    images drawn from `reference_split` (`references.draw_references`); `per_category` / `mean` are then the
    means over the seeds, with their standard deviations beside them, and each seed's own results are kept.
    """
    args = EvaluateOptions(model=model, dataset=dataset, output_dir=output_dir, **options)
    from ..run_folder import claim_output_folder, model_identity
    from ..weights.loader import model_name

    # ---- owned output folder (run_folder.py, docs/reliability.md): manifest + lock, on the main process only ----
    folder = None
    if int(os.environ.get("RANK", "0") or 0) == 0:
        from_path = isinstance(model, (str, os.PathLike))
        manifest = {"written_by": "vip2clip evaluate",
                    "model": model_identity(str(model)) if from_path else {"source": model_name(model)},
                    "inputs": {"dataset": str(args.dataset), "split": args.split, "categories": args.categories},
                    "options": {key: getattr(args, key, None) for key in (
                        "k_shot", "shot_seeds", "reference_split", "mixed_precision", "pro_mode")}}
        folder = claim_output_folder(args.output_dir, manifest, resume=args.resume, overwrite=args.overwrite,
                                     model_dirs=[str(model)] if from_path else [],
                                     writes=("results.md", "results.json", "roc_curves.png", "maps", PARTIAL_DIR))
    try:
        return _evaluate(args, model, processor)
    finally:
        if folder is not None:
            folder.release()


def _check_has_anomalies(args: EvaluateOptions, dataset, report) -> None:
    """Every metric compares anomalous with normal images: a dataset without a single anomalous one gives a table
    of NaN, so it is refused, with what left them out (a raw folder whose defect folders have no known name)."""
    labels = dataset["label"]
    if any(label == 1 for label in labels):
        return
    normal = sum(1 for label in labels if label == 0)
    what = f"--dataset {args.dataset}"
    where = os.path.abspath(args.dataset) if os.path.exists(str(args.dataset)) else None
    why = (f"no anomalous image to evaluate against, only {normal} normal and {len(labels) - normal} unlabelled "
           "ones, so every metric would be NaN")
    if report is not None and report.unconverted:
        names = sorted({name for folders, _ in report.unconverted for name in folders})
        command = report.unconverted[0][1].replace("--out OUT", "--out CONVERTED")
        raise UsageError(sentence(what, where, f"{why}: its sub-folders {', '.join(n + '/' for n in names)} are "
                                  "neither normal nor anomalous by name and were not read",
                                  f"convert it naming them, {command}, then run vip2clip evaluate --dataset "
                                  "CONVERTED"))
    raise UsageError(sentence(what, where, why, "evaluate a dataset that holds anomalous images, or say which labels "
                              "are normal with --label-column / --normal-label"))


def _evaluate(args: EvaluateOptions, model, processor) -> dict[str, Any] | None:
    from accelerate import Accelerator

    from ..data import load_anomaly_dataset, schema_options
    from .feature_cache import dataset_fingerprint
    from ..post_processing.metrics import METRIC_KEYS
    from .references import build_category_banks, draw_references
    from .html_report import run_provenance, write_evaluation_report
    from .report import format_markdown_table, markdown_heading, plot_roc_curves
    from ..weights.loader import job_model_and_processor, model_name
    from ..resolve import resolve_source

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1.")
    k_shot = int(getattr(args, "k_shot", 0) or 0)
    seeds = list(getattr(args, "shot_seeds", None) or [0])
    reference_split = getattr(args, "reference_split", "train")
    if k_shot and reference_split == args.split:
        raise UsageError(f"--reference-split {reference_split}: the references must come from another split than "
                         f"the evaluated --split {args.split}; pass e.g. --reference-split train.")
    dataset_source = resolve_source(args.dataset, "--dataset", repo_type="dataset")
    # Accelerate's mixed precision is autocast; --mixed-precision here means the towers' weights (one meaning in
    # predict, evaluate and calibrate: cli.options.MIXED_PRECISION_HELP).
    accelerator = Accelerator()
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    check_distributed_setup(accelerator)
    output_dir = Path(args.output_dir)
    dataset, report = load_anomaly_dataset(dataset_source, split=args.split, categories=args.categories,
                                           return_report=True, **schema_options(args))
    # Files the converter could not use (raw folders only) are reported with the loader's unusable samples.
    conversion_skipped = [{"index": None, "image_path": path, "reason": f"conversion: {reason}"}
                          for path, reason in (report.skipped if report is not None else [])]
    num_samples = len(dataset)
    if num_samples == 0:
        raise UsageError(f"--dataset {args.dataset} (--split {args.split}): no samples; check the split and "
                         "--categories names.")
    _check_has_anomalies(args, dataset, report)  # before the model loads: a refused dataset costs no seconds
    model, processor = job_model_and_processor(model, processor, device=accelerator.device,
                                               mixed_precision=args.mixed_precision)
    meta = {"model": model_name(args.model), "dataset": dataset_fingerprint(dataset), "num_samples": num_samples,
            "split": args.split, "image_size": model.config.image_size}

    passes = []  # (seed or None, partial store, meta, banks, references as image paths)
    if not k_shot:
        passes.append((None, PartialResults(output_dir / PARTIAL_DIR), meta, None, None))
    else:
        reference_set = load_anomaly_dataset(dataset_source, split=reference_split, categories=args.categories,
                                             **schema_options(args))
        for seed in seeds:
            drawn = draw_references(reference_set, k_shot, seed, split_name=reference_split)
            paths = {category: [str(reference_set[row]["image_path"]) for row in rows] for category, rows in drawn.items()}
            banks = build_category_banks(model, processor, reference_set, drawn, batch_size=args.batch_size)
            seed_meta = {**meta, "k_shot": k_shot, "seed": seed, "reference_split": reference_split,
                         "references": paths}
            passes.append((seed, PartialResults(output_dir / PARTIAL_DIR / f"seed_{seed}"), seed_meta, banks, paths))

    for seed, partial, pass_meta, banks, _ in passes:
        if seed is not None:
            logger.info("%d-shot pass, seed %d", k_shot, seed)
        if not _score_pass(args, accelerator, model, processor, dataset, partial, pass_meta, banks):
            if accelerator.is_main_process:
                evaluated = len(partial.done_indices())
                print(f"stopped after --max-batches {args.max_batches}: {evaluated}/{num_samples} samples evaluated; "
                      f"the partial results are in {partial.directory}, continue with --resume.")
            return None

    results = None
    if accelerator.is_main_process:
        computed_runs, curves = [], {}
        for seed, partial, _, _, _ in passes:
            records = partial.records()
            missing = num_samples - len(records)
            if missing:
                raise RuntimeError(f"{missing} samples have no result in {partial.directory}; rerun with --resume.")
            computed_runs.append(compute_results(records, pro_mode=args.pro_mode))
            if args.save_maps and not curves:  # the ROC curves of the first pass
                for category in computed_runs[-1]["per_category"]:
                    rows = [r for r in records.values() if r["category"] == category and not r["bad"]]
                    curves[category] = ([r["label"] for r in rows], [r["score"] for r in rows])
        computed = computed_runs[0]
        results = {
            "dataset": _dataset_name(args),
            "split": args.split,
            "model": model_name(args.model),
            "pro_mode": args.pro_mode,
            "k_shot": k_shot,
            **run_provenance(),  # date, package_version
            "unit": "fraction",  # every metric in [0, 1], here and in results.md
            "num_samples": num_samples,
            "num_evaluated": num_samples - len(computed["skipped"]),
            "per_category": computed["per_category"],
            "mean": computed["mean"],
            "counts": computed["counts"],
            "skipped": conversion_skipped + computed["skipped"],
        }
        table_rows = {**computed["per_category"], "mean": computed["mean"]}
        table_std = None
        if k_shot:
            runs = [{**run["per_category"], "mean": run["mean"]} for run in computed_runs]
            mean, std = _mean_and_std(runs)
            results.update({
                "per_category": {name: mean[name] for name in computed["per_category"]},
                "mean": mean["mean"],
                "per_category_std": {name: std[name] for name in computed["per_category"]},
                "mean_std": std["mean"],
                "shot_seeds": seeds,
                "reference_split": reference_split,
                "references": {str(seed): paths for seed, _, _, _, paths in passes},
                "per_seed": {str(seed): {"per_category": run["per_category"], "mean": run["mean"]}
                             for (seed, *_), run in zip(passes, computed_runs)},
            })
            table_rows, table_std = mean, (std if len(seeds) > 1 else None)
        table = format_markdown_table(table_rows, columns=list(METRIC_KEYS), std=table_std, unit="fraction")
        mode = f"{k_shot}-shot, seeds {' '.join(map(str, seeds))}" if k_shot else "zero-shot"
        print(f"\n{results['dataset']} ({args.split}, {results['num_evaluated']} images, {mode}, AUPRO "
              f"{args.pro_mode}):\n{table}")
        for item in results["skipped"]:
            where = "" if item["index"] is None else f" (index {item['index']})"
            print(f"skipped {item['image_path']}{where}: {item['reason']}", file=sys.stderr)
        atomic_write_text(output_dir / "results.md", markdown_heading(results) + table)
        atomic_write_json(output_dir / "results.json", _jsonable(results))
        if args.save_maps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plot_roc_curves(curves, output_dir / "roc_curves.png", title=f"Image-level ROC — {results['dataset']}")
        if not getattr(args, "no_report", False):
            write_evaluation_report(output_dir, _jsonable(results), passes[0][1].records(), dataset, processor,
                                    threshold=getattr(model.config, "image_threshold", None))
        shutil.rmtree(output_dir / PARTIAL_DIR)
        logger.info("wrote %s", output_dir / "results.json")
    accelerator.wait_for_everyone()
    return results
