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

__all__ = ["build_parser", "main", "add_convert_arguments", "run_convert"]

_LAYOUTS = ("auto", "mvtec", "visa", "meta_json", "folder")


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--layout", choices=_LAYOUTS, default="auto",
        help="source layout: mvtec (<cat>/{train,test}/<defect>/ + ground_truth/; also MPDD, BTAD), visa "
        "(split_csv/1cls.csv), meta_json (the authors' meta.json), folder (good/ + bad/ [+ masks/]), or auto to "
        "detect it (default: auto).",
    )
    parser.add_argument("--root", required=True, metavar="DIR", help="root folder of the raw benchmark.")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (datasets.save_to_disk, images embedded).")
    parser.add_argument("--split", default="test", choices=["test", "train", "all"], help="split to convert (default: test).")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="convert these categories only (default: all).")
    parser.add_argument(
        "--missing-mask", choices=["keep", "skip"], default="keep",
        help="anomalous images whose mask is missing: keep them (image metrics only) or skip them (default: keep).",
    )
    parser.add_argument("--license", default=None, help="licence string stored in the dataset info (default: detected for MVTec AD / VisA).")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder.")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Convert a raw benchmark with the converters of `modeling_vip2clip.data` and save it to disk."""
    import shutil
    from pathlib import Path

    from .data import convert

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            print(f"error: {out} exists and is not empty; pass --overwrite to replace it.", file=sys.stderr)
            return 1
        shutil.rmtree(out)
    kwargs = {"missing_mask": args.missing_mask}
    if args.license:
        kwargs["license"] = args.license
    dataset, report = convert(args.root, split=args.split, categories=args.categories,
                              layout=None if args.layout == "auto" else args.layout, **kwargs)
    if len(dataset) == 0:
        print(report.summary(), file=sys.stderr)
        print(f"error: nothing to convert in {args.root} (split {args.split!r}).", file=sys.stderr)
        return 1
    dataset.save_to_disk(str(out))
    print(report.summary())
    categories = sorted(set(dataset["category"]))
    anomalous = sum(dataset["label"])
    print(f"saved {len(dataset)} images ({anomalous} anomalous) in {len(categories)} categories to {out}")
    return 0


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
         "Convert a raw anomaly benchmark (MVTec-style tree, VisA CSV, the authors' meta.json, or good/bad folders) "
         "to the canonical datasets schema and save it with save_to_disk."),
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
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
