"""Time the AUPRO implementations on a synthetic category (default: 100 maps of 518x518).

Compared:
  * ``aupro``            -- exact curve at every distinct map value (one sort);
  * ``aupro_reference``  -- the 200-threshold approximation, vectorised;
  * ``authors_loop``     -- a faithful re-implementation of the reference
                            code's loop: for each of the 200 thresholds,
                            threshold the whole stack, re-label every mask and
                            loop over its regions in Python.
Also times the pixel AUROC (shared sort) against ``sklearn.metrics.roc_auc_score``.

Prints one JSON line.  Usage::

    python benchmarks/bench_aupro.py --n 100 --size 518 [--skip-loop] [--skip-sklearn]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_vip2clip.post_processing.metrics import aupro, aupro_reference, pixel_auroc  # noqa: E402
from modeling_vip2clip.testing_utils import authors_loop_aupro  # noqa: E402


def synthetic_category(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks with 1-4 smooth blobs on ~70% of the images; maps = smoothed noise + blurred signal (float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.empty((n, size, size), dtype=np.float32)
    for k in range(n):
        if rng.random() < 0.7:
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.uniform(0, size, 2)
                ry, rx = rng.uniform(0.01, 0.12, 2) * size
                # wobbly ellipse: irregular outline, sometimes split into several regions
                wobble = 1 + 0.3 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6.3))
                masks[k] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 4)
        signal = ndimage.gaussian_filter(masks[k].astype(np.float32), 6)
        maps[k] = noise / noise.std() + 2.0 * signal
    return masks, maps


def _ver(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _timed(fn, *args) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="number of maps")
    ap.add_argument("--size", type=int, default=518, help="map side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="extra warm calls of the fast functions (best reported)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the slow reference loop")
    ap.add_argument("--skip-sklearn", action="store_true", help="skip sklearn's roc_auc_score timing")
    args = ap.parse_args()

    masks, maps = synthetic_category(args.n, args.size, args.seed)
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)

    # The first call of each fast function is reported (it includes page
    # faults on the fresh 100-MB arrays, as a real evaluation does); the best
    # of --repeat further calls is reported separately as "warm".
    exact, t_exact = _timed(aupro, masks, maps)
    ref, t_ref = _timed(aupro_reference, masks, maps)
    fast_auc, t_fast = _timed(pixel_auroc, masks, maps)
    warm = {
        name: round(min(_timed(fn, masks, maps)[1] for _ in range(args.repeat)), 3)
        for name, fn in (("aupro_exact", aupro), ("aupro_reference_vectorised", aupro_reference),
                         ("pixel_auroc_fast", pixel_auroc))
    } if args.repeat > 0 else {}
    out: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": _ver("scipy"),
            "scikit-learn": _ver("scikit-learn"),
            "torch": _ver("torch"),
        },
        "n": args.n,
        "size": args.size,
        "pixels": int(masks.size),
        "n_regions": int(n_regions),
        "anomalous_pixel_fraction": round(float(masks.mean()), 5),
        "seconds": {
            "aupro_exact": round(t_exact, 3),
            "aupro_reference_vectorised": round(t_ref, 3),
            "pixel_auroc_fast": round(t_fast, 3),
        },
        "seconds_warm_best": warm,
        "aupro_exact": exact,
        "aupro_reference": ref,
        "abs_exact_minus_reference": abs(exact - ref),
    }
    if not args.skip_loop:
        loop, t_loop = _timed(authors_loop_aupro, masks, maps)
        out["seconds"]["authors_loop"] = round(t_loop, 3)
        out["aupro_authors_loop"] = loop
        out["abs_reference_minus_authors_loop"] = abs(ref - loop)
        out["speedup_exact_vs_authors_loop"] = round(t_loop / t_exact, 1)
        out["speedup_reference_vs_authors_loop"] = round(t_loop / t_ref, 1)
    if not args.skip_sklearn:
        sk_auc, t_sk = _timed(roc_auc_score, masks.ravel(), maps.ravel())
        out["seconds"]["pixel_auroc_sklearn"] = round(t_sk, 3)
        out["abs_pixel_auroc_fast_minus_sklearn"] = abs(fast_auc - sk_auc)
        out["speedup_pixel_auroc_vs_sklearn"] = round(t_sk / t_fast, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
