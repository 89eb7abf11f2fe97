"""The torch datasets that feed scoring (`vip2clip predict`, `calibrate`): image files, rows of `datasets` parts
(map-style or streamed), one preprocessing step run in the DataLoader workers, and the collate that keeps the
unreadable inputs aside with their reasons."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Sequence

import numpy as np
import torch

from .dataset_parts import DatasetPart
from .images import decode

__all__ = ["Prepare", "FileImages", "RowImages", "StreamImages", "collate", "make_loader", "dataset_rows"]

logger = logging.getLogger(__name__)


def _row_id(part: str, index: int, name: str | None) -> str:
    """The CSV `path` of a dataset row, also its output key: `<split>/<row>` plus the file name when known."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(str(name).replace("\\", "/"))).lstrip(".") if name else ""
    return f"{part}/{index:06d}_{base}" if base else f"{part}/{index:06d}"


def _file_name(image: Any, image_path: Any) -> str | None:
    if image_path:
        return str(image_path)
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return None


def _row_names(dataset) -> list[str | None]:
    """The file name of every row, reading only the paths (arrow batches, never the decoded images)."""
    import pyarrow.compute as pc

    column = "image_path" if "image_path" in dataset.column_names else "image"
    names: list[str | None] = []
    for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=512):
        values = table.column(column)
        if column == "image" and hasattr(values.type, "get_field_index") and values.type.get_field_index("path") >= 0:
            values = pc.struct_field(values, "path")
        elif column == "image" and str(values.type) not in ("string", "large_string"):
            names.extend([None] * len(values))
            continue
        names.extend(values.to_pylist())
    return names


def _as_label(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        return 0 if value.strip().lower() in ("0", "good", "normal", "ok", "nominal", "false", "negative") else 1
    return int(float(value) > 0)


class Prepare:
    """Decode and preprocess one input in a DataLoader worker (picklable, so `spawn` workers work too).

    Returns a dict: `id`, `key`, `pixel_values` (3, S, S), `size` (H, W), `image` (H, W, 3) uint8 when the
    caller draws overlays, `mask` (S, S) bool and `has_mask` with masks, `label`, `category`, and `error`
    (non-empty when the input cannot be used: then nothing else is set)."""

    def __init__(self, processor, keep_image: bool = False, with_masks: bool = False):
        self.processor = processor
        self.keep_image = keep_image
        self.with_masks = with_masks

    def __call__(self, item_id: str, key: str, raw: Any, mask: Any = None, label: Any = None, category: str = "") -> dict:
        out = {"id": item_id, "key": key, "label": _as_label(label), "category": str(category or ""), "error": ""}
        try:
            image = self.processor.to_pil(decode(raw), what=item_id)
            masks = None
            if self.with_masks:
                mask = None if mask is None else decode(mask)
                if mask is not None and out["label"] == 0 and mask.getbbox() is not None:
                    logger.warning("%s is labelled normal but its mask is not empty; the mask is ignored", item_id)
                    mask = None
                if mask is not None and mask.size != image.size:
                    from PIL import Image

                    mask = mask.convert("L").resize(image.size, Image.Resampling.NEAREST)
                masks = [mask]
                out["has_mask"] = mask is not None
            features = self.processor(images=[image], masks=masks)
        except Exception as error:  # noqa: BLE001 - reported with its reason, then skipped
            out["error"] = " ".join(f"{type(error).__name__}: {error}".split())
            return out
        out["pixel_values"] = features["pixel_values"][0]
        out["size"] = (image.height, image.width)
        if self.keep_image:
            out["image"] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # shared memory, not pickled
        if self.with_masks:
            out["mask"] = features["masks"][0] > 0.5
        return out


class FileImages(torch.utils.data.Dataset):
    """Image files `[(path, key)]`, read and preprocessed one by one in the workers."""

    def __init__(self, items: Sequence[tuple[str, str]], prepare: Prepare):
        self.items = list(items)
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, key = self.items[index]
        return self.prepare(path, key, path)


class RowImages(torch.utils.data.Dataset):
    """Rows of `datasets` parts, addressed by `(part, row)` pairs; a batch of rows is read in one call."""

    def __init__(self, parts: Sequence[DatasetPart], rows: np.ndarray, ids: Sequence[str], prepare: Prepare):
        self.parts = list(parts)
        self.rows = rows  # (M, 2) int64: part number, row number
        self.ids = list(ids)
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        out: dict[int, dict] = {}
        indices = [int(i) for i in indices]
        for number in sorted({int(self.rows[i, 0]) for i in indices}):
            mine = [i for i in indices if int(self.rows[i, 0]) == number]
            part = self.parts[number]
            batch = part.dataset[[int(self.rows[i, 1]) for i in mine]]
            for position, i in enumerate(mine):
                out[i] = self.prepare(
                    self.ids[i], self.ids[i], batch["image"][position],
                    mask=batch["mask"][position] if "mask" in batch else None,
                    label=batch["label"][position] if "label" in batch else None,
                    category=batch["category"][position] if "category" in batch else part.category,
                )
        return [out[i] for i in indices]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


class StreamImages(torch.utils.data.IterableDataset):
    """Rows of streamed (`IterableDataset`) parts. Every DataLoader worker of every process reads the whole
    stream in order — so a row's number is the same for all of them — and decodes only the rows of its own slot
    (`row % (processes × workers)`) that are not already done: streaming with several processes or workers
    reads the stream that many times (download the dataset first to avoid it)."""

    def __init__(self, parts: Sequence[DatasetPart], done: set[str], rank: int, world: int, prepare: Prepare):
        self.parts = list(parts)
        self.done = done
        self.rank, self.world = rank, world
        self.prepare = prepare

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        slots, slot = self.world * workers, self.rank * workers + worker_id
        number = 0
        for part in self.parts:
            index = 0
            # `.iter()` (not `iter()`): datasets would otherwise hand each torch worker only some of the shards.
            for batch in part.dataset.iter(batch_size=64):
                for position in range(len(batch["image"])):
                    row, index, number = index, index + 1, number + 1
                    if (number - 1) % slots != slot:
                        continue
                    raw = batch["image"][position]
                    image_path = batch["image_path"][position] if "image_path" in batch else None
                    item_id = _row_id(part.name, row, _file_name(raw, image_path))
                    if item_id in self.done:
                        continue
                    yield self.prepare(
                        item_id, item_id, raw,
                        mask=batch["mask"][position] if "mask" in batch else None,
                        label=batch["label"][position] if "label" in batch else None,
                        category=batch["category"][position] if "category" in batch else part.category,
                    )


def collate(rows: list[dict]) -> dict:
    """`{"pixel_values": (B', 3, S, S) or None, "items": [usable rows], "bad": [(id, reason)], "masks"}`."""
    good = [row for row in rows if not row["error"]]
    batch = {"items": good, "bad": [(row["id"], row["error"]) for row in rows if row["error"]], "pixel_values": None}
    if good:
        batch["pixel_values"] = torch.stack([row.pop("pixel_values") for row in good])
        if "mask" in good[0]:
            batch["masks"] = torch.stack([row.pop("mask") for row in good])
    return batch


def make_loader(dataset, batch_size: int, num_workers: int, pin_memory: bool = False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, prefetch_factor=2 if num_workers > 0 else None,
    )


def dataset_rows(parts: Sequence[DatasetPart]) -> tuple[np.ndarray, list[str]]:
    """`(part, row)` of every row of map-style parts and its id (see :func:`_row_id`)."""
    rows, ids = [], []
    for number, part in enumerate(parts):
        names = _row_names(part.dataset)
        rows.append(np.stack([np.full(len(names), number), np.arange(len(names))], axis=1))
        ids.extend(_row_id(part.name, index, name) for index, name in enumerate(names))
    return (np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)), ids
