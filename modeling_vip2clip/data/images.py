"""Images on disk and in datasets, one way each for every command, the demo and export:

* :data:`IMAGE_EXTENSIONS` — the file extensions taken for images (file discovery, the converters);
* :func:`collect_inputs` — files, folders searched recursively, glob patterns and `@LIST` files → image files;
* :func:`read_image` — one image from a path, bytes, a `datasets` image dict, a PIL image or a numpy array,
  fully decoded, with every failure (missing, empty, not an image, truncated or corrupt data, too many pixels)
  raised as one :class:`ImageReadError` whose message names the input.

Mode conversion (16-bit, palette, RGBA → RGB) and EXIF orientation are the processor's `to_pil` (the Hub-side
conversion, which the Hub files cannot import from here): `read_image` returns the image as stored, so masks keep
their single channel.
"""

from __future__ import annotations

import errno
import glob
import io
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "collect_inputs", "read_image"]

#: Extensions (lower case) of the files taken for images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ImageReadError(ValueError):
    """An image that cannot be read; the message reads ``<what>: <reason>``, ready to show or log."""


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
        candidates = sorted(p for p in path.rglob("*") if p.suffix.lower() in extensions
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        files = [p for p in candidates if p.is_file()]
        # an image name whose link leads nowhere is listed as skipped, not silently left out
        problems.extend((str(p), why) for p in candidates if (why := _broken_link(p)))
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
        problems.append((item, _broken_link(path) or "no such file or folder"))


def _broken_link(path: Path) -> str | None:
    """Why `path`, a symbolic link, cannot be followed; `None` when it is no link or leads to something."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link that leads back to itself (a loop)"
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return None


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
    extensions = IMAGE_EXTENSIONS
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


def read_image(value: Any, *, what: str | None = None, max_pixels: int | None = None):
    """A file path, encoded bytes, a `datasets` image dict (`{"bytes", "path"}`), a PIL image or a numpy array →
    a fully decoded PIL image (mode as stored), its file closed.

    `what` names the input in messages (default: the path, else "image"). `max_pixels` refuses larger images
    before their pixels are decoded (default: PIL's decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`).
    Truncated files are refused (PIL's default; the global `ImageFile.LOAD_TRUNCATED_IMAGES` is not touched, so
    threads reading at once never race on it). Raises :class:`ImageReadError`.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        value.load()
        return value
    if isinstance(value, np.ndarray):
        try:
            return Image.fromarray(np.ascontiguousarray(value))
        except (TypeError, ValueError) as error:
            raise ImageReadError(f"{what or 'image'}: array of shape {value.shape} and dtype {value.dtype} is not "
                                 f"an image ({error})") from None
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if value is None:
            raise ImageReadError(f"{what or 'image'}: the image entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        what, data = what or "image", bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        what, path = what or str(value), Path(value)
        if not path.is_file():
            raise ImageReadError(f"{what}: no such file (missing or moved)")
        # Read into memory: no file handle stays open (multi-frame formats keep theirs after load).
        data = path.read_bytes()
    else:
        raise ImageReadError(f"{what or 'image'}: cannot read an image from a {type(value).__name__}")
    if not data:
        raise ImageReadError(f"{what}: the file is empty (0 bytes)")
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    # (No warnings.catch_warnings here: it is not thread-safe. Between PIL's limit and twice it PIL warns, and the
    # size check below refuses; above twice PIL raises.)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError(f"{what}: not an image file that can be read (PNG, JPEG, TIFF, BMP, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise ImageReadError(f"{what}: too many pixels (limit {limit:,}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{what}: cannot be opened ({' '.join(str(error).split())})") from None
    width, height = image.size
    if limit and width * height > limit:
        raise ImageReadError(f"{what}: {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}; "
                             "downscale it first (the model sees it at a few hundred pixels anyway)")
    try:
        image.load()  # PIL refuses truncated data (unless ImageFile.LOAD_TRUNCATED_IMAGES was set)
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise ImageReadError(f"{what}: the image data is corrupt or truncated ({' '.join(str(error).split())})") from None
    return image
