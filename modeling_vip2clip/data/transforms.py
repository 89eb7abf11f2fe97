"""The torch side of the data: one preprocessing step per sample and the torch datasets built on it.

* :class:`SampleTransform` — *the* preprocessing of one sample, used by every command: read the image and mask
  (:func:`.images.read_image`), drop the mask of an image labelled normal (with a warning), bring a mask to its
  image's size, run the processor → ``pixel_values``, the resized mask, or the reason the sample is unusable.
* training and evaluation (map-style datasets in the canonical schema): :class:`AnomalyBatchTransform` (a
  ``Dataset.with_transform`` function, :func:`make_transform`), :class:`TorchAnomalyDataset`
  (:func:`to_torch_dataset`) and the collate that drops and logs unusable rows (:class:`SkipBadCollate`,
  :data:`collate_skip_bad`);
* scoring (``vip2clip predict`` and ``calibrate``): :class:`FileImages` (image files), :class:`RowImages` (rows of
  a dataset), :class:`StreamImages` (a streamed dataset), :func:`dataset_rows` (each row's id and output key),
  :func:`collate` and :func:`make_loader`.

Datasets decode ``Image`` columns *before* a ``with_transform`` function sees them, so a corrupt image would raise
inside ``datasets``; :func:`without_decoding` (applied by the datasets here) casts ``image``/``mask`` to
``Image(decode=False)`` so that :class:`SampleTransform` reads them and can report errors.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from .images import read_image
from .labels import UNLABELLED
from .sources import without_decoding

__all__ = [
    "without_decoding",
    "SampleTransform",
    "AnomalyBatchTransform",
    "make_transform",
    "SkipBadCollate",
    "collate_skip_bad",
    "TorchAnomalyDataset",
    "to_torch_dataset",
    "FileImages",
    "RowImages",
    "StreamImages",
    "collate",
    "dataset_rows",
    "make_loader",
]

logger = logging.getLogger(__name__)


def _where(batch: Mapping[str, list], i: int) -> str:
    if batch.get("image_path"):
        return str(batch["image_path"][i])
    value = batch["image"][i]
    if isinstance(value, Mapping) and value.get("path"):
        return str(value["path"])
    return f"row {batch['index'][i] if batch.get('index') else i}"


class SampleTransform:
    """One sample → model inputs; a picklable object, so ``DataLoader`` workers also start under ``spawn``
    (macOS, Windows, Python ≥ 3.14 defaults).

    ``sample(image, mask, label, where)`` returns a dict: ``error`` ("" when usable, else the reason: the image
    or mask does not decode, or the processor rejects it — then nothing else is set), ``pixel_values`` (3, S, S)
    float, ``size`` (H, W) of the image as the processor sees it (EXIF orientation applied), with ``with_masks``
    ``mask`` (S, S) bool (all False without one) and ``has_mask`` (the row came with a mask), with ``keep_image``
    ``image`` (H, W, 3) uint8 (for overlays). A non-empty mask on an image labelled normal is ignored with a
    warning (the reference scores normal images against an empty mask; the label wins); a mask of another size
    than its image is resized to it (nearest neighbour keeps it binary).
    """

    def __init__(self, processor: Any, *, with_masks: bool = True, keep_image: bool = False) -> None:
        self.processor = processor
        self.with_masks = with_masks
        self.keep_image = keep_image

    def __call__(self, image: Any, mask: Any = None, label: int = UNLABELLED, where: str = "") -> dict:
        out: dict = {"error": ""}
        try:
            picture = read_image(image, what=where or None)
        except Exception as error:  # noqa: BLE001 - reported with its reason, then skipped
            out["error"] = _reason("image does not decode", error)
            return out
        try:
            picture = self.processor.to_pil(picture, what=where or "image")  # RGB, EXIF orientation applied
        except Exception as error:  # noqa: BLE001
            out["error"] = _reason("processor rejected the image", error)
            return out
        masks = None
        if self.with_masks:
            try:
                mask = None if mask is None else read_image(mask, what=f"mask of {where}" if where else "mask")
            except Exception as error:  # noqa: BLE001
                out["error"] = _reason("mask does not decode", error)
                return out
            out["has_mask"] = mask is not None
            if mask is not None and label == 0 and mask.getbbox() is not None:
                logger.warning("%s is labelled normal but its mask is not empty; the mask is ignored (fix the label "
                               "or the mask)", where or "an image")
                mask = None
            if mask is not None and mask.size != picture.size:
                # Converters keep such rows (with a warning); the processor requires equal sizes.
                logger.debug("resizing mask of %s from %s to %s", where, mask.size, picture.size)
                mask = mask.convert("L").resize(picture.size, Image.Resampling.NEAREST)
            masks = [mask]
        try:
            features = self.processor(images=[picture], masks=masks)
        except Exception as error:  # noqa: BLE001
            out["error"] = _reason("processor rejected the image", error)
            return out
        out["pixel_values"] = torch.as_tensor(features["pixel_values"][0]).float()
        out["size"] = (picture.height, picture.width)
        if self.with_masks:
            out["mask"] = torch.as_tensor(features["masks"][0]) > 0.5
        if self.keep_image:
            out["image"] = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy())  # shared memory, not pickled
        return out


def _reason(what: str, error: BaseException) -> str:
    return " ".join(f"{what}: {type(error).__name__}: {error}".split())


class AnomalyBatchTransform:
    """A ``Dataset.with_transform`` function producing model-ready batches: :class:`SampleTransform` on each row.

    Output per batch of B rows: ``pixel_values`` FloatTensor (B,3,S,S),
    ``masks`` FloatTensor (B,S,S) in {0,1} (zeros when there is no mask),
    ``labels`` LongTensor (B,), ``has_mask`` BoolTensor (B,) (False for rows
    with mask None: exclude anomalous ones from pixel metrics), ``category``
    list[str], ``index`` list[int] (the ``index`` column when present, else
    -1), ``image_path`` list[str], and ``bad`` BoolTensor (B,) with ``error``
    list[str]: unusable rows (see :class:`SampleTransform`) are flagged (zero
    tensors, reason in ``error``) rather than raising; drop them with
    :func:`collate_skip_bad`. Use it on a dataset passed through
    :func:`without_decoding`, otherwise ``datasets`` decodes (and may fail on)
    images before this function runs.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.size = int(processor.image_size)
        self.sample = SampleTransform(processor, with_masks=True)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image"])
        masks_in = batch.get("mask") or [None] * n
        pixel_values = torch.zeros(n, 3, self.size, self.size)
        masks = torch.zeros(n, self.size, self.size)
        errors = [""] * n
        for i in range(n):
            out = self.sample(batch["image"][i], masks_in[i], int(batch["label"][i]), _where(batch, i))
            errors[i] = out["error"]
            if errors[i]:
                logger.debug("bad row %s: %s", _where(batch, i), errors[i])
            else:
                pixel_values[i], masks[i] = out["pixel_values"], out["mask"].float()
        return {
            "pixel_values": pixel_values,
            "masks": masks,
            "labels": torch.as_tensor([int(v) for v in batch["label"]], dtype=torch.long),
            "has_mask": torch.tensor([m is not None for m in masks_in], dtype=torch.bool),
            "category": [str(c) for c in batch.get("category") or [""] * n],
            "index": [int(v) for v in batch["index"]] if "index" in batch else [-1] * n,
            "image_path": [_where(batch, i) for i in range(n)],
            "bad": torch.tensor([bool(e) for e in errors], dtype=torch.bool),
            "error": errors,
        }


def make_transform(processor: Any) -> AnomalyBatchTransform:
    """Return the ``Dataset.with_transform`` function of :class:`AnomalyBatchTransform` for ``processor``."""
    return AnomalyBatchTransform(processor)


class SkipBadCollate:
    """DataLoader ``collate_fn`` that drops rows flagged ``bad`` by :func:`make_transform`.

    Each dropped row is logged (path, reason) with the running count; they are
    kept in ``self.skipped`` as ``(index, image_path, error)`` and counted in
    ``self.n_skipped``. The result is a dict of ``pixel_values`` (B',3,S,S),
    ``masks`` (B',S,S), ``labels``, ``has_mask``, ``category``, ``index``,
    ``image_path``, and the dropped rows as ``bad_index`` / ``bad_samples``; B' may be 0 when every row of a batch is bad (skip such
    batches). With ``num_workers > 0`` each worker process keeps its own count.
    Accepts a list of row dicts (``DataLoader`` default) or one batched dict.
    """

    def __init__(self) -> None:
        self.n_skipped = 0
        self.skipped: list[tuple[int, str, str]] = []

    def reset(self) -> None:
        self.n_skipped = 0
        self.skipped.clear()

    def __call__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict:
        if isinstance(rows, Mapping):
            n = len(rows["labels"])
            rows = [{k: rows[k][i] for k in rows} for i in range(n)]
        if not rows:
            raise ValueError("collate_skip_bad received an empty batch")
        good = []
        for r in rows:
            if bool(r.get("bad", False)):
                self.n_skipped += 1
                self.skipped.append((int(r.get("index", -1)), str(r.get("image_path", "")), str(r.get("error", ""))))
                logger.warning(
                    "skipping bad sample %s (index %s): %s [%d skipped so far]",
                    r.get("image_path", "?"), r.get("index", "?"), r.get("error", ""), self.n_skipped,
                )
            else:
                good.append(r)
        ref = rows[0]
        if good:
            pixel_values = torch.stack([r["pixel_values"] for r in good])
            masks = torch.stack([r["masks"] for r in good])
        else:
            pixel_values = ref["pixel_values"].new_zeros((0, *ref["pixel_values"].shape))
            masks = ref["masks"].new_zeros((0, *ref["masks"].shape))
        return {
            "pixel_values": pixel_values,
            "masks": masks,
            "labels": torch.as_tensor([int(r["labels"]) for r in good], dtype=torch.long),
            "has_mask": torch.as_tensor([bool(r.get("has_mask", True)) for r in good], dtype=torch.bool),
            "category": [r.get("category", "") for r in good],
            "index": [int(r.get("index", -1)) for r in good],
            "image_path": [r.get("image_path", "") for r in good],
            # The rows dropped from this batch, for callers in another process than the collate (DataLoader
            # workers): `bad_index` (the feature cache's status) and `bad_samples` (a run's skipped list).
            "bad_index": [int(r.get("index", -1)) for r in rows if bool(r.get("bad", False))],
            "bad_samples": [{"index": int(r.get("index", -1)), "image_path": str(r.get("image_path", "")),
                             "reason": str(r.get("error", ""))} for r in rows if bool(r.get("bad", False))],
        }


#: Shared :class:`SkipBadCollate` instance; its ``n_skipped`` is a running count.
collate_skip_bad = SkipBadCollate()


class TorchAnomalyDataset(torch.utils.data.Dataset):
    """Map-style torch dataset over a :class:`datasets.Dataset`, decoding lazily per batch.

    Nothing is copied into memory: ``__getitems__`` reads only the requested
    rows (``DataLoader`` calls it once per batch), decodes them and runs the
    processor. ``index`` is the row position in ``dataset``.
    """

    def __init__(self, dataset: Dataset, processor: Any) -> None:
        self.dataset = without_decoding(dataset)
        self.transform = make_transform(processor)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) for i in indices]
        batch = self.dataset[indices]
        batch["index"] = indices
        out = self.transform(batch)
        return [{k: v[i] for k, v in out.items()} for i in range(len(indices))]

    def __getitem__(self, idx: int) -> dict:
        return self.__getitems__([idx])[0]


def to_torch_dataset(dataset: Dataset, processor: Any) -> TorchAnomalyDataset:
    """Wrap ``dataset`` for ``torch.utils.data.DataLoader(..., collate_fn=collate_skip_bad)``."""
    return TorchAnomalyDataset(dataset, processor)


# ---------------------------------------------------------------------------------------------------- scoring
# `vip2clip predict` and `calibrate`: items are dicts with `id` (the CSV's `path`), `key` (the output files' name),
# `label` (None when unlabelled), `category` and the fields of SampleTransform.


def _item(step: SampleTransform, item_id: str, key: str, image: Any, mask: Any = None, label: Any = UNLABELLED,
          category: Any = "") -> dict:
    label = UNLABELLED if label is None else int(label)
    out = step(image, mask, label, item_id)
    out.update(id=item_id, key=key, label=None if label == UNLABELLED else label, category=str(category or ""))
    return out


def _safe_key(image_path: str) -> str:
    """An output key from a row's ``image_path``: path components kept (the dataset's tree mirrored), each
    reduced to safe characters, ``.``/``..`` and leading dots dropped, so no key leaves the output folder."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", part).lstrip(".")
             for part in PurePosixPath(str(image_path).replace("\\", "/")).parts if part not in ("/", ".", "..")]
    return "/".join(part for part in parts if part) or "row"


def dataset_rows(dataset) -> tuple[list[str], list[str]]:
    """``(ids, keys)`` of every row of a map-style dataset in the canonical schema: the id is the row's
    ``image_path`` (what evaluate reports too; ``@<row>`` appended to repeats), the key its safe file name."""
    paths = [str(p) for p in dataset.select_columns(["image_path"])["image_path"]]
    seen: set[str] = set()
    ids = []
    for row, path in enumerate(paths):
        ids.append(path if path not in seen else f"{path}@{row:06d}")
        seen.add(path)
    return ids, [_safe_key(item_id) for item_id in ids]


class FileImages(torch.utils.data.Dataset):
    """Image files `[(path, key)]`, read and preprocessed one by one in the workers."""

    def __init__(self, items: Sequence[tuple[str, str]], step: SampleTransform):
        self.items = list(items)
        self.step = step

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, key = self.items[index]
        return _item(self.step, path, key, path)


class RowImages(torch.utils.data.Dataset):
    """Rows `rows` of a map-style dataset in the canonical schema; a batch of rows is read in one call."""

    def __init__(self, dataset, rows: Sequence[int], ids: Sequence[str], keys: Sequence[str], step: SampleTransform):
        self.dataset = without_decoding(dataset)
        self.rows = [int(row) for row in rows]
        self.ids, self.keys = list(ids), list(keys)
        self.step = step

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) for i in indices]
        batch = self.dataset[[self.rows[i] for i in indices]]
        return [_item(self.step, self.ids[i], self.keys[i], batch["image"][n], batch["mask"][n], batch["label"][n],
                      batch["category"][n]) for n, i in enumerate(indices)]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


class StreamImages(torch.utils.data.IterableDataset):
    """Rows of a streamed (`IterableDataset`) dataset in the canonical schema. Every DataLoader worker of every
    process reads the whole stream in order — so a row's number is the same for all of them — and decodes only
    the rows of its own slot (`row % (processes × workers)`) whose id is not in `done`: streaming with several
    processes or workers reads the stream that many times (download the dataset first to avoid it)."""

    def __init__(self, dataset, done: set[str], rank: int, world: int, step: SampleTransform):
        self.dataset = without_decoding(dataset)
        self.done = done
        self.rank, self.world = rank, world
        self.step = step

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        slots, slot = self.world * workers, self.rank * workers + worker_id
        number = 0
        # `.iter()` (not `iter()`): datasets would otherwise hand each torch worker only some of the shards.
        for batch in self.dataset.iter(batch_size=64):
            for n, image_path in enumerate(batch["image_path"]):
                number += 1
                if (number - 1) % slots != slot or image_path in self.done:
                    continue
                yield _item(self.step, image_path, _safe_key(image_path), batch["image"][n], batch["mask"][n],
                            batch["label"][n], batch["category"][n])


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
