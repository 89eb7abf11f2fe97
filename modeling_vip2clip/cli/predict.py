"""`vip2clip predict --model M INPUT... | --dataset D`: score images with a ViP²-CLIP model, at any scale.

    vip2clip predict --model M /data/line3/ --output-dir out/ --save-maps png --resume
    vip2clip predict --model M 'line3/**/*.png' @more_images.txt --output-dir out/
    vip2clip predict --model M --dataset org/name --split test --image-column image --output-dir out/
    accelerate launch -m modeling_vip2clip.cli.predict --model M /data/line3/ --output-dir out/   # several GPUs/nodes

INPUT is any mix of image files, folders (searched recursively for image files; hidden ones skipped), glob
patterns (quoted, so the shell leaves them alone; `**` recurses) and `@LIST` files: a text file naming one INPUT
per line (blank lines and `#` comments skipped; relative entries are relative to the list file's folder). Or
`--dataset`: a folder written by `vip2clip convert` / `save_to_disk`, a raw benchmark folder, a folder of parquet
files, or a Hub dataset id (`--streaming` reads it without downloading it first); `--split test` also selects
every split named `<category>.test` (e.g. `BrachioLab/visa`), and `--image-column` names the image column.

Written to `--output-dir`:

* `predictions.csv`, one row per scored input: `path` (the file as found; for a dataset row
  `<split>/<row number>_<file name>`), `score` (image anomaly score in [0, 1]), `verdict` (`anomalous` when
  score >= the threshold, else `normal`), `overlay` (the overlay file, relative to the output folder, or empty),
  and `map` / `mask` when those are saved. The threshold is `--threshold`, else the model's calibrated
  `image_threshold` (`vip2clip calibrate`), else 0.5.
* `overlays/<sub>/<stem>.overlay.png`: the anomaly map blended over the image at the image's own size, with a
  strip below it showing the score, the verdict and the map's colour scale 0 … 1 (`--plain-overlays`: the bare
  blend; `--no-overlays`: none). `<sub>/<stem>` is the input's path relative to the deepest folder holding all
  the inputs' roots (a folder input itself, a glob's fixed leading folders, a file's own folder) without its
  extension: `D/a/x.jpg` of the input `D/` gives `overlays/a/x.overlay.png` (two inputs differing only by their
  extension keep it: `x.jpg.overlay.png`). For dataset rows, it is the row's `path` without its extension.
* `--save-maps png|npy`: `maps/<sub>/<stem>.map.png` (16-bit grey, value / 65535 = map value) or
  `maps/<sub>/<stem>.map.npy` (float16), the anomaly map at the image's own size; `--save-masks`:
  `masks/<sub>/<stem>.mask.png`, the map >= the pixel threshold (`--pixel-threshold`, else the model's
  `pixel_threshold`, else 0.5) as a black/white PNG.
* `skipped.csv` (path, reason): the inputs that could not be used (unreadable files, inputs that match nothing,
  non-finite model outputs), also printed; never silently dropped.
* `report.html` (unless `--no-report`): one self-contained page — the run's header, the score histogram with the
  threshold, the most anomalous images first (thumbnails), the skipped inputs — written from the final CSV, so a
  resumed or multi-process run gets one report of everything (`engine.html_report`).

Scale: the inputs stream through a DataLoader (`--num-workers` processes decode and preprocess), so memory stays
flat whatever their number; the CSV is appended and flushed batch by batch, and `--resume` skips the inputs
already in it (a run killed at any moment and resumed scores every input exactly once); under `accelerate launch`
the inputs are sharded over the processes and their part CSVs merged at the end. The exit status is 0 when
predictions.csv holds at least one row, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..data.options import add_schema_arguments
from .options import add_common_arguments, job_keywords, probability

__all__ = ["DESCRIPTION", "add_arguments", "build_parser", "job_arguments", "run", "main"]

DESCRIPTION = ("Score images for anomalies with a ViP2-CLIP model: files, folders, globs, @lists or a dataset, "
               "streamed, resumable and multi-process; a CSV of (path, score, verdict, overlay) and an overlay (and "
               "optionally the map and mask) per image.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, metavar="DIR", help="ViP2CLIP model folder (or Hub id).")
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, folders (recursive), glob patterns, or @LIST text files of such entries.")
    data = parser.add_argument_group("dataset input (instead of INPUT)")
    data.add_argument("--dataset", default=None, metavar="ID_OR_PATH",
                      help="score the images of a dataset: a saved/converted folder, a raw benchmark folder, a folder "
                      "of parquet files or a Hub dataset id.")
    data.add_argument("--split", default="test",
                      help="dataset split; also every split named <category>.<split> (default: test).")
    data.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="only these categories (default: all).")
    data.add_argument("--streaming", action="store_true",
                      help="stream the dataset instead of downloading/preparing it first.")
    add_schema_arguments(parser)
    parser.add_argument("--threshold", type=probability, default=None,
                        help="image score at or above which an image is anomalous (default: the model's calibrated "
                        "image_threshold, else 0.5).")
    parser.add_argument("--pixel-threshold", type=probability, default=None,
                        help="map value at or above which a pixel is defective, for --save-masks (default: the "
                        "model's pixel_threshold, else 0.5).")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda:0 or cpu (default: the process's GPU under accelerate launch, "
                        "else cuda if available, else cpu).")
    parser.add_argument("--no-overlays", action="store_true", help="do not write the overlay PNGs.")
    parser.add_argument("--plain-overlays", action="store_true",
                        help="overlays without the strip below them that shows the score, the verdict and the colour "
                        "scale (the bare heat-map blend, at the image's own size).")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html.")
    parser.add_argument("--save-maps", choices=["none", "png", "npy"], default="none",
                        help="also write each anomaly map at the image's size: 16-bit PNG or float16 .npy (default: none).")
    parser.add_argument("--save-masks", action="store_true", help="also write each binary defect mask (PNG) at the pixel threshold.")
    parser.add_argument("--resume", action="store_true",
                        help="keep OUTPUT_DIR/predictions.csv and score only the inputs not in it yet.")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in OUTPUT_DIR (only the files vip2clip wrote).")
    parser.add_argument("--references", default=None, metavar="DIR_GLOB_OR_BANK",
                        help="few-shot: a folder or glob of normal reference images, or a bank saved with "
                        "ViP2CLIPReferenceBank.save (.safetensors); the maps and scores are then fused with each "
                        "patch's distance to its nearest reference patch (docs/few_shot.md) (default: zero-shot).")
    add_common_arguments(parser, batch_size=8, output_dir="vip2clip-predictions",
                         output_help="where predictions.csv, skipped.csv and the overlays/maps/masks go", num_workers=None)
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog or "vip2clip predict", description=DESCRIPTION))


def job_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of `engine.prediction.predict` from this command's namespace."""
    from ..engine.prediction import PredictOptions

    return job_keywords(args, PredictOptions, overlays=not args.no_overlays,
                        report=not args.no_report)


def run(args: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..console import setup_logging
    from ..distributed import teardown_distributed

    if args.dataset:
        require_extra("datasets", "train", "--dataset")
    setup_logging()
    from ..engine.prediction import predict

    try:
        result = predict(**job_arguments(args))
    finally:
        teardown_distributed()
    if "csv" not in result:  # not the main process of a distributed run
        return 0
    rate = result["scored"] / result["seconds"] if result["seconds"] > 0 else 0.0
    print(f"scored {result['scored']} images in {result['seconds']:.1f} s ({rate:.2f} images/s), skipped "
          f"{result['skipped']}; {result['csv']} holds {result['rows']} images, {result['anomalous']} anomalous at "
          f"threshold {result['threshold']:g} ({result['threshold_source']})", file=sys.stdout)
    return 0 if result["rows"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_vip2clip.cli.predict` / `accelerate launch -m modeling_vip2clip.cli.predict`."""
    from .boundary import run_main

    return run_main(run, build_parser(prog="modeling_vip2clip.cli.predict").parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
