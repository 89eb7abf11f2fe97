"""Zero-shot evaluation of a ViP²-CLIP model on an anomaly benchmark (docs/method.md §1, §7): `vip2clip evaluate`.

    vip2clip evaluate --model runs/mvtec/model --dataset /data/visa --output-dir results/visa --save-maps
    accelerate launch -m modeling_vip2clip.cli.evaluate --model ... --dataset ...   # several GPUs / processes

For every category: image AUROC, AP, F1-max and pixel AUROC, AUPRO, F1-max, AP (`modeling_vip2clip.post_processing.metrics`),
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
* Interruption: the main process writes every gathered batch to `OUTPUT_DIR/partial/` (`results_store`).
  `--resume` reloads them, evaluates only the missing rows and deduplicates by index; the folder is deleted once
  the results are written. `--max-batches N` stops after N batches on
  purpose (the same state as an interrupted run).
* `--save-maps`: an overlay PNG per image (`OUTPUT_DIR/maps/<category>/<stem>.overlay.png`: `processor.overlay`
  with the strip of score and colour scale, `annotate_overlay`) and the image-level ROC curves
  (`OUTPUT_DIR/roc_curves.png`).

`results.md` is headed with the model, dataset, split, k-shot, date and vip2clip version; it and `results.json`
(`date`, `package_version`, `unit`) hold fractions in [0, 1]. `report.html` (unless `--no-report`): one
self-contained page with the metrics, the ROC and precision-recall curves and, per category, the worst-ranked
normal and anomalous images with their maps (`engine.html_report`).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ..data.options import add_schema_arguments
from .options import add_common_arguments, job_keywords, non_negative_int, positive_int

__all__ = ["DESCRIPTION", "add_arguments", "build_parser", "job_arguments", "run", "main"]

DESCRIPTION = ("Evaluate a ViP2-CLIP model zero-shot on an anomaly benchmark: per-category image/pixel metrics and "
               "their mean, as a markdown table and OUTPUT_DIR/results.json.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, metavar="DIR", help="trained ViP2CLIP model folder (or Hub id).")
    parser.add_argument(
        "--dataset", required=True, metavar="ID_OR_PATH",
        help="benchmark to evaluate: a raw folder (MVTec tree, VisA split_csv, meta.json, your own normal/anomalous folders), a "
        "folder written by `vip2clip convert`, parquet/arrow files, or a Hub dataset id (other column names: "
        "--image-column etc.).",
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default: test).")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="evaluate these categories only (default: all).")
    parser.add_argument("--dataset-name", default=None, help="name written to the JSON (default: the dataset folder's name or id).")
    parser.add_argument("--save-maps", action="store_true", help="write an anomaly-map overlay PNG per image and the ROC curves PNG.")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html.")
    parser.add_argument(
        "--pro-mode", choices=["exact", "reference"], default="exact",
        help="AUPRO computation: exact (standard MVTec definition) or reference (the authors' 200-threshold "
        "approximation, for comparison with published tables) (default: exact).",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the per-batch results in OUTPUT_DIR/partial from an interrupted run and evaluate only the rest.",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --output-dir (only the files vip2clip wrote).")
    parser.add_argument(
        "--max-batches", type=positive_int, default=None, metavar="N",
        help="stop after N batches per process, keeping the partial results for --resume (default: no limit).",
    )
    few_shot = parser.add_argument_group(
        "few-shot (docs/few_shot.md)", "add a memory of K normal reference images per category to the zero-shot maps")
    few_shot.add_argument("--k-shot", type=non_negative_int, default=0, metavar="K",
                          help="normal reference images per category (default: 0, zero-shot).")
    few_shot.add_argument("--shot-seeds", type=non_negative_int, nargs="+", default=[0], metavar="SEED",
                          help="one pass per seed, each drawing its own K references; the table shows mean ± std "
                          "(default: 0).")
    few_shot.add_argument("--reference-split", default="train", metavar="SPLIT",
                          help="split the references are drawn from, never the evaluated one (default: train).")
    add_schema_arguments(parser)
    add_common_arguments(parser, batch_size=8, output_dir="vip2clip-eval",
                         output_help="where results.json/results.md, maps and partial results go")
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog or "vip2clip evaluate", description=DESCRIPTION))


def job_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of `engine.evaluation.evaluate` from this command's namespace."""
    from ..engine.evaluation import EvaluateOptions

    return job_keywords(args, EvaluateOptions)


def run(args: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..resolve import resolve_source
    from .boundary import run_job

    for module in ("accelerate", "datasets", "sklearn", "scipy"):
        require_extra(module, "train", "vip2clip evaluate")
    if args.save_maps:
        require_extra("matplotlib", "train", "--save-maps (the ROC curves)")
    resolve_source(args.dataset, "--dataset", repo_type="dataset")  # fail fast, before the heavy imports
    resolve_source(args.model, "--model")
    from ..engine.evaluation import evaluate

    return run_job(lambda namespace: evaluate(**job_arguments(namespace)), args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_vip2clip.cli.evaluate` / `accelerate launch -m modeling_vip2clip.cli.evaluate`."""
    from .boundary import entry_point_main

    return entry_point_main(run, build_parser(prog="modeling_vip2clip.cli.evaluate"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
