"""The authors' released ViP²-CLIP weights: fetched from their repository at a pinned commit, verified, converted
and cached, in one call.

    vip2clip download-authors mvtec --out vip2clip-mvtec     # or: python -m modeling_vip2clip.cli.download_authors
    model = ViP2CLIPModel.from_authors_checkpoint("mvtec")   # downloaded once; later calls are offline and instant

**Which one.** The names say what each file was *trained* on (the paper's zero-shot protocol, docs/method.md §1):

- `mvtec` (`mvtec_train_epoch_10.pth`): trained on MVTec AD — use it on anything that is **not** MVTec AD
  (VisA, MPDD, BTAD, KSDD, DAGM, DTD-Synthetic, the medical sets, your own images);
- `visa` (`visa_train_epoch_10.pth`): trained on VisA — use it on **MVTec AD**.

**Where from.** `https://github.com/kim0806/ViP2-CLIP/raw/<commit>/models/<name>_train_epoch_10.pth` at the commit
pinned below (not a branch, so the bytes cannot change under the user). A downloaded file must have the git blob id
listed here (git's id of a file: SHA-1 over `b"blob <size>\\0" + content`); any other file is deleted and nothing
is converted from it. The file is then read with `torch.load(weights_only=True)` (`weights.authors_checkpoint`), so no
code in it can run, and combined with OpenAI's CLIP from the Hub (`openai/clip-vit-large-patch14-336`).

**Cache.** Under the Hugging Face home, so `HF_HOME` moves it with the Hub's own caches:

    $HF_HOME/vip2clip/authors/checkpoints/<git blob id>/<name>_train_epoch_10.pth   verified file
                                         .../<name>_train_epoch_10.pth.incomplete   an interrupted download (resumed)
    $HF_HOME/vip2clip/authors/models/<name>-<key>/     converted model folder (weights/folder.py: a complete Hub folder)
    $HF_HOME/vip2clip/authors/locks/*.lock             inter-process locks (empty files)

`<key>` hashes the checkpoint's id, the CLIP and the conversion options. Timeouts are huggingface_hub's
(`HF_HUB_ETAG_TIMEOUT` to connect, `HF_HUB_DOWNLOAD_TIMEOUT` between received bytes, 10 s each by default);
`HF_HUB_OFFLINE=1` forbids the download (cached files are still used).

**Terms.** The weights are the authors' and are not redistributed by this project: each user downloads them from
the authors' repository. At the pinned commit that repository has no licence file (an MIT licence file sits on its
separate `main` branch, whose history does not hold the weights). The `mvtec` weights were trained on MVTec AD
(CC BY-NC-SA 4.0), so they are for **non-commercial** use; VisA is CC BY 4.0. Cite the paper, arXiv 2505.17692.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Sequence

from ..errors import UsageError

__all__ = [
    "AUTHORS_REPOSITORY",
    "AUTHORS_COMMIT",
    "DEFAULT_CLIP",
    "RELEASES",
    "AuthorsRelease",
    "AuthorsCheckpointError",
    "AuthorsDownloadError",
    "AuthorsChecksumError",
    "AuthorsConversionError",
    "get_release",
    "compute_git_blob_sha1",
    "authors_cache_dir",
    "fetch_authors_checkpoint",
    "download_authors_checkpoint",
    "load_authors_model",
    "from_authors_checkpoint",
]

LOGGER = logging.getLogger("vip2clip.authors_checkpoint")

AUTHORS_REPOSITORY = "https://github.com/kim0806/ViP2-CLIP"
AUTHORS_COMMIT = "4b5884f6c6bd42001fe47ccaeef32e4f1a8f5a93"
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
PAPER = "arXiv 2505.17692"
_CACHE_FORMAT = 2  # bump when the conversion's output changes, so older cached folders are not reused


@dataclass(frozen=True)
class AuthorsRelease:
    """One released checkpoint of the authors' repository, at `AUTHORS_COMMIT`."""

    name: str
    git_blob_sha1: str
    trained_on: str
    use_on: str
    terms: str

    @property
    def filename(self) -> str:
        return f"{self.name}_train_epoch_10.pth"

    @property
    def url(self) -> str:
        return f"{AUTHORS_REPOSITORY}/raw/{AUTHORS_COMMIT}/models/{self.filename}"

    @property
    def summary(self) -> str:
        """One line for terminals and the demo page."""
        return f"trained on {self.trained_on}: use it on {self.use_on}; {self.terms}"


RELEASES: dict[str, AuthorsRelease] = {
    "mvtec": AuthorsRelease(
        name="mvtec",
        git_blob_sha1="2988d3d425552fde7ed8c33433dea402c43103c5",
        trained_on="MVTec AD",
        use_on="anything that is not MVTec AD (VisA, MPDD, BTAD, medical sets, your own images)",
        terms="non-commercial (MVTec AD is CC BY-NC-SA 4.0)",
    ),
    "visa": AuthorsRelease(
        name="visa",
        git_blob_sha1="5d95c734a7a4b52b41704d322f4c046b8c1fcbcf",
        trained_on="VisA",
        use_on="MVTec AD",
        terms="VisA is CC BY 4.0 (attribute its authors)",
    ),
}


# ---------------------------------------------------------------------------------------------- errors
class AuthorsCheckpointError(UsageError):
    """A problem the user can fix (network, wrong id or URL, CLIP); one line: what is wrong, then the fix. The
    entry points print it as `error: ...` and exit 2 (`cli.boundary.run_main`)."""


class AuthorsDownloadError(AuthorsCheckpointError):
    """The file could not be downloaded (no network, offline mode, HTTP error, connection lost for good)."""


class AuthorsChecksumError(AuthorsCheckpointError):
    """The downloaded file is not the pinned one; it has been deleted and nothing was converted."""


class AuthorsConversionError(AuthorsCheckpointError):
    """The verified file could not be combined with the CLIP (e.g. the CLIP is unreachable or does not fit)."""


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text.split('. ')[0][:300]}"


# ---------------------------------------------------------------------------------------------- helpers
def compute_git_blob_sha1(path: str | PathLike, chunk_size: int = 1 << 20) -> str:
    """git's blob id of a file (`git hash-object FILE`): SHA-1 over `b"blob <size>\\0" + content`, streamed."""
    path = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def authors_cache_dir(cache_dir: str | PathLike | None = None) -> Path:
    """`cache_dir`, else `$HF_HOME/vip2clip/authors` (read at call time, so `huggingface_hub.constants.HF_HOME` rules)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "vip2clip" / "authors"


def get_release(name: str) -> AuthorsRelease:
    """The entry of `RELEASES`, or `AuthorsCheckpointError` naming the choices and what each is for."""
    if name not in RELEASES:
        choices = "; ".join(f"{r.name} (trained on {r.trained_on}: use it on {r.use_on})" for r in RELEASES.values())
        raise AuthorsCheckpointError(f"unknown authors' checkpoint {name!r}; choose {choices}")
    return RELEASES[name]


def _check_blob_id(value: str) -> str:
    value = value.strip().lower()
    if len(value) != 40 or any(c not in "0123456789abcdef" for c in value):
        raise AuthorsCheckpointError(f"--git-blob-sha1 {value!r} is not a 40-digit hex git blob id; "
                                     "get it with `git hash-object FILE` or `git ls-tree -r COMMIT`")
    return value


class _Lock:
    """`filelock.FileLock` (a huggingface_hub dependency) that says so when another process holds it."""

    def __init__(self, path: Path, what: str):
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock, self._what = FileLock(str(path)), what

    def __enter__(self):
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            LOGGER.info("Waiting for another process that is %s...", self._what)
            self._lock.acquire()
        return self

    def __exit__(self, *exc_info):
        self._lock.release()


# ---------------------------------------------------------------------------------------------- download
def _download(url: str, partial: Path, label: str) -> None:
    """Stream `url` into `partial`, resuming from what is already there.

    huggingface_hub's `http_get` is used rather than hand-written HTTP: it is the Hub's own resumable streamer
    (Range request from `resume_size`, restart from zero when a server ignores Range and answers 200, up to 5
    resumptions when the connection drops, tqdm bar, size check, `HF_HUB_DOWNLOAD_TIMEOUT`) and works with any
    Range-capable server, GitHub's included. One HEAD request first gives the size and fails fast, once and
    quietly, when nothing answers (http_get would retry a refused connection five times, one second apart).
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import get_session, hf_raise_for_status

    response = get_session().head(url, follow_redirects=True, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    hf_raise_for_status(response)
    size = response.headers.get("Content-Length")
    size = int(size) if size and size.isdigit() and not response.headers.get("Content-Encoding") else None
    resume = partial.stat().st_size if partial.exists() else 0
    if size is not None and resume > size:  # not a prefix of this file: start again
        partial.unlink()
        resume = 0
    from tqdm import tqdm

    LOGGER.info(
        "Downloading the authors' %s (%s) from %s%s", label, tqdm.format_sizeof(size, "B") if size else "size unknown",
        url, f", resuming after {tqdm.format_sizeof(resume, 'B')}" if resume else "",
    )
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("ab") as file:  # append: http_get writes from the current end (and truncates on restart)
        http_get(url, file, resume_size=resume, expected_size=size, displayed_filename=label)


def _download_error(release: AuthorsRelease, url: str, root: Path, error: Exception) -> AuthorsDownloadError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = f"the authors' {release.name} checkpoint from {url}"
    if isinstance(error, OfflineModeIsEnabled):
        return AuthorsDownloadError(
            f"cannot download {where}: HF_HUB_OFFLINE=1 is set and it is not cached in {root}; unset HF_HUB_OFFLINE, "
            f"or run `vip2clip download-authors {release.name} --out DIR` on a machine with network and use that folder"
        )
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return AuthorsDownloadError(
            f"cannot download {where}: the server answered HTTP {error.response.status_code}; check --url "
            f"(default {release.url}), and run the command again to resume"
        )
    return AuthorsDownloadError(
        f"cannot download {where} ({_first_line(error)}); check the network or proxy and run the command again "
        "(a partial download is resumed), or fetch the file yourself and convert it with "
        "`python hub/authors_checkpoint_to_folder.py --checkpoint FILE --clip CLIP --out DIR`"
    )


def fetch_authors_checkpoint(
    name: str,
    url: str | None = None,
    git_blob_sha1: str | None = None,
    cache_dir: str | PathLike | None = None,
) -> Path:
    """The authors' `<name>_train_epoch_10.pth`, downloaded once into the cache and verified; returns its path.

    `url` / `git_blob_sha1` replace the pinned ones (a mirror, a test server). A file whose git blob id differs is
    deleted and `AuthorsChecksumError` raised; an interrupted download stays as `<file>.incomplete` and the next
    call resumes it (HTTP Range). Raises `AuthorsDownloadError` when the file cannot be fetched.
    """
    release = get_release(name)
    url = url or release.url
    expected = _check_blob_id(git_blob_sha1 or release.git_blob_sha1)
    root = authors_cache_dir(cache_dir)
    final = root / "checkpoints" / expected / release.filename  # content-addressed: a mirror shares the file
    if final.is_file() and compute_git_blob_sha1(final) == expected:
        return final
    with _Lock(root / "locks" / f"checkpoint-{expected}.lock", f"downloading {release.filename}"):
        if final.is_file():
            if compute_git_blob_sha1(final) == expected:
                return final
            final.unlink()  # changed on disk since it was verified
        partial = final.with_name(final.name + ".incomplete")
        try:
            _download(url, partial, release.filename)
        except Exception as error:
            if partial.exists() and partial.stat().st_size == 0:
                partial.unlink()
            _remove_empty(final.parent)  # kept only when it holds a partial download to resume
            if not _is_transfer_error(error):
                raise
            # The sentence names the cause; the library's chain of tracebacks would bury it (errors.py).
            raise _download_error(release, url, root, error) from None
        actual = compute_git_blob_sha1(partial)
        if actual != expected:
            size = partial.stat().st_size
            partial.unlink()
            _remove_empty(final.parent)
            raise AuthorsChecksumError(
                f"the file downloaded from {url} ({size:,} bytes) has git blob id {actual}, not the expected "
                f"{expected}: it was deleted and nothing was converted; check --url and --git-blob-sha1 "
                f"(the authors' file: {release.url}, id {release.git_blob_sha1})"
            )
        os.replace(partial, final)
        LOGGER.info("Verified %s (git blob %s).", release.filename, expected)
    return final


def _is_transfer_error(error: Exception) -> bool:
    """Network / HTTP / offline failures (huggingface_hub's errors are OSErrors; httpx's are not)."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore")


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- conversion
def _model_key(blob: str, clip: str | PathLike, image_size: int, feature_layers: Sequence[int], top_k: int) -> str:
    clip_path = Path(clip).expanduser()
    clip_id = f"dir:{clip_path.resolve()}" if clip_path.is_dir() else f"hub:{clip}"
    options = {"format": _CACHE_FORMAT, "checkpoint": blob, "clip": clip_id, "image_size": int(image_size),
               "feature_layers": [int(layer) for layer in feature_layers], "top_k": int(top_k)}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def download_authors_checkpoint(
    name: str,
    clip: str | PathLike = DEFAULT_CLIP,
    image_size: int = 518,
    feature_layers: Sequence[int] = (6, 12, 18, 24),
    top_k: int = 50,
    url: str | None = None,
    git_blob_sha1: str | None = None,
    cache_dir: str | PathLike | None = None,
) -> Path:
    """The authors' `name` checkpoint ("mvtec": trained on MVTec AD, use it on anything else; "visa": trained on
    VisA, use it on MVTec AD) as a converted model folder in the cache; returns the folder.

    The first call downloads and verifies the `.pth` (`fetch_authors_checkpoint`), builds the model from `clip`
    (Hub id or folder) with `weights.authors_checkpoint.model_from_authors_checkpoint` and the size options, and renames
    the finished folder into place; later calls with the same arguments return it at once, without network. Two
    processes doing this at the same time wait for each other (file locks) and share one download.
    """
    release = get_release(name)
    feature_layers = [int(layer) for layer in feature_layers]
    blob = _check_blob_id(git_blob_sha1 or release.git_blob_sha1)
    root = authors_cache_dir(cache_dir)
    folder = f"{release.name}-{_model_key(blob, clip, image_size, feature_layers, top_k)}"
    model_dir = root / "models" / folder
    if (model_dir / "config.json").is_file():  # renamed into place only when complete
        return model_dir
    with _Lock(root / "locks" / f"model-{folder}.lock", f"converting the authors' {release.name} checkpoint"):
        if (model_dir / "config.json").is_file():
            return model_dir
        checkpoint = fetch_authors_checkpoint(name, url=url, git_blob_sha1=blob, cache_dir=root)
        from .authors_checkpoint import model_from_authors_checkpoint

        LOGGER.info("Converting %s with the CLIP %s...", release.filename, clip)
        try:  # staged beside model_dir and renamed into place by the model-folder writer
            model_from_authors_checkpoint(
                checkpoint, clip, model_dir, image_size=image_size, feature_layers=feature_layers, top_k=top_k
            )
        except (ValueError, OSError) as error:
            raise AuthorsConversionError(
                f"cannot build the model from {release.filename} and the CLIP {str(clip)!r} ({_first_line(error)}); "
                f"pass --clip a local CLIP folder or allow Hub access (the paper's CLIP is {DEFAULT_CLIP})"
            ) from None
        LOGGER.info("Cached the converted model in %s.", model_dir)
    return model_dir


def load_authors_model(
    name: str,
    clip: str | PathLike = DEFAULT_CLIP,
    image_size: int = 518,
    feature_layers: Sequence[int] = (6, 12, 18, 24),
    top_k: int = 50,
    url: str | None = None,
    git_blob_sha1: str | None = None,
    cache_dir: str | PathLike | None = None,
    **from_pretrained_kwargs,
):
    """`(model, processor)` for the authors' `name` checkpoint (see `download_authors_checkpoint`); extra keyword
    arguments go to `from_pretrained` (e.g. `dtype=torch.bfloat16`). The model is in eval mode."""
    from ..modeling_vip2clip import ViP2CLIPModel
    from ..processing_vip2clip import ViP2CLIPImageProcessor

    model_dir = download_authors_checkpoint(
        name, clip=clip, image_size=image_size, feature_layers=feature_layers, top_k=top_k, url=url,
        git_blob_sha1=git_blob_sha1, cache_dir=cache_dir,
    )
    model = ViP2CLIPModel.from_pretrained(model_dir, **from_pretrained_kwargs).eval()
    return model, ViP2CLIPImageProcessor.from_pretrained(model_dir)


def from_authors_checkpoint(
    cls,
    name: str,
    clip: str | PathLike = DEFAULT_CLIP,
    image_size: int = 518,
    feature_layers: Sequence[int] = (6, 12, 18, 24),
    top_k: int = 50,
    url: str | None = None,
    git_blob_sha1: str | None = None,
    cache_dir: str | PathLike | None = None,
    **from_pretrained_kwargs,
):
    """`ViP2CLIPModel.from_authors_checkpoint("mvtec")`: the authors' released weights, downloaded once from their
    repository at a pinned commit, verified by git blob id, converted with `clip` and cached (offline afterwards).

    "mvtec" was trained on MVTec AD: use it on anything that is not MVTec AD; "visa" was trained on VisA: use it on
    MVTec AD. The processor is `ViP2CLIPImageProcessor.from_pretrained(download_authors_checkpoint(name, ...))`, or use
    `load_authors_model`, which returns both. Terms: see `modeling_vip2clip.weights.authors_release`.
    """
    model_dir = download_authors_checkpoint(
        name, clip=clip, image_size=image_size, feature_layers=feature_layers, top_k=top_k, url=url,
        git_blob_sha1=git_blob_sha1, cache_dir=cache_dir,
    )
    return cls.from_pretrained(model_dir, **from_pretrained_kwargs).eval()
