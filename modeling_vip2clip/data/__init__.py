"""Anomaly-detection data for vip2clip: images, labels, schema, converters, loading, transforms, synthetic data.

* :mod:`.images` — the one image reader (:func:`read_image`), the one file discovery (:func:`collect_inputs`)
  and the one extension set (:data:`IMAGE_EXTENSIONS`).
* :mod:`.labels` — the one label rule (:class:`LabelRule`, ``--normal-label``).
* :mod:`.schema` — the canonical ``datasets.Features`` and :func:`validate_sample`.
* :mod:`.converters` — MVTec-style trees, VisA's split CSV, the authors'
  ``meta.json`` and a user's own normal/anomalous folders → ``datasets.Dataset`` + a
  :class:`ConversionReport`. (MVTec AD: CC BY-NC-SA 4.0; VisA: CC BY 4.0.)
* :mod:`.sources` — :func:`load_anomaly_dataset`, the one dataset loader of every command: a saved folder, a raw
  benchmark folder, parquet/imagefolder files or a Hub id (optionally streamed), in any column names
  (:func:`add_schema_arguments` in :mod:`.options`), with ``<category>.<split>`` split patterns → the schema.
* :mod:`.transforms` — the one sample transform (:class:`SampleTransform`) and the torch datasets on it: training
  and evaluation (:func:`to_torch_dataset`, :func:`collate_skip_bad`), scoring (``FileImages``, ``RowImages``,
  ``StreamImages``).
* :mod:`.synthetic` — a procedural CC0 benchmark for tests and demos.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name → submodule. Imported on first use: `from modeling_vip2clip.data import convert` does not import torch
# (only .transforms needs it), and `python -m modeling_vip2clip.data.synthetic` does not find its module already
# imported by the package (runpy's RuntimeWarning).
_SUBMODULE_NAMES = {
    ".converters": (
        "ANOMALOUS_FOLDER_NAMES", "LICENSES", "MASK_FOLDER_NAMES", "MVTEC_CATEGORIES",
        "NORMAL_FOLDER_NAMES", "VISA_CATEGORIES", "ConversionOptions", "ConversionReport", "convert",
        "convert_folder", "convert_meta_json", "convert_mvtec", "convert_visa", "detect_layout",
        "suggest_folder_command", "unrecognised_layout_message",
    ),
    ".transforms": (
        "AnomalyBatchTransform", "SampleTransform", "SkipBadCollate", "TorchAnomalyDataset", "collate_skip_bad",
        "make_transform", "to_torch_dataset",
    ),
    ".images": ("IMAGE_EXTENSIONS", "ImageReadError", "collect_inputs", "read_image"),
    ".labels": ("ANOMALOUS_VALUES", "NORMAL_VALUES", "UNLABELLED", "LabelRule"),
    ".options": ("DEFAULT_COLUMNS", "add_schema_arguments", "schema_options"),
    ".sources": ("is_saved_dataset", "load_anomaly_dataset", "select_splits", "without_decoding"),
    ".schema": (
        "ANOMALY_FEATURES", "COLUMNS", "LABEL_NAMES", "DatasetError", "NORMAL_DEFECT", "UNKNOWN_DEFECT",
        "anomaly_features", "validate_sample",
    ),
    ".synthetic": ("DEFAULT_CATEGORIES", "DEFECT_KINDS", "LAYOUTS", "generate_synthetic_benchmark"),
}
_LAZY = {name: module for module, names in _SUBMODULE_NAMES.items() for name in names}

if TYPE_CHECKING:  # pragma: no cover
    from .converters import (
        ANOMALOUS_FOLDER_NAMES, LICENSES, MASK_FOLDER_NAMES, MVTEC_CATEGORIES,
        NORMAL_FOLDER_NAMES, VISA_CATEGORIES, ConversionOptions, ConversionReport, convert, convert_folder,
        convert_meta_json, convert_mvtec, convert_visa, detect_layout, suggest_folder_command,
        unrecognised_layout_message,
    )
    from .transforms import (
        AnomalyBatchTransform, SampleTransform, SkipBadCollate, TorchAnomalyDataset, collate_skip_bad,
        make_transform, to_torch_dataset,
    )
    from .images import IMAGE_EXTENSIONS, ImageReadError, collect_inputs, read_image
    from .labels import ANOMALOUS_VALUES, NORMAL_VALUES, UNLABELLED, LabelRule
    from .schema import (
        ANOMALY_FEATURES, COLUMNS, LABEL_NAMES, NORMAL_DEFECT, UNKNOWN_DEFECT, DatasetError, anomaly_features,
        validate_sample,
    )
    from .options import DEFAULT_COLUMNS, add_schema_arguments, schema_options
    from .sources import is_saved_dataset, load_anomaly_dataset, select_splits, without_decoding
    from .synthetic import DEFAULT_CATEGORIES, DEFECT_KINDS, LAYOUTS, generate_synthetic_benchmark


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_LAZY)
