"""The `vip2clip` command: `train`, `evaluate`, `predict` and `convert` (datasets) subcommands.

    vip2clip convert --layout mvtec --root /data/mvtec_raw --out /data/mvtec --split test
    vip2clip train --clip openai/clip-vit-large-patch14-336 --dataset /data/mvtec --output-dir runs/mvtec
    vip2clip evaluate --model runs/mvtec/model --dataset /data/visa --output-dir results/visa
    vip2clip predict --model runs/mvtec/model photos/ 'line3/**/*.png' --threshold 0.5

`vip2clip COMMAND --help` lists every option with its default. For several GPUs or machines, run the training
and evaluation modules under Accelerate instead: `accelerate launch -m modeling_vip2clip.train ...` (see
`docs/training.md`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .convert_dataset import DESCRIPTION as _CONVERT_DESCRIPTION, UsageError
from .convert_dataset import add_arguments as add_convert_arguments, run as run_convert

__all__ = ["build_parser", "main", "add_convert_arguments", "run_convert"]


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, predict, train

    parser = argparse.ArgumentParser(
        prog="vip2clip",
        description="ViP2-CLIP zero-shot anomaly detection: train the prompt heads, evaluate on benchmarks, score "
        "images, convert datasets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `vip2clip COMMAND --help` for the options of a command.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vip2clip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    specs = [
        ("train", train.add_arguments, "train the ICA/FGP heads on an auxiliary dataset (Accelerate loop)",
         train.build_parser().description),
        ("evaluate", evaluate.add_arguments, "per-category image/pixel metrics on a benchmark (table + JSON)",
         evaluate.build_parser().description),
        ("predict", predict.add_arguments, "score image files/folders/globs: CSV + overlay PNGs",
         predict.build_parser().description),
        ("convert", add_convert_arguments, "convert a raw benchmark folder to a saved datasets folder",
         _CONVERT_DESCRIPTION),
    ]
    for name, add, summary, description in specs:
        sub = commands.add_parser(name, help=summary, description=description)
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .train import run
    elif args.command == "evaluate":
        from .evaluate import run
    elif args.command == "predict":
        from .predict import run
    else:
        run = run_convert
    try:
        return run(args)
    except UsageError as exc:  # the one-line user error of issue 12 (the lead's runtime.run_main replaces this)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
