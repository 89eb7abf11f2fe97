"""Turn anomaly datasets into model-ready torch batches (opening them is :mod:`.sources`' job).

* :func:`make_transform` builds a function for ``Dataset.with_transform`` that
  decodes images lazily, runs the processor, and *flags* rows whose image or
  mask cannot be decoded or processed instead of raising;
  :func:`collate_skip_bad` (a :class:`SkipBadCollate` instance) drops the
  flagged rows in a ``DataLoader`` and logs them with a running count.
* :func:`to_torch_dataset` wraps a dataset for a ``DataLoader`` without copying
  images into memory (rows are read and decoded per batch) and adds the row
  ``index``.

Datasets decode ``Image`` columns *before* a ``with_transform`` function sees
them, so a corrupt image would raise inside ``datasets``; :func:`without_decoding`
(applied by :func:`to_torch_dataset`) casts ``image``/``mask`` to
``Image(decode=False)`` so the transform does the decoding and can catch errors.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from datasets import Dataset, Image as ImageFeature
from PIL import Image

from .schema import decode_image

__all__ = [
    "without_decoding",
    "AnomalyBatchTransform",
    "make_transform",
    "SkipBadCollate",
    "collate_skip_bad",
    "TorchAnomalyDataset",
    "to_torch_dataset",
]

logger = logging.getLogger(__name__)


def without_decoding(dataset: Dataset) -> Dataset:
    """Cast the ``image``/``mask`` columns to ``Image(decode=False)`` (metadata-only change)."""
    for col in ("image", "mask"):
        feat = dataset.features.get(col)
        if isinstance(feat, ImageFeature) and feat.decode:
            dataset = dataset.cast_column(col, ImageFeature(decode=False))
    return dataset


def _where(batch: Mapping[str, list], i: int) -> str:
    if batch.get("image_path"):
        return str(batch["image_path"][i])
    value = batch["image"][i]
    if isinstance(value, Mapping) and value.get("path"):
        return str(value["path"])
    return f"row {batch['index'][i] if batch.get('index') else i}"


class AnomalyBatchTransform:
    """A ``Dataset.with_transform`` function producing model-ready batches (a picklable object, so that
    ``DataLoader`` workers also start under the ``spawn`` method: macOS, Windows, Python ≥ 3.14 defaults).

    Output per batch of B rows: ``pixel_values`` FloatTensor (B,3,S,S),
    ``masks`` FloatTensor (B,S,S) in {0,1} (zeros when there is no mask),
    ``labels`` LongTensor (B,), ``has_mask`` BoolTensor (B,) (False for rows
    with mask None: exclude anomalous ones from pixel metrics), ``category``
    list[str], ``index`` list[int] (the ``index`` column when present, else
    -1), ``image_path`` list[str], and ``bad`` BoolTensor (B,) with ``error``
    list[str]: rows whose image or mask fails to decode, or that the processor
    rejects (``ValueError``), are flagged (zero tensors, reason in ``error``)
    rather than raising; drop them with :func:`collate_skip_bad`. A mask whose
    size differs from its image's is resized to the image's size (nearest
    neighbour) before the processor sees it.

    ``processor(images=[PIL], masks=[PIL|None], return_tensors="pt")`` must
    return ``pixel_values`` and ``masks``; ``processor.image_size`` is S. Use
    it on a dataset passed through :func:`without_decoding`, otherwise
    ``datasets`` decodes (and may fail on) images before this function runs.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.size = int(processor.image_size)

    def _run(self, images: list, masks: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.processor(images=images, masks=masks, return_tensors="pt")
        return torch.as_tensor(out["pixel_values"]).float(), torch.as_tensor(out["masks"]).float()

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image"])
        masks_in = batch.get("mask") or [None] * n
        errors = [""] * n
        images: list = [None] * n
        masks: list = [None] * n
        for i in range(n):
            try:
                images[i] = decode_image(batch["image"][i])  # mode conversion is the processor's job
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                errors[i] = f"image does not decode: {type(exc).__name__}: {exc}"
                continue
            try:
                masks[i] = decode_image(masks_in[i])
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"mask does not decode: {type(exc).__name__}: {exc}"
                continue
            if masks[i] is not None and int(batch["label"][i]) == 0 and masks[i].getbbox() is not None:
                # The reference scores normal images against an empty mask; a defect drawn on an image
                # labelled normal is a labelling error, so say so and follow the label.
                logger.warning("%s is labelled normal but its mask is not empty; the mask is ignored "
                               "(fix the label or the mask)", _where(batch, i))
                masks[i] = None
            if masks[i] is not None and masks[i].size != images[i].size:
                # Converters keep such rows (with a warning); bring the mask to its image's size here
                # (nearest neighbour keeps it binary) since the processor requires equal sizes.
                logger.debug("resizing mask of %s from %s to %s", _where(batch, i), masks[i].size, images[i].size)
                masks[i] = masks[i].convert("L").resize(images[i].size, Image.Resampling.NEAREST)
        pixel_values = torch.zeros(n, 3, self.size, self.size)
        mask_t = torch.zeros(n, self.size, self.size)
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            try:
                pv, mk = self._run([images[i] for i in ok], [masks[i] for i in ok])
                pixel_values[ok], mask_t[ok] = pv, mk
            except Exception:  # noqa: BLE001 - find the offending rows one by one
                for i in ok:
                    try:
                        pv, mk = self._run([images[i]], [masks[i]])
                        pixel_values[i], mask_t[i] = pv[0], mk[0]
                    except Exception as exc:  # noqa: BLE001
                        errors[i] = f"processor rejected the image: {type(exc).__name__}: {exc}"
        index = [int(v) for v in batch["index"]] if "index" in batch else [-1] * n
        for i, err in enumerate(errors):
            if err:
                pixel_values[i].zero_()
                mask_t[i].zero_()
                logger.debug("bad row %s: %s", _where(batch, i), err)
        return {
            "pixel_values": pixel_values,
            "masks": (mask_t > 0.5).float(),
            "labels": torch.as_tensor([int(v) for v in batch["label"]], dtype=torch.long),
            "has_mask": torch.tensor([m is not None for m in masks_in], dtype=torch.bool),
            "category": [str(c) for c in batch.get("category") or [""] * n],
            "index": index,
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
