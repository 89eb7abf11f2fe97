"""The batch-prediction loop behind `vip2clip predict` (`modeling_vip2clip.predict` is its command line).

Streaming: the inputs (a list of file names, or the rows of a `datasets` dataset) go through a
`torch.utils.data.DataLoader` whose workers decode and preprocess; the main process runs the model and hands the
overlays / maps / masks of each batch to a small thread pool, at most two batches behind. Memory is bounded by the
batch size, the DataLoader's prefetch and those two batches, never by the number of inputs (only the list of
file names, a few hundred bytes per input, is held).

Nothing lost: each process appends its rows to its CSV once the files they name are on disk, then flushes and
fsyncs it, batch by batch. `--resume` reads every CSV of the output folder (a torn last line, the trace of a killed
write, is ignored and cut off), skips the inputs already there and appends the rest, so a run killed at any moment
and resumed holds every input exactly once. Unreadable inputs are retried by a resumed run and listed again in
`skipped.csv` if they still fail.

Distributed (`accelerate launch`): the remaining inputs are sharded over the processes (`inputs[rank::world]`);
process r writes `predictions.part-<r>.csv` (and `skipped.part-<r>.csv`), and at the end the main process appends
the parts' rows to `predictions.csv` (skipping any input already there, so an interrupted merge is harmless) and
deletes them. A resumed run reads the parts like the main CSV, whatever its number of processes.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import logging
import math
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .dataset_source import DatasetPart, open_dataset_parts
from .runtime import UsageError, check_distributed_setup, require_extra, test_pause

logger = logging.getLogger("modeling_vip2clip.predict")

__all__ = [
    "PREDICTIONS_CSV",
    "SKIPPED_CSV",
    "DatasetPart",
    "collect_inputs",
    "open_dataset_parts",
    "read_csv_rows",
    "run_prediction",
]

PREDICTIONS_CSV = "predictions.csv"
SKIPPED_CSV = "skipped.csv"
_PART = re.compile(r"^(predictions|skipped)\.part-(\d+)\.csv$")
_DEFAULT_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


# ---------------------------------------------------------------------------------------------------- inputs


def _image_extensions() -> set[str]:
    try:
        from .data import IMAGE_EXTENSIONS

        return {ext.lower() for ext in IMAGE_EXTENSIONS}
    except ImportError:  # pragma: no cover - the data extra is missing
        return set(_DEFAULT_EXTENSIONS)


def _glob_base(pattern: str) -> str:
    """The folder a glob pattern searches: its leading components without wildcards (`line3/**/*.png` → `line3`)."""
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return str(Path(*parts)) if parts else "."


def _expand(item: str, extensions: set[str], found: list, problems: list) -> None:
    """Append `(shown path, absolute path, absolute root)` for every image of one INPUT."""
    path = Path(item)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in extensions and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            problems.append((item, "folder contains no image files"))
        root = os.path.abspath(path)
        found.extend((str(p), os.path.abspath(p), root) for p in files)
    elif path.is_file():
        found.append((item, os.path.abspath(path), os.path.dirname(os.path.abspath(path))))
    elif glob.has_magic(item):
        files = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not files:
            problems.append((item, "pattern matched no file"))
        root = os.path.abspath(_glob_base(item))
        found.extend((p, os.path.abspath(p), root) for p in files)
    else:
        problems.append((item, "no such file or folder"))


def _read_list(item: str) -> list[str]:
    """The entries of an `@LIST` file: one INPUT per line (blank lines and `#` comments skipped), relative ones
    taken relative to the list file's folder."""
    list_path = Path(item[1:])
    base = list_path.parent
    entries = []
    for line in list_path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line if os.path.isabs(line) else str(base / line))
    return entries


def collect_inputs(inputs: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Expand INPUTs (files, folders searched recursively, glob patterns, `@LIST` files of such entries) into
    `[(path, key)]`, deduplicated in order, and `[(input, problem)]` for those that matched nothing.

    `path` is the file as found (what the CSV's `path` column says); `key` is its path relative to the deepest
    folder that holds every input's root — a folder input itself, a glob's fixed leading folders, a file's own
    folder — so one folder `D/` gives keys relative to `D/` (its tree mirrored), and same-named files from
    different inputs always get different keys (the outputs are `overlays/<key>.png`, ...).
    """
    extensions = _image_extensions()
    found: list[tuple[str, str, str]] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        if item.startswith("@") and len(item) > 1:
            if not Path(item[1:]).is_file():
                problems.append((item, "no such list file"))
                continue
            for entry in _read_list(item):
                _expand(entry, extensions, found, problems)
        else:
            _expand(item, extensions, found, problems)
    unique: dict[str, tuple[str, str]] = {}
    for shown, absolute, root in found:
        unique.setdefault(absolute, (shown, root))
    if not unique:
        return [], problems
    try:
        common = os.path.commonpath([root for _, root in unique.values()])
    except ValueError:  # Windows: inputs on different drives
        common = ""
    items = []
    for absolute, (shown, _) in unique.items():
        relative = os.path.relpath(absolute, common) if common else absolute.replace(":", "")
        items.append((shown, Path(relative).as_posix().lstrip("/")))
    return items, problems


# ---------------------------------------------------------------------------------------------------- datasets


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


# ---------------------------------------------------------------------------------------------------- decoding


def _decode(value: Any):
    """A file path, encoded bytes, a `datasets` image dict or a PIL image → a loaded PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        value.load()
        return value
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if value is None:
            raise ValueError("the image entry has neither bytes nor a path")
    source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
    with Image.open(source) as handle:
        handle.load()
        return handle.copy()


class _Prepare:
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
            image = self.processor.to_pil(_decode(raw), what=item_id)
            masks = None
            if self.with_masks:
                mask = None if mask is None else _decode(mask)
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

    def __init__(self, items: Sequence[tuple[str, str]], prepare: _Prepare):
        self.items = list(items)
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, key = self.items[index]
        return self.prepare(path, key, path)


class RowImages(torch.utils.data.Dataset):
    """Rows of `datasets` parts, addressed by `(part, row)` pairs; a batch of rows is read in one call."""

    def __init__(self, parts: Sequence[DatasetPart], rows: np.ndarray, ids: Sequence[str], prepare: _Prepare):
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

    def __init__(self, parts: Sequence[DatasetPart], done: set[str], rank: int, world: int, prepare: _Prepare):
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


# ---------------------------------------------------------------------------------------------------- CSV files


def _cut_torn_tail(path: Path) -> None:
    """Truncate a file after its last newline: a row cut short by a killed write is dropped (and redone)."""
    if not path.is_file():
        return
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep != size:
            handle.truncate(keep)


def read_csv_rows(path: str | os.PathLike) -> tuple[list[str] | None, list[list[str]]]:
    """`(header, rows)` of a CSV written here, ignoring a torn last line; `(None, [])` when absent or empty."""
    path = Path(path)
    if not path.is_file():
        return None, []

    def complete_lines(handle) -> Iterable[str]:
        for line in handle:
            if line.endswith("\n"):
                yield line

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(complete_lines(handle)))
    return (rows[0], rows[1:]) if rows else (None, [])


class _CsvLog:
    """An append-only CSV: each `write` is flushed and fsynced; a torn last line is cut off on opening."""

    def __init__(self, path: Path, header: list[str]):
        _cut_torn_tail(path)
        existing, _ = read_csv_rows(path)
        if existing is not None and existing != header:
            raise UsageError(f"--resume: {path} has the columns {','.join(existing)} but this run writes "
                             f"{','.join(header)}; resume with the same --save-maps / --save-masks, or use another "
                             "--output-dir.")
        self.path = path
        self.handle = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle)
        if existing is None:
            self.handle.truncate(0)
            self.write([header])

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        self.writer.writerows(rows)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _parts(output_dir: Path, kind: str) -> list[Path]:
    found = [(int(m.group(2)), p) for p in output_dir.glob(f"{kind}.part-*.csv") if (m := _PART.match(p.name))]
    return [p for _, p in sorted(found)]


def _done_ids(output_dir: Path, header: list[str]) -> set[str]:
    done: set[str] = set()
    for path in [output_dir / PREDICTIONS_CSV, *_parts(output_dir, "predictions")]:
        existing, rows = read_csv_rows(path)
        if existing is not None and existing != header:
            raise UsageError(f"--resume: {path} has the columns {','.join(existing)} but this run writes "
                             f"{','.join(header)}; resume with the same --save-maps / --save-masks, or use another "
                             "--output-dir.")
        done.update(row[0] for row in rows if row)
    return done


def _merge_parts(output_dir: Path, kind: str, header: list[str]) -> None:
    """Append the parts' rows to the main CSV (rows whose first field is already there are skipped, so a merge
    cut short and run again adds nothing twice), then delete the parts."""
    parts = _parts(output_dir, kind)
    if not parts:
        return
    target = output_dir / (PREDICTIONS_CSV if kind == "predictions" else SKIPPED_CSV)
    _cut_torn_tail(target)
    _, existing = read_csv_rows(target)
    seen = {row[0] for row in existing if row}
    log = _CsvLog(target, header)
    try:
        for part in parts:
            _, rows = read_csv_rows(part)
            fresh = []
            for row in rows:
                if row and row[0] not in seen:
                    seen.add(row[0])
                    fresh.append(row)
            log.write(fresh)
    finally:
        log.close()
    for part in parts:
        part.unlink()


# ---------------------------------------------------------------------------------------------------- outputs


def _save_atomic(target: Path, save) -> None:
    """`save(file)` into a temporary file beside `target`, then rename: a killed run never leaves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            save(handle)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class _Outputs:
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
        """Write the files of one image (map `(S, S)` float32, `full`: `full_size_map`) and complete its CSV row
        with their paths. Runs in writer threads: numpy and PIL only (the overlay is numpy, see
        `ViP2CLIPProcessor.overlay`)."""
        from PIL import Image

        key = item["key"]
        if full is None:
            full = self.full_size_map(item, anomaly_map)
        overlay = ""
        if self.overlays:
            overlay = f"overlays/{key}.png"
            picture = self.processor.overlay(Image.fromarray(item["image"].numpy()), anomaly_map)
            _save_atomic(self.root / overlay, lambda handle: picture.save(handle, format="PNG", compress_level=1))
        row = [*row, overlay]
        if self.maps == "png":
            # 16-bit grey: value / 65535 is the map value in [0, 1].
            levels = np.round(np.clip(full, 0.0, 1.0) * 65535.0).astype(np.uint16)
            row.append(f"maps/{key}.png")
            _save_atomic(self.root / row[-1], lambda handle: Image.fromarray(levels).save(handle, format="PNG", compress_level=1))
        elif self.maps == "npy":
            row.append(f"maps/{key}.npy")
            _save_atomic(self.root / row[-1], lambda handle: np.save(handle, full.astype(np.float16)))
        if self.masks:
            binary = (full >= self.pixel_threshold).astype(np.uint8) * 255
            row.append(f"masks/{key}.png")
            _save_atomic(self.root / row[-1], lambda handle: Image.fromarray(binary, mode="L").save(handle, format="PNG", compress_level=1))
        return row


# ---------------------------------------------------------------------------------------------------- processes


class _Processes:
    """This process's place in an `accelerate launch` job (Accelerate's `PartialState`), or alone."""

    def __init__(self):
        self.state = None
        self.rank, self.world, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            require_extra("accelerate", "train", "a multi-process `vip2clip predict` (accelerate launch)")
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # As Accelerator does: ACCELERATE_USE_CPU=true runs the processes on CPUs (gloo).
            self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            check_distributed_setup(self.state)
            self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_num_workers(device: torch.device, cores: int | None = None) -> int:
    """DataLoader workers when --num-workers is not given. On a CPU the model uses every core and takes seconds
    per image while decoding and preprocessing a photo takes tens of milliseconds: one worker keeps up, and more
    only take cores and memory from the model. A GPU scores hundreds of images a second, so decoding needs
    several cores: up to 8, leaving one for the main process (benchmarks/README.md, "Batch prediction")."""
    cores = cores or os.cpu_count() or 1
    if device.type == "cpu":
        return 1
    return max(1, min(8, cores - 1))


# ---------------------------------------------------------------------------------------------------- the loop


def run_prediction(args: argparse.Namespace, model=None, processor=None) -> dict:
    """Score the inputs of `args` (the options of `vip2clip predict`). Returns, on the main process,
    `{"csv", "rows", "anomalous", "scored", "skipped", "seconds", "threshold"}` (this run's counts and scoring
    time, model loading excluded; `rows` and `anomalous` over the whole CSV); on the other processes of a distributed run, `{"rank": r}`."""
    from tqdm.auto import tqdm

    from .runtime import load_model_and_processor, resolve_source

    inputs = list(getattr(args, "inputs", None) or [])
    if bool(inputs) == bool(args.dataset):
        raise UsageError("give either INPUT files/folders/globs or --dataset ID_OR_PATH (not both, not neither); "
                         "e.g. `vip2clip predict --model M photos/` or `--dataset org/name --split test`.")
    if model is None:
        resolve_source(args.model, "--model")  # fail fast, before any data is opened
    procs = _Processes()
    output_dir = Path(args.output_dir)

    parts: list[DatasetPart] = []
    problems: list[tuple[str, str]] = []
    if inputs:
        items, problems = collect_inputs(inputs)
        ids = [path for path, _ in items]
    else:
        parts = open_dataset_parts(
            args.dataset, args.split, image_column=args.image_column, label_column=args.label_column,
            mask_column=args.mask_column, category_column=args.category_column, categories=args.categories,
            streaming=args.streaming,
        )
        if not args.streaming:
            rows, ids = dataset_rows(parts)

    device = torch.device(args.device or procs.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, processor = load_model_and_processor(args.model, device=device, dtype=_DTYPES[args.mixed_precision])
    if device.type == "cpu" and args.mixed_precision in ("bf16", "fp16"):
        from .cpu_fast_path_vip2clip import onednn_bf16_supported

        if not onednn_bf16_supported():  # measured: bf16 ran 6x slower than fp32 on an AVX2-only EPYC (Zen 3)
            logger.warning("--mixed-precision %s: this CPU has no native bf16/fp16 matrix unit (AVX-512 BF16 or AMX), "
                           "so it is emulated and several times slower than fp32; --mixed-precision no is faster here",
                           args.mixed_precision)
    elif processor is None:
        from .processing_vip2clip import ViP2CLIPProcessor

        processor = ViP2CLIPProcessor.for_model(model.config)
    model = model.to(device).eval()
    # The dtype the model's first layer takes (an exported ONNX / OpenVINO model takes float32).
    input_dtype = model.clip.vision_model.embeddings.patch_embedding.weight.dtype if hasattr(model, "clip") else torch.float32
    reference_bank = None
    if getattr(args, "references", None):  # few-shot: one bank for every input (docs/few_shot.md)
        from .references import load_reference_bank

        reference_bank = load_reference_bank(model, processor, args.references, batch_size=args.batch_size).to(device)
    extra = {} if reference_bank is None else {"reference_bank": reference_bank}
    config = model.config
    threshold = args.threshold if args.threshold is not None else (
        config.image_threshold if getattr(config, "image_threshold", None) is not None else 0.5)
    pixel_threshold = args.pixel_threshold if args.pixel_threshold is not None else (
        config.pixel_threshold if getattr(config, "pixel_threshold", None) is not None else 0.5)
    outputs = _Outputs(output_dir, processor, overlays=not args.no_overlays, maps=args.save_maps,
                       masks=args.save_masks, pixel_threshold=pixel_threshold)
    header = outputs.header()

    # Every process reads what is done before the main process touches any file.
    done = _done_ids(output_dir, header) if args.resume and output_dir.is_dir() else set()
    procs.barrier()
    if procs.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        stale = [*_parts(output_dir, "skipped"), output_dir / SKIPPED_CSV]  # rebuilt: skipped inputs are retried
        if not args.resume:
            stale += [output_dir / PREDICTIONS_CSV, *_parts(output_dir, "predictions")]
        for path in stale:
            path.unlink(missing_ok=True)
    procs.barrier()
    suffix = "" if procs.world == 1 else f".part-{procs.rank:05d}"
    predictions = _CsvLog(output_dir / (PREDICTIONS_CSV.replace(".csv", f"{suffix}.csv")), header)
    skipped = _CsvLog(output_dir / (SKIPPED_CSV.replace(".csv", f"{suffix}.csv")), ["path", "reason"])
    if procs.is_main and problems:
        skipped.write(problems)
        for path, reason in problems:
            print(f"skipped {path}: {reason}", file=sys.stderr)

    prepare = _Prepare(processor, keep_image=outputs.overlays)
    if args.dataset and args.streaming:
        dataset, total = StreamImages(parts, done, procs.rank, procs.world, prepare), None
    else:
        remaining = [index for index, item_id in enumerate(ids) if item_id not in done]
        mine = remaining[procs.rank::procs.world]
        if inputs:
            dataset = FileImages([items[i] for i in mine], prepare)
        else:
            dataset = RowImages(parts, rows[mine], [ids[i] for i in mine], prepare)
        total = len(mine)
        if done and procs.is_main:
            logger.info("resuming: %d inputs already in %s, %d to go", len(ids) - len(remaining), output_dir, len(remaining))
    # Not pinned: pinning would also copy the full-size originals kept for the overlays.
    workers = args.num_workers if args.num_workers is not None else default_num_workers(device)
    loader = make_loader(dataset, args.batch_size, workers)
    started = time.perf_counter()  # the scoring time (images/s), model loading excluded

    progress = tqdm(total=total, unit="img", desc="predicting" if procs.world == 1 else f"predicting (process 0 of {procs.world})",
                    disable=args.no_progress or not procs.is_main, dynamic_ncols=True)
    # Threads suffice: PNG encoding and numpy release the GIL. PNGs use zlib level 1 (the maps' overlays hardly
    # compress better at 6, which costs several times the time).
    writers = min(8, max(2, (os.cpu_count() or 2) // 2))
    pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="vip2clip-outputs") if outputs.needs_files else None
    pending: deque = deque()
    counts = {"scored": 0, "skipped": 0, "batches": 0}

    def write_oldest() -> None:
        rows_, bad, count = pending.popleft()
        finished = [entry.result() if isinstance(entry, Future) else entry for entry in rows_]
        predictions.write(finished)
        skipped.write(bad)
        counts["scored"] += len(finished)
        counts["skipped"] += len(bad)
        counts["batches"] += 1
        progress.update(count)
        test_pause("VIP2CLIP_TEST_PAUSE_AFTER_BATCH", counts["batches"])  # test-only, no-op unless set

    try:
        for batch in loader:
            bad = list(batch["bad"])
            entries: list = []
            if batch["items"]:
                with torch.inference_mode():
                    output = model(pixel_values=batch["pixel_values"].to(device=device, dtype=input_dtype), **extra)
                scores = output.anomaly_score.float().cpu()
                maps = output.anomaly_map.float().cpu()
                for item, score, anomaly_map in zip(batch["items"], scores.tolist(), maps):
                    if not (math.isfinite(score) and bool(torch.isfinite(anomaly_map).all())):
                        bad.append((item["id"], "the model's score or map is not finite (NaN/inf)"))
                        continue
                    row = [item["id"], f"{score:.6f}", "anomalous" if score >= threshold else "normal"]
                    if pool is None:
                        entries.append([*row, ""])
                    else:
                        entries.append(pool.submit(outputs.write, item, anomaly_map, row,
                                                   outputs.full_size_map(item, anomaly_map)))
            for path, reason in bad:
                progress.write(f"skipped {path}: {reason}", file=sys.stderr)
            pending.append((entries, bad, len(batch["items"]) + len(batch["bad"])))
            while len(pending) > (2 if pool is not None else 0):
                write_oldest()
        while pending:
            write_oldest()
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        predictions.close()
        skipped.close()
    seconds = time.perf_counter() - started

    procs.barrier()
    if not procs.is_main:
        return {"rank": procs.rank}
    _merge_parts(output_dir, "predictions", header)
    _merge_parts(output_dir, "skipped", ["path", "reason"])
    _, final_rows = read_csv_rows(output_dir / PREDICTIONS_CSV)
    _, skipped_rows = read_csv_rows(output_dir / SKIPPED_CSV)
    if not skipped_rows:
        (output_dir / SKIPPED_CSV).unlink(missing_ok=True)
    scored = len(final_rows) - len(done)
    return {
        "csv": str(output_dir / PREDICTIONS_CSV),
        "rows": len(final_rows),
        "anomalous": sum(1 for row in final_rows if len(row) > 2 and row[2] == "anomalous"),
        "scored": scored,
        "skipped": len(skipped_rows),
        "skipped_rows": skipped_rows,
        "seconds": seconds,
        "threshold": threshold,
    }
