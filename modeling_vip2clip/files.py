"""Writing files and folders so that a reader or a crash only ever sees the old or the new content."""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import writing

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_save", "staged_folder", "user_mode", "apply_umask",
           "is_temporary"]


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


# The temporary names of the two atomic writers below: `atomic_save`'s `.NAME.PID.tmp` and `atomic_write_text`'s
# mkstemp `.NAME.XXXXXXXX.tmp` (eight of [a-z0-9_]).
_TEMPORARY = re.compile(r"^\..+\.(\d+|[a-z0-9_]{8})\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of this module's temporaries (what a writer killed mid-way leaves behind)."""
    return bool(_TEMPORARY.match(name))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers (and a crash) only ever
    see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with writing(path), os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, user_mode())  # mkstemp creates 0600; the file gets what `open` would have given it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`atomic_write_text` of `data` as indented JSON in its own key order (non-JSON values written with `str`)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_save(target: Path, save) -> None:
    """`save(file)` into a temporary file beside `target`, then rename: a killed run never leaves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with writing(target), open(tmp, "wb") as handle:
            save(handle)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _clear_dead_staging(path: Path) -> None:
    """What a killed `staged_folder` left beside `path` (its name carries the writer's pid): a `.partial` folder is
    removed; an `.old` one (killed between its two renames) is removed when `path` is in place, else renamed back
    to `path` — the previous folder, complete, is never lost. A live writer's folders are left alone."""
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*.*.*"):
        pid, kind = entry.name[len(path.name) + 2:].partition(".")[0], entry.suffix  # .NAME.PID.TOKEN.KIND
        if kind not in (".partial", ".old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == ".old" and not path.exists():
            os.replace(entry, path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


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
    _clear_dead_staging(path)
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    staging = path.with_name(f".{path.name}.{token}.partial")
    os.mkdir(staging)
    try:
        with writing(path):
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
