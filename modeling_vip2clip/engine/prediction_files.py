"""The files `vip2clip predict` writes per image — overlay, map (16-bit PNG or float16 .npy), binary mask — each
staged and renamed into place, and the CSV columns that name them.

Names: `overlays/<sub>/<stem>.overlay.png`, `maps/<sub>/<stem>.map.png` (or `.map.npy`) and
`masks/<sub>/<stem>.mask.png`, where `<sub>/<stem>` is the input's key (`data.images.collect_inputs`: its path
relative to the inputs' common folder) without its file extension — `D/a/x.jpg` of the input `D/` gives
`overlays/a/x.overlay.png`. When two inputs of a run differ only by their extension (`x.jpg`, `x.png`), those keep
it (`x.jpg.overlay.png`) so that nothing collides.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
import torch

from ..files import atomic_save

__all__ = ["PredictionFiles", "ambiguous_stems", "file_stem"]


def _without_extension(key: str) -> str:
    suffix = PurePosixPath(key).suffix
    return key[: -len(suffix)] if suffix else key


def ambiguous_stems(keys: Iterable[str]) -> frozenset[str]:
    """The keys-without-extension shared by several keys of a run (their files keep the extension)."""
    counts = Counter(_without_extension(key) for key in keys)
    return frozenset(stem for stem, count in counts.items() if count > 1)


def file_stem(key: str, ambiguous: frozenset[str] | set[str] = frozenset()) -> str:
    """The `<sub>/<stem>` the files of the input `key` are named after (see the module docstring)."""
    stem = _without_extension(key)
    return key if stem in ambiguous or not stem else stem


@dataclass
class PredictionFiles:
    """What to write per image and where (paths relative to `root`)."""

    root: Path
    processor: Any
    overlays: bool
    maps: str  # "none" | "png" | "npy"
    masks: bool
    pixel_threshold: float
    threshold: float | None = None  # the verdict's, drawn on the overlay
    plain_overlays: bool = False  # True: the bare blend, without the strip of score and colour scale
    ambiguous: frozenset = field(default_factory=frozenset)

    @property
    def needs_files(self) -> bool:
        return self.overlays or self.maps != "none" or self.masks

    def header(self) -> list[str]:
        return ["path", "score", "verdict", "overlay"] + (["map"] if self.maps != "none" else []) + (
            ["mask"] if self.masks else [])

    def full_size_map(self, item: dict, anomaly_map: torch.Tensor) -> np.ndarray | None:
        """The map at the image's own size, for --save-maps / --save-masks; None when neither is asked.

        Called in the main thread: a torch op in a writer thread would start an OpenMP team of its own that
        competes with the model's threads."""
        if self.maps == "none" and not self.masks:
            return None
        return self.processor.post_process_anomaly_maps(anomaly_map[None], target_sizes=[item["size"]])[0].numpy()

    def write(self, item: dict, anomaly_map: torch.Tensor, row: list[str], full: np.ndarray | None = None) -> list[str]:
        """Write the files of one image (map `(S, S)` float32) and complete its CSV row with their paths."""
        from PIL import Image

        from ..processing_vip2clip import annotate_overlay

        stem = file_stem(item["key"], self.ambiguous)
        if full is None:  # `full_size_map`, computed by the caller in the main thread (see there)
            full = self.full_size_map(item, anomaly_map)
        overlay = ""
        if self.overlays:
            overlay = f"overlays/{stem}.overlay.png"
            picture = self.processor.overlay(Image.fromarray(item["image"].numpy()), anomaly_map)
            if not self.plain_overlays:
                picture = annotate_overlay(picture, float(row[1]), self.threshold)
            atomic_save(self.root / overlay, lambda handle: picture.save(handle, format="PNG", compress_level=1))
        row = [*row, overlay]
        if self.maps == "png":
            # 16-bit grey: value / 65535 is the map value in [0, 1].
            levels = np.round(np.clip(full, 0.0, 1.0) * 65535.0).astype(np.uint16)
            row.append(f"maps/{stem}.map.png")
            atomic_save(self.root / row[-1], lambda handle: Image.fromarray(levels).save(handle, format="PNG", compress_level=1))
        elif self.maps == "npy":
            row.append(f"maps/{stem}.map.npy")
            atomic_save(self.root / row[-1], lambda handle: np.save(handle, full.astype(np.float16)))
        if self.masks:
            binary = (full >= self.pixel_threshold).astype(np.uint8) * 255
            row.append(f"masks/{stem}.mask.png")
            atomic_save(self.root / row[-1], lambda handle: Image.fromarray(binary, mode="L").save(handle, format="PNG", compress_level=1))
        return row
