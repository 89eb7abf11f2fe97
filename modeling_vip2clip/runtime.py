"""What every entry point shares: the user-error style, logging, distributed set-up and teardown, atomic writes,
the common command-line options and argument types, optional-extra checks, and the one model loader.

The entry points (train, evaluate, predict, calibrate, export, download-authors, the demo, `hub/publish.py`)
import from here and never from each other. Nothing heavy is imported at module level, so `--help` stays fast:
torch, transformers and huggingface_hub are imported inside the functions that need them.

Error style (every entry point): a mistake the user can fix raises :class:`UsageError`; :func:`run_main` prints it
as one line, ``error: <what is wrong with which value>; <the fix>``, on stderr and exits 2 (argparse's
convention), with no traceback unless ``--debug`` or ``VIP2CLIP_DEBUG=1``. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "UsageError",
    "debug_enabled",
    "run_main",
    "entry_point_main",
    "run_job",
    "setup_logging",
    "show_progress_lines",
    "check_distributed_setup",
    "teardown_distributed",
    "atomic_write_text",
    "atomic_write_json",
    "positive_int",
    "non_negative_int",
    "probability",
    "positive_float",
    "add_common_arguments",
    "add_debug_argument",
    "require_extra",
    "looks_like_path",
    "resolve_source",
    "load_model_and_processor",
    "test_pause",
]

logger = logging.getLogger("modeling_vip2clip")


# ---------------------------------------------------------------------------------------------------- errors


class UsageError(Exception):
    """A mistake the user can fix (a bad value, a missing file, an unreachable Hub id, a missing extra).

    The message names the value and says how to fix it: ``"--model ./x: no such folder; pass a model folder …"``.
    """


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """`--debug` on the command line or `VIP2CLIP_DEBUG=1` in the environment: show tracebacks of user errors."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get("VIP2CLIP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run an entry point's `run(args)` with the project's error style (see the module docstring)."""
    try:
        return int(run(args) or 0)
    except UsageError as error:
        if debug_enabled(args):
            traceback.print_exc()
        message = " ".join(str(error).split())  # one line, whatever the message was built from
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def entry_point_main(run: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv=None) -> int:
    """`python -m modeling_vip2clip.X` (and `accelerate launch -m ...`): parse, then :func:`run_main`."""
    return run_main(run, parser.parse_args(argv))


def run_job(work: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Console logging, `work(args)`, and the process group torn down however it ends (train, evaluate, predict
    under `accelerate launch`)."""
    setup_logging()
    try:
        work(args)
    finally:
        teardown_distributed()
    return 0


# ---------------------------------------------------------------------------------------------------- logging


def setup_logging() -> None:
    """Console logging for the entry points: our INFO messages, the libraries' warnings only."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("accelerate", "datasets", "httpx", "httpx2", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # huggingface_hub logs through its own handler *and* propagates: once is enough.
    logging.getLogger("huggingface_hub").propagate = False


def show_progress_lines(name: str = "vip2clip") -> None:
    """Plain progress lines of the logger `name` (and its children) on stderr, once each: its own handler, no
    propagation to the root, whose handler (logging.basicConfig) would print huggingface_hub's lines twice."""
    target = logging.getLogger(name)
    if not target.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        target.addHandler(handler)
    target.setLevel(logging.INFO)
    target.propagate = False


# ---------------------------------------------------------------------------------------------------- distributed


def check_distributed_setup(accelerator) -> None:
    """Refuse a launcher that started several processes that Accelerate does not see as one distributed job.

    E.g. `accelerate launch --multi_gpu` (torchrun) on a machine without GPUs: every process would work alone and
    overwrite the others' outputs. On CPUs set `ACCELERATE_USE_CPU=true` (see docs/training.md).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes == 1:
        raise UsageError(
            f"the launcher started {world_size} processes (WORLD_SIZE={world_size}) but Accelerate runs this one "
            "alone (no GPU found?); for several CPU processes use `ACCELERATE_USE_CPU=true accelerate launch "
            "--multi_gpu --num_processes N -m ...` (or torchrun with ACCELERATE_USE_CPU=1)."
        )


def teardown_distributed() -> None:
    """Destroy the process group of an `accelerate launch` run before the interpreter exits.

    A group left alive at exit lets gloo's threads be destroyed while still joinable: the process then aborts
    ("terminate called without an active exception", SIGABRT) after a run that succeeded, and the launcher reports
    a failure.
    """
    if "torch" not in sys.modules:  # nothing can have started a process group
        return
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- files


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`atomic_write_text` of `data` as indented JSON in its own key order (non-JSON values written with `str`)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------- arguments


def _number_type(kind: type, name: str, check: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number_type(int, "an integer >= 0", lambda v: v >= 0)
probability = _number_type(float, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
positive_float = _number_type(float, "a number > 0", lambda v: v > 0 and v == v and v != float("inf"))


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int = 8,
    output_dir: str | None = None,
    output_help: str = "where the results go",
    num_workers: int | None = 2,
    mixed_precision: bool = True,
) -> argparse.ArgumentParser:
    """The options every data-processing entry point has: --batch-size, --num-workers, --output-dir,
    --mixed-precision, --no-progress and --debug, validated at parse time."""
    group = parser.add_argument_group("run")
    group.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help=f"images per batch and process (default: {batch_size}).")
    workers_default = num_workers if num_workers is not None else "by device and cores: 1 on a CPU, min(8, cores - 1) on a GPU"
    group.add_argument("--num-workers", type=non_negative_int, default=num_workers,
                       help=f"DataLoader worker processes that decode and preprocess (default: {workers_default}).")
    if output_dir is not None:
        group.add_argument("--output-dir", default=output_dir, help=f"{output_help} (default: {output_dir}).")
    if mixed_precision:
        group.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                           help="autocast precision of the forward pass (default: no, fp32 like the reference).")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bars.")
    add_debug_argument(group)
    return parser


def add_debug_argument(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also VIP2CLIP_DEBUG=1).")


def require_extra(module: str, extra: str, why: str) -> None:
    """Fail at the start of a command, not after its work, when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{why} needs the Python package {module!r}, which is not installed; install it with "
                         f"pip install \"vip2clip[{extra}]\"")


# ---------------------------------------------------------------------------------------------------- sources


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
            raise UsageError(f"{flag} {repo_id}: HF_HUB_OFFLINE=1 and this {repo_type} is not in the local cache; "
                             "unset HF_HUB_OFFLINE to download it, or pass a local folder.")
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
        raise UsageError(f"{flag} {repo_id}: no such {repo_type} on the Hub (or it is private); check the id, "
                         "log in with `hf auth login`, or pass a local folder.") from None
    except Exception as error:  # noqa: BLE001 - network trouble of any kind: the cache is the way out
        if cached:
            logger.warning("the Hub is unreachable (%s): using the cached copy of %s", _hub_error_reason(error), repo_id)
            return _cached_copy(repo_id, repo_type)
        raise UsageError(f"{flag} {repo_id}: cannot reach the Hub ({_hub_error_reason(error)}) and it is not in "
                         "the local cache; connect to the network, pass a local folder, or set HF_HUB_OFFLINE=1 "
                         "once a copy is cached.") from None
    return repo_id


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


# ---------------------------------------------------------------------------------------------------- model


def load_model_and_processor(source: str, device=None, dtype=None, flag: str = "--model"):
    """The one loader of every entry point: `(model, processor)` for a model folder or Hub id, in eval mode.

    * `source` is checked first (:func:`resolve_source`): a missing path or an unreachable id fails at once.
    * A folder written by `vip2clip export` loads as `exported_model.ExportedViP2CLIPModel` (ONNX Runtime or
      OpenVINO, no PyTorch in its forward), with the same `model(pixel_values=...)` outputs.
    * The model is the package's `ViP2CLIPModel` (no remote code runs), `dtype` (default fp32) through the standard
      `from_pretrained(dtype=...)` (the heads stay fp32). A folder whose weights do not fit its config is refused.
    * The processor is the folder's `preprocessor_config.json`, else `ViP2CLIPProcessor.for_model(config)`; one
      whose input size differs from the model's is refused (the folder mixes two models).
    """
    resolved = resolve_source(source, flag)  # before the heavy imports: a bad value fails in a second
    from .exported_runtime import is_exported_folder

    if is_exported_folder(resolved):  # `vip2clip export` output: ONNX Runtime / OpenVINO behind the same interface
        from .exported_model import load_exported

        return load_exported(resolved, device=device, dtype=dtype)
    import torch

    from .modeling_vip2clip import ViP2CLIPModel
    from .processing_vip2clip import ViP2CLIPProcessor

    try:
        model = ViP2CLIPModel.from_pretrained(resolved, dtype=dtype or torch.float32)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {source}: cannot be loaded as a ViP2-CLIP model ({_hub_error_reason(error)}); "
                         "re-save or re-convert it.") from error
    model.eval()
    if device is not None:
        model.to(device)
    processor = None
    try:
        processor = ViP2CLIPProcessor.from_pretrained(resolved)
    except (OSError, ValueError):
        processor = ViP2CLIPProcessor.for_model(model.config)
    if int(processor.image_size) != int(model.config.image_size):
        raise UsageError(f"{flag} {source}: its preprocessor_config.json has image_size {processor.image_size} but "
                         f"the model takes {model.config.image_size}; re-save the processor with "
                         f"ViP2CLIPProcessor.for_model(model.config).save_pretrained(...).")
    return model, processor


# ---------------------------------------------------------------------------------------------------- tests


def test_pause(variable: str, at: int) -> None:
    """TEST-ONLY hook (tests/test_interruptions.py), a no-op unless `variable` is set in the environment.

    With `variable="N:SECONDS"`, print one line to stderr and sleep SECONDS when `at == N`, so that a test can
    SIGKILL the process at that exact point. Variables: VIP2CLIP_TEST_PAUSE_AFTER_STEP (train: after optimiser
    step N), VIP2CLIP_TEST_PAUSE_IN_CHECKPOINT (train: while epoch_N.tmp is written, before its rename),
    VIP2CLIP_TEST_PAUSE_AFTER_BATCH (evaluate / predict: after batch N's results are written).
    """
    spec = os.environ.get(variable)
    if not spec:
        return
    target, _, seconds = spec.partition(":")
    if int(target) == int(at):
        print(f"[test hook] {variable}: pausing {seconds} s at {at}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 0))


test_pause.__test__ = False  # not a pytest test
