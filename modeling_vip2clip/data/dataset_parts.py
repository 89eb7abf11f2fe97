"""Datasets in any schema as input of `predict` and `calibrate`: `open_dataset_parts` maps a dataset's columns
to the canonical names and understands split patterns such as `<category>.test`; `add_column_arguments` adds the
`--image-column` / `--label-column` / `--mask-column` / `--category-column` options.

A thin adapter over `datasets.load_dataset` / `load_from_disk`, isolated here so that the package's shared schema
mapping (`modeling_vip2clip.data`) can replace it; nothing heavy is imported at module level (fast `--help`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError

__all__ = ["DatasetPart", "add_column_arguments", "open_dataset_parts"]


def add_column_arguments(parser) -> None:
    """--image-column, --label-column, --mask-column, --category-column (datasets in other schemas)."""
    parser.add_argument("--image-column", default="image", metavar="NAME", help="the dataset's image column (default: image).")
    parser.add_argument("--label-column", default=None, metavar="NAME",
                        help="the dataset's label column; 0 / false / normal / good = normal (default: label, when present).")
    parser.add_argument("--mask-column", default=None, metavar="NAME",
                        help="the dataset's defect-mask column (default: mask, when present).")
    parser.add_argument("--category-column", default=None, metavar="NAME",
                        help="the dataset's category column (default: category, when present; else the category "
                        "from split names such as candle.test).")


@dataclass
class DatasetPart:
    """One split of a dataset, its columns renamed to `image` (and `label`, `mask`, `category`, `image_path`
    when present); `category` is the one its name gives (`candle` for `candle.test`), else ""."""

    name: str
    category: str
    dataset: Any  # datasets.Dataset, or datasets.IterableDataset when streaming


def _choose_splits(names: Sequence[str], split: str, where: str) -> list[str]:
    if split in names:
        return [split]
    matches = sorted(name for name in names if name.endswith(f".{split}"))
    if not matches:
        raise UsageError(f"--split {split}: {where} has no such split (it has: {', '.join(sorted(names)) or 'none'}); "
                         "pass one of them, or a suffix such as test for the splits named <category>.test.")
    return matches


def _split_category(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _map_columns(dataset, where: str, columns: dict[str, str | None], explicit: set[str]):
    """Keep and rename the columns `{canonical: actual}`; image and mask columns are left undecoded (the
    DataLoader workers decode them and report the ones that fail)."""
    from datasets import Image as ImageFeature

    available = list(dataset.column_names or (dataset.features or {}).keys())
    for canonical, actual in list(columns.items()):
        if actual is not None and available and actual not in available:
            if canonical in explicit:
                raise UsageError(f"--{canonical.replace('_', '-')}-column {actual}: {where} has no such column (it "
                                 f"has: {', '.join(available)}); pass one of them.")
            columns[canonical] = None
    chosen = {canonical: actual for canonical, actual in columns.items() if actual is not None}
    dataset = dataset.select_columns(list(dict.fromkeys(chosen.values())))
    renames = {actual: canonical for canonical, actual in chosen.items() if actual != canonical}
    if renames:
        dataset = dataset.rename_columns(renames)
    for name in ("image", "mask"):
        feature = (dataset.features or {}).get(name)
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
    return dataset


def open_dataset_parts(
    source: str,
    split: str = "test",
    *,
    image_column: str = "image",
    label_column: str | None = None,
    mask_column: str | None = None,
    category_column: str | None = None,
    categories: Sequence[str] | None = None,
    streaming: bool = False,
    flag: str = "--dataset",
) -> list[DatasetPart]:
    """Open `source` — a folder written by `save_to_disk` (e.g. by `vip2clip convert`), a raw benchmark folder
    (converted by `modeling_vip2clip.data`), a folder of parquet/image files, or a Hub dataset id — as one
    :class:`DatasetPart` per selected split, with the given columns mapped to the canonical names.

    `split` selects a split by name, or every split named `<category>.<split>` when there is none of that name
    (the layout of e.g. `BrachioLab/visa`: `candle.test`, `pcb1.test`, ...; the category comes from the name).
    A saved single `Dataset` (the canonical schema) is filtered on its `split` column instead. `label_column`,
    `mask_column`, `category_column` default to `label`, `mask`, `category` when the dataset has them.
    `categories` keeps only those categories. `streaming` gives `IterableDataset`s (nothing downloaded first).

    (A thin adapter over `datasets.load_dataset` / `load_from_disk`, kept in this one function so that the
    package's shared schema mapping can replace it.)
    """
    from datasets import Dataset, get_dataset_split_names, load_dataset, load_from_disk

    from ..data import detect_layout, is_saved_dataset, load_anomaly_dataset
    from ..resolve import resolve_source

    resolved = resolve_source(source, flag, repo_type="dataset")
    path = Path(resolved)
    where = f"{flag} {source}"
    try:
        if path.is_dir() and is_saved_dataset(path):
            loaded = load_from_disk(str(path))
            if isinstance(loaded, Dataset):
                if split not in (None, "all") and "split" in loaded.column_names:
                    loaded = loaded.filter(lambda value: value == split, input_columns="split")
                splits = {split: loaded}
            else:
                splits = {name: loaded[name] for name in _choose_splits(list(loaded), split, where)}
            if streaming:
                splits = {name: ds.to_iterable_dataset() for name, ds in splits.items()}
        elif path.is_dir() and detect_layout(path) is not None:
            dataset = load_anomaly_dataset(path, split=split)  # the raw layouts the converters know
            splits = {split: dataset.to_iterable_dataset() if streaming else dataset}
        else:
            names = get_dataset_split_names(resolved)
            splits = {name: load_dataset(resolved, split=name, streaming=streaming)
                      for name in _choose_splits(names, split, where)}
    except UsageError:
        raise
    except (OSError, ValueError, FileNotFoundError) as error:
        raise UsageError(f"{where}: cannot be opened as a dataset ({' '.join(str(error).split())[:200]}); pass a "
                         "folder written by `vip2clip convert` / save_to_disk, a folder of parquet files, or a Hub "
                         "dataset id.") from error

    # The image column is required; the others are used when present, and must exist when named.
    explicit = {"image"} | {name for name, value in (("label", label_column), ("mask", mask_column),
                                                     ("category", category_column)) if value is not None}
    wanted = frozenset(categories or ())
    parts = []
    for name, dataset in splits.items():
        columns = {"image": image_column, "label": label_column or "label", "mask": mask_column or "mask",
                   "category": category_column or "category", "image_path": "image_path"}
        dataset = _map_columns(dataset, f"{where} (split {name})", columns, explicit)
        part = DatasetPart(name=name, category=_split_category(name), dataset=dataset)
        if categories is not None:
            if "category" in (dataset.column_names or []):
                part.dataset = dataset.filter(lambda value: value in wanted, input_columns="category")
            elif part.category not in wanted:
                continue
        parts.append(part)
    if not parts:
        raise UsageError(f"--categories {' '.join(categories or [])}: none of them is in {where} (split {split}); "
                         "check the names.")
    return parts
