"""The resumable on-disk store of an evaluation's per-batch results (`OUTPUT_DIR/partial/`).

The main process writes every gathered batch to its own folder (`r<run>_b<batch>/`, arrays as `.npy`, strings as
JSON), renamed into place when complete, so an interrupted evaluation keeps every finished batch. `--resume` reads
them back, deduplicated by sample index (the first record of an index wins); the folder is deleted once the
results are written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["PARTIAL_DIR", "PartialResults"]

PARTIAL_DIR = "partial"
_BATCH_DIR = re.compile(r"^r(\d+)_b(\d+)$")


class PartialResults:
    """Per-batch results of an evaluation on disk, keyed by sample index (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def meta_matches(self, meta: dict) -> bool:
        path = self.directory / "meta.json"
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(meta))
        except ValueError:
            return False

    def start(self, meta: dict, keep: bool) -> None:
        if not keep and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for stale in self.directory.glob("*.tmp"):
            shutil.rmtree(stale)

    def batch_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), int(m.group(2)), entry) for entry in self.directory.iterdir()
                 if (m := _BATCH_DIR.match(entry.name)) and entry.is_dir()]
        return [entry for *_, entry in sorted(found)]

    def next_run_number(self) -> int:
        runs = [int(_BATCH_DIR.match(entry.name).group(1)) for entry in self.batch_dirs()]
        return max(runs, default=0) + 1

    def write(self, name: str, arrays: dict[str, np.ndarray], strings: dict[str, list[str]]) -> None:
        tmp = self.directory / f"{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array)
        (tmp / "strings.json").write_text(json.dumps(strings), encoding="utf-8")
        os.replace(tmp, self.directory / name)

    def done_indices(self) -> set[int]:
        done: set[int] = set()
        for entry in self.batch_dirs():
            done.update(np.load(entry / "index.npy").tolist())
        return done

    def records(self) -> "OrderedDict[int, dict]":
        """index → {"dir", "row", "score", "label", "has_mask", "bad", "category", "image_path", "error"}; the first
        record of an index wins (later ones are duplicates)."""
        out: OrderedDict[int, dict] = OrderedDict()
        for entry in self.batch_dirs():
            index = np.load(entry / "index.npy")
            score = np.load(entry / "score.npy")
            label = np.load(entry / "label.npy")
            has_mask = np.load(entry / "has_mask.npy")
            bad = np.load(entry / "bad.npy")
            strings = json.loads((entry / "strings.json").read_text(encoding="utf-8"))
            for row, sample in enumerate(index.tolist()):
                if sample in out:
                    continue
                out[sample] = {
                    "dir": entry, "row": row, "score": float(score[row]), "label": int(label[row]),
                    "has_mask": bool(has_mask[row]), "bad": bool(bad[row]), "category": strings["category"][row],
                    "image_path": strings["image_path"][row], "error": strings["error"][row],
                }
        return out

    @staticmethod
    def load_pixels(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Masks (uint8) and maps (float32) of these records, read through memory maps batch folder by folder."""
        maps, masks = [], []
        opened: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
        for record in records:
            entry = record["dir"]
            if entry not in opened:
                opened[entry] = (np.load(entry / "map.npy", mmap_mode="r"), np.load(entry / "mask.npy", mmap_mode="r"))
            maps.append(np.asarray(opened[entry][0][record["row"]], dtype=np.float32))
            masks.append(np.asarray(opened[entry][1][record["row"]], dtype=np.uint8))
        return np.stack(masks), np.stack(maps)
