"""The command-line options that name a dataset's columns (`--image-column` ...), with no heavy import, so that
every entry point's `--help` stays fast."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_COLUMNS", "add_schema_arguments", "schema_options"]

#: The canonical column each option names, and its default (the canonical name itself).
DEFAULT_COLUMNS = {"image_column": "image", "label_column": "label", "mask_column": "mask",
                   "category_column": "category"}


def add_schema_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--image-column``, ``--label-column``, ``--mask-column``, ``--category-column`` (for datasets in
    other schemas, e.g. ``BrachioLab/visa``); pass :func:`schema_options` ``(args)`` to
    :func:`load_anomaly_dataset`."""
    group = parser.add_argument_group(
        "dataset columns", "for a dataset in another schema (a Hub dataset, parquet files): the names of its "
        "columns. A --split such as test also selects every split named <category>.test.")
    group.add_argument("--image-column", default="image", metavar="NAME",
                       help="column of the images (default: image).")
    group.add_argument("--label-column", default="label", metavar="NAME",
                       help="column of the labels: 0/1, true/false, normal/anomalous names, or a ClassLabel whose "
                       "normal class is named good/normal/ok/nominal (default: label).")
    group.add_argument("--mask-column", default="mask", metavar="NAME",
                       help="column of the ground-truth masks, any non-zero pixel a defect (default: mask; without "
                       "such a column the metrics are image-level only).")
    group.add_argument("--category-column", default="category", metavar="NAME",
                       help="column of the object/texture class (default: category; without such a column the "
                       "category is the <category> of a <category>.<split> split name, else the dataset's name).")
    return parser


def schema_options(args: argparse.Namespace) -> dict[str, str]:
    """The keywords of :func:`load_anomaly_dataset` from the flags of :func:`add_schema_arguments`."""
    return {key: getattr(args, key, default) for key, default in DEFAULT_COLUMNS.items()}
