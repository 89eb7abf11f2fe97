"""Procedural synthetic anomaly benchmark written as real PNG files.

The images are synthetic — procedural textures (woven fabric, brushed metal,
a round pill-like object on a background, wood grain) made with numpy and
``scipy.ndimage`` — with procedural defects (scratch line, patch pasted from
another texture, discoloured blob, hole) whose ground-truth masks are *exact*:
a mask pixel is 255 precisely where the defect changed the image. They contain
no third-party data and are released under CC0 1.0 by this project.

Output is byte-for-byte deterministic for a given ``seed`` and arguments
(per-image random generators are seeded from the seed, a CRC of the category
name and the image's position; PNG encoding is deterministic).

Layouts (``layout=``):

* ``"mvtec"``: ``<root>/<cat>/train/good/000.png``, ``<root>/<cat>/test/good/``,
  ``<root>/<cat>/test/<defect>/000.png`` and
  ``<root>/<cat>/ground_truth/<defect>/000_mask.png`` (0/255).
* ``"meta_json"``: the same tree plus the authors' ``<root>/meta.json``.
* ``"visa"``: ``<root>/<cat>/Data/Images/{Normal,Anomaly}/NNNN.png``,
  ``<root>/<cat>/Data/Masks/Anomaly/NNNN.png`` and ``<root>/split_csv/1cls.csv``.
* ``"folder"``: ``<root>/<cat>/good/``, ``<root>/<cat>/bad/<defect>_NNN.png``,
  ``<root>/<cat>/masks/<defect>_NNN_mask.png`` (test images only; no split).

CLI: ``python -m modeling_vip2clip.data.synthetic --out DIR [--tiny] [--layout mvtec] [--seed 0]`` (``--help``
describes every option; ``--tiny`` writes a 6-image benchmark in about a second, for trying the command line).
"""

from __future__ import annotations

import argparse
import csv
import json
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFAULT_CATEGORIES",
    "DEFECT_KINDS",
    "LAYOUTS",
    "render_texture",
    "apply_defect",
    "generate_synthetic_benchmark",
    "DESCRIPTION",
    "add_arguments",
    "run",
    "main",
]

DEFAULT_CATEGORIES = ("fabric", "metal_plate", "pill_like", "wood_like")
DEFECT_KINDS = ("scratch", "patch", "discolor", "hole")
LAYOUTS = ("mvtec", "meta_json", "visa", "folder")
_CATEGORY_DEFECTS = {
    "fabric": ("hole", "discolor"),
    "metal_plate": ("scratch", "discolor"),
    "pill_like": ("discolor", "hole"),
    "wood_like": ("scratch", "patch"),
}


# --------------------------------------------------------------------------- textures


def _noise(rng: np.random.Generator, n: int, sigma) -> np.ndarray:
    """Smoothed Gaussian noise with unit standard deviation."""
    x = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
    return x / (x.std() + 1e-8)


def _fabric(rng: np.random.Generator, n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    period = rng.uniform(5.0, 8.0)
    jitter = 0.6 * _noise(rng, n, 6)
    warp = 0.5 + 0.5 * np.sin(2 * np.pi * (x + jitter) / period + rng.uniform(0, 2 * np.pi))
    weft = 0.5 + 0.5 * np.sin(2 * np.pi * (y + jitter) / period + rng.uniform(0, 2 * np.pi))
    over = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    weave = np.where(over, warp, weft)
    fibre = _noise(rng, n, (0.7, 2.5))
    colour = np.array([rng.uniform(60, 110), rng.uniform(90, 140), rng.uniform(140, 200)])
    img = colour * (0.55 + 0.45 * weave[..., None]) + 6.0 * fibre[..., None]
    return img


def _metal(rng: np.random.Generator, n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) / n
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.08 * (np.cos(angle) * x + np.sin(angle) * y)
    brushed = 0.06 * _noise(rng, n, (0.4, n / 5))  # long horizontal streaks
    grain = 0.02 * rng.standard_normal((n, n))
    v = 0.62 + light + brushed + grain
    tint = np.array([0.97, 1.0, 1.04]) * 200
    return v[..., None] * tint


def _wood(rng: np.random.Generator, n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    distort = 0.08 * n * _noise(rng, n, n / 8)
    period = rng.uniform(0.08, 0.14) * n
    r = np.hypot((x - rng.uniform(-n, 0)) * 0.25, y - rng.uniform(0, n)) + distort
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * r / period)
    rings = rings**2
    streaks = _noise(rng, n, (3, 0.5))
    light = np.array([205.0, 160.0, 110.0])
    dark = np.array([135.0, 85.0, 45.0])
    t = np.clip(rings[..., None] + 0.08 * streaks[..., None], 0, 1)
    return light * (1 - t) + dark * t


def _pill(rng: np.random.Generator, n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    bg = 45 + 10 * _noise(rng, n, 2)[..., None] * np.ones(3)
    cx, cy = n / 2 + rng.uniform(-0.05, 0.05) * n, n / 2 + rng.uniform(-0.05, 0.05) * n
    ax, ay = rng.uniform(0.28, 0.36) * n, rng.uniform(0.24, 0.32) * n
    d = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    inside = np.clip((1.0 - d) * ax / 1.5, 0, 1)[..., None]  # anti-aliased edge
    shade = (1.0 - 0.25 * np.clip(d, 0, 1) ** 2)[..., None]
    speck = (ndimage.gaussian_filter(rng.random((n, n)), 0.6) > 0.68)[..., None]
    colour = np.array([rng.uniform(220, 240), rng.uniform(205, 225), rng.uniform(190, 210)])
    obj = colour * shade - 60.0 * speck + 3.0 * _noise(rng, n, 1)[..., None]
    return bg * (1 - inside) + obj * inside


_TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "fabric": _fabric,
    "metal_plate": _metal,
    "pill_like": _pill,
    "wood_like": _wood,
}
_TEXTURE_ORDER = tuple(_TEXTURES)


def _texture_name(category: str) -> str:
    if category in _TEXTURES:
        return category
    return _TEXTURE_ORDER[zlib.crc32(category.encode()) % len(_TEXTURE_ORDER)]


def render_texture(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one defect-free image (uint8, size x size x 3) of ``category``'s texture.

    Unknown category names get one of the four textures, chosen by a CRC of the name.
    """
    img = _TEXTURES[_texture_name(category)](rng, size)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- defects


def _blob(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    cx, cy = rng.uniform(0.3, 0.7, size=2) * n
    wobble = 0.25 * radius * _noise(rng, n, max(radius / 2, 1))
    return np.hypot(x - cx, y - cy) + wobble < radius


def apply_defect(
    clean: np.ndarray, kind: str, rng: np.random.Generator, category: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a defect of ``kind`` to a uint8 image; return ``(defective, mask)``.

    ``mask`` (bool) is True exactly where ``defective`` differs from ``clean``.
    """
    n = clean.shape[0]
    img = clean.astype(np.float64)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    if kind == "scratch":
        p0 = rng.uniform(0.15, 0.85, size=2) * n
        theta = rng.uniform(0, np.pi)
        length = rng.uniform(0.35, 0.6) * n
        p1 = np.clip(p0 + length * np.array([np.cos(theta), np.sin(theta)]), 0, n - 1)
        d = p1 - p0
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / max(d @ d, 1e-8), 0, 1)
        dist = np.hypot(x - (p0[0] + t * d[0]), y - (p0[1] + t * d[1]))
        region = dist <= max(0.8, n / 90)
        target = 245.0 if clean.mean() < 140 else 25.0
        img[region] = 0.25 * img[region] + 0.75 * target
    elif kind == "patch":
        others = [c for c in _TEXTURE_ORDER if c != _texture_name(category)]
        other = render_texture(others[int(rng.integers(len(others)))], rng, n).astype(np.float64)
        h, w = (rng.uniform(0.15, 0.3, size=2) * n).astype(int) + 2
        top, left = int(rng.integers(0, n - h)), int(rng.integers(0, n - w))
        region = np.zeros((n, n), bool)
        region[top : top + h, left : left + w] = True
        img[region] = other[region]
    elif kind == "discolor":
        region = _blob(rng, n, rng.uniform(0.08, 0.16) * n)
        factor = np.array([rng.uniform(1.25, 1.5), rng.uniform(0.7, 0.85), rng.uniform(0.45, 0.6)])
        img[region] = img[region] * factor + np.array([25.0, 0.0, -10.0])
    elif kind == "hole":
        region = _blob(rng, n, rng.uniform(0.05, 0.1) * n)
        img[region] = 12.0 + 6.0 * rng.random((int(region.sum()), 1))
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    out[~region] = clean[~region]
    unchanged = region & np.all(out == clean, axis=-1)
    out[unchanged] = 255 - clean[unchanged]  # never equal to clean (255 is odd)
    mask = np.any(out != clean, axis=-1)
    assert np.array_equal(mask, region)
    return out, mask


# --------------------------------------------------------------------------- writer


def _rng(seed: int, category: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(category.encode()), *parts])


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(array, mode=mode).save(path, format="PNG", compress_level=6)


def _paths(layout: str, category: str, split: str, defect: str | None, i: int, counters: dict) -> tuple[str, str | None]:
    """Relative image path and mask path for one generated image."""
    if layout in ("mvtec", "meta_json"):
        folder = "good" if defect is None else defect
        img = f"{category}/{split}/{folder}/{i:03d}.png"
        mask = None if defect is None else f"{category}/ground_truth/{defect}/{i:03d}_mask.png"
        return img, mask
    if layout == "visa":
        kind = "Normal" if defect is None else "Anomaly"
        k = counters[(category, kind)]
        counters[(category, kind)] += 1
        img = f"{category}/Data/Images/{kind}/{k:04d}.png"
        mask = None if defect is None else f"{category}/Data/Masks/Anomaly/{k:04d}.png"
        return img, mask
    if layout == "folder":
        if defect is None:
            return f"{category}/good/{i:03d}.png", None
        return f"{category}/bad/{defect}_{i:03d}.png", f"{category}/masks/{defect}_{i:03d}_mask.png"
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def generate_synthetic_benchmark(
    root: str | Path,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    n_train_good: int = 4,
    n_test_good: int = 4,
    n_test_bad: int = 4,
    image_size: int = 128,
    seed: int = 0,
    layout: str = "mvtec",
) -> list[dict]:
    """Write a synthetic benchmark under ``root`` and return one record per image.

    Each record: ``category``, ``split``, ``label`` (0/1), ``defect_kind``
    (the defect applied, "good" for normal), ``defect_type`` (what the layout
    exposes: the defect folder name, or "anomaly" for the ``visa`` and flat
    ``folder`` layouts, which carry none), ``image_path`` and ``mask_path`` (relative to ``root``; None
    for normal images). The ``folder`` layout writes test images only.
    Anomalous images cycle over the category's two defect kinds.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if image_size < 16:
        raise ValueError("image_size must be at least 16")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    counters: dict = {}
    for category in categories:
        defects = _CATEGORY_DEFECTS.get(category)
        if defects is None:
            start = zlib.crc32(category.encode()) % len(DEFECT_KINDS)
            defects = (DEFECT_KINDS[start], DEFECT_KINDS[(start + 1) % len(DEFECT_KINDS)])
        counters[(category, "Normal")] = counters[(category, "Anomaly")] = 0
        plan: list[tuple[str, str | None, int, int]] = []  # split, defect, index within folder, code
        if layout != "folder":
            plan += [("train", None, i, 0) for i in range(n_train_good)]
        plan += [("test", None, i, 1) for i in range(n_test_good)]
        per_defect = {d: 0 for d in defects}
        for j in range(n_test_bad):
            d = defects[j % len(defects)]
            plan.append(("test", d, per_defect[d], 2 + DEFECT_KINDS.index(d)))
            per_defect[d] += 1
        for split, defect, i, code in plan:
            rng = _rng(seed, category, code, i)
            clean = render_texture(category, rng, image_size)
            img_rel, mask_rel = _paths(layout, category, split, defect, i, counters)
            if defect is None:
                _save_png(clean, root / img_rel)
            else:
                bad, mask = apply_defect(clean, defect, rng, category)
                _save_png(bad, root / img_rel)
                _save_png(mask.astype(np.uint8) * 255, root / mask_rel)
            records.append(
                {
                    "category": category,
                    "split": split,
                    "label": int(defect is not None),
                    "defect_kind": defect or "good",
                    "defect_type": "good" if defect is None else ("anomaly" if layout in ("visa", "folder") else defect),
                    "image_path": img_rel,
                    "mask_path": mask_rel,
                }
            )
    if layout == "meta_json":
        _write_meta_json(root, records)
    elif layout == "visa":
        _write_visa_csv(root, records)
    return records


def _write_meta_json(root: Path, records: list[dict]) -> None:
    info: dict = {"train": {}, "test": {}}
    for r in records:
        normal = f"{r['category']}/train/good/000.png"
        info[r["split"]].setdefault(r["category"], []).append(
            {
                "img_path": r["image_path"],
                "normal_path": normal,
                "mask_path": r["mask_path"] or "",
                "cls_name": r["category"],
                "specie_name": r["defect_kind"],
                "anomaly": r["label"],
            }
        )
    (root / "meta.json").write_text(json.dumps(info, indent=4) + "\n", encoding="utf-8")


def _write_visa_csv(root: Path, records: list[dict]) -> None:
    path = root / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["object", "split", "label", "image", "mask"])
        for r in records:
            w.writerow(
                [r["category"], r["split"], "anomaly" if r["label"] else "normal", r["image_path"], r["mask_path"] or ""]
            )


DESCRIPTION = (
    "Write a synthetic anomaly benchmark (procedural textures with exact defect masks, CC0) as PNG files, in the "
    "layout of MVTec AD, VisA, the authors' meta.json or plain folders: data to try every vip2clip command on, "
    "offline. --tiny writes one small category in about a second."
)
_TINY = {"categories": ["fabric"], "image_size": 32, "n_train_good": 2, "n_test_good": 2, "n_test_bad": 2}
_FULL = {"categories": list(DEFAULT_CATEGORIES), "image_size": 128, "n_train_good": 4, "n_test_good": 4,
         "n_test_bad": 4}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m modeling_vip2clip.data.synthetic``."""
    from ..cli.options import add_debug_argument, non_negative_int, positive_int

    def default(key: str) -> str:
        full, tiny = _FULL[key], _TINY[key]
        full, tiny = (" ".join(v) if isinstance(v, list) else v for v in (full, tiny))
        return f"(default: {full}; {tiny} with --tiny)"

    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write the benchmark into (created; files of the same names are replaced).")
    parser.add_argument("--layout", choices=LAYOUTS, default="mvtec",
                        help="on-disk layout: mvtec (<cat>/{train,test}/<defect>/ + ground_truth/), meta_json (the "
                        "same tree + the authors' meta.json), visa (<cat>/Data/... + split_csv/1cls.csv), folder "
                        "(<cat>/good/, <cat>/bad/, <cat>/masks/; test images only) (default: mvtec).")
    parser.add_argument("--tiny", action="store_true",
                        help="a benchmark for trying the command line in seconds: one category (fabric), 32-pixel "
                        "images, 2 normal training, 2 normal and 2 anomalous test images; the flags below override it.")
    parser.add_argument("--categories", nargs="+", default=None, metavar="NAME",
                        help="categories to write; fabric, metal_plate, pill_like and wood_like have their own "
                        f"texture, other names get one of them {default('categories')}.")
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="PIXELS",
                        help=f"side of the square images, at least 16 {default('image_size')}.")
    parser.add_argument("--n-train-good", type=non_negative_int, default=None, metavar="N",
                        help=f"normal training images per category (none in the folder layout) {default('n_train_good')}.")
    parser.add_argument("--n-test-good", type=non_negative_int, default=None, metavar="N",
                        help=f"normal test images per category {default('n_test_good')}.")
    parser.add_argument("--n-test-bad", type=non_negative_int, default=None, metavar="N",
                        help="anomalous test images per category, cycling over the category's two defect kinds "
                        f"{default('n_test_bad')}.")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed and options write the same bytes (default: 0).")
    add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the benchmark described by ``args``; user errors raise ``errors.UsageError``."""
    from ..errors import UsageError

    preset = _TINY if args.tiny else _FULL
    options = {key: preset[key] if getattr(args, key) is None else getattr(args, key) for key in preset}
    if options["image_size"] < 16:
        raise UsageError(f"--image-size {options['image_size']}: below 16 pixels; pass --image-size 16 or more")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a folder to write the benchmark into")
    records = generate_synthetic_benchmark(out, seed=args.seed, layout=args.layout, **options)
    n_bad = sum(r["label"] for r in records)
    print(f"wrote {len(records)} images ({n_bad} anomalous) in the {args.layout!r} layout to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m modeling_vip2clip.data.synthetic``)."""
    from ..cli.boundary import run_main

    parser = argparse.ArgumentParser(prog="python -m modeling_vip2clip.data.synthetic", description=DESCRIPTION)
    return run_main(run, add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
