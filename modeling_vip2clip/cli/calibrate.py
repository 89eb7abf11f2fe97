"""`vip2clip calibrate`: the command line of `engine.calibration.calibrate` (what it computes and writes: that
module's docstring). Several processes: `accelerate launch -m modeling_vip2clip.cli.calibrate ...`."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..data.options import add_schema_arguments
from .options import add_common_arguments, job_keywords, open_fraction

__all__ = ["DESCRIPTION", "add_arguments", "build_parser", "job_arguments", "main", "run"]

DESCRIPTION = ("Calibrate a model's decision thresholds and save a copy of the model that carries them: on a "
               "labelled dataset (F1-max image and pixel thresholds), or on good parts only (--normal-images: the "
               "score quantile giving --false-alarm-rate); zero-shot means no training on the target, calibrating "
               "on a few images of it is your explicit choice.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, metavar="DIR", help="ViP2CLIP model folder (or Hub id) to calibrate.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="ID_OR_PATH",
                        help="labelled dataset: a saved/converted folder, a raw benchmark folder, a folder of parquet "
                        "files or a Hub dataset id (F1-max thresholds; a dataset whose rows are all normal gets the "
                        "normal-only thresholds of --normal-images).")
    source.add_argument("--normal-images", nargs="+", metavar="INPUT",
                        help="good parts only: image files, folders (recursive), glob patterns or @LIST files; the "
                        "thresholds are set so that about --false-alarm-rate of such images would be flagged.")
    parser.add_argument("--false-alarm-rate", type=open_fraction, default=0.01, metavar="RATE",
                        help="normal-only calibration: the fraction of normal images (and pixels) allowed at or above "
                        "the thresholds (default: 0.01); use at least 10 / RATE images.")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the calibrated copy of the model goes.")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists.")
    parser.add_argument("--split", default="test",
                        help="dataset split; also every split named <category>.<split> (default: test).")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="calibrate on these categories only (default: all).")
    parser.add_argument("--dataset-name", default=None, help="name recorded in the calibration info (default: the folder's name or the id).")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first.")
    add_schema_arguments(parser)
    parser.add_argument("--device", default=None,
                        help="torch device (default: the process's GPU under accelerate launch, else cuda if "
                        "available, else cpu).")
    add_common_arguments(parser, batch_size=8, output_dir=None, num_workers=2)
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog or "vip2clip calibrate", description=DESCRIPTION))


def job_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of `engine.calibration.calibrate` from this command's namespace."""
    from ..engine.calibration import CalibrateOptions

    return job_keywords(args, CalibrateOptions)


def run(args: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..console import setup_logging
    from ..distributed import process_state, teardown_distributed

    for module in ("datasets", "sklearn", "scipy"):
        require_extra(module, "train", "vip2clip calibrate")
    setup_logging()
    from ..engine.calibration import calibrate

    try:
        result = calibrate(**job_arguments(args))
        if not process_state().is_main_process:  # one summary, from the main process
            return 0
    finally:
        teardown_distributed()
    if result["num_anomalous"] == 0:  # the normal-only route
        print(f"calibrated on {result['num_images']} normal images ({result['num_skipped']} skipped) at a false-alarm "
              f"rate of {result['false_alarm_rate']:g}: image_threshold {result['image_threshold']:.6g}, "
              f"pixel_threshold {result['pixel_threshold']:.6g}; wrote {args.out}")
        return 0
    pixel = ("unset (no masks)" if result["pixel_threshold"] is None else
             f"{result['pixel_threshold']:.6g} (pixel F1-max {result['pixel_f1_max']:.4f})")
    print(f"calibrated on {result['num_images']} images of {result['dataset']} ({result['num_normal']} normal, "
          f"{result['num_anomalous']} anomalous, {result['num_anomalous_with_mask']} with a mask; "
          f"{result['num_skipped']} skipped): image_threshold {result['image_threshold']:.6g} (image F1-max "
          f"{result['image_f1_max']:.4f}), pixel_threshold {pixel}; wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_vip2clip.cli.calibrate`."""
    from .boundary import run_main

    return run_main(run, build_parser(prog="modeling_vip2clip.cli.calibrate").parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
