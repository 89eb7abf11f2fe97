"""On-disk cache of the frozen backbone's features, so training epochs can skip CLIP (`train --cache-features`).

The vision tower of ViP²-CLIP is frozen (docs/method.md §2, §6): for a given backbone, input size and image, `encode_image`
always returns the same `image_embeds` (D,) and `patch_embeds` (n, L, D). A pre-pass computes them once per
sample and stores them here; every training epoch then calls `model.score_features(...)` on the cached features
(only the small ICA/FGP heads and the frozen *text* encoder run), with the same losses as the uncached path.

Layout of a cache folder (all arrays are `.npy` files opened with `numpy.load(mmap_mode="r")`, so nothing is read
into memory beyond the rows of a batch):

* `image_embeds.npy` (N, D), `patch_embeds.npy` (N, n, L, D), in `dtype` (float32 by default, float16 halves the
  size at a ~1e-3 relative rounding of the features);
* `masks.npy` (N, S, S) uint8 in {0, 1}, `labels.npy` (N,) int64, `has_mask.npy` (N,) uint8;
* `status.npy` (N,) uint8: 0 not computed, 1 ok, 2 unusable sample (image/mask failed to decode or was rejected
  by the processor — the same rows the uncached loader drops);
* `index.json`: format version, the cache *key* (hash of the backbone-relevant config, of the backbone weights,
  of the processor settings and of the dataset, plus the mixed-precision mode and dtype), the shapes, and
  `"complete": true` once every row is written. A missing/incomplete index or any key mismatch makes the cache
  stale: it is deleted and rebuilt.

Size: at the paper's geometry (ViT-L/14, 518 px, 4 layers) one sample's patch features are 4 × 1369 × 768 values,
16.8 MB in float32 (8.4 MB in float16): the 1,725 test images of MVTec AD take 29 GB (14.5 GB). In a multi-process
run every process writes its own rows into the same memory-mapped files, so the folder must be on a filesystem
shared by the processes (always true on one machine).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import writing
from ..files import atomic_write_text

logger = logging.getLogger("modeling_vip2clip.engine.feature_cache")

__all__ = [
    "CACHE_FORMAT_VERSION",
    "FeatureCache",
    "backbone_fingerprint",
    "dataset_fingerprint",
    "cache_key",
    "CachedFeatureDataset",
    "collate_cached",
    "build_feature_cache",
    "cached_bad_samples",
]

CACHE_FORMAT_VERSION = 1
_DTYPES = {"float32": np.float32, "float16": np.float16}
STATUS_MISSING, STATUS_OK, STATUS_BAD = 0, 1, 2


def _blake(data: Any) -> str:
    return hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """Hash of everything that determines `encode_image`'s output: the backbone-relevant config and the vision
    tower's weights (every byte of the vision tower and the visual projection, ~1 s for ViT-L on one core)."""
    config = model.config
    relevant = {
        "clip_vision": config.clip_config.vision_config.to_dict(),
        "projection_dim": config.projection_dim,
        "feature_layers": list(config.feature_layers),
        "official_compat": bool(config.official_compat),
    }
    digest = hashlib.blake2b(_blake(relevant).encode(), digest_size=16)
    clip = model.clip
    for prefix, module in (("vision_model", clip.vision_model), ("visual_projection", clip.visual_projection)):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """Hash identifying a `datasets.Dataset` of the canonical schema and the image files it points to.

    Combines the dataset's own fingerprint (a hash of its table: paths, labels, embedded bytes) with the size and
    modification time of every image stored by path, so an image replaced on disk invalidates the cache.
    """
    parts: list[Any] = [getattr(dataset, "_fingerprint", None), len(dataset)]
    try:
        from ..data import without_decoding

        raw = without_decoding(dataset)
        if "image" in raw.column_names:
            for value in raw.select_columns(["image"])["image"]:
                path = value.get("path") if isinstance(value, dict) else None
                if path and value.get("bytes") is None and os.path.exists(path):
                    stat = os.stat(path)
                    parts.append((path, stat.st_size, stat.st_mtime_ns))
    except Exception as error:  # noqa: BLE001 - a dataset without the canonical columns still gets a fingerprint
        parts.append(f"unhashable:{type(error).__name__}")
    return _blake(parts)


def cache_key(
    model: torch.nn.Module,
    processor: Any,
    dataset: Any,
    dtype: str = "float32",
    mixed_precision: str = "no",
    dataset_fp: str | None = None,
) -> dict[str, Any]:
    """The key a cache must match to be reused (`dataset_fp`: a precomputed :func:`dataset_fingerprint`)."""
    processor_settings = {
        name: getattr(processor, name, None)
        for name in ("image_size", "image_mean", "image_std", "mask_threshold", "min_image_size", "max_image_pixels")
    }
    return {
        "backbone": backbone_fingerprint(model),
        "processor": _blake(processor_settings),
        "dataset": dataset_fp or dataset_fingerprint(dataset),
        "num_samples": len(dataset),
        "dtype": dtype,
        "mixed_precision": mixed_precision,
    }


def _reserve(path: Path) -> None:
    """Allocate the blocks of a memory-mapped file now: `open_memmap` makes a sparse file, and a page written through
    the map on a disk that has since filled up kills the process with SIGBUS instead of raising ENOSPC."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: as before
                raise


class FeatureCache:
    """A folder of memory-mapped per-sample backbone features (see the module docstring)."""

    ARRAYS = ("image_embeds", "patch_embeds", "masks", "labels", "has_mask", "status")

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._arrays: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ index
    @property
    def index_path(self) -> Path:
        return self.directory / "index.json"

    def read_index(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write_index(self, index: dict[str, Any]) -> None:
        atomic_write_text(self.index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")

    def is_valid(self, key: dict[str, Any]) -> bool:
        """True when the folder holds a complete cache built with exactly this key."""
        index = self.read_index()
        return bool(
            index
            and index.get("format_version") == CACHE_FORMAT_VERSION
            and index.get("complete") is True
            and index.get("key") == key
            and all((self.directory / f"{name}.npy").is_file() for name in self.ARRAYS)
        )

    def stale_reason(self, key: dict[str, Any]) -> str:
        """Why the folder cannot be reused (for the log)."""
        index = self.read_index()
        if index is None:
            return "no cache yet" if not self.directory.exists() else "no readable index.json"
        if index.get("format_version") != CACHE_FORMAT_VERSION:
            return f"format version {index.get('format_version')} != {CACHE_FORMAT_VERSION}"
        if index.get("complete") is not True:
            return "an earlier build did not finish"
        old = index.get("key", {})
        changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        return f"changed: {', '.join(changed)}" if changed else "missing array files"

    # ------------------------------------------------------------------ build
    def create(
        self,
        key: dict[str, Any],
        num_samples: int,
        embed_dim: int,
        patch_shape: Sequence[int],
        image_size: int,
    ) -> None:
        """Delete any previous content and allocate the arrays (main process only)."""
        dtype = key["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        shapes = {
            "image_embeds": ((num_samples, embed_dim), _DTYPES[dtype]),
            "patch_embeds": ((num_samples, *patch_shape), _DTYPES[dtype]),
            "masks": ((num_samples, image_size, image_size), np.uint8),
            "labels": ((num_samples,), np.int64),
            "has_mask": ((num_samples,), np.uint8),
            "status": ((num_samples,), np.uint8),
        }
        for name, (shape, array_dtype) in shapes.items():
            path = self.directory / f"{name}.npy"
            with writing(path):
                array = np.lib.format.open_memmap(path, mode="w+", dtype=array_dtype, shape=shape)
                array.flush()
                del array
                _reserve(path)
        self._write_index(
            {
                "format_version": CACHE_FORMAT_VERSION,
                "key": key,
                "shapes": {name: list(shape) for name, (shape, _) in shapes.items()},
                "complete": False,
            }
        )

    def open(self, mode: str = "r") -> "FeatureCache":
        """Memory-map the arrays (`"r"` to read, `"r+"` for the processes writing their rows)."""
        self._arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode=mode) for name in self.ARRAYS}
        return self

    def __getitem__(self, name: str) -> np.ndarray:
        if not self._arrays:
            self.open()
        return self._arrays[name]

    def __len__(self) -> int:
        return int(self["status"].shape[0])

    def write(
        self,
        indices: Sequence[int],
        image_embeds: torch.Tensor,
        patch_embeds: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        has_mask: torch.Tensor,
    ) -> None:
        """Store the rows of one batch (tensors on any device; features are cast to the cache dtype)."""
        if not len(indices):
            return
        rows = np.asarray(indices, dtype=np.int64)
        dtype = self["image_embeds"].dtype
        self["image_embeds"][rows] = image_embeds.detach().float().cpu().numpy().astype(dtype)
        self["patch_embeds"][rows] = patch_embeds.detach().float().cpu().numpy().astype(dtype)
        self["masks"][rows] = (masks.detach().cpu().numpy() > 0.5).astype(np.uint8)
        self["labels"][rows] = labels.detach().cpu().numpy().astype(np.int64)
        self["has_mask"][rows] = has_mask.detach().cpu().numpy().astype(np.uint8)
        self["status"][rows] = STATUS_OK

    def mark_bad(self, indices: Sequence[int]) -> None:
        if len(indices):
            self["status"][np.asarray(indices, dtype=np.int64)] = STATUS_BAD

    def flush(self) -> None:
        for array in self._arrays.values():
            if isinstance(array, np.memmap):
                array.flush()

    def finalize(self) -> dict[str, Any]:
        """Check every row was written and mark the cache complete (main process, after all writers flushed)."""
        self.open("r")
        status = np.asarray(self["status"])
        missing = np.flatnonzero(status == STATUS_MISSING)
        if missing.size:
            raise RuntimeError(
                f"feature cache {self.directory}: {missing.size} samples were never written (first: "
                f"{missing[:5].tolist()}); the pre-pass did not see every sample."
            )
        index = self.read_index() or {}
        index["complete"] = True
        index["num_ok"] = int((status == STATUS_OK).sum())
        index["num_bad"] = int((status == STATUS_BAD).sum())
        self._write_index(index)
        return index

    # ------------------------------------------------------------------ read
    def read(self, indices: Sequence[int]) -> dict[str, Any]:
        """Rows `indices` (in that order) as float32/long tensors plus the `status` array."""
        rows = np.asarray(indices, dtype=np.int64)
        return {
            "image_embeds": torch.from_numpy(np.asarray(self["image_embeds"][rows], dtype=np.float32)),
            "patch_embeds": torch.from_numpy(np.asarray(self["patch_embeds"][rows], dtype=np.float32)),
            "masks": torch.from_numpy(np.asarray(self["masks"][rows], dtype=np.float32)),
            "labels": torch.from_numpy(np.asarray(self["labels"][rows], dtype=np.int64)),
            "has_mask": torch.from_numpy(np.asarray(self["has_mask"][rows]).astype(bool)),
            "status": np.asarray(self["status"][rows]),
        }


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Map-style dataset over a complete :class:`FeatureCache`, for the same sampler as the image dataset.

    `__getitems__` reads a whole batch of rows from the memory maps at once and returns it as one dict; use
    :func:`collate_cached` as the `collate_fn`, which drops unusable samples exactly like `collate_skip_bad`
    drops them from image batches. `image_paths` (one per row) only serve error messages.
    """

    def __init__(self, cache: FeatureCache, image_paths: Sequence[str] | None = None, categories: Sequence[str] | None = None):
        self.cache = cache
        self.image_paths = list(image_paths) if image_paths is not None else None
        self.categories = list(categories) if categories is not None else None

    def __len__(self) -> int:
        return len(self.cache)

    def __getstate__(self):  # DataLoader workers re-open the memory maps themselves
        state = dict(self.__dict__)
        state["cache"] = FeatureCache(self.cache.directory)
        return state

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        indices = [int(i) for i in indices]
        batch = self.cache.read(indices)
        batch["index"] = indices
        batch["image_path"] = [self.image_paths[i] if self.image_paths else f"row {i}" for i in indices]
        batch["category"] = [self.categories[i] if self.categories else "" for i in indices]
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


def collate_cached(batch: dict[str, Any]) -> dict[str, Any]:
    """Keep the rows whose status is OK (the cache's analogue of `collate_skip_bad`)."""
    keep = np.flatnonzero(batch.pop("status") == STATUS_OK)
    keep_t = torch.from_numpy(keep)
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.index_select(0, keep_t)
        else:
            out[name] = [value[i] for i in keep.tolist()]
    return out


# ---------------------------------------------------------------------------------------------------- pre-pass


def build_feature_cache(accelerator, model, processor, dataset, torch_dataset, directory: Path, *, batch_size: int,
                        num_workers: int, cache_dtype: str, collate_fn, dataset_fp: str, show_progress: bool = True):
    """The pre-pass of `train --cache-features`: each process encodes its share of the samples once and writes
    them into the shared memory maps; a valid cache (same key) is reused as is.

    `collate_fn` must return `index`, `bad_index` (rows it dropped), `pixel_values`, `masks`, `labels`,
    `has_mask`. Returns `(cache opened read-only, seconds spent)`.
    """
    from tqdm.auto import tqdm

    key = cache_key(model, processor, dataset, cache_dtype, accelerator.mixed_precision, dataset_fp=dataset_fp)
    cache = FeatureCache(directory)
    if cache.is_valid(key):
        logger.info("reusing the feature cache in %s", directory)
        return cache.open("r"), 0.0
    reason = cache.stale_reason(key)
    accelerator.wait_for_everyone()  # everyone has read the old index before the main process deletes it
    config = model.config
    if accelerator.is_main_process:
        logger.info("building the feature cache in %s (%s)", directory, reason)
        cache.create(key, len(dataset), config.projection_dim,
                     (len(config.feature_layers), config.num_patches, config.projection_dim), config.image_size)
    accelerator.wait_for_everyone()
    cache.open("r+")
    started = time.perf_counter()
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(torch_dataset, batch_size=batch_size, sampler=mine, collate_fn=collate_fn,
                                         num_workers=num_workers)
    with torch.no_grad():  # the bare model: no gradients, no DDP
        for batch in tqdm(loader, desc="caching features", disable=not (show_progress and accelerator.is_local_main_process)):
            cache.mark_bad(batch["bad_index"])
            if not batch["index"]:
                continue
            with accelerator.autocast():
                image_embeds, patch_embeds = model.encode_image(batch["pixel_values"].to(accelerator.device))
            cache.write(batch["index"], image_embeds, patch_embeds, batch["masks"], batch["labels"], batch["has_mask"])
    cache.flush()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        index = cache.finalize()
        logger.info("feature cache complete: %d samples, %d unusable", index["num_ok"], index["num_bad"])
    accelerator.wait_for_everyone()
    return cache.open("r"), time.perf_counter() - started


def cached_bad_samples(cache: FeatureCache, image_paths: Sequence[str]) -> dict[int, dict]:
    """The rows the pre-pass found unusable, as the training summary lists skipped samples."""
    return {int(i): {"index": int(i), "image_path": str(image_paths[int(i)]),
                     "reason": "unusable when the feature cache was built (its pre-pass log has the reason)"}
            for i in np.flatnonzero(np.asarray(cache["status"]) == STATUS_BAD)}
