"""`vip2clip convert`: convert a raw anomaly benchmark to the canonical `datasets` schema and save it to disk."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .runtime import UsageError, add_debug_argument

__all__ = ["DESCRIPTION", "add_arguments", "run", "main"]

DESCRIPTION = ("Convert a raw anomaly benchmark (MVTec-style tree, VisA CSV, the authors' meta.json, or good/bad "
               "folders) to the canonical datasets schema and save it with save_to_disk.")

_LAYOUTS = ("auto", "mvtec", "visa", "meta_json", "folder")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
    add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert a raw benchmark with the converters of `modeling_vip2clip.data` and save it to disk."""
    import shutil
    from pathlib import Path

    from .data import convert

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"--out {out}: exists and is not empty; pass --overwrite to replace it.")
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


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime import run_main

    parser = argparse.ArgumentParser(prog="modeling_vip2clip.convert_dataset", description=DESCRIPTION)
    return run_main(run, add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
