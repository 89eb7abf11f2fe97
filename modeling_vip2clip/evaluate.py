"""Zero-shot evaluation of a ViP²-CLIP model on an anomaly benchmark (SPEC §1, §7): `vip2clip evaluate`.

    vip2clip evaluate --model runs/mvtec/model --dataset /data/visa --output-dir results/visa --save-maps
    accelerate launch -m modeling_vip2clip.evaluate --model ... --dataset ...   # several GPUs / processes

For every category: image AUROC, AP, F1-max and pixel AUROC, AUPRO, F1-max, AP (`modeling_vip2clip.metrics`),
then the mean over categories — printed as a markdown table like the authors' `test.py` and written to
`OUTPUT_DIR/results.json`:

    {"dataset": name, "split": ..., "model": ..., "pro_mode": "exact",
     "per_category": {cat: {"image_auroc": ..., "image_ap": ..., "image_f1_max": ..., "pixel_auroc": ...,
                            "pixel_aupro": ..., "pixel_f1_max": ..., "pixel_ap": ...}},
     "mean": {...}, "counts": {cat: {"normal": n, "anomalous": n, "with_mask": n}},
     "num_samples": N, "num_evaluated": N - skipped, "skipped": [{"index", "image_path", "reason"}]}

Values lie in [0, 1]; a metric that is undefined for a category (no anomalous or no normal images, no masks)
is `null` in the JSON (valid JSON has no NaN), "nan" in the table, with a warning. Anomalous images without a
mask count for the image metrics only. Unusable samples never enter a metric and are listed in `skipped` with the
reason: rows the loader could not use (undecodable image or mask, rejected by the processor; `index` = their row)
and, for raw folders, files the converter already dropped (`index` null, reason prefixed "conversion:").
`num_samples` counts the dataset's rows, `num_evaluated` those that entered the metrics.

Robustness:

* Distributed: the samples are sharded over the processes by Accelerate; per batch, the results are gathered
  with `accelerator.gather_for_metrics` (which drops the samples Accelerate repeats to even out the last batch)
  and keyed by the sample's row index, so no sample is counted twice.
* Interruption: the main process writes every gathered batch to `OUTPUT_DIR/partial/` (one folder per batch,
  renamed into place when complete). `--resume` reloads them, evaluates only the missing rows and deduplicates
  by index; the folder is deleted once the results are written. `--max-batches N` stops after N batches on
  purpose (the same state as an interrupted run).
* `--save-maps`: an overlay PNG per image (`OUTPUT_DIR/maps/<category>/...`, `processor.overlay`) and the
  image-level ROC curves (`OUTPUT_DIR/roc_curves.png`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger("modeling_vip2clip.evaluate")

__all__ = ["add_arguments", "build_parser", "run_evaluation", "run", "main", "load_model_and_processor"]

PARTIAL_DIR = "partial"
_BATCH_DIR = re.compile(r"^r(\d+)_b(\d+)$")


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, metavar="DIR", help="trained ViP2CLIP model folder (or Hub id).")
    parser.add_argument(
        "--dataset", required=True, metavar="ID_OR_PATH",
        help="benchmark to evaluate: a raw folder (MVTec tree, VisA split_csv, meta.json, good/bad folders), a "
        "folder written by `vip2clip convert`, or a Hub dataset id.",
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default: test).")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="evaluate these categories only (default: all).")
    parser.add_argument("--dataset-name", default=None, help="name written to the JSON (default: the dataset folder's name or id).")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch and process (default: 8).")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (default: 2).")
    parser.add_argument("--output-dir", default="vip2clip-eval", help="where results.json/results.md, maps and partial results go (default: vip2clip-eval).")
    parser.add_argument("--save-maps", action="store_true", help="write an anomaly-map overlay PNG per image and the ROC curves PNG.")
    parser.add_argument(
        "--pro-mode", choices=["exact", "reference"], default="exact",
        help="AUPRO computation: exact (standard MVTec definition) or reference (the authors' 200-threshold "
        "approximation, for comparison with published tables) (default: exact).",
    )
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
        help="autocast precision of the forward pass (default: no).",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the per-batch results in OUTPUT_DIR/partial from an interrupted run and evaluate only the rest.",
    )
    parser.add_argument(
        "--max-batches", type=int, default=None, metavar="N",
        help="stop after N batches per process, keeping the partial results for --resume (default: no limit).",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar.")
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "vip2clip evaluate",
        description="Evaluate a ViP2-CLIP model zero-shot on an anomaly benchmark: per-category image/pixel metrics "
        "and their mean, as a markdown table and OUTPUT_DIR/results.json.",
    )
    return add_arguments(parser)


# ---------------------------------------------------------------------------------------------------- helpers


def load_model_and_processor(model_id: str, device: torch.device | str | None = None):
    """The model (package class, fp32, eval mode) and its processor (the saved one, else one at its input size)."""
    from .modeling_vip2clip import ViP2CLIPModel
    from .processing_vip2clip import ViP2CLIPProcessor

    model = ViP2CLIPModel.from_pretrained(model_id, dtype=torch.float32).eval()
    if device is not None:
        model.to(device)
    try:
        processor = ViP2CLIPProcessor.from_pretrained(model_id)
    except (OSError, ValueError):
        processor = ViP2CLIPProcessor(image_size=model.config.image_size)
    if int(processor.image_size) != model.config.image_size:
        logger.warning("processor image_size %s != model input size %s: using the model's", processor.image_size,
                       model.config.image_size)
        processor = ViP2CLIPProcessor(image_size=model.config.image_size)
    return model, processor


class _RowsOf(torch.utils.data.Dataset):
    """The rows `rows` (original indices) of a `TorchAnomalyDataset`; each sample keeps its original `index`."""

    def __init__(self, dataset, rows: Sequence[int]):
        self.dataset = dataset
        self.rows = [int(row) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions):
        return self.dataset.__getitems__([self.rows[int(p)] for p in positions])

    def __getitem__(self, position):
        return self.__getitems__([position])[0]


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


class PartialResults:
    """Per-batch results of an evaluation on disk, keyed by sample index (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def meta_matches(self, meta: dict) -> bool:
        path = self.directory / "meta.json"
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(meta))
        except ValueError:
            return False

    def start(self, meta: dict, keep: bool) -> None:
        if not keep and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for stale in self.directory.glob("*.tmp"):
            shutil.rmtree(stale)

    def batch_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), int(m.group(2)), entry) for entry in self.directory.iterdir()
                 if (m := _BATCH_DIR.match(entry.name)) and entry.is_dir()]
        return [entry for *_, entry in sorted(found)]

    def next_run_number(self) -> int:
        runs = [int(_BATCH_DIR.match(entry.name).group(1)) for entry in self.batch_dirs()]
        return max(runs, default=0) + 1

    def write(self, name: str, arrays: dict[str, np.ndarray], strings: dict[str, list[str]]) -> None:
        tmp = self.directory / f"{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array)
        (tmp / "strings.json").write_text(json.dumps(strings), encoding="utf-8")
        os.replace(tmp, self.directory / name)

    def done_indices(self) -> set[int]:
        done: set[int] = set()
        for entry in self.batch_dirs():
            done.update(np.load(entry / "index.npy").tolist())
        return done

    def records(self) -> "OrderedDict[int, dict]":
        """index → {"dir", "row", "score", "label", "has_mask", "bad", "category", "image_path", "error"}; the first
        record of an index wins (later ones are duplicates)."""
        out: OrderedDict[int, dict] = OrderedDict()
        for entry in self.batch_dirs():
            index = np.load(entry / "index.npy")
            score = np.load(entry / "score.npy")
            label = np.load(entry / "label.npy")
            has_mask = np.load(entry / "has_mask.npy")
            bad = np.load(entry / "bad.npy")
            strings = json.loads((entry / "strings.json").read_text(encoding="utf-8"))
            for row, sample in enumerate(index.tolist()):
                if sample in out:
                    continue
                out[sample] = {
                    "dir": entry, "row": row, "score": float(score[row]), "label": int(label[row]),
                    "has_mask": bool(has_mask[row]), "bad": bool(bad[row]), "category": strings["category"][row],
                    "image_path": strings["image_path"][row], "error": strings["error"][row],
                }
        return out

    @staticmethod
    def load_pixels(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Masks (uint8) and maps (float32) of these records, read through memory maps batch folder by folder."""
        maps, masks = [], []
        opened: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
        for record in records:
            entry = record["dir"]
            if entry not in opened:
                opened[entry] = (np.load(entry / "map.npy", mmap_mode="r"), np.load(entry / "mask.npy", mmap_mode="r"))
            maps.append(np.asarray(opened[entry][0][record["row"]], dtype=np.float32))
            masks.append(np.asarray(opened[entry][1][record["row"]], dtype=np.uint8))
        return np.stack(masks), np.stack(maps)


def _save_overlays(output_dir: Path, raw_dataset, processor, batch: dict, maps: torch.Tensor) -> None:
    for position, index in enumerate(batch["index"].tolist()):
        if bool(batch["bad"][position]):
            continue
        try:
            image = raw_dataset[int(index)]["image"]
            overlay = processor.overlay(image, maps[position].float().cpu())
        except Exception as error:  # noqa: BLE001 - an overlay must never stop the evaluation
            logger.warning("no overlay for %s: %s", batch["image_path"][position], error)
            continue
        folder = output_dir / "maps" / _safe_name(batch["category"][position] or "all")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{_safe_name(Path(batch['image_path'][position]).with_suffix('').as_posix())}.png"
        # Atomic: in a distributed run the samples Accelerate repeats to even out the last batch are written twice.
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.png")
        overlay.save(tmp)
        os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------- evaluation


def compute_results(records: "OrderedDict[int, dict]", pro_mode: str = "exact") -> dict[str, Any]:
    """Per-category metrics, their mean, counts and skipped samples from the deduplicated records."""
    from .metrics import MetricUndefinedWarning, compute_category_metrics, summarize

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


def run_evaluation(args: argparse.Namespace, model=None, processor=None) -> dict[str, Any] | None:
    """Evaluate with the options of :func:`build_parser`. Returns the results dict (as written to results.json),
    or None when `--max-batches` stopped the run early (the partial results stay for `--resume`)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .data import load_anomaly_dataset, to_torch_dataset
    from .feature_cache import dataset_fingerprint
    from .metrics import METRIC_KEYS, format_markdown_table, plot_roc_curves

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1.")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    from .train import _test_pause, check_distributed_setup

    check_distributed_setup(accelerator)
    output_dir = Path(args.output_dir)
    if model is None:
        model, processor = load_model_and_processor(args.model)
    elif processor is None:
        from .processing_vip2clip import ViP2CLIPProcessor

        processor = ViP2CLIPProcessor(image_size=model.config.image_size)
    model = model.to(accelerator.device).eval()

    dataset, report = load_anomaly_dataset(args.dataset, split=args.split, categories=args.categories, return_report=True)
    # Files the converter could not use (raw folders only) are reported with the loader's unusable samples.
    conversion_skipped = [{"index": None, "image_path": path, "reason": f"conversion: {reason}"}
                          for path, reason in (report.skipped if report is not None else [])]
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError(f"{args.dataset} (split {args.split!r}) has no samples.")
    partial = PartialResults(output_dir / PARTIAL_DIR)
    meta = {"model": str(args.model), "dataset": dataset_fingerprint(dataset), "num_samples": num_samples,
            "split": args.split, "image_size": model.config.image_size}
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

    stopped_early = False
    if remaining:
        torch_dataset = _RowsOf(to_torch_dataset(dataset, processor), remaining)
        loader = torch.utils.data.DataLoader(torch_dataset, batch_size=args.batch_size, shuffle=False,
                                             collate_fn=_collate_keep_bad, num_workers=args.num_workers)
        loader = accelerator.prepare(loader)
        run_number = partial.next_run_number()
        progress = tqdm(loader, desc="evaluating", disable=args.no_progress or not accelerator.is_local_main_process)
        for batch_number, batch in enumerate(progress, start=1):
            with torch.no_grad(), accelerator.autocast():
                output = model(pixel_values=batch["pixel_values"])
            scores = output.anomaly_score.float()
            maps = output.anomaly_map.float()
            # A NaN/inf output (e.g. an image whose pixels break the model) is reported, not fed to the metrics.
            finite = torch.isfinite(scores) & torch.isfinite(maps).flatten(1).all(dim=1)
            for position in torch.nonzero(~finite & ~batch["bad"]).flatten().tolist():
                batch["error"][position] = "the model's score or map is not finite (NaN/inf)"
            batch["bad"] = batch["bad"] | ~finite
            if args.save_maps:
                _save_overlays(output_dir, dataset, processor, batch, maps)
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
                _test_pause("VIP2CLIP_TEST_PAUSE_AFTER_BATCH", batch_number)  # test-only, no-op unless set
            if args.max_batches is not None and batch_number >= args.max_batches:
                stopped_early = batch_number < len(loader)
                break
    accelerator.wait_for_everyone()
    if stopped_early:
        if accelerator.is_main_process:
            evaluated = len(partial.done_indices())
            print(f"stopped after --max-batches {args.max_batches}: {evaluated}/{num_samples} samples evaluated; the "
                  f"partial results are in {partial.directory}, continue with --resume.")
        return None

    results = None
    if accelerator.is_main_process:
        records = partial.records()
        missing = num_samples - len(records)
        if missing:
            raise RuntimeError(f"{missing} samples have no result in {partial.directory}; rerun with --resume.")
        computed = compute_results(records, pro_mode=args.pro_mode)
        results = {
            "dataset": _dataset_name(args),
            "split": args.split,
            "model": str(args.model),
            "pro_mode": args.pro_mode,
            "num_samples": num_samples,
            "num_evaluated": num_samples - len(computed["skipped"]),
            "per_category": computed["per_category"],
            "mean": computed["mean"],
            "counts": computed["counts"],
            "skipped": conversion_skipped + computed["skipped"],
        }
        table = format_markdown_table({**computed["per_category"], "mean": computed["mean"]}, columns=list(METRIC_KEYS))
        print(f"\n{results['dataset']} ({args.split}, {results['num_evaluated']} images, AUPRO {args.pro_mode}):\n{table}")
        for item in results["skipped"]:
            where = "" if item["index"] is None else f" (index {item['index']})"
            print(f"skipped {item['image_path']}{where}: {item['reason']}", file=sys.stderr)
        (output_dir / "results.md").write_text(table, encoding="utf-8")
        tmp = output_dir / "results.json.tmp"
        tmp.write_text(json.dumps(_jsonable(results), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, output_dir / "results.json")
        if args.save_maps:
            curves = {}
            for category in computed["per_category"]:
                rows = [r for r in records.values() if r["category"] == category and not r["bad"]]
                curves[category] = ([r["label"] for r in rows], [r["score"] for r in rows])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plot_roc_curves(curves, output_dir / "roc_curves.png", title=f"Image-level ROC — {results['dataset']}")
        shutil.rmtree(partial.directory)
        logger.info("wrote %s", output_dir / "results.json")
    accelerator.wait_for_everyone()
    return results


def run(args: argparse.Namespace) -> int:
    from .train import setup_logging, teardown_distributed

    setup_logging()
    try:
        run_evaluation(args)
    finally:
        teardown_distributed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_vip2clip.evaluate` / `accelerate launch -m modeling_vip2clip.evaluate`."""
    return run(build_parser(prog="modeling_vip2clip.evaluate").parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
