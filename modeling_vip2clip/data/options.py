"""The command-line options that name a dataset's columns (`--image-column` ...) and its normal class
(`--normal-label`), shared by every command that opens a dataset, with no heavy import, so that every entry
point's `--help` stays fast."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Sequence

__all__ = ["DEFAULT_COLUMNS", "DatasetColumns", "add_schema_arguments", "schema_options"]


@dataclass(kw_only=True)
class DatasetColumns:
    """The dataset-schema options every job that opens a dataset takes (`predict`, `evaluate`, `calibrate`,
    `train`): the flags of :func:`add_schema_arguments`. A keyword-only base of each job's options dataclass, so
    the five fields and their defaults exist once."""

    image_column: str = "image"
    label_column: str = "label"
    mask_column: str = "mask"
    category_column: str = "category"
    normal_label: Sequence[str] | None = None


#: The canonical column each option names, and its default (the canonical name itself).
DEFAULT_COLUMNS = {field.name: field.default for field in fields(DatasetColumns) if field.name.endswith("_column")}
#: The normal/anomalous words of the label rule, for the help text (the rule itself: `.labels`, not imported here
#: to keep `--help` free of the `datasets` import).
_LABEL_HELP = ("0/1, true/false, normal/good/ok/nominal vs anomalous/anomaly/bad/defect/defective/ng, or a "
               "ClassLabel whose class names say so (in any order)")


def add_schema_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--image-column``, ``--label-column``, ``--mask-column``, ``--category-column`` (for datasets in
    other schemas, e.g. ``BrachioLab/visa``) and ``--normal-label``; pass :func:`schema_options` ``(args)`` to
    :func:`load_anomaly_dataset`. Every command that opens a dataset adds exactly these."""
    group = parser.add_argument_group(
        "dataset columns", "for a dataset in another schema (a Hub dataset, parquet files): the names of its "
        "columns. A --split such as test also selects every split named <category>.test.")
    group.add_argument("--image-column", default="image", metavar="NAME",
                       help="column of the images (default: image).")
    group.add_argument("--label-column", default="label", metavar="NAME",
                       help=f"column of the labels: {_LABEL_HELP}; for a column of class names see --normal-label "
                       "(default: label; commands that need no labels go on without it when it is missing).")
    group.add_argument("--normal-label", nargs="+", default=None, metavar="VALUE",
                       help="the value(s) of the label column that mark normal images, e.g. --normal-label good "
                       "for a column of defect names (good / scratch / crack): every other value is anomalous and "
                       "kept as its defect type. Needed when the labels are not the words above.")
    group.add_argument("--mask-column", default="mask", metavar="NAME",
                       help="column of the ground-truth masks, any non-zero pixel a defect (default: mask; without "
                       "such a column the metrics are image-level only).")
    group.add_argument("--category-column", default="category", metavar="NAME",
                       help="column of the object/texture class (default: category; without such a column the "
                       "category is the <category> of a <category>.<split> split name, else the dataset's name).")
    return parser


def schema_options(args: argparse.Namespace) -> dict:
    """The keywords of :func:`load_anomaly_dataset` from the flags of :func:`add_schema_arguments`."""
    options = {key: getattr(args, key, default) for key, default in DEFAULT_COLUMNS.items()}
    options["normal_labels"] = getattr(args, "normal_label", None)
    return options
