"""Calibrated thresholds (issue 13): the F1-max threshold functions of `modeling_vip2clip.metrics` against an
independent computation (scikit-learn's `precision_recall_curve`), the config fields that carry them, and
`vip2clip calibrate` end to end on a tiny model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from modeling_vip2clip.metrics import (
    MetricUndefinedWarning,
    f1_max,
    f1_max_threshold,
    pixel_f1_max,
    pixel_f1_max_threshold,
)


def sklearn_f1_max_threshold(labels, scores) -> tuple[float, float]:
    """F1-max and its threshold from scikit-learn: the first maximum over its ascending thresholds (the lowest
    threshold reaching the best F1 of "anomalous when score >= threshold")."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1])
    best = int(np.nanargmax(np.where(np.isfinite(f1), f1, np.nan)))
    return float(f1[best]), float(thresholds[best])


@pytest.mark.parametrize("seed", range(12))
def test_image_f1_max_threshold_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 80))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Ties (coarse grid) on even seeds, float32 on odd ones.
    scores = rng.integers(0, 6, n) / 5.0 if seed % 2 == 0 else rng.random(n).astype(np.float32)
    f1, threshold = f1_max_threshold(labels, scores)
    expected_f1, expected_threshold = sklearn_f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(expected_f1, abs=1e-12) and threshold == expected_threshold
    assert f1 == pytest.approx(f1_max(labels, scores), abs=1e-12)
    # The threshold is a decision rule: applying it reproduces the F1.
    predicted = np.asarray(scores) >= threshold
    tp = int((predicted & (labels == 1)).sum())
    assert 2 * tp / (predicted.sum() + (labels == 1).sum()) == pytest.approx(f1, abs=1e-12)


def test_f1_max_threshold_prefers_the_lowest_threshold_on_ties():
    # Thresholds 0.9 and 0.2 both give F1 = 2/3 (one TP; or two TPs and two FPs): the lower one wins, as in sklearn.
    labels = [1, 0, 1, 0, 0]
    scores = [0.9, 0.5, 0.2, 0.2, 0.1]
    assert f1_max_threshold(labels, scores) == sklearn_f1_max_threshold(labels, scores)


@pytest.mark.parametrize("seed", range(6))
def test_pixel_f1_max_threshold_equals_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    masks = np.zeros((4, 24, 24), dtype=np.uint8)
    for image in range(1, 4):  # rectangles of defect on three of the four maps
        y, x = rng.integers(0, 16, 2)
        masks[image, y:y + 6, x:x + 5] = 255
    maps = np.clip(rng.normal(0.3, 0.15, masks.shape) + 0.3 * (masks > 0), 0, 1).astype(np.float32)
    if seed % 2:
        maps = np.round(maps * 20) / 20  # many tied pixels
    f1, threshold = pixel_f1_max_threshold(masks, maps)
    expected_f1, expected_threshold = sklearn_f1_max_threshold(masks > 127, maps)
    assert f1 == pytest.approx(expected_f1, abs=1e-12) and threshold == expected_threshold
    assert f1 == pytest.approx(pixel_f1_max(masks, maps), abs=1e-12)


def test_thresholds_undefined_with_one_class():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = f1_max_threshold([0, 0, 0], [0.1, 0.2, 0.3])
        pixel = pixel_f1_max_threshold(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4))
    assert all(math.isnan(v) for v in (*image, *pixel))
    assert sum(issubclass(w.category, MetricUndefinedWarning) for w in caught) == 2


# ---------------------------------------------------------------------------------------------------- config


def test_config_threshold_fields_are_optional_typed_and_validated(tiny_config):
    from modeling_vip2clip import ViP2CLIPConfig

    assert tiny_config.image_threshold is None and tiny_config.pixel_threshold is None
    assert tiny_config.calibration is None
    calibrated = ViP2CLIPConfig(**{**tiny_config.to_dict(), "image_threshold": 0.42, "pixel_threshold": 0.6,
                                   "calibration": {"dataset": "d", "num_images": 3}})
    again = ViP2CLIPConfig.from_dict(calibrated.to_dict())
    assert (again.image_threshold, again.pixel_threshold, again.calibration["dataset"]) == (0.42, 0.6, "d")
    for bad in ({"image_threshold": 1.5}, {"pixel_threshold": -0.1}, {"image_threshold": float("nan")}):
        with pytest.raises(Exception, match="outside \\[0, 1\\]"):
            ViP2CLIPConfig(**{**tiny_config.to_dict(), **bad})
    with pytest.raises(Exception):
        ViP2CLIPConfig(**{**tiny_config.to_dict(), "image_threshold": "high"})
