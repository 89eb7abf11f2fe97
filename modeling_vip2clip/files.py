"""Writing files and folders so that a reader or a crash only ever sees the old or the new content."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_save", "staged_folder", "user_mode", "apply_umask"]


def user_mode(directory: bool = False) -> int:
    """The mode a file (0o666) or folder (0o777) gets under the process's umask, as `open` / `mkdir` give it."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything in it) the user's umask modes: temporary files renamed into
    place (mkstemp, safetensors' writer) are 0600, which a shared server or a Space cannot read."""
    path = Path(path)
    file_mode, folder_mode = user_mode(), user_mode(directory=True)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            os.chmod(item, folder_mode if item.is_dir() else file_mode)


def _name_the_file(error: BaseException, path: str | os.PathLike) -> None:
    """Give an `OSError` raised without a file name (a full disk noticed at `write` or `close`) the name of the
    file being written, so that its one `error:` line says where."""
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
        error.filename = os.fspath(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers (and a crash) only ever
    see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, user_mode())  # mkstemp creates 0600; the file gets what `open` would have given it
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        _name_the_file(error, path)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`atomic_write_text` of `data` as indented JSON in its own key order (non-JSON values written with `str`)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_save(target: Path, save) -> None:
    """`save(file)` into a temporary file beside `target`, then rename: a killed run never leaves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            save(handle)
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _name_the_file(error, target)
        raise


@contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty folder beside `path` to fill in the `with` block; when the block ends without an error it takes
    the place of `path` (an existing folder there is moved aside, then removed once the new one is in place), and
    when it raises, the staged folder is removed and `path` is untouched. Readers never see a half-written folder.

    The staged folder is made with `os.mkdir`, so it gets the user's umask like any other folder (a `mkdtemp`
    folder would stay 0700). Whether `path` may be replaced at all is the caller's decision, taken before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; remove it or choose another folder")
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    staging = path.with_name(f".{path.name}.{token}.partial")
    os.mkdir(staging)
    try:
        yield staging
        apply_umask(staging)  # safetensors' and mkstemp's files are 0600: give them the user's umask modes
        if path.exists():
            previous = path.with_name(f".{path.name}.{token}.old")
            os.replace(path, previous)
            os.replace(staging, path)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
