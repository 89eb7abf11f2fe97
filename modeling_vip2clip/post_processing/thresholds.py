"""Decision thresholds from normal images only (`vip2clip calibrate --normal-images`): the score above which only
a chosen fraction of good parts would be flagged.

On a production line good parts are plentiful and defects rare and new, so the threshold is placed on the normal
score distribution alone, as anomalib's training-free models do (a percentile of normal scores): the image
threshold is the (1 − rate) quantile of the normal images' scores and the pixel threshold the (1 − rate) quantile
of their map pixels. With "anomalous when score ≥ threshold", about `rate` of such normal images are flagged.
The labelled alternative (F1-max, needing anomalous images too) is `metrics.f1_max_threshold`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["false_alarm_threshold", "PixelQuantile", "min_images_for_rate", "check_rate"]


def check_rate(rate: float) -> float:
    rate = float(rate)
    if not (0.0 < rate < 1.0) or math.isnan(rate):
        raise ValueError(f"false-alarm rate {rate}: must be strictly between 0 and 1 (e.g. 0.01 for 1 %).")
    return rate


def min_images_for_rate(rate: float) -> int:
    """Fewer normal images than this (10 / rate) place the threshold on the few highest scores only: a 1 % rate
    from 100 images rests on one image."""
    return math.ceil(10.0 / check_rate(rate))


def false_alarm_threshold(values: Any, rate: float) -> float:
    """The (1 − `rate`) quantile of `values` (normal scores), linearly interpolated between order statistics —
    the definition of numpy's default `quantile` method (Hyndman & Fan type 7), written out so that the tests can
    check it against numpy independently. NaNs are not allowed (the callers drop non-finite outputs first)."""
    rate = check_rate(rate)
    array = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if array.size == 0:
        raise ValueError("no normal scores to place a threshold on.")
    if not np.isfinite(array).all():
        raise ValueError("the normal scores contain NaN or infinite values.")
    position = (1.0 - rate) * (array.size - 1)
    below = int(math.floor(position))
    above = min(below + 1, array.size - 1)
    fraction = position - below
    return float(array[below] + fraction * (array[above] - array[below]))


class PixelQuantile:
    """The (1 − rate) quantile of every pixel of many anomaly maps, in constant memory: a histogram of `bins`
    equal bins over [0, 1] (the maps' range; values outside are clipped), the quantile read off it with the order
    statistics placed at their bins' centres — within half a bin (1 / 131072 by default) of the exact quantile,
    while keeping 1,000 maps of 518² pixels would take a gigabyte."""

    def __init__(self, bins: int = 65536):
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def add(self, anomaly_map: Any) -> None:
        values = np.asarray(anomaly_map, dtype=np.float64).ravel()
        index = np.clip((np.clip(values, 0.0, 1.0) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)

    def merge(self, other: "PixelQuantile") -> None:
        """Add the pixels counted by `other` (another process's share of the images)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge a {other.bins}-bin histogram into a {self.bins}-bin one")
        self.counts += other.counts

    def threshold(self, rate: float) -> float:
        """numpy's default (linear) quantile, with each order statistic known to its bin: the two order
        statistics around the quantile's position are taken at their bins' centres and interpolated, so the
        result is within half a bin of the exact quantile."""
        rate = check_rate(rate)
        total = self.count
        if total == 0:
            raise ValueError("no normal pixels to place a threshold on.")
        position = (1.0 - rate) * (total - 1)
        below = int(math.floor(position))
        above = min(below + 1, total - 1)
        cumulative = np.cumsum(self.counts)
        # The order statistic j (0-based) lies in the first bin whose cumulative count exceeds j.
        low_bin, high_bin = np.searchsorted(cumulative, [below, above], side="right")
        low, high = (low_bin + 0.5) / self.bins, (high_bin + 0.5) / self.bins
        return float(low + (position - below) * (high - low))
