"""The one model-folder writer: every model folder the package writes is a complete Hugging Face Hub folder.

Used by the authors'-checkpoint converter, `vip2clip download-authors`, `train`, `calibrate` and `hub/publish.py`.
A folder it writes holds

* `config.json` with `auto_map` for `AutoConfig`, `AutoModel`, `AutoImageProcessor` and `AutoProcessor`, and
  `custom_pipelines` for the `anomaly-detection` task — so that, in a process that never imported this package,
  `pipeline("anomaly-detection", model=FOLDER, trust_remote_code=True)`, `AutoModel`, `AutoImageProcessor` and
  `AutoProcessor` all load it; the calibrated thresholds and their `calibration` record when the model has them;
* the weights (`model.safetensors`, or the source folder's weight files byte for byte when the model was loaded
  from a local folder and only its config changed, as `calibrate` does);
* `preprocessor_config.json` (the `ViP2CLIPImageProcessor`, with the same two `auto_map` entries);
* every Hub file (`HUB_FILES`: the configuration, model, processor, pipeline, CPU fast path and reference-bank
  code), copied from this package so the folder runs the code that wrote it;
* any extra files the caller adds (`hub/publish.py`: the model card and evaluation results).

The folder is filled in a staging folder beside `out` and renamed into place (`files.staged_folder`), so a crash
leaves the previous folder or none, never half of one. Whether `out` may be replaced is the caller's decision
(`--overwrite`), taken before calling.
"""

from __future__ import annotations

import copy
import shutil
from os import PathLike
from pathlib import Path
from typing import Mapping

from ..errors import UsageError
from ..files import staged_folder

__all__ = ["HUB_FILES", "auto_map", "custom_pipelines", "save_model_folder", "copy_model_folder"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]

# The files that travel with every model folder: they import only each other, torch and transformers
# (tests/test_security.py), so remote code can run them without this package.
HUB_FILES = (
    "configuration_vip2clip.py",
    "modeling_vip2clip.py",
    "processing_vip2clip.py",
    "pipeline_vip2clip.py",
    "cpu_fast_path_vip2clip.py",
    "reference_bank_vip2clip.py",
)
# Weight files save_pretrained may write (one file, or shards and their index); carried byte for byte.
_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
# Never carried over from a source folder: caches and version control.
_NOT_CARRIED = {".cache", ".git", "__pycache__"}


def _remote_name(cls) -> str:
    """`module.Class` as transformers' remote code names it (the file name inside the folder, then the class)."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def auto_map() -> dict[str, str]:
    """The `auto_map` of a model folder's config.json: which class of which Hub file each Auto class loads."""
    from ..configuration_vip2clip import ViP2CLIPConfig
    from ..modeling_vip2clip import ViP2CLIPModel
    from ..processing_vip2clip import ViP2CLIPImageProcessor

    return {
        "AutoConfig": _remote_name(ViP2CLIPConfig),
        "AutoModel": _remote_name(ViP2CLIPModel),
        "AutoImageProcessor": _remote_name(ViP2CLIPImageProcessor),
        # The image processor is the whole processor (no tokenizer at inference): AutoProcessor gets the same class.
        "AutoProcessor": _remote_name(ViP2CLIPImageProcessor),
    }


def custom_pipelines() -> dict[str, dict]:
    """The `custom_pipelines` entry of config.json, in the form `Pipeline.save_pretrained` writes it, so that
    `pipeline(TASK, model=FOLDER, trust_remote_code=True)` finds the task without a registry in the process."""
    from ..pipeline_vip2clip import TASK, ViP2CLIPAnomalyDetectionPipeline

    return {TASK: {"impl": _remote_name(ViP2CLIPAnomalyDetectionPipeline), "pt": ["AutoModel"]}}


def _local_folder(source: str | PathLike | None) -> Path | None:
    if source is None:
        return None
    path = Path(source).expanduser()
    return path if path.is_dir() else None  # a Hub id: nothing local to carry over


def _check_not_source(out: Path, source: Path | None) -> None:
    if source is None:
        return
    out_resolved, source_resolved = out.resolve(), source.resolve()
    if out_resolved == source_resolved or out_resolved in source_resolved.parents:
        raise UsageError(f"cannot write the model folder {out}: it holds the source model {source}, which replacing "
                         "it would delete; choose another output folder")


def _carry_over(source: Path, staging: Path, owned: set[str]) -> None:
    """The source folder's files, except what the writer writes itself: the weights byte for byte, and whatever
    else the user keeps there (a model card, notes)."""
    for entry in source.iterdir():
        if entry.name in _NOT_CARRIED or entry.name in owned:
            continue
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name, ignore=shutil.ignore_patterns(*_NOT_CARRIED))
        else:
            shutil.copy2(entry, staging / entry.name)


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def save_model_folder(
    model,
    processor,
    out: str | PathLike,
    *,
    source_folder: str | PathLike | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write `model` and `processor` as a complete Hub model folder at `out` (see the module docstring); returns `out`.

    Args:
        model: a `ViP2CLIPModel` (its config is written with this package's `auto_map` and `custom_pipelines`; the
            model object itself is not changed), or a model loaded from a `vip2clip export` folder (then
            `source_folder` must be that folder: it is copied and only its config rewritten).
        processor: the model's `ViP2CLIPImageProcessor`.
        out: the folder to write; an existing one is replaced as a whole once the new one is complete.
        source_folder: the local folder `model` was loaded from, when its weights are unchanged: its weight files
            (and any other file of the user's) are copied byte for byte instead of re-serialising the weights.
            A Hub id or a folder without weights is ignored (the weights are saved from `model`).
        extra_files: `{file name: text}` written beside (e.g. `README.md`).
    """
    return _write(model.config, processor, out, model=model, source_folder=source_folder, extra_files=extra_files)


def copy_model_folder(source_folder: str | PathLike, out: str | PathLike) -> Path:
    """`source_folder` (a model folder on disk) written again at `out` without loading its weights: the weights
    byte for byte, config and processor re-read and written with this package's `auto_map`, `custom_pipelines`
    and Hub files (an older folder comes out complete). Returns `out`."""
    from ..configuration_vip2clip import ViP2CLIPConfig
    from ..processing_vip2clip import ViP2CLIPImageProcessor

    source = Path(source_folder).expanduser()
    config = ViP2CLIPConfig.from_pretrained(source)
    if (source / "preprocessor_config.json").is_file():
        processor = ViP2CLIPImageProcessor.from_pretrained(source)
    else:
        processor = ViP2CLIPImageProcessor.for_model(config)
    return _write(config, processor, out, model=None, source_folder=source, extra_files=None)


def _write(config, processor, out, *, model, source_folder, extra_files) -> Path:
    from ..deploy.exported_runtime import is_exported_folder

    out = Path(out).expanduser()
    source = _local_folder(source_folder)
    _check_not_source(out, source)
    exported = source is not None and is_exported_folder(source)
    if source is not None and not exported and not _has_weights(source):
        source = None  # nothing to carry: the weights are saved from the model
    if source is None and model is None:
        raise FileNotFoundError(f"{source_folder} holds no model weights (model.safetensors) to copy")
    if source is None and not hasattr(model, "save_pretrained"):
        raise TypeError(f"cannot save a {type(model).__name__} as a model folder without its source folder")

    config = copy.deepcopy(config)
    processor = copy.deepcopy(processor)
    owned = {"config.json", "preprocessor_config.json", *(extra_files or {})}
    if not exported:
        # An exported folder runs on ONNX Runtime / OpenVINO (deploy/exported_runtime.py), not on remote code: it
        # keeps its own layout and gets only its config rewritten.
        entries = auto_map()
        config.auto_map = entries
        config.custom_pipelines = custom_pipelines()
        processor.auto_map = {key: entries[key] for key in ("AutoImageProcessor", "AutoProcessor")}
        owned.update(HUB_FILES)

    with staged_folder(out) as staging:
        if source is not None:
            _carry_over(source, staging, owned)
        else:
            model.save_pretrained(staging)  # the weights (its config.json and code files are rewritten below)
        config.save_pretrained(staging)
        processor.save_pretrained(staging)
        if not exported:
            for name in HUB_FILES:  # after the save_pretrained calls, which copy only some of them
                shutil.copyfile(PACKAGE_DIR / name, staging / name)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        if not exported and not _has_weights(staging):
            raise RuntimeError(f"the model folder staged for {out} has no weights (model.safetensors); nothing written")
    return out
