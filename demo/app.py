"""ViP²-CLIP zero-shot anomaly detection — Gradio demo (local checkout or Hugging Face Space).

    python demo/app.py                               # the authors' released weights (mvtec), fetched once
    python demo/app.py --authors visa                # the authors' VisA-trained weights (for MVTec AD images)
    python demo/app.py --model DIR_OR_HUB_ID         # your own model folder (e.g. from `vip2clip download-authors`)
                       [--dtype auto|fp32|bf16] [--host 127.0.0.1] [--port 7860]

Upload, paste or pick one image (or a batch): the page shows the anomaly score with a verdict at an adjustable
threshold, the anomaly map over the image with its colour scale, the binary defect mask and a gallery for batches.

Without `--model` the app serves the authors' released ViP²-CLIP weights (GitHub kim0806/ViP2-CLIP, pinned commit,
verified by git blob id; `modeling_vip2clip.weights.authors_release`): downloaded and converted on the first start
(progress in the terminal), cached in $HF_HOME/vip2clip/authors afterwards. Only when that cannot happen (no
network and nothing cached) does it serve an UNTRAINED model built from a small config — its scores are
meaningless — and say why, in the terminal and on the page, with the command that fixes it. A `--model` that
cannot be loaded is an error (exit 2), never a silent fallback. See demo/README.md.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home from the server

HERE = Path(__file__).resolve().parent

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
AUTHORS_NAMES = ("mvtec", "visa")
DTYPE_CHOICES = ("auto", "fp32", "bf16")


# ---------------------------------------------------------------------------------------------- command line
# Standard library only: a wrong --model is refused before the import of gradio and torch (10-20 s on a small CPU).
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, metavar="DIR_OR_HUB_ID",
        help="a ViP²-CLIP model folder or Hub id; it must load, or the app exits (default: the authors' weights)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=os.environ.get("VIP2CLIP_DTYPE", "auto"),
        help="precision of the CLIP towers: auto (default) = bf16 on CPUs with native bf16 (about 2x faster, scores "
             "within ~0.003 of fp32), else fp32, the exact model",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also VIP2CLIP_DEBUG=1)")
    authors = parser.add_argument_group(
        "the authors' weights (served when --model is not given; environment variables in brackets)")
    authors.add_argument(
        "--authors", choices=AUTHORS_NAMES, default=os.environ.get("VIP2CLIP_AUTHORS", "mvtec"),
        help="mvtec (default): trained on MVTec AD, for anything that is not MVTec AD; visa: trained on VisA, for "
             "MVTec AD [VIP2CLIP_AUTHORS]",
    )
    authors.add_argument("--authors-url", default=os.environ.get("VIP2CLIP_AUTHORS_URL"), metavar="URL",
                         help="fetch the file from this URL instead of the pinned GitHub one [VIP2CLIP_AUTHORS_URL]")
    authors.add_argument("--authors-git-blob-sha1", default=os.environ.get("VIP2CLIP_AUTHORS_GIT_BLOB_SHA1"),
                         metavar="HEX", help="git blob id that file must have [VIP2CLIP_AUTHORS_GIT_BLOB_SHA1]")
    authors.add_argument("--clip", default=os.environ.get("VIP2CLIP_CLIP", DEFAULT_CLIP), metavar="ID_OR_DIR",
                         help=f"CLIP to combine them with (default {DEFAULT_CLIP}) [VIP2CLIP_CLIP]")
    authors.add_argument("--image-size", type=int, default=518, metavar="N", help="input size (default 518)")
    authors.add_argument("--feature-layers", type=int, nargs="+", default=[6, 12, 18, 24], metavar="L",
                         help="scored CLIP blocks (default 6 12 18 24)")
    authors.add_argument("--top-k", type=int, default=50, metavar="K", help="patches per layer (default 50)")
    return parser


def model_argument_problem(model: str) -> str | None:
    """Why a `--model` naming a local path cannot be loaded (missing, or a folder without config.json), from the
    package's own check (`resolve.resolve_source`); None for a usable folder or a Hub id (checked when loading),
    and where the package is absent (a Space with demo/ alone: loading reports it)."""
    try:
        from modeling_vip2clip.errors import UsageError
        from modeling_vip2clip.resolve import looks_like_path, resolve_source
    except ImportError:
        return None
    if not (looks_like_path(model) or Path(model).expanduser().exists()):
        return None
    try:
        resolve_source(model, "--model")
    except UsageError as error:
        return str(error)
    return None


if __name__ == "__main__":  # refuse a bad --model now, before the slow imports below
    _model = build_parser().parse_args().model
    if _model and (_problem := model_argument_problem(_model)):
        print(f"error: {_problem}", file=sys.stderr)
        sys.exit(2)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402



def _package_errors() -> tuple[type[BaseException], ...]:
    """The package's `UsageError` (its message already says what is wrong and how to fix it); none on a Space
    holding demo/ alone, where nothing raises it."""
    try:
        from modeling_vip2clip.errors import UsageError
    except ImportError:
        return ()
    return (UsageError,)


PACKAGE_ERRORS = _package_errors()


LOGGER = logging.getLogger("vip2clip.demo")

EXAMPLES_DIR = HERE / "examples"
MAX_PIXELS = 40_000_000  # per image (e.g. 6300 × 6300); PIL refuses to decode more (decompression bombs)
MAX_FILE_SIZE = "20mb"  # per uploaded file
MAX_BATCH = 16  # images per run
DISPLAY_SIDE = 1024  # images larger than this are shown (not scored) downscaled
STATE_TTL_S = 15 * 60  # a session's last results (kept for re-thresholding) are dropped after this long unused
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _esc(text: str) -> str:
    """Escape user-controlled text (file names, error messages) for Markdown / HTML toasts."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("`", "'")


def _code(text: str) -> str:
    """Text for a Markdown code span (rendered literally, so only backticks need removing)."""
    return "`" + str(text).replace("`", "'") + "`"


class ImageInputError(ValueError):
    """An input the app cannot use; its message is shown to the user as is."""


# ---------------------------------------------------------------------------------------------- server memory
class MemoryReleaser:
    """Give memory freed by a run back to the OS (glibc only; the server enables it in `main`).

    glibc keeps the image buffers freed by a run in per-thread malloc arenas (up to 8 per core), so after a burst
    of concurrent requests the server's RSS stayed ~20 % above its idle level and rose with each burst. This
    caps the arenas at 2 (unless MALLOC_ARENA_MAX is set) and calls `malloc_trim(0)` once the server has been idle
    for `delay` s after a run (after Gradio has encoded the outputs).
    """

    def __init__(self, delay: float = 2.0):
        import ctypes

        self._libc = ctypes.CDLL("libc.so.6")  # OSError where the C library is not glibc
        self._libc.malloc_trim.argtypes = [ctypes.c_size_t]
        if "MALLOC_ARENA_MAX" not in os.environ and "arena_max" not in os.environ.get("GLIBC_TUNABLES", ""):
            self._libc.mallopt(-8, 2)  # M_ARENA_MAX
        self.delay = delay
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def schedule(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay, self._libc.malloc_trim, args=(0,))
            self._timer.daemon = True
            self._timer.start()


_MEMORY_RELEASER: MemoryReleaser | None = None


def enable_memory_release() -> bool:
    global _MEMORY_RELEASER
    try:
        _MEMORY_RELEASER = MemoryReleaser()
    except (OSError, AttributeError):  # not glibc: nothing to do
        return False
    return True


def release_memory_soon() -> None:
    if _MEMORY_RELEASER is not None:
        _MEMORY_RELEASER.schedule()


# ---------------------------------------------------------------------------------------------- model loading
def build_untrained_model(seed: int = 0):
    """The package's tiny random ViP²-CLIP (`testing_utils.tiny_vip2clip_model`, 32 px) for trying the interface:
    its scores and maps are MEANINGLESS. Returns `(model, processor)`."""
    from modeling_vip2clip.testing_utils import tiny_vip2clip_model

    model, processor = tiny_vip2clip_model(seed)
    processor.max_image_pixels = MAX_PIXELS
    return model, processor


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux); elsewhere False. oneDNN also runs bf16 on plain
    AVX-512 by converting, which is no faster than fp32, so only native support counts."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(choice: str) -> str:
    """`--dtype`: "fp32" (the exact model), "bf16" (about 2× faster on CPUs with native bf16; scores within
    ~0.003 of fp32, maps correlating ≥ 0.999 — benchmarks/README.md) or "auto" = bf16 where the CPU has
    native bf16, else fp32."""
    if choice not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be auto, fp32 or bf16; got {choice!r}.")
    if choice == "auto":
        return "bf16" if _cpu_has_native_bf16() else "fp32"
    return choice


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    source: str  # what was asked for: a folder / Hub id, or the authors' file name
    trained: bool
    error: str | None = None  # why the trained weights are unavailable (fallback only)
    via: str = ""  # "package", "remote code" or "untrained fallback"
    dtype: str = "fp32"  # of the CLIP towers; the heads stay fp32
    authors: Any = None  # the `AuthorsRelease` served, if any
    authors_from: str = ""  # where its file came from (the pinned URL or --authors-url)
    authors_blob: str = ""  # the git blob id it was verified against
    clip: str = ""  # the CLIP the authors' heads were combined with
    fix: str = ""  # the commands that give real weights (fallback only)


class ModelLoadError(Exception):
    """`--model` cannot be loaded; the message says why and what to pass instead (one line)."""


def _load_requested(model_id: str, dtype: str = "fp32"):
    """The requested checkpoint: through the package's one loader (`weights.loader.load_model_and_processor`: the source
    checked first, no remote code executed) when the package is importable, else through transformers' remote code
    (a Space holding demo/ alone). `dtype` is the standard `from_pretrained(dtype=...)`: bf16 converts the CLIP
    towers and keeps the heads fp32."""
    try:
        from modeling_vip2clip.weights.loader import load_model_and_processor
    except ImportError:
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=DTYPES[dtype])
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
        return model, processor, "remote code"
    model, processor = load_model_and_processor(model_id, dtype=DTYPES[dtype])
    return model, processor, "package"


def _one_line(error: BaseException) -> str:
    reason = " ".join(f"{type(error).__name__}: {error}".split())
    return reason.split(". ")[0][:240]  # the first sentence says it


def load_model(model_id: str, dtype: str = "fp32") -> LoadedModel:
    """Load `model_id` (folder or Hub id) in `dtype` ("fp32", "bf16" or "auto", see `resolve_dtype`), or raise
    `ModelLoadError`: a model the user named is served or refused, never replaced."""
    dtype = resolve_dtype(dtype)
    print(f"Loading model '{model_id}'...", flush=True)
    try:
        model, processor, via = _load_requested(model_id, dtype)
    except PACKAGE_ERRORS as error:  # the package's loader says what is wrong and how to fix it
        raise ModelLoadError(str(error)) from error
    except Exception as error:  # remote code: offline, missing repo, not a ViP²-CLIP folder, ...
        raise ModelLoadError(
            f"--model {model_id} cannot be loaded ({_one_line(error)}); pass a ViP²-CLIP model folder or a reachable "
            "Hub id, or omit --model to serve the authors' weights"
        ) from error
    model.eval()
    processor.max_image_pixels = MAX_PIXELS
    print(f"Loaded '{model_id}' ({via}, {dtype}): input {model.config.image_size} px.", flush=True)
    return LoadedModel(model, processor, model_id, trained=True, via=via, dtype=dtype)


def fix_commands(authors: str = "mvtec") -> str:
    return (f"vip2clip download-authors {authors} --out vip2clip-{authors}   # where the network is\n"
            f"python demo/app.py --model vip2clip-{authors}")


def untrained_fallback(reason: str, source: str, fix: str) -> LoadedModel:
    """The labelled untrained model (or none, without the package), after saying why in the terminal."""
    print(
        f"WARNING: the trained weights ({source}) are unavailable: {reason}\n"
        "WARNING: serving an UNTRAINED model built from a small local config instead: its scores and maps are "
        f"MEANINGLESS. For real results:\n    " + fix.replace("\n", "\n    "),
        flush=True,
    )
    try:
        model, processor = build_untrained_model()
    except ImportError:
        print("ERROR: the fallback needs the vip2clip package as well; no model is served.", flush=True)
        return LoadedModel(None, None, source, trained=False, error=reason, fix=fix)
    return LoadedModel(model, processor, source, trained=False, error=reason, via="untrained fallback", fix=fix)


def load_authors_weights(
    name: str = "mvtec",
    dtype: str = "fp32",
    clip: str = DEFAULT_CLIP,
    url: str | None = None,
    git_blob_sha1: str | None = None,
    image_size: int = 518,
    feature_layers: tuple[int, ...] | list[int] = (6, 12, 18, 24),
    top_k: int = 50,
) -> LoadedModel:
    """The default: the authors' released `name` weights, downloaded, verified, converted and cached on the first
    start (`modeling_vip2clip.weights.authors_release`), from the cache afterwards; the labelled untrained fallback only
    when that cannot happen."""
    source = f"the authors' {name}_train_epoch_10.pth"
    try:
        from modeling_vip2clip.weights.authors_release import AuthorsCheckpointError, download_authors_checkpoint, get_release
    except ImportError as error:  # a Space holding demo/ alone
        return untrained_fallback(
            f"the vip2clip package, which fetches and converts them, is not importable here ({_one_line(error)})",
            source, "copy modeling_vip2clip/ next to app.py (demo/README.md, 'As a Space'), or pass --model DIR",
        )
    release = get_release(name)
    print(f"No --model given: serving the authors' {release.filename} ({release.summary}).", flush=True)
    try:
        model_dir = download_authors_checkpoint(
            name, clip=clip, image_size=image_size, feature_layers=feature_layers, top_k=top_k, url=url,
            git_blob_sha1=git_blob_sha1,
        )
        loaded = load_model(str(model_dir), dtype)
    except (AuthorsCheckpointError, ModelLoadError) as error:
        fix = fix_commands(name)
        if "HF_HUB_OFFLINE" in str(error):
            fix = f"unset HF_HUB_OFFLINE and restart: python demo/app.py\n{fix}"
        return untrained_fallback(str(error), source, fix)
    loaded.source, loaded.authors, loaded.clip = release.filename, release, str(clip)
    loaded.authors_from, loaded.authors_blob = url or release.url, (git_blob_sha1 or release.git_blob_sha1).lower()
    return loaded


# ---------------------------------------------------------------------------------------------- inputs
def _display_name(path: str | Path) -> str:
    return Path(str(path)).name or "image"


def open_image(path: str | Path, name: str | None = None) -> Image.Image:
    """Open and fully decode an image file (the package's one reader), or raise `ImageInputError` naming it."""
    name = name or _display_name(path)
    try:
        from modeling_vip2clip.data.images import ImageReadError, read_image
    except ImportError:  # demo/ alone, as a Space without the package: PIL's own checks (MAX_IMAGE_PIXELS) only
        try:
            with Image.open(path) as handle:
                handle.load()
                return handle.copy()
        except Exception as error:  # noqa: BLE001 - shown to the user, never a crash
            raise ImageInputError(f"{name}: cannot be read ({error}).") from None
    try:
        return read_image(Path(path), what=name, max_pixels=MAX_PIXELS)
    except ImageReadError as error:
        raise ImageInputError(str(error)) from None


# ---------------------------------------------------------------------------------------------- the demo
@dataclass
class Result:
    name: str
    image: Image.Image  # RGB, shown at most DISPLAY_SIDE px on its long side
    score: float
    anomaly_map: np.ndarray  # (h, w) float32 in [0, 1], the displayed image's size
    size: tuple[int, int]  # original (width, height)
    k_shot: int = 0  # reference images behind the map (0: zero-shot)


@dataclass
class AnomalyDemo:
    """The app's logic, callable without a browser (the tests use it directly)."""

    loaded: LoadedModel
    notes: list[str] = field(default_factory=list)
    # Few-shot: the last reference bank, keyed by its files' contents, so re-running with the same references
    # does not re-encode them (docs/few_shot.md).
    _bank_key: tuple | None = field(default=None, repr=False)
    _bank: Any = field(default=None, repr=False)

    def reference_bank(self, paths: list[str]):
        """A `ViP2CLIPReferenceBank` of the uploaded normal images (None without any), or `ImageInputError`."""
        if not paths:
            return None
        import hashlib

        key = tuple(hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest() for path in paths)
        if key != self._bank_key:
            from modeling_vip2clip.engine.references import bank_from_images

            images = [self.prepare(path) for path in paths]
            self._bank = bank_from_images(self.loaded.model, self.loaded.processor, images)
            self._bank_key = key
        return self._bank

    # -------------------------------------------------------------- inference
    def prepare(self, path: str | Path, name: str | None = None) -> Image.Image:
        """File → RGB image at its own size (EXIF orientation applied, 16-bit converted) or `ImageInputError`."""
        name = name or _display_name(path)
        image = open_image(path, name)
        try:
            return self.loaded.processor.to_pil(image, what=name)
        except (ValueError, TypeError) as error:
            raise ImageInputError(str(error)) from None

    def predict(self, image: Image.Image, map_size: tuple[int, int] | None = None, bank=None) -> tuple[float, np.ndarray]:
        """RGB image → (score, anomaly map) with the map at `map_size` (width, height), default the image's size;
        with `bank`, the few-shot (WinCLIP+-fused) score and map."""
        processor, model = self.loaded.processor, self.loaded.model
        width, height = map_size or image.size
        with torch.inference_mode():
            inputs = processor(images=[image])
            extra = {} if bank is None else {"reference_bank": bank}
            outputs = model(pixel_values=inputs["pixel_values"], **extra)
            anomaly_map = processor.post_process_anomaly_maps(outputs, target_sizes=[(height, width)])[0]
        return float(outputs.anomaly_score[0]), anomaly_map.numpy().astype(np.float32)

    def run_one(self, path: str | Path, name: str | None = None, bank=None) -> Result:
        name = name or _display_name(path)
        image = self.prepare(path, name)
        size = image.size
        shown = image
        if max(size) > DISPLAY_SIDE:  # the model sees S×S anyway; show (and map) a downscaled copy
            shown = image.copy()
            shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
        score, anomaly_map = self.predict(image, map_size=shown.size, bank=bank)
        return Result(name, shown, score, anomaly_map, size, 0 if bank is None else bank.num_images)

    # -------------------------------------------------------------- event handlers
    def analyze(self, image_path, files, score_threshold: float = 0.5, mask_threshold: float = 0.5, references=None,
                progress=gr.Progress()):
        """Gradio handler: single image and/or a batch (and optional normal reference images: few-shot) →
        (summary, overlay, mask, gallery, state)."""
        if self.loaded.model is None:
            message = "No model is loaded (see the note at the top of the page)."
            gr.Warning(message)
            return self.render([], [message], score_threshold, mask_threshold)
        sources: list[str] = []
        if image_path:
            sources.append(str(image_path))
        for item in files or []:
            sources.append(str(getattr(item, "path", None) or getattr(item, "name", None) or item))
        problems: list[str] = []
        if not sources:
            message = "Upload, paste or pick an example image first."
            gr.Warning(message)
            return self.render([], [message], score_threshold, mask_threshold)
        if len(sources) > MAX_BATCH:
            problems.append(f"{len(sources)} images given; only the first {MAX_BATCH} are scored.")
            sources = sources[:MAX_BATCH]
        reference_paths = [str(getattr(item, "path", None) or getattr(item, "name", None) or item)
                           for item in references or []][:MAX_BATCH]
        bank = None
        if reference_paths:
            progress((0, len(sources)), desc=f"Encoding {len(reference_paths)} reference image(s)", unit="images")
            try:
                bank = self.reference_bank(reference_paths)
            except ImageInputError as error:
                problems.append(f"reference image {error} — scored zero-shot instead.")
            except PACKAGE_ERRORS as error:  # e.g. an exported (ONNX / OpenVINO) model: no reference bank
                problems.append(f"{error} Scored zero-shot instead.")
        results: list[Result] = []
        for index, path in enumerate(sources):
            name = _display_name(path)
            progress((index, len(sources)), desc=f"Scoring {name}", unit="images")
            try:
                results.append(self.run_one(path, name, bank=bank))
            except ImageInputError as error:
                problems.append(str(error))
            except Exception as error:  # never show a stack trace: log it, tell the user what failed
                LOGGER.error("scoring %s failed:\n%s", name, traceback.format_exc())
                problems.append(f"{name}: could not be scored ({type(error).__name__}); the server log has details.")
        progress((len(sources), len(sources)), desc="Done", unit="images")
        for problem in problems:
            gr.Warning(_esc(problem))
        release_memory_soon()
        return self.render(results, problems, score_threshold, mask_threshold)

    def rethreshold(self, state, score_threshold: float, mask_threshold: float):
        """Re-apply new thresholds to the last results without running the model again."""
        if not state:  # nothing run yet in this session, or its results expired (STATE_TTL_S): leave the page as is
            gr.Info(f"No results to re-threshold: press Detect anomalies (results are kept {STATE_TTL_S // 60} min).")
            return tuple(gr.skip() for _ in range(5))
        results, problems = state
        return self.render(results, problems, score_threshold, mask_threshold)

    # -------------------------------------------------------------- rendering
    def render(self, results: list[Result], problems: list[str], score_threshold: float, mask_threshold: float):
        score_threshold, mask_threshold = float(score_threshold), float(mask_threshold)
        processor = self.loaded.processor
        lines = []
        if not self.loaded.trained:
            lines.append("> ⚠️ **Untrained fallback model — these scores are MEANINGLESS.**\n")
        if results:
            first = results[0]
            lines.append(f"### {_esc(first.name)}: {self.verdict(first.score, score_threshold)}")
            lines.append("")
            lines.append("| image | size | anomaly score | verdict |")
            lines.append("| --- | --- | ---: | --- |")
            for result in results:
                verdict = "**anomalous**" if result.score >= score_threshold else "normal"
                lines.append(
                    f"| {_esc(result.name)} | {result.size[0]}×{result.size[1]} | {result.score:.3f} | {verdict} |"
                )
            k = first.k_shot
            mode = (f"**{k}-shot**: zero-shot fused with the nearest of {k} normal reference image(s) (WinCLIP+)"
                    if k else "**zero-shot** (no reference images)")
            lines.append(f"\nMaps: {mode}. Score threshold {score_threshold:.2f}; mask threshold {mask_threshold:.2f}.")
        if problems:
            lines.append("\n**Not scored:**")
            lines.extend(f"- {_esc(problem)}" for problem in problems)
        summary = "\n".join(lines) if lines else ""

        overlay = annotated = None
        gallery = []
        for index, result in enumerate(results):
            heat = processor.overlay(result.image, result.anomaly_map, alpha=0.5)
            verdict = "ANOMALOUS" if result.score >= score_threshold else "normal"
            gallery.append((heat, f"{result.name}: {result.score:.3f} ({verdict})"))
            if index == 0:
                overlay = heat
                mask = (result.anomaly_map >= mask_threshold).astype(np.float32)
                annotated = (result.image, [(mask, f"defect (map ≥ {mask_threshold:.2f})")])
        return summary, overlay, annotated, gallery, (results, problems)

    def default_thresholds(self) -> tuple[float, float]:
        """The sliders' start: the model's calibrated thresholds (`vip2clip calibrate`), else 0.5."""
        config = getattr(self.loaded.model, "config", None)
        if config is None:  # no model served
            return 0.5, 0.5
        return config.resolve_threshold("image")[0], config.resolve_threshold("pixel")[0]

    @staticmethod
    def verdict(score: float, threshold: float) -> str:
        if score >= threshold:
            return f"anomaly score {score:.3f} ≥ {threshold:.2f} → **ANOMALOUS**"
        return f"anomaly score {score:.3f} < {threshold:.2f} → **normal**"

    # -------------------------------------------------------------- page
    def status_markdown(self) -> str:
        loaded = self.loaded
        calibrate = "Scores are relative: calibrate the threshold on a few normal images of your domain."
        if loaded.trained and loaded.authors is not None:
            release = loaded.authors
            return (
                f"Model: the authors' released ViP²-CLIP weights {_code(release.filename)} — trained on "
                f"{release.trained_on}, so use it on {_esc(release.use_on)} — downloaded from "
                f"{_esc(loaded.authors_from)} (verified: git blob {_code(loaded.authors_blob[:12])}), combined with "
                f"the CLIP {_code(loaded.clip)} ({loaded.via}, {loaded.dtype}). The weights are the authors' "
                f"(not redistributed by this project); {_esc(release.terms)}. Paper: "
                "[arXiv 2505.17692](https://arxiv.org/abs/2505.17692). " + calibrate
            )
        if loaded.trained:
            return f"Model: {_code(loaded.source)} (loaded via {loaded.via}, {loaded.dtype}). " + calibrate
        how = f"**For meaningful results:**\n\n```\n{loaded.fix}\n```"
        if loaded.model is None:
            return (
                f"⚠️ **The trained weights ({_esc(loaded.source)}) are unavailable**: {_esc(loaded.error or '')}\n\n"
                f"No fallback model could be built either (it needs the vip2clip package).\n\n{how}"
            )
        return (
            f"⚠️ **The trained weights ({_esc(loaded.source)}) are unavailable**: {_esc(loaded.error or '')}\n\n"
            "This page runs an **UNTRAINED model built locally from a small config: its scores and maps are "
            "MEANINGLESS.** It is here only so that the interface can be tried.\n\n" + how
        )

    def colour_scale_html(self) -> str:
        """The overlay's colour scale, 0 … 1, as a CSS gradient: the colours of `colour_scale`, the scale that
        `vip2clip predict` draws under its overlays (`annotate_overlay`), on the fixed [0, 1] range they use."""
        from modeling_vip2clip.processing_vip2clip import colour_scale

        if self.loaded.processor is None:
            return ""
        side = 101  # column i holds the value i / 100
        row = colour_scale(side)
        columns = [round(i * (side - 1) / 10) for i in range(11)]  # every 0.1
        stops = ", ".join(f"rgb({r},{g},{b}) {10 * i}%" for i, (r, g, b) in enumerate(row[columns]))
        ticks = "".join(f"<span>{value}</span>" for value in ("0", "0.25", "0.5", "0.75", "1"))
        return (
            '<div class="colour-scale" title="anomaly map value">'
            f'<div class="colour-bar" style="background: linear-gradient(to right, {stops});"></div>'
            f'<div class="colour-ticks">{ticks}</div>'
            '<div class="colour-caption">anomaly map: 0 = normal … 1 = anomalous (fixed scale for every image)</div>'
            "</div>"
        )


class SafeImage(gr.Image):
    """`gr.Image` input that hands the raw uploaded file to the handler instead of decoding it in Gradio, so a
    corrupt or non-image file gets the app's own readable message (and 16-bit data is not clipped)."""

    is_template = True  # same front-end as gr.Image

    def preprocess(self, payload):
        if payload is None:
            return None
        if getattr(payload, "path", None) and not str(getattr(payload, "url", "") or "").startswith("data:"):
            return str(payload.path)
        try:
            return super().preprocess(payload)
        except Exception:  # an undecodable pasted image: let the handler report it
            return None


CSS = """
#verdict h3 { margin-top: 0; }
.colour-bar { height: 12px; border-radius: 3px; }
.colour-ticks { display: flex; justify-content: space-between; font-size: 0.8em; }
.colour-caption { font-size: 0.8em; opacity: 0.8; }
"""


def build_demo(app: AnomalyDemo) -> gr.Blocks:
    examples = sorted(EXAMPLES_DIR.glob("*.png"))
    with gr.Blocks(title="ViP²-CLIP zero-shot anomaly detection") as demo:
        gr.Markdown(
            "# ViP²-CLIP — zero-shot anomaly detection\n"
            "Upload, paste or pick an image of *any* object or texture (no class names, no reference images needed): "
            "the model returns an anomaly score in [0, 1] and a map of where the defect is "
            "([paper](https://arxiv.org/abs/2505.17692)). Optionally add a few images of *good* parts: the maps then "
            "also compare each patch with its nearest normal patch (few-shot)."
        )
        gr.Markdown(app.status_markdown(), elem_id="model-status")
        # The last results, for re-thresholding. Gradio keeps a session's state until it expires, and API clients
        # never close their session: without a time to live every client's last batch stayed in memory for good.
        state = gr.State(time_to_live=STATE_TTL_S)
        with gr.Row():
            with gr.Column(scale=1):
                image_input = SafeImage(
                    label="Image (upload or paste)", type="filepath", image_mode=None,
                    sources=["upload", "clipboard"], elem_id="input-image", height=320,
                )
                files_input = gr.File(
                    label="…or a batch of images", file_count="multiple", elem_id="input-files", height=120,
                )
                image_default, pixel_default = app.default_thresholds()
                score_threshold = gr.Slider(0.0, 1.0, value=image_default, step=0.01, label="Score threshold (verdict)")
                mask_threshold = gr.Slider(0.0, 1.0, value=pixel_default, step=0.01, label="Map threshold (defect mask)")
                references_input = gr.File(
                    label="Reference normal images (optional: few-shot maps)", file_count="multiple",
                    elem_id="input-references", height=100,
                )
                run = gr.Button("Detect anomalies", variant="primary", elem_id="run-button")
                if examples:
                    gr.Examples(
                        examples=[[str(path)] for path in examples], inputs=[image_input],
                        label="Synthetic examples (CC0, made by this project)",
                    )
            with gr.Column(scale=2):
                summary = gr.Markdown(elem_id="verdict")
                with gr.Row():
                    with gr.Column():
                        overlay = gr.Image(
                            label="Anomaly map over the image", type="pil", format="png", elem_id="overlay",
                            interactive=False, height=340,
                        )
                        gr.HTML(app.colour_scale_html(), elem_id="colour-scale")
                    mask = gr.AnnotatedImage(label="Defect mask", elem_id="mask", format="png", height=340)
                gallery = gr.Gallery(
                    label="All images (batch)", columns=6, height=260, object_fit="contain", elem_id="gallery",
                    fit_columns=False, preview=False,
                    format="png",
                )
        outputs = [summary, overlay, mask, gallery, state]
        run.click(
            app.analyze, inputs=[image_input, files_input, score_threshold, mask_threshold, references_input],
            outputs=outputs,
            api_name="detect",
        )
        for slider in (score_threshold, mask_threshold):
            slider.release(
                app.rethreshold, inputs=[state, score_threshold, mask_threshold], outputs=outputs,
                api_name=False, show_progress="hidden",
            )
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def configure_logging() -> None:
    """The app's and the package's progress lines ("vip2clip.*") on stderr, once each (`console.show_progress_lines`:
    huggingface_hub's logger has its own handler and also propagates, so a root handler printed every Hub warning and
    retry twice)."""
    from modeling_vip2clip.console import show_progress_lines

    show_progress_lines("vip2clip")


def main(argv: list[str] | None = None) -> int:
    """`_serve` inside the package's error boundary (docs/reliability.md): one `error:` line for expected faults."""
    from modeling_vip2clip.cli.boundary import guarded

    args = build_parser().parse_args(argv)
    return guarded(lambda: _serve(args), debug=bool(args.debug) or None)


def _serve(args) -> int:
    configure_logging()
    enable_memory_release()
    if args.model:
        try:
            loaded = load_model(args.model, args.dtype)
        except ModelLoadError as error:
            if args.debug or os.environ.get("VIP2CLIP_DEBUG", "") not in ("", "0"):
                traceback.print_exc()
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
    else:
        loaded = load_authors_weights(
            args.authors, args.dtype, clip=args.clip, url=args.authors_url, git_blob_sha1=args.authors_git_blob_sha1,
            image_size=args.image_size, feature_layers=args.feature_layers, top_k=args.top_k,
        )
    from modeling_vip2clip.gradio_cache import make_gradio_cache_writes_atomic

    make_gradio_cache_writes_atomic()  # identical concurrent results must not rewrite a file being served
    app = AnomalyDemo(loaded)
    demo = build_demo(app)
    theme = gr.themes.Default(
        primary_hue="orange", font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # system fonts: the page makes no third-party font requests
    demo.launch(
        server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(EXAMPLES_DIR)], show_error=False, ssr_mode=False, theme=theme, css=CSS,
        footer_links=["api"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
