"""The files `vip2clip predict` writes per image — overlay, map (16-bit PNG or float16 .npy), binary mask — each
staged and renamed into place, and the CSV columns that name them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_save

__all__ = ["PredictionFiles"]


@dataclass
class PredictionFiles:
    """What to write per image and where (paths relative to `root`)."""

    root: Path
    processor: Any
    overlays: bool
    maps: str  # "none" | "png" | "npy"
    masks: bool
    pixel_threshold: float

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

        key = item["key"]
        if full is None:  # `full_size_map`, computed by the caller in the main thread (see there)
            full = self.full_size_map(item, anomaly_map)
        overlay = ""
        if self.overlays:
            overlay = f"overlays/{key}.png"
            picture = self.processor.overlay(Image.fromarray(item["image"].numpy()), anomaly_map)
            atomic_save(self.root / overlay, lambda handle: picture.save(handle, format="PNG", compress_level=1))
        row = [*row, overlay]
        if self.maps == "png":
            # 16-bit grey: value / 65535 is the map value in [0, 1].
            levels = np.round(np.clip(full, 0.0, 1.0) * 65535.0).astype(np.uint16)
            row.append(f"maps/{key}.png")
            atomic_save(self.root / row[-1], lambda handle: Image.fromarray(levels).save(handle, format="PNG", compress_level=1))
        elif self.maps == "npy":
            row.append(f"maps/{key}.npy")
            atomic_save(self.root / row[-1], lambda handle: np.save(handle, full.astype(np.float16)))
        if self.masks:
            binary = (full >= self.pixel_threshold).astype(np.uint8) * 255
            row.append(f"masks/{key}.png")
            atomic_save(self.root / row[-1], lambda handle: Image.fromarray(binary, mode="L").save(handle, format="PNG", compress_level=1))
        return row
