"""Where a `--model` / `--clip` / `--dataset` value points: a local path or a Hub id, checked before any library
is asked to load it (a bad value fails in a second, an unreachable Hub falls back to the cache)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from .errors import UsageError

__all__ = ["looks_like_path", "resolve_source"]

logger = logging.getLogger("modeling_vip2clip")


def looks_like_path(value: str) -> bool:
    """A value meant as a local path: `./x`, `../x`, `/x`, `~/x`, `C:\\x`, or one whose parent folder exists
    (`runs/model` when `runs/` exists). Such a value is never sent to the Hub."""
    text = str(value)
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", "..") or "\\" in text:
        return True
    if len(text) > 1 and text[1] == ":":  # Windows drive
        return True
    parent = Path(text).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _hub_error_reason(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text.split(". ")[0][:200]


def resolve_source(value: str, flag: str, repo_type: str = "model", need: str = "config.json") -> str:
    """Check a `--model` / `--clip` / `--dataset` value before any library is asked to load it.

    Returns what to load: a local path (absolute), a reachable Hub id as given, or — when the Hub is unreachable or
    `HF_HUB_OFFLINE=1` but the model is cached — its cached snapshot folder, so no library retries the network.
    Raises `UsageError` at once for
    a path that does not exist, a folder without `need` (for models), an invalid Hub id, an id the Hub does not
    know, and an id that can be neither reached nor found in the cache (saying how to go offline).
    """
    path = Path(str(value)).expanduser()
    if path.exists() or looks_like_path(str(value)):
        if not path.exists():
            raise UsageError(f"{flag} {value}: no such file or folder; check the path (or pass a Hub id such as "
                             "org/name).")
        if repo_type == "model" and need and path.is_file():
            raise UsageError(f"{flag} {value}: a file, not a model folder; pass the folder that holds it "
                             f"({path.parent}) — a model is a folder with {need} and model.safetensors.")
        if repo_type == "model" and need and path.is_dir() and not (path / need).is_file():
            raise UsageError(f"{flag} {value}: not a model folder (no {need} in it); pass a folder written by "
                             "save_pretrained / `vip2clip train` / `vip2clip download-authors`, or a Hub id.")
        return str(path.resolve())
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(value))
    except HFValidationError:
        raise UsageError(f"{flag} {value}: neither an existing path nor a valid Hub id (org/name); check the "
                         "spelling.") from None
    return _resolve_hub_id(str(value), flag, repo_type, need)


@functools.lru_cache(maxsize=64)
def _resolve_hub_id(repo_id: str, flag: str, repo_type: str, need: str) -> str:
    # Memoised: an entry point checks its sources before the heavy imports, and the loader it calls later checks
    # them again; one Hub request per id and process is enough (failures raise, so they are never cached).
    from huggingface_hub import constants, try_to_load_from_cache

    cached = False
    if repo_type == "model" and need:
        cached = isinstance(try_to_load_from_cache(repo_id, need), str)
    else:
        cached = _dataset_cached(repo_id)
    offline = constants.HF_HUB_OFFLINE
    if offline:
        if not cached:
            raise UsageError(f"{flag} {repo_id}: {_no_folder(repo_id)}, and HF_HUB_OFFLINE=1 with this Hub "
                             f"{repo_type} not in the local cache; check the path, or unset HF_HUB_OFFLINE to "
                             "download it.")
        return _cached_copy(repo_id, repo_type)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    timeout = float(os.environ.get("VIP2CLIP_HUB_TIMEOUT", "5"))
    try:
        # One short request instead of the libraries' retries (~30 s of silence when the Hub is unreachable).
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except GatedRepoError:
        raise UsageError(f"{flag} {repo_id}: a gated repository; accept its terms on the Hub and log in with "
                         "`hf auth login`.") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{flag} {repo_id}: {_no_folder(repo_id)}, and no such {repo_type} on the Hub (or it is "
                         "private); check the path or the id, or log in with `hf auth login`.") from None
    except Exception as error:  # noqa: BLE001 - network trouble of any kind: the cache is the way out
        if cached:
            logger.warning("the Hub is unreachable (%s): using the cached copy of %s", _hub_error_reason(error), repo_id)
            return _cached_copy(repo_id, repo_type)
        raise UsageError(f"{flag} {repo_id}: {_no_folder(repo_id)}, and as a Hub id it cannot be reached "
                         f"({_hub_error_reason(error)}) nor found in the local cache; check the path (or pass a local folder), "
                         "or connect to the network to download it (HF_HUB_OFFLINE=1 then uses the cached copy).") from None
    return repo_id


def _no_folder(value: str) -> str:
    """Said first when a value that could be a folder or a Hub id is neither: most often a mistyped path."""
    return f"no folder named {value!r} in {os.getcwd()}"


def _cached_copy(repo_id: str, repo_type: str) -> str:
    """The cached snapshot folder of a model (loaded as a folder: no network, no retries); a dataset id as is
    (`datasets` reads its own cache under HF_HUB_OFFLINE)."""
    if repo_type != "model":
        return repo_id
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, local_files_only=True)


def _dataset_cached(repo_id: str) -> bool:
    from huggingface_hub import scan_cache_dir

    try:
        return any(repo.repo_id == repo_id and repo.repo_type == "dataset" for repo in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 - no cache folder yet
        return False
