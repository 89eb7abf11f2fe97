"""Finding image files: files, folders searched recursively, glob patterns and `@LIST` files (`collect_inputs`), and
reading one image from a path, bytes, a `datasets` image dict or a PIL image (`decode`)."""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["collect_inputs", "decode"]

_DEFAULT_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _image_extensions() -> set[str]:
    try:
        from .converters import IMAGE_EXTENSIONS

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
    different inputs always get different keys (the output files are named after them: `engine.prediction_files`).
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


def decode(value: Any):
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
