"""Open an anomaly dataset wherever it is, in whatever columns it has, as this package's canonical schema.

:func:`load_anomaly_dataset` takes, in this order:

* a ``datasets.Dataset`` / ``DatasetDict`` / ``IterableDataset`` already loaded (e.g.
  ``load_dataset("parquet", data_files={...})``);
* a folder written by ``save_to_disk`` (``load_from_disk``);
* a raw benchmark folder whose layout :func:`~.converters.detect_layout` recognises (converted on the fly);
* a folder of data files (``parquet``/``arrow``/``csv``/``json``, e.g. a local copy of a Hub dataset repository,
  or an ``imagefolder`` with a ``metadata.csv``) or one such file, through ``datasets.load_dataset``;
* otherwise a Hub dataset id, through ``datasets.load_dataset`` (``streaming=True`` reads it lazily).

Other schemas are mapped onto the canonical columns (:mod:`.schema`): ``image_column``, ``label_column``,
``mask_column``, ``category_column`` name the source's columns. Labels follow the one label rule
(:mod:`.labels`): 0/1, booleans, normal/anomalous words, a ``ClassLabel`` read through its names in any order, or
— with ``normal_labels`` (``--normal-label good``) — a column of class names whose listed values are normal and
every other value an anomaly of that ``defect_type``.
Without a mask column the dataset is image-level only; without a category column the category comes from the
split name or the dataset's name.

Split patterns: ``split="test"`` on a dataset whose splits are ``candle.test``, ``pcb1.test``, … (the layout of
``BrachioLab/visa`` and of ``push_to_hub`` with one split per class) selects all of them, each row's category
taken from its split name; ``split="candle.test"`` selects one; ``categories`` keeps only the named ones.

:func:`add_schema_arguments` adds ``--image-column/--label-column/--mask-column/--category-column`` to an entry
point's parser and :func:`schema_options` turns them into this function's keywords. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .options import DEFAULT_COLUMNS, add_schema_arguments, schema_options  # noqa: F401 - re-exported
from ..errors import UsageError
from .labels import UNLABELLED, LabelRule
from .schema import COLUMNS, LABEL_NAMES, DatasetError, anomaly_features

__all__ = ["DEFAULT_COLUMNS", "is_saved_dataset", "load_anomaly_dataset", "add_schema_arguments", "schema_options",
           "select_splits", "without_decoding", "is_dataset_folder"]

logger = logging.getLogger(__name__)

_FLAGS = {key: "--" + key.replace("_", "-") for key in DEFAULT_COLUMNS}
_DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``Dataset``/``DatasetDict.save_to_disk``."""
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or (
        (p / "dataset_info.json").is_file() and (p / "state.json").is_file()
    )


# --------------------------------------------------------------------------------------------- command line


# --------------------------------------------------------------------------------------------- splits


def select_splits(names: Sequence[str], split: str | None, source: str) -> list[str]:
    """The split names of ``names`` that ``split`` selects: itself; ``"all"``: every one; a bare name such as
    ``"test"``: every ``<category>.test``; None: ``test``, else every ``<category>.test``, else the only one."""
    names = list(names)
    if split in names:
        return [split]
    suffixed = lambda s: [n for n in names if "." in n and n.rsplit(".", 1)[1] == s]  # noqa: E731
    if split is None:
        chosen = ["test"] if "test" in names else suffixed("test") or (names if len(names) == 1 else [])
        if chosen:
            return chosen
        raise DatasetError(f"{source} has several splits ({', '.join(names)}); pass --split with one of them")
    if split == "all":
        return names
    if suffixed(split):
        return suffixed(split)
    raise DatasetError(f"--split {split}: {source} has no split {split!r} nor any '<category>.{split}' "
                       f"(splits: {', '.join(names) or 'none'}); pass one of them")


# --------------------------------------------------------------------------------------------- schema mapping


@dataclass(frozen=True)
class _Columns:
    image: str = "image"
    label: str | None = "label"
    mask: str | None = "mask"
    category: str | None = "category"

    def check(self, available: Sequence[str], source: str, require_labels: bool) -> "_Columns":
        """The columns to read: a missing one is an error, except the defaults of the optional ones."""
        shown = ", ".join(available)

        def missing(key: str, name: str, what: str) -> DatasetError:
            flag = _FLAGS[key]
            return DatasetError(f"{flag} {name}: no column {name!r} in {source} (columns: {shown}); pass {flag} "
                                f"with the name of the column that holds {what}")

        if self.image not in available:
            raise missing("image_column", self.image, "the images")
        label = self.label
        if label is not None and label not in available:
            if require_labels or label != DEFAULT_COLUMNS["label_column"]:
                raise missing("label_column", label, "the normal/anomalous labels")
            label = None
        mask, category = self.mask, self.category
        if mask is not None and mask not in available:
            if mask != DEFAULT_COLUMNS["mask_column"]:
                raise missing("mask_column", mask, "the masks")
            mask = None
        if category is not None and category not in available:
            if category != DEFAULT_COLUMNS["category_column"]:
                raise missing("category_column", category, "the categories")
            category = None
        return _Columns(self.image, label, mask, category)


def _label_rule(ds, column: str | None, normal_labels: Sequence[str] | None) -> LabelRule | None:
    """The :class:`LabelRule` of ``column`` (None without labels); with ``--normal-label`` it checks that one of
    its values occurs (in the class names, or the column of a map-style dataset)."""
    from datasets import Dataset

    if column is None:
        return None
    names = getattr(ds.features[column], "names", None)
    rule = LabelRule(column, names, normal_labels)
    if normal_labels is not None:
        if names:
            rule.check_values(names)
        elif isinstance(ds, Dataset):
            rule.check_values(ds.unique(column))
    return rule


def _stored_paths(ds, column: str) -> list[str | None]:
    """The ``path`` of each stored image, read as Arrow in batches (the image bytes are never decoded)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths: list[str | None] = []
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=4096):
        array = batch.column(0)
        array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
        if pa.types.is_struct(array.type) and array.type.get_field_index("path") >= 0:
            paths += pc.struct_field(array, "path").to_pylist()
        elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            paths += array.to_pylist()
        else:
            paths += [None] * len(array)
    return paths


def _image_paths(stored: list[str | None], prefix: str) -> list[str]:
    """``<prefix>/<stored path>`` when the stored paths name every row uniquely, else ``<prefix>/<row index>``
    (so that merged categories never share an ``image_path``)."""
    if all(stored) and len(set(stored)) == len(stored):
        return [f"{prefix}/{Path(p).as_posix().lstrip('/')}" for p in stored]
    return [f"{prefix}/{i:06d}" for i in range(len(stored))]


def _is_canonical(ds, columns: _Columns, normal_labels: Sequence[str] | None = None) -> bool:
    """The canonical columns with 0/1 labels (a ``ClassLabel`` named normal/anomalous, or integers): used as
    they are. Any other label column (strings, other class names) goes through the label rule."""
    if columns != _Columns() or normal_labels is not None or not set(COLUMNS) <= set(ds.column_names or ()):
        return False
    feature = ds.features["label"]
    names = getattr(feature, "names", None)
    return list(names) == list(LABEL_NAMES) if names else str(getattr(feature, "dtype", "")).startswith(("int", "uint"))


def to_canonical(ds, columns: _Columns, *, split_tag: str, category: str, prefix: str, source: str,
                 require_labels: bool = True, normal_labels: Sequence[str] | None = None):
    """``ds`` (a ``Dataset`` or ``IterableDataset`` of one split) in the canonical schema."""
    from datasets import Dataset, Image as ImageFeature

    if ds.column_names is None:  # a streamed dataset whose features the source does not declare
        ds = ds._resolve_features()
    if _is_canonical(ds, columns, normal_labels):
        return ds.select_columns(list(COLUMNS))
    cols = columns.check(ds.column_names, source, require_labels)
    rule = _label_rule(ds, cols.label, normal_labels)
    features = anomaly_features()
    for key in (cols.image, cols.mask):
        if key is not None and not isinstance(ds.features[key], ImageFeature):
            ds = ds.cast_column(key, ImageFeature())  # paths or bytes → images

    if isinstance(ds, Dataset):  # read the small columns only; the images stay where they are (no copy)
        n = len(ds)
        pairs = [rule(v) for v in ds[cols.label]] if rule else [(UNLABELLED, "")] * n
        if "defect_type" in ds.column_names and cols.label:
            pairs = [(label, str(d) if label == 1 and d else defect)
                     for (label, defect), d in zip(pairs, ds["defect_type"])]
        categories = [str(c) for c in ds[cols.category]] if cols.category else [category] * n
        out = ds.select_columns([cols.image] + ([cols.mask] if cols.mask else []))
        out = out.rename_columns({k: v for k, v in ((cols.image, "image"), (cols.mask, "mask")) if k and k != v})
        if cols.mask is None:
            out = out.add_column("mask", [None] * n, feature=features["mask"])
        added = {"label": [p[0] for p in pairs], "category": categories, "defect_type": [p[1] for p in pairs],
                 "split": [split_tag] * n, "image_path": _image_paths(_stored_paths(ds, cols.image), prefix)}
        for name, values in added.items():
            out = out.add_column(name, values, feature=features[name])
        return out.select_columns(list(COLUMNS))

    # Streaming: the same mapping, lazily, row by row. Images and masks stay undecoded ({"bytes", "path"}, an
    # ``Image(decode=False)`` feature): reading a path costs no decode, and the consumer decodes where it runs
    # (``read_image`` in ``SampleTransform``, in DataLoader workers).
    for key in (cols.image, cols.mask):
        if key is not None:
            ds = ds.cast_column(key, ImageFeature(decode=False))
    features["image"], features["mask"] = ImageFeature(decode=False), ImageFeature(decode=False)

    def canonical(row: dict, index: int) -> dict:
        label, defect = rule(row[cols.label]) if rule else (UNLABELLED, "")
        if label == 1 and row.get("defect_type"):
            defect = str(row["defect_type"])
        stored = row[cols.image].get("path") if isinstance(row[cols.image], dict) else None
        return {"image": row[cols.image], "mask": row[cols.mask] if cols.mask else None, "label": label,
                "category": str(row[cols.category]) if cols.category else category, "defect_type": defect,
                "split": split_tag, "image_path": f"{prefix}/{stored or f'{index:06d}'}"}

    return ds.map(canonical, with_indices=True, remove_columns=ds.column_names, features=features)


# --------------------------------------------------------------------------------------------- loading


def without_decoding(dataset):
    """``dataset`` with its ``image``/``mask`` columns cast to ``Image(decode=False)`` (a metadata-only change):
    rows then carry ``{"bytes", "path"}``, and the consumer reads them (:func:`.images.read_image`) where it can
    report an unreadable one instead of failing inside ``datasets``."""
    from datasets import Image as ImageFeature

    for column in ("image", "mask"):
        feature = (dataset.features or {}).get(column)
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def is_dataset_folder(path: str | os.PathLike) -> bool:
    """True for a folder :func:`load_anomaly_dataset` opens as a dataset (saved with ``save_to_disk``, a benchmark
    layout the converters know, or data files), False for e.g. a plain folder of images."""
    from .converters import detect_layout

    path = Path(path)
    return path.is_dir() and (is_saved_dataset(path) or detect_layout(path) is not None or _has_data_files(path))


def _has_data_files(folder: Path) -> bool:
    if any((folder / name).is_file() for name in _METADATA_FILES):
        return True
    for i, p in enumerate(folder.rglob("*")):
        if i > 10_000:
            break
        if p.suffix.lower() in _DATA_FILE_BUILDERS and p.is_file():
            return True
    return False


def _splits_of(loaded) -> dict[str, Any]:
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        return dict(loaded)
    return {None: loaded}


@contextmanager
def _library_errors_held_back() -> Iterator[None]:
    """`datasets` logs a file it cannot read at ERROR, traceback included, and then raises; the raised error becomes
    the user's one line, so its log records are held back while a source is opened."""
    library = logging.getLogger("datasets")
    level = library.level
    library.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library.setLevel(level)


def load_anomaly_dataset(
    source: Any,
    split: str | None = None,
    categories: Sequence[str] | None = None,
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    mask_column: str | None = "mask",
    category_column: str | None = "category",
    normal_labels: Sequence[Any] | None = None,
    streaming: bool = False,
    require_labels: bool = True,
    return_report: bool = False,
    flag: str = "--dataset",
    **converter_kwargs: Any,
):
    """Open an anomaly dataset as a :class:`datasets.Dataset` (``IterableDataset`` with ``streaming``) in the
    canonical schema; see the module docstring for the sources, schemas and split patterns understood. Streamed
    rows carry their images and masks undecoded (``Image(decode=False)``: read with :func:`.images.read_image`).
    This is the one loader of every command (train, evaluate, calibrate, ``predict --dataset``, ``export
    --calibration-dataset``): they all see the same rows, labels, masks and categories.

    ``split``: a split name, a bare name matching ``<category>.<split>`` splits, ``"all"``, or None (``test``,
    else every ``<category>.test``, else the only split; a raw folder converts its ``test`` split; a saved
    ``Dataset`` is kept whole). On a saved ``Dataset`` (no splits) it filters the ``split`` column.
    ``categories`` keeps those categories. Labels follow :class:`.labels.LabelRule`; ``normal_labels`` (the
    ``--normal-label`` values) names the normal class(es) of a column of class names. ``label_column=None`` (or, with ``require_labels=False``, a missing
    default ``label`` column) gives an unlabelled dataset (``label`` -1), for scoring only. ``converter_kwargs``
    go to the converter of a raw folder (e.g. ``missing_mask="skip"``, ``progress=False``). With
    ``return_report`` the result is ``(dataset, report)``, the report None unless a raw folder was converted.
    A source, split, column or label that is not understood raises :class:`DatasetError` (a one-line user error
    that names ``flag`` for the source).
    """
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, concatenate_datasets

    columns = _Columns(image_column, label_column, mask_column, category_column)
    report = None
    if isinstance(source, (Dataset, DatasetDict, IterableDataset, IterableDatasetDict)):
        name = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
        splits = _splits_of(source)
        selected = ([(None, splits[None])] if None in splits else
                    [(s, splits[s]) for s in select_splits(list(splits), split, name)])
    else:
        from ..resolve import resolve_source

        name = str(source)
        try:
            resolved = resolve_source(name, flag, repo_type="dataset")  # a clear error before datasets is asked
        except DatasetError:
            raise
        except UsageError as error:  # a DatasetError, so that library callers may catch ValueError as before
            raise DatasetError(str(error)) from None
        try:
            with _library_errors_held_back():
                selected, report = _open(Path(resolved), name, split, categories, streaming, converter_kwargs)
        except DatasetError:
            raise
        except (OSError, ValueError) as error:  # e.g. unreadable data files
            raise DatasetError(f"{flag} {name}: cannot be opened as a dataset ({' '.join(str(error).split())[:200]});"
                               " pass a folder written by `vip2clip convert` / save_to_disk, a folder of parquet "
                               "files or a Hub dataset id") from error
        if report is not None:
            categories = None  # the converter applied them

    wanted = set(categories) if categories is not None else None
    parts = []
    for split_name, ds in selected:
        prefix, _, tag = (split_name or "").rpartition(".")
        if wanted is not None and prefix and columns.category not in (ds.column_names or ()) and prefix not in wanted:
            continue  # a <category>.<split> split of a category not asked for: not even read
        tag = tag or (split_name or "test")
        if streaming and isinstance(ds, Dataset):
            ds = ds.to_iterable_dataset()
        part = to_canonical(ds, columns, split_tag=tag, category=prefix or Path(name).name or "dataset",
                            prefix=split_name or tag, source=name, require_labels=require_labels,
                            normal_labels=normal_labels)
        if split_name is None and split not in (None, "all") and _is_canonical(ds, columns, normal_labels):
            part = part.filter(lambda v: v == split, input_columns="split")  # a saved Dataset with a split column
        parts.append(without_decoding(part) if streaming else part)
    if not parts:
        raise DatasetError(f"--categories {' '.join(categories or [])}: none of them in {name}; pass categories "
                           "among its splits' <category> names")
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    if wanted is not None:
        if isinstance(ds, Dataset):
            missing = wanted - set(ds.unique("category"))
            if missing:
                logger.warning("categories not found in %s: %s", name, sorted(missing))
        ds = ds.filter(lambda v: v in wanted, input_columns="category")
    return (ds, report) if return_report else ds


def _open(path: Path, text: str, split: str | None, categories: Sequence[str] | None, streaming: bool,
          converter_kwargs: dict) -> tuple[list[tuple[str | None, Any]], Any]:
    """([(split name or None, dataset)], conversion report or None) for a path or a Hub id."""
    from datasets import DatasetDict, get_dataset_split_names, load_dataset, load_from_disk

    from .converters import convert, detect_layout, unrecognised_layout_message

    if path.is_dir() and is_saved_dataset(path):
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            return [(s, loaded[s]) for s in select_splits(list(loaded), split, text)], None
        return [(None, loaded)], None
    if path.is_dir() and detect_layout(path) is not None:
        ds, report = convert(path, split=split or "test", categories=categories, **converter_kwargs)
        return [(None, ds)], report
    if path.is_dir() and _has_data_files(path):
        splits = _splits_of(load_dataset(str(path), streaming=streaming))
        return [(s, splits[s]) for s in select_splits(list(splits), split, text)], None
    if path.is_file() and path.suffix.lower() in _DATA_FILE_BUILDERS:
        loaded = load_dataset(_DATA_FILE_BUILDERS[path.suffix.lower()], data_files=str(path), streaming=streaming)
        return [(None, next(iter(_splits_of(loaded).values())))], None
    if path.is_dir():
        raise DatasetError(unrecognised_layout_message(path))
    if path.exists():
        raise DatasetError(f"{text} is a file but not a data file ({', '.join(_DATA_FILE_BUILDERS)}); pass a "
                           "dataset folder, a data file or a Hub dataset id")
    names = get_dataset_split_names(text)
    return [(s, load_dataset(text, split=s, streaming=streaming)) for s in select_splits(names, split, text)], None
