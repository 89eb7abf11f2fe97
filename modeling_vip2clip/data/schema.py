"""Canonical ``datasets`` schema for anomaly-detection benchmarks.

Every converter in :mod:`modeling_vip2clip.data.converters` produces rows with
exactly these columns, so training and evaluation code never has to know which
on-disk layout (MVTec AD tree, VisA CSV, the authors' ``meta.json``, a user's own
normal/anomalous folders; a Hub dataset in other columns, see :mod:`.sources`) a dataset came from:

============== ======================= =========================================
column         feature                 meaning
============== ======================= =========================================
image          ``Image()``             the image (path or embedded bytes)
mask           ``Image()``             binary 0/255 ground-truth mask, or None
                                       (normal image, or no mask available)
label          ``ClassLabel``          0 = ``normal``, 1 = ``anomalous``
category       ``Value("string")``     object / texture class (e.g. ``bottle``)
defect_type    ``Value("string")``     ``"good"`` for normal images, else the
                                       defect name (``"anomaly"`` if unknown)
split          ``Value("string")``     ``"train"`` or ``"test"`` (source split)
image_path     ``Value("string")``     source path relative to the dataset
                                       root, POSIX separators (for reports)
============== ======================= =========================================
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from datasets import ClassLabel, Features, Image, Value

from ..errors import UsageError
from .images import read_image

__all__ = [
    "DatasetError",
    "LABEL_NAMES",
    "NORMAL_DEFECT",
    "UNKNOWN_DEFECT",
    "COLUMNS",
    "ANOMALY_FEATURES",
    "anomaly_features",
    "validate_sample",
]

#: Names of the two classes of the ``label`` column (index = integer label).
LABEL_NAMES = ("normal", "anomalous")
#: ``defect_type`` of every normal image.
NORMAL_DEFECT = "good"
#: ``defect_type`` of an anomalous image whose source gives no defect name.
UNKNOWN_DEFECT = "anomaly"
#: Column order of the canonical schema.
COLUMNS = ("image", "mask", "label", "category", "defect_type", "split", "image_path")


class DatasetError(UsageError, ValueError):
    """A dataset that cannot be used as given (a folder that does not exist or has no known layout, a named
    folder or column that is missing). The message reads ``<what is wrong with which value>; <the fix>``; as a
    :class:`~modeling_vip2clip.errors.UsageError` every entry point shows it as a one-line user error (exit 2),
    and as a ``ValueError`` library callers may catch it as before."""


def anomaly_features() -> Features:
    """Return a fresh copy of the canonical :class:`datasets.Features`."""
    return Features(
        {
            "image": Image(),
            "mask": Image(),
            "label": ClassLabel(names=list(LABEL_NAMES)),
            "category": Value("string"),
            "defect_type": Value("string"),
            "split": Value("string"),
            "image_path": Value("string"),
        }
    )


#: The canonical schema (treat as read-only; call :func:`anomaly_features` for a copy).
ANOMALY_FEATURES = anomaly_features()


def validate_sample(row: Mapping[str, Any], *, check_images: bool = True) -> list[str]:
    """Return the list of problems found in one row of the canonical schema.

    An empty list means the row is usable. Checks: every column present;
    ``label`` is 0 or 1; ``category``/``split``/``image_path`` are non-empty
    strings; ``defect_type`` is ``"good"`` exactly when the label is 0; and,
    when ``check_images`` is true, that the image (and the mask, if any) decode,
    that a normal image's mask (if given) is empty and that the mask is a
    single-channel-compatible binary image. An anomalous image without a mask is
    *not* a problem (image-level-only datasets such as HeadCT have none), and a
    mask whose size differs from its image is not one either (the processor
    resizes masks); converters report both as warnings instead.
    """
    problems: list[str] = []
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    label = row.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        problems.append(f"label must be 0 or 1, got {label!r}")
    for col in ("category", "split", "image_path", "defect_type"):
        val = row.get(col)
        if col in row and (not isinstance(val, str) or (col != "defect_type" and not val)):
            problems.append(f"{col} must be a non-empty string, got {val!r}")
    defect = row.get("defect_type")
    if label == 0 and defect != NORMAL_DEFECT:
        problems.append(f"normal image must have defect_type {NORMAL_DEFECT!r}, got {defect!r}")
    if label == 1 and defect == NORMAL_DEFECT:
        problems.append(f"anomalous image has defect_type {NORMAL_DEFECT!r}")
    if not check_images:
        return problems

    if row.get("image") is None:
        problems.append("image is None")
    else:
        try:
            read_image(row["image"])
        except Exception as exc:  # noqa: BLE001 - any decode failure is a problem to report
            problems.append(f"image does not decode: {type(exc).__name__}: {exc}")
    if row.get("mask") is not None:
        try:
            mask = read_image(row["mask"])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"mask does not decode: {type(exc).__name__}: {exc}")
        else:
            arr = np.asarray(mask.convert("L"))
            values = np.unique(arr)
            if not set(values.tolist()) <= {0, 255}:
                problems.append(f"mask is not binary 0/255 (values {values[:8].tolist()}...)")
            if label == 0 and arr.any():
                problems.append("normal image has a non-empty mask")
    return problems
