"""Anomaly-detection datasets for vip2clip: schema, converters, loading, synthetic data.

* :mod:`.schema` — the canonical ``datasets.Features`` and :func:`validate_sample`.
* :mod:`.converters` — MVTec-style trees, VisA's split CSV, the authors'
  ``meta.json`` and a user's own normal/anomalous folders → ``datasets.Dataset`` + a
  :class:`ConversionReport`. (MVTec AD: CC BY-NC-SA 4.0; VisA: CC BY 4.0.)
* :mod:`.loading` — :func:`load_anomaly_dataset`, :func:`make_transform`,
  :func:`collate_skip_bad`, :func:`to_torch_dataset`.
* :mod:`.synthetic` — a procedural CC0 benchmark for tests and demos.
"""

from .converters import (
    ANOMALOUS_FOLDER_NAMES,
    IMAGE_EXTENSIONS,
    LICENSES,
    MASK_FOLDER_NAMES,
    MVTEC_CATEGORIES,
    NORMAL_FOLDER_NAMES,
    VISA_CATEGORIES,
    ConversionOptions,
    ConversionReport,
    convert,
    convert_folder,
    convert_meta_json,
    convert_mvtec,
    convert_visa,
    detect_layout,
    suggest_folder_command,
    unrecognised_layout_message,
)
from .loading import (
    AnomalyBatchTransform,
    SkipBadCollate,
    TorchAnomalyDataset,
    collate_skip_bad,
    is_saved_dataset,
    load_anomaly_dataset,
    make_transform,
    to_torch_dataset,
    without_decoding,
)
from .schema import (
    ANOMALY_FEATURES,
    COLUMNS,
    LABEL_NAMES,
    DatasetError,
    NORMAL_DEFECT,
    UNKNOWN_DEFECT,
    anomaly_features,
    decode_image,
    validate_sample,
)

_SYNTHETIC_NAMES = ("DEFAULT_CATEGORIES", "DEFECT_KINDS", "LAYOUTS", "generate_synthetic_benchmark")


def __getattr__(name: str):
    # Imported lazily so that ``python -m modeling_vip2clip.data.synthetic`` does not find the
    # module already imported by its package (runpy's RuntimeWarning).
    if name in _SYNTHETIC_NAMES:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ANOMALOUS_FOLDER_NAMES",
    "ANOMALY_FEATURES",
    "COLUMNS",
    "DEFAULT_CATEGORIES",
    "DEFECT_KINDS",
    "IMAGE_EXTENSIONS",
    "LABEL_NAMES",
    "LAYOUTS",
    "LICENSES",
    "MASK_FOLDER_NAMES",
    "MVTEC_CATEGORIES",
    "NORMAL_FOLDER_NAMES",
    "NORMAL_DEFECT",
    "UNKNOWN_DEFECT",
    "VISA_CATEGORIES",
    "ConversionOptions",
    "ConversionReport",
    "DatasetError",
    "SkipBadCollate",
    "TorchAnomalyDataset",
    "anomaly_features",
    "collate_skip_bad",
    "convert",
    "convert_folder",
    "convert_meta_json",
    "convert_mvtec",
    "convert_visa",
    "decode_image",
    "detect_layout",
    "suggest_folder_command",
    "generate_synthetic_benchmark",
    "is_saved_dataset",
    "load_anomaly_dataset",
    "AnomalyBatchTransform",
    "make_transform",
    "to_torch_dataset",
    "unrecognised_layout_message",
    "validate_sample",
    "without_decoding",
]
