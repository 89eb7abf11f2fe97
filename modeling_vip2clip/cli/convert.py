"""`vip2clip convert`: a raw anomaly benchmark folder → a saved ``datasets`` folder in this package's schema.

    vip2clip convert --root /data/mvtec_raw --out /data/mvtec                      # layout detected
    vip2clip convert --layout folder --root line3/ --normal-dir OK --anomalous-dir scratch dent \\
        --mask-dir masks --out line3_ds                                          # your own folders
    python -m modeling_vip2clip.cli.convert --help                           # the same, without the script

The converters are those of :mod:`modeling_vip2clip.data.converters`; the schema is
:mod:`modeling_vip2clip.data.schema`. Nothing heavy is imported before the arguments are parsed, so
``--help`` and the checks of ``--root`` / ``--out`` answer at once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from .options import add_debug_argument

__all__ = ["DESCRIPTION", "LAYOUTS", "add_arguments", "run", "main"]

DESCRIPTION = (
    "Convert a raw anomaly benchmark (MVTec-style tree, VisA CSV, the authors' meta.json, or your own "
    "normal/anomalous folders) to the canonical datasets schema and save it with save_to_disk."
)
LAYOUTS = ("auto", "mvtec", "visa", "meta_json", "folder")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `vip2clip convert` to ``parser``."""
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="auto",
        help="source layout: mvtec (<cat>/{train,test}/<defect>/ + ground_truth/; also MPDD, BTAD), visa "
        "(split_csv/1cls.csv), meta_json (the authors' meta.json), folder (your own folders of normal and "
        "anomalous images [+ masks], see --normal-dir), or auto to detect it (default: auto).",
    )
    parser.add_argument("--root", required=True, metavar="DIR", help="root folder of the raw benchmark.")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (datasets.save_to_disk, images embedded).")
    parser.add_argument("--split", default="test", choices=["test", "train", "all"],
                        help="split to convert (default: test; the folder layout has none and tags every row "
                        "with this split, 'all' tagging 'test').")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT",
                        help="convert these categories only (default: all).")
    folder = parser.add_argument_group(
        "your own folders (--layout folder, the convention of anomalib's Folder)",
        "Folder names are sub-folders of --root (or of each of its category sub-folders), matched exactly. "
        "Without these flags the names are matched case-insensitively: normal good, ok, normal, nominal; "
        "anomalous bad, anomalous, anomaly, defect, defective, ng; masks masks, mask.",
    )
    folder.add_argument("--normal-dir", nargs="+", default=None, metavar="NAME",
                        help="folder(s) of normal images (default: those with a normal name, see above).")
    folder.add_argument("--anomalous-dir", nargs="+", default=None, metavar="NAME",
                        help="folder(s) of anomalous images; each folder's name is the defect_type of its images "
                        "(a generic name such as bad or NG: its sub-folders name the defect types) (default: "
                        "those with an anomalous name, see above).")
    folder.add_argument("--mask-dir", default=None, metavar="NAME",
                        help="folder of masks, matched to anomalous images by file stem (x.png ↔ x.png or "
                        "x_mask.png), looked up in NAME/<image folder>/ then NAME/ (default: masks or mask if "
                        "present, else image-level labels only).")
    parser.add_argument(
        "--missing-mask", choices=["keep", "skip"], default="keep",
        help="anomalous images whose mask is missing: keep them (image metrics only) or skip them (default: keep).",
    )
    parser.add_argument("--license", default=None,
                        help="licence string stored in the dataset info (default: detected for MVTec AD / VisA).")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder.")
    add_debug_argument(parser)
    return parser


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path, str | None]:
    """The cheap checks, before anything heavy is imported: (root, out, layout or None for auto)."""
    root = Path(args.root).expanduser()
    if not root.exists():
        raise UsageError(f"--root {args.root} does not exist; pass the folder that holds the raw benchmark")
    if not root.is_dir():
        raise UsageError(f"--root {args.root} is a file, not a folder; pass the folder that holds the raw benchmark")
    layout = None if args.layout == "auto" else args.layout
    folder_flags = [flag for flag, value in (("--normal-dir", args.normal_dir), ("--anomalous-dir", args.anomalous_dir),
                                             ("--mask-dir", args.mask_dir)) if value is not None]
    if folder_flags:
        if layout not in (None, "folder"):
            raise UsageError(f"{' / '.join(folder_flags)} apply to --layout folder, not --layout {layout}; "
                             "drop them or pass --layout folder")
        layout = "folder"
    return root, Path(args.out).expanduser(), layout


# What `save_to_disk` writes at the top of a folder: all that `--overwrite` may remove from an --out folder written
# before manifests existed.
_SAVED_DATASET = ("data-*.arrow", "dataset_info.json", "state.json", "dataset_dict.json", "cache-*.arrow")


def _claim_out(args: argparse.Namespace, root: Path):
    """`--out`, claimed (run_folder.py): never --root, inside it or around it; a folder holding files only with
    --overwrite, which replaces only what vip2clip wrote there, once the new dataset is complete."""
    from ..run_folder import claim_output_folder

    manifest = {"written_by": "vip2clip convert",
                "inputs": {"root": str(root.resolve()), "layout": args.layout, "split": args.split,
                           "categories": args.categories},
                "options": {"missing_mask": args.missing_mask}}
    return claim_output_folder(args.out, manifest, overwrite=args.overwrite, writes=_SAVED_DATASET, flag="--out",
                               can_resume=False, input_dirs=[root], replace_on_move=True)


def _save(dataset, folder) -> None:
    """Write into a staging folder inside ``--out`` and move the files into place only when complete: an
    interrupted save (or overwrite) leaves the old dataset as it was."""
    from ..run_folder import move_into_place, staging_folder

    from ..errors import writing

    staged = staging_folder(folder)
    try:
        with writing(folder.path):  # a full disk names --out (datasets' writer raises without a file name)
            dataset.save_to_disk(str(staged))
        move_into_place(folder, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.root`` and save it to ``args.out``; user errors raise :class:`UsageError`."""
    from ..errors import require_extra

    require_extra("datasets", "train", "vip2clip convert")  # before any work: the `demo` extra alone lacks it
    root, out, layout = _check_paths(args)
    folder = _claim_out(args, root)  # before the work: a held or non-empty --out is refused at once
    try:
        return _convert(args, root, out, layout, folder)
    finally:
        folder.release()


def _convert(args: argparse.Namespace, root: Path, out: Path, layout: str | None, folder) -> int:
    from ..data import convert, detect_layout, unrecognised_layout_message  # after the checks

    if layout is None and detect_layout(root) is None:
        raise UsageError(unrecognised_layout_message(args.root, args.out))

    kwargs = {"missing_mask": args.missing_mask}
    if args.license:
        kwargs["license"] = args.license
    if layout == "folder":
        kwargs.update(normal_dirs=args.normal_dir, anomalous_dirs=args.anomalous_dir, mask_dir=args.mask_dir)
    # A DatasetError (a named folder missing, ...) is a UsageError: run_main shows it as one line.
    dataset, report = convert(root, split=args.split, categories=args.categories, layout=layout, **kwargs)
    if len(dataset) == 0:
        print(report.summary(), file=sys.stderr)
        which = f" for --categories {' '.join(args.categories)}" if args.categories else ""
        raise UsageError(f"--root {args.root}: no usable image in split {args.split!r}{which}; check --split / "
                         "--categories, or the skipped files listed above")
    _save(dataset, folder)
    folder.finish()
    print(report.summary())
    categories = sorted(set(dataset["category"]))
    anomalous = sum(dataset["label"])
    print(f"saved {len(dataset)} images ({anomalous} anomalous) in {len(categories)} categories to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modeling_vip2clip.cli.convert``: the same as ``vip2clip convert``."""
    from .boundary import run_main

    parser = argparse.ArgumentParser(prog="vip2clip convert", description=DESCRIPTION)
    return run_main(run, add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
