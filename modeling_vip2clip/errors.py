"""The package's bottom layer of errors: every module may import this one, and it imports nothing of the package.

A fault the user can fix raises :class:`UsageError` (or a subclass below); its message is one sentence,
``<what> (<path or value>): <why>; <fix>``. The command line's error boundary (`cli/boundary.py`) prints it as
``error: <that sentence>`` and exits 2; the Python API raises the typed exception itself, with that sentence as
its first line and no chain of library tracebacks behind it (``raise ... from None`` where the cause adds nothing).

:func:`explain` turns the expected faults that arrive as *library* exceptions — `OSError` and its kinds, a
truncated safetensors file, a refused pickle, an invalid config, JSON/CSV/UTF-8 decode errors, a missing optional
package, an ONNX / OpenVINO file that does not load — into those typed errors; it is the one table of them, used
by the boundary and by the loaders that know which file they were reading. Documented in docs/reliability.md.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
from contextlib import contextmanager
from typing import Iterator

__all__ = [
    "UsageError",
    "MissingExtraError",
    "BadFileError",
    "InvalidConfigError",
    "FileSystemError",
    "OutputFolderError",
    "FolderInUseError",
    "EXTRAS",
    "require_extra",
    "sentence",
    "explain",
    "writing",
]


class UsageError(Exception):
    """A mistake the user can fix (a bad value, a missing file, an unreachable Hub id, a missing extra).

    The message names the value and says how to fix it: ``"--model ./x: no such folder; pass a model folder …"``.
    """


class MissingExtraError(UsageError):
    """An optional dependency of the command is not installed (the message names the extra to install)."""


class BadFileError(UsageError):
    """A file the package reads is corrupt, truncated, of another kind, or refused (a pickle with code in it)."""


class InvalidConfigError(BadFileError, ValueError):
    """A model configuration holds a value the model cannot be built with (non-finite, out of range, huge)."""


class FileSystemError(UsageError):
    """The file system refused (missing, not a folder, read-only, full, permission, a folder where a file goes)."""


class OutputFolderError(UsageError):
    """An output folder cannot be used as asked: results of another run in it, a resume that does not match, or
    an output inside the model folder it reads."""


class FolderInUseError(OutputFolderError):
    """Another run holds the output folder's lock."""


# Optional dependencies → the extra that installs them (pyproject.toml's [project.optional-dependencies]).
EXTRAS = {
    "datasets": "train", "accelerate": "train", "sklearn": "train", "tensorboard": "train",
    "matplotlib": "train", "scipy": "train", "gradio": "demo", "onnx": "onnx", "onnxruntime": "onnx",
    "openvino": "openvino", "nncf": "openvino",
}


def require_extra(module: str, extra: str | None = None, why: str = "this command") -> None:
    """Fail at the start of a command, not after its work, when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(_missing(module, extra or EXTRAS.get(module), why))


def _missing(module: str, extra: str | None, why: str) -> str:
    install = f'pip install "vip2clip[{extra}]"' if extra else "pip install --force-reinstall vip2clip"
    return f"{why} needs the Python package {module!r}, which is not installed; install it with {install}"


def sentence(what: str, where: object | None, why: str, fix: str) -> str:
    """The one shape of every message: ``<what> (<where>): <why>; <fix>`` (``where`` left out when unknown)."""
    place = f" ({os.fspath(where) if isinstance(where, os.PathLike) else where})" if where not in (None, "") else ""
    return f"{what}{place}: {str(why).rstrip('. ')}; {fix}"


@contextmanager
def writing(path: object) -> Iterator[None]:
    """An `OSError` raised in the block without a file name is given `path` (a `write()` that meets a full disk
    names no file, and the user's line must say where: `error: cannot write (PATH): no space left …`); a library's
    error that only carries the errno in its message becomes that `OSError`."""
    where = os.fspath(path) if isinstance(path, os.PathLike) else path
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            error.filename = where
        raise
    except Exception as error:  # a library's writer wrapping the I/O error (safetensors: "... (os error 28)")
        code = _os_error_in(error)
        if code is None and "inline_container" in str(error) and "unexpected pos" in str(error):
            code = errno.ENOSPC  # torch.save's zip writer after a short write, read as disk full like numpy's
        if code is None:
            raise
        raise OSError(code, os.strerror(code), where) from error


# The same command is refused over the files the failed run kept; --resume (predict, evaluate, train) continues it.
_RERUN = "then run again (with --resume, where the command has it, to keep what was done)"
_SPACE_FIX = f"free some space or write elsewhere, {_RERUN}"

_OS_ERRORS = {
    errno.ENOENT: ("cannot find", "no such file or folder", "check the path"),
    errno.ENOTDIR: ("cannot use", "a part of this path is a file, not a folder", "pass a folder"),
    errno.EISDIR: ("cannot use", "this is a folder where a file is expected", "pass a file, or remove the folder"),
    errno.EROFS: ("cannot write", "the file system is read-only", "choose a writable folder"),
    errno.ENOSPC: ("cannot write", "no space left on the device", _SPACE_FIX),
    errno.EDQUOT: ("cannot write", "the disk quota is exhausted", _SPACE_FIX),
    # A per-process file-size limit (`ulimit -f`, a batch scheduler's) or the file system's largest file.
    errno.EFBIG: ("cannot write", "the file is larger than this system allows (a file-size limit such as "
                  "`ulimit -f`, or the file system's maximum)",
                  f"raise the limit or write to another file system, {_RERUN}"),
    errno.EACCES: ("cannot access", "permission denied", "check its permissions or choose another folder"),
    errno.EPERM: ("cannot access", "operation not permitted", "check its permissions or choose another folder"),
    errno.EEXIST: ("cannot create", "it already exists", "remove it or choose another name"),
    errno.ELOOP: ("cannot use", "too many levels of symbolic links (a link that points to itself)",
                  "fix or remove the link"),
    errno.ENAMETOOLONG: ("cannot use", "the file name is too long for the file system", "choose a shorter path"),
}

# Library exceptions identified by their module and class name, so that this bottom module imports no library.
_CORRUPT_MODULES = ("safetensors", "onnx", "onnxruntime", "openvino", "google.protobuf", "nncf")
_CORRUPT_NAMES = {"SafetensorError", "HeaderTooLarge", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "Fail",
                  "ValidationError", "DecodeError", "BadZipFile", "UnidentifiedImageError", "DecompressionBombError"}


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _os_error_in(error: BaseException) -> int | None:
    """The errno a library's own exception carries in its message (Rust's `(os error 28)`), if any."""
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def explain(error: BaseException, path: object | None = None, what: str | None = None) -> UsageError | None:
    """The typed error (one sentence, see the module docstring) for an expected fault raised by a library, or
    `None` when `error` is not one (a bug: the boundary then says so). `path`: the file being read or written,
    when the caller knows it better than the exception; `what`: e.g. ``"cannot load the model"``."""
    if isinstance(error, UsageError):
        return error
    kind = type(error)
    module, name = kind.__module__ or "", kind.__name__
    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.split(".")[0]
        return MissingExtraError(_missing(top, EXTRAS.get(top), what or "this command"))
    if name == "StrictDataclassClassValidationError" or (name == "StrictDataclassFieldValidationError"):
        inner = error.__cause__ or error
        why = _one_line(f"{inner}" if inner is not error else str(error).split(":", 1)[-1])
        return InvalidConfigError(sentence(what or "invalid model configuration", path, why,
                                           "fix the value in config.json, or re-save the model"))
    if isinstance(error, OSError) and not module.startswith(_CORRUPT_MODULES) and name not in _CORRUPT_NAMES:
        where = path or error.filename
        code = error.errno
        if code is None and "requested and" in str(error) and "written" in str(error):
            code = errno.ENOSPC  # numpy / torch short writes: "25600 requested and 20416 written"
        verb, why, fix = _OS_ERRORS.get(code, ("cannot use", _one_line(error.strerror or error),
                                               "check the path and the file system"))
        if error.filename2:
            where = f"{where} -> {error.filename2}"
        return FileSystemError(sentence(what or verb, where, why, fix))
    if module.startswith(_CORRUPT_MODULES) or name in _CORRUPT_NAMES:
        code = _os_error_in(error)
        if code is not None:  # a writer's I/O error wrapped by the library (safetensors: "... (os error 28)")
            return explain(OSError(code, os.strerror(code)), path, what)
        return BadFileError(sentence(what or "cannot read the file", path, f"corrupt, truncated or not this kind of "
                                     f"file ({_one_line(error, 160)})", "re-download, re-save or re-export it"))
    if name == "UnpicklingError":
        return BadFileError(sentence(what or "refused to load the file", path,
                                     "it is a pickle holding Python objects beyond plain tensors, which could run code "
                                     f"({_one_line(error, 120)})",
                                     "load only files from a source you trust, converted to safetensors"))
    if name == "JSONDecodeError":
        return BadFileError(sentence(what or "cannot read the file", path,
                                     f"not valid JSON (line {error.lineno}, column {error.colno})",
                                     "fix or re-create the file"))
    if isinstance(error, UnicodeDecodeError):
        return BadFileError(sentence(what or "cannot read the file", path,
                                     f"not valid UTF-8 text (byte {error.start})", "fix or re-create the file"))
    if module in ("_csv", "csv") and name == "Error":
        return BadFileError(sentence(what or "cannot read the CSV file", path, f"not valid CSV ({_one_line(error)})",
                                     "fix it, or remove it and run again"))
    if isinstance(error, MemoryError) or name == "OutOfMemoryError":
        return UsageError(sentence(what or "out of memory", path, _one_line(error, 160) or "the allocation failed",
                                   "lower --batch-size, use a smaller model, or free memory"))
    return None
