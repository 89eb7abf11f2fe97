"""Tests of modeling_vip2clip.post_processing.metrics against scikit-learn and brute-force definitions.

Every reference implementation here is written independently of the module
(explicit loops, pure-Python flood fill for regions) so that a wrong
vectorisation in the module cannot hide behind the same mistake in its test.
"""

from __future__ import annotations

import math
import warnings
from itertools import product

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from modeling_vip2clip.post_processing.metrics import (
    METRIC_KEYS,
    MetricUndefinedWarning,
    aupro,
    aupro_reference,
    compute_category_metrics,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    summarize,
)
from modeling_vip2clip.engine.report import format_markdown_table, plot_roc_curves
from modeling_vip2clip.testing_utils import authors_loop_aupro

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# independent reference implementations
# ---------------------------------------------------------------------------


def brute_curve_metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """AUROC (Mann-Whitney with ties = 1/2), AP and F1-max by looping over thresholds."""
    y = np.asarray(y, bool).ravel()
    s = np.asarray(s, np.float64).ravel()
    pos, neg = s[y], s[~y]
    gt = sum(int(p > q) for p in pos for q in neg)
    eq = sum(int(p == q) for p in pos for q in neg)
    auroc = (gt + 0.5 * eq) / (pos.size * neg.size)
    ap, prev_recall, best_f1 = 0.0, 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = int(np.sum(pred & y))
        precision = tp / int(pred.sum())
        recall = tp / pos.size
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        if precision + recall > 0:
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
    return auroc, ap, best_f1


def flood_fill_regions(mask2d: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by explicit BFS (independent of scipy)."""
    h, w = mask2d.shape
    seen = np.zeros_like(mask2d, dtype=bool)
    regions = []
    for i, j in product(range(h), range(w)):
        if not mask2d[i, j] or seen[i, j]:
            continue
        stack, region = [(i, j)], []
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            region.append((a, b))
            for da, db in product((-1, 0, 1), repeat=2):
                c, d = a + da, b + db
                if 0 <= c < h and 0 <= d < w and mask2d[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
        regions.append(region)
    return regions


def brute_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Exact AUPRO: every distinct threshold, per-region overlaps by explicit loops."""
    masks = np.asarray(masks) > 0.5
    regions = [(n, r) for n in range(masks.shape[0]) for r in flood_fill_regions(masks[n])]
    n_neg = int((~masks).sum())
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        overlaps = []
        for n, region in regions:
            covered = 0
            for a, b in region:
                covered += int(pred[n, a, b])
            overlaps.append(covered / len(region))
        pros.append(sum(overlaps) / len(overlaps))
        fprs.append(int((pred & ~masks).sum()) / n_neg)
    fprs, pros = np.array(fprs), np.array(pros)
    i = int(np.nonzero(fprs <= max_fpr)[0][-1])  # last point inside [0, max_fpr]
    if i + 1 < fprs.size:
        end = np.interp(max_fpr, fprs[i : i + 2], pros[i : i + 2])
    else:
        end = pros[i]
    x = np.append(fprs[: i + 1], max_fpr)
    y = np.append(pros[: i + 1], end)
    return float(np.trapezoid(y, x) / max_fpr)


def sklearn_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = 2 * p * r / (p + r)
    return float(f[np.isfinite(f)].max())


def blobs(rng: np.random.Generator, n: int, h: int, w: int, p_anom: float = 0.6) -> np.ndarray:
    """Masks with a few rectangular/irregular defects, some images defect-free."""
    masks = np.zeros((n, h, w), dtype=bool)
    for k in range(n):
        if rng.random() > p_anom:
            continue
        for _ in range(rng.integers(1, 4)):
            i, j = rng.integers(0, h), rng.integers(0, w)
            di, dj = rng.integers(1, max(2, h // 3)), rng.integers(1, max(2, w // 3))
            masks[k, i : i + di, j : j + dj] = True
    return masks


@st.composite
def pixel_case(draw, max_side: int = 7):
    """Random (masks, maps): sizes, float32/float64, few levels (ties) or constant maps."""
    seed = draw(st.integers(0, 2**32 - 1))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    levels = draw(st.sampled_from([1, 2, 3, 5, 50, 0]))  # 0 = continuous
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    p_pos = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < p_pos
    raw = rng.random((n, h, w)) + 0.5 * masks
    maps = np.floor(raw * levels) / max(levels, 1) if levels else raw
    return masks, maps.astype(dtype)


# ---------------------------------------------------------------------------
# image and pixel AUROC / AP / F1-max
# ---------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 40), levels=st.sampled_from([1, 2, 4, 0]))
def test_image_metrics_match_brute_force(seed, n, levels):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.5
    y[0], y[1] = True, False  # both classes present
    s = rng.random(n) + 0.3 * y
    if levels:
        s = np.floor(s * levels) / levels
    ref_auroc, ref_ap, ref_f1 = brute_curve_metrics(y, s)
    assert image_auroc(y, s) == pytest.approx(ref_auroc, abs=1e-12)
    assert image_ap(y, s) == pytest.approx(ref_ap, abs=1e-12)
    assert f1_max(y, s) == pytest.approx(ref_f1, abs=1e-12)


@FAST
@given(case=pixel_case())
def test_pixel_metrics_match_sklearn(case):
    masks, maps = case
    y, s = masks.ravel(), maps.ravel()
    if y.all() or not y.any():
        for fn in (pixel_auroc, pixel_ap, pixel_f1_max):
            with pytest.warns(MetricUndefinedWarning, match=fn.__name__):
                assert math.isnan(fn(masks, maps))
        return
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert pixel_f1_max(masks, maps) == pytest.approx(sklearn_f1_max(y, s), abs=1e-9)


def test_pixel_metrics_match_sklearn_larger_float32_with_ties():
    rng = np.random.default_rng(0)
    masks = blobs(rng, 6, 64, 64)
    maps = ndimage.gaussian_filter(rng.random((6, 64, 64)), (0, 2, 2)) + 0.2 * masks
    maps = (np.round(maps * 300) / 300).astype(np.float32)  # float32 with many ties
    y, s = masks.ravel(), maps.ravel()
    assert len(np.unique(s)) < s.size / 10
    assert abs(pixel_auroc(masks, maps) - roc_auc_score(y, s)) < 1e-9
    assert abs(pixel_ap(masks, maps) - average_precision_score(y, s)) < 1e-9
    assert abs(pixel_f1_max(masks, maps) - sklearn_f1_max(y, s)) < 1e-9


def test_pixel_metrics_on_constant_map():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # prevalence 4/32
    maps = np.full((2, 4, 4), 0.7, np.float32)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5)
    assert pixel_ap(masks, maps) == pytest.approx(4 / 32)
    assert pixel_f1_max(masks, maps) == pytest.approx(2 * (1 / 8) / (1 + 1 / 8))


@pytest.mark.parametrize("fn", [image_auroc, image_ap, f1_max])
@pytest.mark.parametrize("value", [0, 1])
def test_image_metrics_single_class_is_nan_with_warning(fn, value):
    name = {"f1_max": "image_f1_max"}.get(fn.__name__, fn.__name__)
    with pytest.warns(MetricUndefinedWarning, match=name):
        assert math.isnan(fn(np.full(5, value), np.linspace(0, 1, 5)))


# ---------------------------------------------------------------------------
# exact AUPRO
# ---------------------------------------------------------------------------


@FAST
@given(case=pixel_case(max_side=6), max_fpr=st.sampled_from([0.3, 0.05, 0.5, 1.0]))
def test_aupro_matches_brute_force(case, max_fpr):
    masks, maps = case
    if not masks.any() or masks.all():
        with pytest.warns(MetricUndefinedWarning, match="aupro"):
            assert math.isnan(aupro(masks, maps, max_fpr))
        return
    assert aupro(masks, maps, max_fpr) == pytest.approx(brute_aupro(masks, maps, max_fpr), abs=1e-9)


def test_aupro_matches_brute_force_several_regions_and_empty_images():
    rng = np.random.default_rng(3)
    masks = blobs(rng, 5, 12, 12, p_anom=0.6)
    masks[0] = False  # an image without any region
    masks[1, 1:3, 1:3] = masks[1, 8:11, 6:8] = True  # two regions in one image
    maps = np.round(rng.random((5, 12, 12)) * 8 + 3 * masks) / 8  # ties
    assert len(flood_fill_regions(masks[1])) >= 2
    for dtype in (np.float32, np.float64):
        m = maps.astype(dtype)
        assert aupro(masks, m) == pytest.approx(brute_aupro(masks, m), abs=1e-9)


def test_aupro_closed_form_cases():
    # One region of 2 px, 4 negatives. Curve: (0,0) (0,.5) (.25,.5) (.25,1) (.5,1) ...
    # area on [0,.3] = .25*.5 + .05*1 = .175 -> .175/.3 = 7/12.
    m = np.array([[[1, 1, 0, 0, 0, 0]]])
    a = np.array([[[0.9, 0.5, 0.7, 0.3, 0.2, 0.1]]])
    assert aupro(m, a) == pytest.approx(7 / 12, abs=1e-12)

    # PRO is a mean over regions, not pixels: a 1-px region fully found first
    # gives PRO 1/2 (a pixel mean would give 1/4). Same curve -> 7/12.
    m = np.array([[[1, 0, 0, 0]], [[1, 1, 1, 0]]])
    a = np.array([[[0.9, 0.1, 0.1, 0.1]], [[0.2, 0.2, 0.2, 0.5]]])
    assert aupro(m, a) == pytest.approx(7 / 12, abs=1e-12)

    # 8-connectivity: (0,1) and (1,2) touch diagonally -> one region of 3 px.
    # Curve (0,0) (0,1/3) (1/6,1/3) (1/6,1) (1,1): area 1/18 + 2/15 = 17/90 -> 17/27
    # (with 4-connectivity it would be 13/18).
    m = np.array([[[1, 1, 0], [0, 0, 1], [0, 0, 0]]])
    a = np.array([[[0.2, 0.2, 0.1], [0.1, 0.1, 0.9], [0.1, 0.1, 0.5]]])
    assert aupro(m, a) == pytest.approx(17 / 27, abs=1e-12)

    # Tie between the positive and a negative: diagonal segment (0,0)->(1/3,1),
    # interpolated at .3 -> PRO .9, area .3*.9/2 -> .45.
    m = np.array([[[1, 0, 0, 0]]])
    a = np.array([[[0.5, 0.5, 0.1, 0.1]]])
    assert aupro(m, a) == pytest.approx(0.45, abs=1e-12)

    # FPR reaches exactly max_fpr before the region is found: the vertical jump
    # at FPR = .3 adds no area -> 0.
    m = np.array([[[1] + [0] * 10]])
    a = np.array([[[0.6, 0.9, 0.8, 0.7] + [0.1] * 7]])
    assert aupro(m, a) == 0.0

    # Constant map: diagonal (0,0)->(1,1) -> max_fpr / 2; perfect map -> 1.
    m = blobs(np.random.default_rng(0), 3, 8, 8, p_anom=1.0)
    assert aupro(m, np.zeros(m.shape, np.float32)) == pytest.approx(0.15, abs=1e-12)
    assert aupro(m, m.astype(np.float32), max_fpr=0.2) == pytest.approx(1.0, abs=1e-12)


def test_aupro_accepts_channel_axis_and_soft_masks():
    rng = np.random.default_rng(1)
    masks = blobs(rng, 3, 10, 10, p_anom=1.0)
    maps = rng.random((3, 10, 10))
    soft = np.where(masks, 0.8, 0.3)  # e.g. bilinearly resized; binarised at 0.5
    ref = aupro(masks, maps)
    assert aupro(soft, maps) == ref
    assert aupro(masks[:, None], maps[:, None]) == ref


# ---------------------------------------------------------------------------
# reference (200-threshold) AUPRO
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_reference_matches_authors_loop(seed, dtype):
    rng = np.random.default_rng(seed)
    masks = blobs(rng, 4, 16, 16, p_anom=0.8)
    masks[0, 2:4, 2:4] = True
    maps = (ndimage.gaussian_filter(rng.random((4, 16, 16)), (0, 1, 1)) + 0.1 * masks).astype(dtype)
    assert aupro_reference(masks, maps) == pytest.approx(authors_loop_aupro(masks, maps), abs=1e-12)


def test_aupro_reference_matches_authors_loop_with_ties():
    # few distinct values: many pixels sit exactly on a threshold (map > th matters)
    rng = np.random.default_rng(7)
    masks = blobs(rng, 3, 12, 12, p_anom=1.0)
    maps = (np.floor(rng.random((3, 12, 12)) * 40 + 20 * masks) / 40).astype(np.float32)
    assert aupro_reference(masks, maps) == pytest.approx(authors_loop_aupro(masks, maps), abs=1e-12)
    assert aupro_reference(masks, maps, num_thresholds=37) == pytest.approx(
        authors_loop_aupro(masks, maps, max_step=37), abs=1e-12
    )


def test_exact_vs_reference_difference_is_recorded():
    rng = np.random.default_rng(2024)
    masks = blobs(rng, 8, 64, 64, p_anom=0.7)
    maps = (ndimage.gaussian_filter(rng.random((8, 64, 64)), (0, 3, 3)) + 0.05 * masks).astype(np.float32)
    exact, ref = aupro(masks, maps), aupro_reference(masks, maps)
    diff = exact - ref
    print(f"\nAUPRO exact={exact:.6f} reference(200 thr)={ref:.6f} exact-reference={diff:+.6f}")
    assert math.isfinite(diff)
    assert 0.0 <= exact <= 1.0 and 0.0 <= ref <= 1.0
    # Guard against a silent change of either definition on this fixed case.
    assert exact == pytest.approx(0.714832, abs=1e-6)
    assert ref == pytest.approx(0.713814, abs=1e-6)


# ---------------------------------------------------------------------------
# input errors and edge cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise(bad):
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1, 1] = True
    maps = np.random.default_rng(0).random((2, 4, 4))
    maps[1, 2, 2] = bad
    kind = "NaN" if np.isnan(bad) else "infinite"
    for fn in (aupro, aupro_reference):
        with pytest.raises(ValueError, match=rf"anomaly_maps contains 1 {kind} value.*check the model output"):
            fn(masks, maps)
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max):
        with pytest.raises(ValueError, match=kind):
            fn(masks, maps)
    scores = np.array([0.1, bad, 0.3])
    for fn in (image_auroc, image_ap, f1_max):
        with pytest.raises(ValueError, match=rf"scores contains 1 {kind}"):
            fn([0, 1, 1], scores)


def test_shape_mismatch_and_bad_labels_raise():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(3, 4, 4\)"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2)), max_fpr=0.0)


def test_aupro_undefined_cases_warn():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.warns(MetricUndefinedWarning, match="aupro.*no anomalous regions"):
        assert math.isnan(aupro(np.zeros((2, 4, 4)), maps))
    with pytest.warns(MetricUndefinedWarning, match="aupro.*no normal pixels"):
        assert math.isnan(aupro(np.ones((2, 4, 4)), maps))
    with pytest.warns(MetricUndefinedWarning, match="aupro_reference.*constant"):
        m = np.zeros((2, 4, 4))
        m[0, 0, 0] = 1
        assert math.isnan(aupro_reference(m, np.zeros((2, 4, 4))))


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    masks = blobs(rng, 2, 8, 8, p_anom=1.0)
    maps = rng.random((2, 8, 8)).astype(np.float32)
    assert aupro(torch.from_numpy(masks), torch.from_numpy(maps).requires_grad_()) == aupro(masks, maps)
    assert image_auroc(torch.tensor([0, 1, 1]), torch.tensor([0.1, 0.5, 0.3])) == 1.0


# ---------------------------------------------------------------------------
# category bundle, summary, table, plot
# ---------------------------------------------------------------------------


def test_compute_category_metrics_consistent_with_single_metrics():
    rng = np.random.default_rng(11)
    masks = blobs(rng, 6, 20, 20, p_anom=0.7)
    masks[0, :3, :3] = True
    masks[1] = False
    labels = masks.reshape(6, -1).any(axis=1)
    maps = (rng.random((6, 20, 20)) + 0.5 * masks).astype(np.float32)
    scores = maps.reshape(6, -1).max(axis=1)

    exact = compute_category_metrics(labels, scores, masks, maps)
    assert tuple(exact) == METRIC_KEYS
    assert exact["image_auroc"] == image_auroc(labels, scores)
    assert exact["image_ap"] == image_ap(labels, scores)
    assert exact["image_f1_max"] == f1_max(labels, scores)
    assert exact["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-15)
    assert exact["pixel_ap"] == pytest.approx(pixel_ap(masks, maps), abs=1e-15)
    assert exact["pixel_f1_max"] == pytest.approx(pixel_f1_max(masks, maps), abs=1e-15)
    assert exact["pixel_aupro"] == pytest.approx(aupro(masks, maps), abs=1e-15)

    ref = compute_category_metrics(labels, scores, masks, maps, pro_mode="reference")
    assert ref["pixel_aupro"] == pytest.approx(aupro_reference(masks, maps), abs=1e-15)

    image_only = compute_category_metrics(labels, scores)
    assert all(math.isnan(image_only[k]) for k in METRIC_KEYS if k.startswith("pixel_"))
    assert image_only["image_auroc"] == exact["image_auroc"]
    with pytest.raises(ValueError, match="pro_mode"):
        compute_category_metrics(labels, scores, masks, maps, pro_mode="approx")


def test_compute_category_metrics_all_normal_category():
    labels = np.zeros(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compute_category_metrics(labels, [0.1, 0.2, 0.3], np.zeros((3, 4, 4)), np.zeros((3, 4, 4)))
    assert all(math.isnan(v) for v in out.values())
    named = " ".join(str(w.message) for w in caught if issubclass(w.category, MetricUndefinedWarning))
    for key in METRIC_KEYS:
        assert key in named


def test_summarize_uses_nanmean_and_table_format():
    per_cat = {
        "bottle": {"image_auroc": 0.91234, "pixel_aupro": 0.5},
        "cable": {"image_auroc": 0.8, "pixel_aupro": float("nan")},
    }
    out = summarize(per_cat)
    assert out["mean"]["image_auroc"] == pytest.approx((0.91234 + 0.8) / 2)
    assert out["mean"]["pixel_aupro"] == 0.5  # NaN category ignored
    assert set(per_cat) | {"mean"} == set(out)
    assert summarize(out)["mean"] == out["mean"]  # an existing mean is not averaged in
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" RuntimeWarning
        assert math.isnan(summarize({"a": {"x": float("nan")}})["mean"]["x"])

    table = format_markdown_table(per_cat)
    lines = table.strip().splitlines()
    assert lines[0] == "| objects | image_auroc | pixel_aupro |"
    assert lines[2] == "| bottle | 91.2 | 50.0 |"
    assert lines[3] == "| cable | 80.0 | nan |"
    assert lines[4] == "| mean | 85.6 | 50.0 |"
    assert set(lines[1]) <= set("|:-")


def test_plot_roc_curves_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    results = {f"cat{i}": (rng.random(30) < 0.5, rng.random(30)) for i in range(3)}
    results["single_class"] = (np.ones(4), rng.random(4))
    with pytest.warns(MetricUndefinedWarning, match="single_class"):
        path = plot_roc_curves(results, tmp_path / "sub" / "roc.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("from_origin", [False, True])
def test_partial_area_matches_explicit_trapezoid(from_origin):
    """The copy-free trapezoid (two dot products, the crossing segment cut at max_x) against an explicit curve
    built point by point and integrated with numpy's trapezoid."""
    from modeling_vip2clip.post_processing.metrics import _partial_area

    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        x = np.sort(np.round(rng.random(n) * 4) / 4)  # ties and vertical segments
        y = np.sort(rng.random(n))
        max_x = float(rng.choice([0.1, 0.25, 0.3, 0.5, 0.75, 1.0, 1.5]))
        points = ([(0.0, 0.0)] if from_origin else []) + list(zip(x.tolist(), y.tolist()))
        kept = [p for p in points if p[0] < max_x]
        after = next((p for p in points if p[0] >= max_x), None)
        if after is not None and kept:  # interpolate the crossing point
            (x0, y0), (x1, y1) = kept[-1], after
            kept.append((max_x, y0 + (max_x - x0) / (x1 - x0) * (y1 - y0)))
        expected = float(np.trapezoid([p[1] for p in kept], [p[0] for p in kept])) if len(kept) > 1 else 0.0
        assert _partial_area(x, y, max_x, from_origin=from_origin) == pytest.approx(expected, abs=1e-12)
