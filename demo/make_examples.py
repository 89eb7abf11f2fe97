"""Regenerate the demo's example images (`demo/examples/*.png`): synthetic, CC0, made by this project.

    python demo/make_examples.py            # from the repository root; needs numpy, scipy, pillow

Procedural textures with one procedural defect each (and one defect-free image), drawn with the project's
synthetic benchmark generator (`modeling_vip2clip.data.synthetic`). Deterministic: the same PNG bytes each run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).resolve().parent / "examples"
SIZE = 256
# (file name, texture category, defect kind or None for a defect-free image)
PLAN = [
    ("fabric_hole.png", "fabric", "hole"),
    ("metal_scratch.png", "metal_plate", "scratch"),
    ("pill_discolor.png", "pill_like", "discolor"),
    ("wood_patch.png", "wood_like", "patch"),
    ("pill_good.png", "pill_like", None),
]


def main(seed: int = 2025) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from modeling_vip2clip.data.synthetic import apply_defect, render_texture

    EXAMPLES.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (name, category, defect) in enumerate(PLAN):
        rng = np.random.default_rng([seed, index])
        image = render_texture(category, rng, SIZE)
        if defect is not None:
            image, _ = apply_defect(image, defect, rng, category)
        path = EXAMPLES / name
        Image.fromarray(image, mode="RGB").save(path, format="PNG", optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in main():
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KB")
