"""Output folders that belong to one run: a manifest written first, an exclusive lock, resume only when nothing
that changes the results differs, `overwrite` that removes only what the package wrote (docs/reliability.md).

    folder = claim_output_folder(out, {"written_by": "vip2clip predict", "model": model_identity(m),
                                       "inputs": [...], "options": {...}},
                                 resume=args.resume, overwrite=args.overwrite, writes=("predictions*.csv", ...),
                                 model_dirs=[m])
    try:
        ...                                  # write; folder.record("name") before a new top-level entry appears
    finally:
        folder.release()

The manifest (`MANIFEST_FILE`, JSON) says what wrote the folder (command, package version, time), the model's
identity (its source and fingerprints of its config and weight files), the inputs' identity and the options that
change the results, and every top-level entry the package wrote there (`writes`). The lock (`LOCK_FILE`, an
`flock` held for the run) refuses a second run into the same folder; the kernel drops it when the holder dies,
so a killed run never blocks the next one. Staging folders of a killed run (`.staging-*`, export's `.traced`) are
removed when the folder is claimed again.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import FolderInUseError, OutputFolderError, sentence
from .files import apply_umask, atomic_write_json, is_temporary

__all__ = ["MANIFEST_FILE", "LOCK_FILE", "OutputFolder", "claim_output_folder", "check_apart", "model_identity",
           "file_fingerprint", "staging_folder", "move_into_place"]

logger = logging.getLogger("modeling_vip2clip")

MANIFEST_FILE = ".vip2clip_run.json"
LOCK_FILE = ".vip2clip_run.lock"
_LEFTOVERS = (".staging-*", ".traced")  # staging folders of a run that was killed: never results
_MARKERS = ("config.json", "export_info.json")  # moved into place last (move_into_place)
_WEIGHT_FILES = ("model.safetensors", "model.onnx", "model.onnx_data", "openvino_model.xml", "openvino_model.bin",
                 "pytorch_model.bin")


_WHOLE = 8 << 20  # files up to 8 MiB are hashed whole; larger ones by size, head and tail


@functools.lru_cache(maxsize=256)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= _WHOLE:
            digest.update(handle.read())
        else:  # a weight file: its header (names, shapes, offsets) and first and last MiB of values
            digest.update(handle.read(1 << 20))
            handle.seek(size - (1 << 20))
            digest.update(handle.read())
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a file's size and bytes (whole up to 8 MiB, else its first and last MiB: a 1.7 GB model is
    told apart in milliseconds, not seconds; memoised per path, size and modification time)."""
    stat = os.stat(path)
    return _fingerprint(os.fspath(path), stat.st_size, stat.st_mtime_ns)


def model_identity(source: str | os.PathLike) -> dict:
    """What identifies a model for a resume: fingerprints of its `config.json` and weight files when it is a local
    folder (so the same model under another path matches, and an edited one does not); else the Hub id."""
    folder = Path(source)
    identity: dict[str, Any] = {"source": str(source)}
    if folder.is_dir():
        files = ["config.json", *_WEIGHT_FILES]
        files += sorted(p.name for p in folder.glob("model-*.safetensors"))
        identity["fingerprints"] = {name: file_fingerprint(folder / name) for name in files
                                    if (folder / name).is_file()}
    return identity


def check_apart(out: str | os.PathLike, model_dirs: Iterable[Any], flag: str = "--out",
                input_dirs: Iterable[Any] = ()) -> None:
    """Refuse an output folder that is, contains or lies inside a model folder or an input (a dataset folder) the
    run reads: writing there could replace or delete it, or mix the results into the data."""
    target = Path(out).expanduser().resolve()
    read = [(model, "the model folder", "the model's folder") for model in model_dirs]
    read += [(data, "the input", "its inputs") for data in input_dirs]
    for source_path, what, outside in read:
        if source_path is None or not Path(str(source_path)).expanduser().exists():
            continue  # a Hub id, or nothing local to protect
        source = Path(str(source_path)).expanduser().resolve()
        relation = ("is" if target == source else "contains" if source.is_relative_to(target) else
                    "lies inside" if target.is_relative_to(source) else None)
        if relation:
            raise OutputFolderError(sentence(f"{flag} {out}", target, f"{relation} {what} {source_path} that "
                                             "this run reads", f"choose an output folder outside {outside}"))


class OutputFolder:
    """A claimed output folder: `path`, the `manifest` being written, the lock until `release()`."""

    def __init__(self, path: Path, manifest: dict, lock_handle, created: bool, superseded: Sequence[str] = ()):
        self.path, self.manifest, self._lock, self._created = path, manifest, lock_handle, created
        self.superseded = list(superseded)  # an earlier run's entries that `move_into_place` removes

    def record(self, *names: str) -> None:
        """Add top-level entries to the manifest's `writes` *before* they appear, so that a run killed while
        writing them still owns them (a later `overwrite` removes them)."""
        writes = self.manifest.setdefault("writes", [])
        fresh = [name for name in names if name not in writes]
        if fresh:
            writes.extend(fresh)
            atomic_write_json(self.path / MANIFEST_FILE, self.manifest)

    def finish(self) -> None:
        """Mark the run complete in the manifest."""
        self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.path / MANIFEST_FILE, self.manifest)

    def release(self) -> None:
        """Drop the lock. A folder this run created and left without any result is removed again (a failed run
        leaves no folder behind)."""
        if self._lock is None:
            return
        try:
            empty = not [entry for entry in self.path.iterdir() if entry.name not in (MANIFEST_FILE, LOCK_FILE)]
            if self._created and empty:
                (self.path / MANIFEST_FILE).unlink(missing_ok=True)
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()
        except OSError:
            pass  # best effort: the folder stays usable either way
        finally:
            _HELD.discard(self._lock.fileno())
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# The lock files this process holds. A forked child (a DataLoader worker, a writer pool) inherits their descriptors,
# and an flock lives until the last descriptor of it is closed: a worker that outlives its killed parent by the few
# seconds it takes to notice would keep the folder "in use". Each child points its copies at /dev/null at once (the
# parent's lock is untouched: dropping one duplicate of a descriptor does not drop an flock; dup2 rather than close
# keeps the number valid for the child's file object, which closes it later).
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in _HELD:
            try:
                os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock(folder: Path, flag: str):
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; the manifest checks still apply
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = " ".join(handle.read().split()) or "another process"
        handle.close()
        raise FolderInUseError(sentence(flag, folder.resolve(), f"another vip2clip run is writing to it ({holder})",
                                        "wait for it to finish, or choose another folder")) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    handle.flush()
    _HELD.add(handle.fileno())
    return handle


def _read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def _differences(previous: dict, current: dict) -> list[str]:
    if previous.get("unreadable"):
        return [f"its {MANIFEST_FILE} cannot be read"]
    found = []
    if previous.get("written_by") != current.get("written_by"):
        found.append(f"it was written by {previous.get('written_by')!r}, not {current.get('written_by')!r}")
    old_model, new_model = previous.get("model") or {}, current.get("model") or {}
    if (old_model.get("fingerprints") or old_model.get("source")) != (
            new_model.get("fingerprints") or new_model.get("source")):
        found.append(f"another model (was {old_model.get('source')}, now {new_model.get('source')})")
    if previous.get("inputs") != current.get("inputs"):
        found.append("other inputs")
    old_options, new_options = previous.get("options") or {}, current.get("options") or {}
    for key in sorted(set(old_options) | set(new_options)):
        if old_options.get(key) != new_options.get(key):
            found.append(f"{key} was {old_options.get(key)!r}, now {new_options.get(key)!r}")
    return found


def _owned(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clear_temporaries(out: Path) -> None:
    """Remove the half-written files a killed run left anywhere in its folder (an overlay cut by SIGKILL): under
    the folder's lock no other run writes there, so every atomic writer's temporary in it is a killed run's."""
    for directory, _, names in os.walk(out):
        for name in names:
            if is_temporary(name):
                Path(directory, name).unlink(missing_ok=True)


def claim_output_folder(
    path: str | os.PathLike,
    manifest: dict,
    *,
    resume: bool = False,
    overwrite: bool = False,
    writes: Sequence[str] = (),
    model_dirs: Iterable[Any] = (),
    flag: str = "--output-dir",
    can_resume: bool = True,
    input_dirs: Iterable[Any] = (),
    overwrite_flag: str = "--overwrite",
    reusable: Sequence[str] = (),
    replace_on_move: bool = False,
) -> OutputFolder:
    """Claim `path` for a run (see the module docstring) and write its manifest; raises `OutputFolderError`.

    Args:
        manifest: `written_by`, `model` (:func:`model_identity`), `inputs`, `options` (those that change results).
        resume: continue the folder's run: refused when the model, inputs or options differ (named).
        overwrite: a fresh run into a folder holding results: remove what the manifest says the package wrote (or,
            without a manifest, the entries matching `writes`) and nothing else.
        writes: glob patterns of the top-level names this command writes (`predictions*.csv`, `overlays`, ...).
        model_dirs: model folders the run reads; the output may not be, contain or lie inside one.
        can_resume: whether the command has `--resume` (only changes the advice in the refusal).
        input_dirs: the inputs the run reads (dataset folders, files): the same rule as `model_dirs`.
        overwrite_flag: the command's name of `overwrite` (train: `--overwrite-output-dir`), for the advice.
        reusable: glob patterns of the package's caches kept in the folder (train's `feature_cache`, checked
            before each use): never results, so they neither make the folder "not empty" nor go with `overwrite`.
        replace_on_move: with `overwrite`, leave the earlier run's entries in place until `move_into_place`
            brings the new ones (for a command that stages all it writes: a run that fails keeps the old results).
    """
    out = Path(path).expanduser()
    check_apart(out, model_dirs, flag, input_dirs)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(sentence(f"{flag} {path}", out.resolve(), "this is a file, not a folder",
                                         "pass a folder path"))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = _lock(out, flag)
    try:
        for entry in out.iterdir():
            if _owned(entry.name, _LEFTOVERS):  # a killed run's staging: ours, never results
                _remove(entry)
        _clear_temporaries(out)
        previous = _read_manifest(out)
        entries = sorted(e.name for e in out.iterdir()
                         if e.name not in (MANIFEST_FILE, LOCK_FILE) and not _owned(e.name, reusable))
        superseded: list[str] = []
        record = {"written_by": manifest.get("written_by"), "version": _version(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest, "writes": []}
        if resume and entries:
            if previous is not None:
                differences = _differences(previous, record)
                if differences:
                    raise OutputFolderError(sentence(
                        f"{flag} {path}", (out / MANIFEST_FILE).resolve(), "--resume refused: this run differs from the one in "
                        f"the folder: {'; '.join(differences)}", "resume with the same model, inputs and options, "
                        "or write to another folder"))
                record["writes"] = list(previous.get("writes") or [])
                record["started"] = previous.get("started", record["started"])
            else:  # a folder from before manifests: the CSV header checks still apply
                record["writes"] = [name for name in entries if _owned(name, writes)]
        elif entries:
            owned = list(previous.get("writes") or []) if previous and not previous.get("unreadable") else [
                name for name in entries if _owned(name, writes)]
            if not overwrite:
                shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
                advice = ("pass --resume to continue that run (same model, inputs and options), " if can_resume else
                          "") + f"pass {overwrite_flag} to replace what vip2clip wrote there, or choose another folder"
                raise OutputFolderError(sentence(f"{flag} {path}", out.resolve(), f"exists and is not empty (it holds {shown})",
                                                 advice))
            owned = [name for name in owned if "/" not in name and name not in (MANIFEST_FILE, LOCK_FILE)
                     and not _owned(name, reusable)]
            if replace_on_move:  # still the folder's until the new entries arrive (and still owned if killed)
                superseded = [name for name in owned if (out / name).exists() or (out / name).is_symlink()]
                record["writes"] = list(superseded)
            else:
                for name in owned:
                    _remove(out / name)
            kept = [name for name in entries if name not in owned]
            if kept:
                logger.warning("%s: kept %d entries of %s that vip2clip did not write: %s", overwrite_flag, len(kept),
                               out, ", ".join(kept[:8]))
        atomic_write_json(out / MANIFEST_FILE, record)
    except BaseException:
        handle.close()
        if created:  # refused, or the manifest could not be written (a full disk): leave no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return OutputFolder(out, record, handle, created, superseded)


def staging_folder(folder: OutputFolder) -> Path:
    """A fresh staging folder inside the claimed folder (same file system: entries are renamed into place);
    removed on the next claim if the run dies before moving them."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.path))


def move_into_place(folder: OutputFolder, staged: Path) -> list[str]:
    """Rename every entry of `staged` into the claimed folder (recorded in the manifest first), then remove
    `staged`; returns the names moved. An earlier run's entries kept by `replace_on_move` go first."""
    # The files that make a folder a model (config.json) or an export (export_info.json) go last: a run killed
    # mid-way leaves a folder that nothing loads as complete, never a config beside missing weights.
    names = sorted((entry.name for entry in staged.iterdir()), key=lambda name: (name in _MARKERS, name))
    apply_umask(staged)  # safetensors and mkstemp write 0600
    folder.record(*names)
    for name in folder.superseded:
        if name not in names:
            _remove(folder.path / name)
    folder.superseded = []
    for name in names:
        _move_entry(staged / name, folder.path / name)
    staged.rmdir()
    return names


def _move_entry(source: Path, target: Path) -> None:
    """Rename `source` over `target` (a folder there is removed first: `os.replace` cannot replace one)."""
    if target.exists() and target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


def _version() -> str:
    from . import __version__

    return __version__
