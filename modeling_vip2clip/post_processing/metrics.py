"""Evaluation metrics for zero-shot anomaly detection (docs/method.md §7).

Image level (one score per image): AUROC, AP and F1-max.
Pixel level (one map per image, ``(N, H, W)`` arrays, flattened): AUROC, AP,
F1-max and AUPRO.

AUPRO comes in two forms:

* :func:`aupro` -- the standard (MVTec AD) definition, computed exactly: the
  PRO/FPR curve is taken at *every* distinct map value, starts at (0, 0),
  is linearly interpolated at ``FPR = max_fpr``, integrated by trapezoid over
  ``[0, max_fpr]`` and divided by ``max_fpr``.  This is the default.
* :func:`aupro_reference` -- the approximation of the authors' code
  (200 equally spaced thresholds, FPRs below ``max_fpr`` rescaled min-max to
  ``[0, 1]``), for comparison with published tables.

Conventions shared by every function here:

* A sample/pixel is predicted positive when its score is ``>=`` the threshold
  (scikit-learn's convention), except in :func:`aupro_reference`, which keeps
  the reference's ``map > threshold``.
* Masks that are not binary (e.g. bilinearly resized) are binarised with
  ``mask > 0.5``, as the data pipeline does (docs/method.md §7).  Image labels must
  already be 0/1.
* A metric that is undefined on the input (no anomalous or no normal images,
  no positive or no negative pixels, ...) returns ``float('nan')`` and emits a
  :class:`MetricUndefinedWarning` naming the metric; :func:`summarize` then
  averages categories with ``nanmean``.
* NaN or infinite scores/maps raise ``ValueError`` instead of being silently
  ranked somewhere: they always mean a broken model output or input.

The pixel metrics do not call scikit-learn, which is slow on a category of
100 maps of 518x518 (27M pixels) because it runs a stable argsort of all
pixels.  Here the negatives are sorted with an in-place ``np.sort`` (SIMD, no
permutation), only the few positive pixels are argsorted, the two sorted
lists are merged with ``searchsorted``, and counting at the start of each run
of tied scores yields the whole ROC / PR curve -- shared by AUROC, AP, F1-max
and (with per-region weights) the exact AUPRO.  Measured with
``benchmarks/bench_aupro.py`` on 27M float32 pixels on a busy 2-core VM:
``roc_auc_score`` 15-23 s vs :func:`pixel_auroc` 0.6-1.8 s, with identical
results (exact :func:`aupro` 2-3.5 s vs ~25 s for the reference's loop); ``tests/test_metrics.py`` checks all of them against scikit-learn to
1e-9, ties and float32 included.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

__all__ = [
    "METRIC_KEYS",
    "MetricUndefinedWarning",
    "image_auroc",
    "image_ap",
    "f1_max",
    "f1_max_threshold",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_f1_max_threshold",
    "aupro",
    "aupro_reference",
    "compute_category_metrics",
    "summarize",
]

#: Keys returned by :func:`compute_category_metrics`, in table order.
METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_aupro",
    "pixel_f1_max",
    "pixel_ap",
)

# Connectivity of ground-truth regions: 8-connectivity inside an image (what
# skimage's ``measure.label`` does by default on 2-D masks, used by the
# reference); images are labelled one at a time (``_positive_regions``).
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


class MetricUndefinedWarning(UserWarning):
    """A metric is undefined on the given input and was returned as NaN."""


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    # Accept torch tensors (also on GPU / requiring grad) without importing torch.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _undefined(metric: str, why: str) -> float:
    warnings.warn(f"{metric} is undefined: {why}; returning NaN.", MetricUndefinedWarning, stacklevel=3)
    return float("nan")


def _check_finite(x: np.ndarray, name: str) -> None:
    if x.size and not np.isfinite(x).all():
        n_nan = int(np.isnan(x).sum())
        n_inf = int(np.isinf(x).sum())
        parts = [f"{n} {kind} value{'s' if n != 1 else ''}" for n, kind in ((n_nan, "NaN"), (n_inf, "infinite")) if n]
        raise ValueError(
            f"{name} contains {' and '.join(parts)}; check the model output / input images "
            "(metrics cannot rank non-finite scores)."
        )


def _as_scores(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == object:
        a = a.astype(np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        # ints / bools: exact in float64; floats keep their dtype so that ties
        # are exactly those the model produced (and float32 sorts fastest).
        a = a.astype(np.float64)
    _check_finite(a, name)
    return a


def _as_labels(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == object:
        a = a.astype(np.float64)
    if a.dtype != bool:
        if np.issubdtype(a.dtype, np.floating):
            _check_finite(a, name)
        bad = (a != 0) & (a != 1)
        if bad.any():
            raise ValueError(
                f"{name} must contain only 0/1 (normal/anomalous); found {int(bad.sum())} other values, "
                f"e.g. {a[bad].ravel()[0]!r}."
            )
        a = a.astype(bool)
    return a


def _as_masks(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == bool:
        return a
    if a.dtype == object:
        a = a.astype(np.float64)
    if np.issubdtype(a.dtype, np.floating):
        _check_finite(a, name)
    # Non-binary masks (bilinear resize) are binarised at 0.5, as in docs/method.md §7.
    return a > 0.5


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(labels, "labels")
    s = _as_scores(scores, "scores")
    y2 = y.reshape(-1) if y.ndim > 1 and y.size == y.shape[0] else y
    s2 = s.reshape(-1) if s.ndim > 1 and s.size == s.shape[0] else s
    if y2.ndim != 1 or s2.ndim != 1 or y2.shape != s2.shape:
        raise ValueError(
            f"labels and scores must be 1-D with one entry per image; got shapes {y.shape} and {s.shape}."
        )
    return y2, s2


def _squeeze_channel(a: np.ndarray) -> np.ndarray:
    # (N, 1, H, W) -> (N, H, W); (H, W) -> (1, H, W).
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim == 2:
        return a[None]
    return a


def _pixel_inputs(masks: Any, maps: Any, maps_name: str = "anomaly_maps") -> tuple[np.ndarray, np.ndarray]:
    m = _squeeze_channel(_as_masks(masks, "masks"))
    a = _squeeze_channel(_as_scores(maps, maps_name))
    if m.shape != a.shape:
        raise ValueError(
            f"masks and {maps_name} must have the same shape (N, H, W); got masks {m.shape} "
            f"and {maps_name} {a.shape}."
        )
    if m.ndim != 3:
        raise ValueError(f"masks and {maps_name} must be (N, H, W) arrays; got shape {m.shape}.")
    return m, a


def _check_max_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr}.")
    return max_fpr


# --------------------------------------------------------------------------
# image-level metrics (small inputs: scikit-learn directly)
# --------------------------------------------------------------------------


def _both_classes(metric: str, y: np.ndarray, anomalous: str, normal: str) -> bool:
    """True when `y` holds both classes; else warn that `metric` is undefined (saying which class is missing)."""
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        _undefined(metric, f"no {anomalous}")
        return False
    if n_pos == y.size:
        _undefined(metric, f"no {normal}")
        return False
    return True


def _image_defined(metric: str, y: np.ndarray) -> bool:
    return _both_classes(metric, y, "anomalous images (all labels are 0)", "normal images (all labels are 1)")


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level AUROC (``sklearn.metrics.roc_auc_score``)."""
    y, s = _image_inputs(labels, scores)
    if not _image_defined("image_auroc", y):
        return float("nan")
    return float(roc_auc_score(y, s))


def image_ap(labels: Any, scores: Any) -> float:
    """Image-level average precision (``sklearn.metrics.average_precision_score``)."""
    y, s = _image_inputs(labels, scores)
    if not _image_defined("image_ap", y):
        return float("nan")
    return float(average_precision_score(y, s))


def f1_max(labels: Any, scores: Any) -> float:
    """Image-level F1-max: max over thresholds of 2PR/(P+R).

    Computed like the reference, from ``precision_recall_curve`` (which ends
    with the point P=1, R=0), ignoring the non-finite 0/0 entries.
    """
    y, s = _image_inputs(labels, scores)
    if not _image_defined("image_f1_max", y):
        return float("nan")
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


# --------------------------------------------------------------------------
# shared sorted curve (pixel metrics and exact AUPRO)
# --------------------------------------------------------------------------


def _desc_curve(
    y: np.ndarray, s: np.ndarray, pos_weights: np.ndarray | None = None, return_thresholds: bool = False
) -> tuple[np.ndarray, ...]:
    """Counts at every distinct threshold, highest threshold first.

    ``y`` (bool) and ``s`` are 1-D.  Returns ``(tps, fps, wsum)`` where, for
    the k-th largest distinct score t_k, ``tps[k]`` / ``fps[k]`` count the
    positives / negatives with score >= t_k and ``wsum[k]`` sums
    ``pos_weights`` over those positives (None when no weights are given).
    The point for a threshold above the maximum (all zeros) is not included.
    With ``return_thresholds`` a fourth array holds the t_k themselves.
    """
    # Fresh arrays are costly here (page faults on ~100 MB buffers cost as much
    # as the arithmetic), hence the in-place sorts and subtractions below.
    neg = s[~y]
    neg.sort()  # ascending; SIMD sort in place, no permutation needed
    s_pos = s[y]
    if pos_weights is None:
        pos = s_pos
        pos.sort()
        w_pos = None
    else:
        order = np.argsort(s_pos, kind="stable")  # few pixels: cheap
        pos = s_pos[order]
        w_pos = pos_weights[order]
    n = neg.size + pos.size

    # Merge the two sorted lists (ascending).  Inside a run of tied scores the
    # order of positives/negatives is irrelevant: the curve is only read at
    # run boundaries, where the whole run is counted.
    pos_at = np.searchsorted(neg, pos, side="right") + np.arange(pos.size)
    merged = np.empty(n, dtype=s.dtype)
    is_neg = np.ones(n, dtype=bool)
    is_neg[pos_at] = False
    merged[pos_at] = pos
    merged[is_neg] = neg
    del is_neg

    # First index of each run of equal scores, ascending; t_k = merged[start].
    # Samples with score >= t_k are merged[start:], so the positives among
    # them are those not before `start`: a searchsorted of the run starts in
    # the sorted positions of the positives.  Measured on 27M pixels this is
    # ~0.35 s against ~0.5-1.4 s for a cumulative count over the whole merge;
    # the keys are searched in ascending order (reversed afterwards) because
    # numpy's searchsorted is ~3x slower on descending keys.
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(merged[1:], merged[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    del new_run
    thresholds = merged[starts][::-1] if return_thresholds else None
    del merged
    tps = np.searchsorted(pos_at, starts, side="left")  # positives before each start
    np.subtract(pos.size, tps, out=tps)  # positives at or after it
    fps = starts
    np.subtract(n, fps, out=fps)
    fps -= tps
    tps, fps = tps[::-1], fps[::-1]  # highest threshold first

    wsum = None
    if w_pos is not None:
        # The tps[k] positives counted are the tps[k] largest ones, so their
        # weight sum is a prefix sum of the weights in descending order.
        cw = np.concatenate(([0.0], np.cumsum(w_pos[::-1], dtype=np.float64)))
        wsum = cw[tps]
    return (tps, fps, wsum, thresholds) if return_thresholds else (tps, fps, wsum)


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    tpr = np.concatenate(([0.0], tps / tps[-1]))
    fpr = np.concatenate(([0.0], fps / fps[-1]))
    return float(np.trapezoid(tpr, fpr))


def _ap_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    # sklearn's step-wise AP: sum over thresholds of (R_k - R_{k-1}) * P_k.
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _f1_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]
    # precision_recall_curve's extra final point (P=1, R=0) has F1 = 0.
    return float(max(np.max(f1), 0.0)) if f1.size else 0.0


def _f1_max_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(F1-max, its threshold) from the sorted curve: the lowest threshold t reaching the maximum F1 of the
    rule "anomalous when score >= t" (``precision_recall_curve``'s thresholds and F1, first maximum in its
    ascending order, as anomalib's adaptive threshold takes it)."""
    tps, fps, _, thresholds = _desc_curve(y, s, return_thresholds=True)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.where(np.isfinite(f1), f1, -np.inf)  # 0/0 where no positive is found yet
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # the last maximum of the descending curve: lowest threshold
    return float(max(f1[best], 0.0)), float(thresholds[best])


def f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """Image-level ``(F1-max, threshold)``: the score t at which "anomalous when score >= t" reaches the
    F1-max (:func:`f1_max`) — the lowest such score on ties.  ``(nan, nan)`` (with a warning) when the labels
    hold one class only.  What `vip2clip calibrate` stores as the model's ``image_threshold``."""
    y, s = _image_inputs(labels, scores)
    if not _image_defined("image_f1_max_threshold", y):
        return float("nan"), float("nan")
    return _f1_max_threshold(y.astype(bool), s)


def pixel_f1_max_threshold(masks: Any, maps: Any) -> tuple[float, float]:
    """Pixel-level ``(F1-max, threshold)`` over all pixels of an (N, H, W) stack (masks > 0.5 are defects),
    on the same sorted curve as :func:`pixel_f1_max` (fast on millions of pixels).  ``(nan, nan)`` when the
    masks hold one class only.  What `vip2clip calibrate` stores as the model's ``pixel_threshold``."""
    m, a = _pixel_inputs(masks, maps, "maps")
    y, s = m.ravel(), a.ravel()
    if not _pixel_defined("pixel_f1_max_threshold", y):
        return float("nan"), float("nan")
    return _f1_max_threshold(y, s)


def _pixel_defined(metric: str, y: np.ndarray) -> bool:
    return _both_classes(metric, y, "anomalous pixels in the masks", "normal pixels in the masks")


def _pixel_metric(metric: str, masks: Any, maps: Any, fn) -> float:
    m, a = _pixel_inputs(masks, maps, "maps")
    y, s = m.ravel(), a.ravel()
    if not _pixel_defined(metric, y):
        return float("nan")
    tps, fps, _ = _desc_curve(y, s)
    return fn(tps, fps)


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level AUROC over all pixels of an (N, H, W) stack (== ``roc_auc_score`` on the flattened arrays)."""
    return _pixel_metric("pixel_auroc", masks, maps, _auroc_from_counts)


def pixel_ap(masks: Any, maps: Any) -> float:
    """Pixel-level AP (== ``average_precision_score`` on the flattened arrays)."""
    return _pixel_metric("pixel_ap", masks, maps, _ap_from_counts)


def pixel_f1_max(masks: Any, maps: Any) -> float:
    """Pixel-level F1-max: max over thresholds of 2PR/(P+R) on the flattened arrays.

    The reference adds 1e-8 to the denominator here; that changes the value
    by less than 1e-8 and is left out.
    """
    return _pixel_metric("pixel_f1_max", masks, maps, _f1_from_counts)


# --------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------


def _positive_regions(m: np.ndarray) -> tuple[np.ndarray, int]:
    """The region of every anomalous pixel and the number of regions.

    Regions are 8-connected within an image, numbered 0..R-1 over the stack;
    the ids come in the order of ``m.ravel()``'s True entries.  Images are
    labelled one at a time and only the anomalous pixels' labels are kept: no
    (N, H, W) label array (4 bytes a pixel, 0.5 GB for 500 images of 518²).
    """
    ids, n_regions = [], 0
    for image in m:  # (H, W)
        if not image.any():
            continue
        labels, count = ndimage.label(image, structure=_REGION_STRUCTURE)
        ids.append(labels[image] - 1 + n_regions)
        n_regions += int(count)
    if not ids:
        return np.empty(0, dtype=np.int64), 0
    return np.concatenate(ids).astype(np.int64, copy=False), n_regions


def _pro_weights(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Weight 1 / (R |r(p)|) of every anomalous pixel p (``m.ravel()`` order) and R, the number of regions.

    PRO(t) = (1/R) sum_r |{p in r : s_p >= t}| / |r| is then the sum of these
    weights over the positive pixels scoring >= t: a weighted cumulative count.
    """
    region, n_regions = _positive_regions(m)
    return 1.0 / (np.bincount(region, minlength=n_regions)[region] * float(n_regions)), n_regions


def _partial_area(x: np.ndarray, y: np.ndarray, max_x: float, from_origin: bool = False) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing, over [0, max_x].

    ``from_origin``: the polyline starts at (0, 0) before its first point (as
    if that point were prepended, without copying the arrays).  The segment
    that crosses max_x is cut at the linearly interpolated point.  Vertical
    segments (equal x) add no area, so it does not matter which of several
    points sharing x == max_x would be "the" value there.
    """
    # x is sorted: only the points up to the first one at or beyond max_x
    # matter (a slice, not a boolean mask -- the curve can have ~20M points),
    # and only the last of those segments can cross max_x.  One temporary and
    # two dot products (sum of w_i (y_i + y_i+1)): fresh ~70 MB buffers cost
    # more than the arithmetic here.
    cut = int(np.searchsorted(x, max_x, side="left"))
    x, y = x[: cut + 1], y[: cut + 1]
    if x.size == 0:
        return 0.0
    area = 0.0
    if from_origin:  # the segment (0, 0) -> (x[0], y[0]), cut at max_x like any other
        x1, y1 = float(x[0]), float(y[0])
        if x1 > max_x:
            return max_x * (max_x / x1 * y1) / 2.0
        area += x1 * y1
    if x.size >= 2:
        widths = np.diff(x[:-1])  # the segments wholly below max_x
        area += float(np.dot(widths, y[:-2])) + float(np.dot(widths, y[1:-1]))
        x0, x1, y0, y1 = float(x[-2]), float(x[-1]), float(y[-2]), float(y[-1])
        if x1 > max_x:  # the crossing segment, cut at max_x (x0 < max_x < x1)
            y_cut = y0 + (max_x - x0) / (x1 - x0) * (y1 - y0)
            area += (max_x - x0) * (y0 + y_cut)
        else:
            area += (x1 - x0) * (y0 + y1)
    return area / 2.0


def _aupro_exact(m: np.ndarray, a: np.ndarray, max_fpr: float, metric: str = "aupro") -> float:
    w, n_regions = _pro_weights(m)
    if n_regions == 0:
        return _undefined(metric, "no anomalous regions in the masks")
    y = m.ravel()
    n_neg = y.size - int(np.count_nonzero(y))
    if n_neg == 0:
        return _undefined(metric, "no normal pixels in the masks (FPR undefined)")
    s = a.ravel()
    # Only thresholds down to the first FPR >= max_fpr matter, and the counts at
    # a threshold t depend only on the pixels scoring >= t.  So every pixel below
    # t_cut -- the k-th largest negative score, with k negatives > max_fpr * n_neg
    # -- can be dropped before the sort (an O(n) partition instead of sorting all
    # pixels: ~2.5x faster at max_fpr = 0.3 on 27M pixels; the curve is identical).
    k = min(n_neg, int(np.floor(max_fpr * n_neg)) + 1)
    negatives = s[~y]
    negatives.partition(n_neg - k)  # in place: np.partition would copy ~100 MB more
    t_cut = negatives[n_neg - k]
    del negatives
    keep = s >= t_cut
    _, fps, pro = _desc_curve(y[keep], s[keep], w[keep[y]])
    return _aupro_from_curve(fps, pro, n_neg, max_fpr)


def _aupro_from_curve(fps: np.ndarray, pro: np.ndarray, n_neg: int, max_fpr: float) -> float:
    # (0, 0), the threshold above the maximum, starts the curve.
    return _partial_area(fps / n_neg, pro, max_fpr, from_origin=True) / max_fpr


def aupro(masks: Any, anomaly_maps: Any, max_fpr: float = 0.3) -> float:
    """Exact normalised area under the PRO curve up to ``max_fpr`` (MVTec AD definition).

    Args:
        masks: ``(N, H, W)`` ground-truth masks (binarised at 0.5).
        anomaly_maps: ``(N, H, W)`` anomaly maps, finite.
        max_fpr: upper integration limit of the false-positive rate, in (0, 1].

    A pixel is positive when its score is ``>=`` the threshold; the curve is
    taken at every distinct map value plus (0, 0) for a threshold above the
    maximum.  PRO is the mean, over all connected ground-truth regions of all
    images (8-connectivity), of the fraction of the region that is positive;
    FPR is false-positive pixels / negative pixels.  The curve is linearly
    interpolated at ``max_fpr``, integrated by trapezoid over
    ``[0, max_fpr]`` and divided by ``max_fpr`` (so a perfect map scores 1,
    and a constant map ``max_fpr / 2``).

    Returns NaN with a :class:`MetricUndefinedWarning` when the masks have no
    anomalous region or no normal pixel.
    """
    max_fpr = _check_max_fpr(max_fpr)
    m, a = _pixel_inputs(masks, anomaly_maps)
    return _aupro_exact(m, a, max_fpr)


def _aupro_reference(
    m: np.ndarray, a: np.ndarray, max_fpr: float, num_thresholds: int, metric: str = "aupro_reference"
) -> float:
    region, n_regions = _positive_regions(m)
    if n_regions == 0:
        return _undefined(metric, "no anomalous regions in the masks")
    y = m.ravel()
    s = a.ravel()
    n_neg = y.size - int(np.count_nonzero(y))
    if n_neg == 0:
        return _undefined(metric, "no normal pixels in the masks (FPR undefined)")
    lo, hi = a.min(), a.max()
    if hi == lo:
        return _undefined(metric, "the anomaly maps are constant (no threshold range)")
    # Same arange call as the reference (map dtype scalars), so the number of
    # thresholds (200, sometimes 201 by rounding) and their values match it.
    ths = np.arange(lo, hi, (hi - lo) / num_thresholds)
    n_th = ths.size
    # k = number of thresholds strictly below the score: the pixel is
    # "map > th_j" exactly for j < k.  One searchsorted replaces the
    # per-threshold comparisons of the whole stack.
    k = np.searchsorted(ths, s, side="left")
    k_pos = k[y]
    counts = np.bincount(region * (n_th + 1) + k_pos, minlength=n_regions * (n_th + 1)).reshape(n_regions, n_th + 1)
    area = counts.sum(axis=1)
    # pixels of region r that are NOT above th_j are those with k <= j
    below = np.cumsum(counts, axis=1)[:, :n_th]
    pros = ((area[:, None] - below) / area[:, None]).mean(axis=0)
    neg_below = np.cumsum(np.bincount(k[~y], minlength=n_th + 1))[:n_th]
    fprs = (n_neg - neg_below) / n_neg

    keep = fprs < max_fpr
    f, p = fprs[keep], pros[keep]
    if f.size < 2 or f.max() == f.min():
        return _undefined(metric, f"fewer than two distinct FPR values below {max_fpr} among the thresholds")
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, p))


def aupro_reference(
    masks: Any, anomaly_maps: Any, max_fpr: float = 0.3, num_thresholds: int = 200
) -> float:
    """AUPRO as approximated by the reference code (for comparison with published tables).

    Thresholds ``np.arange(min, max, (max - min) / num_thresholds)`` of the
    whole stack's map values; a pixel is positive when ``map > threshold``;
    PRO = mean overlap over all regions of all images pooled; only thresholds
    with FPR < ``max_fpr`` are kept, those FPRs are rescaled min-max to
    [0, 1], and the area is the trapezoid ``sklearn.metrics.auc`` (no division
    by ``max_fpr``: the rescale already normalises).

    It differs from :func:`aupro` because of the coarse thresholds and because
    the rescale stretches [min kept FPR, max kept FPR] -- not [0, max_fpr] --
    onto [0, 1].  Returns NaN with a warning when undefined (no region, no
    normal pixel, constant maps, fewer than two usable thresholds).
    """
    max_fpr = _check_max_fpr(max_fpr)
    if int(num_thresholds) < 1:
        raise ValueError(f"num_thresholds must be >= 1; got {num_thresholds}.")
    m, a = _pixel_inputs(masks, anomaly_maps)
    return _aupro_reference(m, a, max_fpr, int(num_thresholds))


# --------------------------------------------------------------------------
# per-category bundle, summary, table, plot
# --------------------------------------------------------------------------


def compute_category_metrics(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    pro_mode: str = "exact",
    max_fpr: float = 0.3,
) -> dict[str, float]:
    """All metrics of one category, keyed as :data:`METRIC_KEYS`.

    ``labels``/``scores`` are per image; ``masks``/``maps`` are ``(N, H, W)``
    (pixel keys are NaN when they are not given).  ``pro_mode`` is
    ``"exact"`` (:func:`aupro`, default) or ``"reference"``
    (:func:`aupro_reference`).  The pixel metrics share one sort of the
    pixels (and, in exact mode, AUPRO shares it too).
    """
    if pro_mode not in ("exact", "reference"):
        raise ValueError(f"pro_mode must be 'exact' or 'reference'; got {pro_mode!r}.")
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together (or both left out for image-only metrics).")
    max_fpr = _check_max_fpr(max_fpr)

    out: dict[str, float] = {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "image_f1_max": f1_max(labels, scores),
        "pixel_auroc": float("nan"),
        "pixel_aupro": float("nan"),
        "pixel_f1_max": float("nan"),
        "pixel_ap": float("nan"),
    }
    if masks is None:
        return out

    m, a = _pixel_inputs(masks, maps, "maps")
    y, s = m.ravel(), a.ravel()
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        why = "no anomalous pixels in the masks" if n_pos == 0 else "no normal pixels in the masks"
        for key in ("pixel_auroc", "pixel_aupro", "pixel_f1_max", "pixel_ap"):
            _undefined(key, why)
        return out

    if pro_mode == "exact":
        w, _ = _pro_weights(m)  # at least one region because n_pos >= 1
        tps, fps, pro = _desc_curve(y, s, w)
        out["pixel_aupro"] = _aupro_from_curve(fps, pro, int(fps[-1]), max_fpr)
    else:
        tps, fps, _ = _desc_curve(y, s)
        out["pixel_aupro"] = _aupro_reference(m, a, max_fpr, 200, metric="pixel_aupro")
    out["pixel_auroc"] = _auroc_from_counts(tps, fps)
    out["pixel_ap"] = _ap_from_counts(tps, fps)
    out["pixel_f1_max"] = _f1_from_counts(tps, fps)
    return out


def summarize(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Copy of ``per_category`` with a ``"mean"`` entry: the NaN-ignoring mean over categories.

    A metric that is NaN for every category stays NaN in the mean.  An
    existing ``"mean"`` entry is recomputed, not averaged in.
    """
    cats = {k: dict(v) for k, v in per_category.items() if k != "mean"}
    keys: list[str] = []
    for v in cats.values():
        keys.extend(k for k in v if k not in keys)
    mean: dict[str, float] = {}
    for key in keys:
        vals = np.array([float(v.get(key, float("nan"))) for v in cats.values()], dtype=np.float64)
        # nanmean warns "Mean of empty slice" on all-NaN columns; NaN is the answer we want.
        mean[key] = float(np.mean(vals[~np.isnan(vals)])) if (~np.isnan(vals)).any() else float("nan")
    return {**cats, "mean": mean}
