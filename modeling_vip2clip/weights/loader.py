"""The one model loader of every command, the demo and `hub/publish.py`."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadFileError, InvalidConfigError, UsageError, explain, sentence
from ..resolve import resolve_source

__all__ = ["precision_dtype", "load_model_and_processor", "job_model_and_processor",
           "model_name"]

def precision_dtype(mixed_precision: str | None):
    """`--mixed-precision` no / bf16 / fp16 → the dtype the CLIP towers are loaded in (None: fp32).

    One meaning in predict, evaluate and calibrate (`cli.options.MIXED_PRECISION_HELP`): weights, not autocast —
    the bf16 load is the CPU fast path (benchmarks/README.md) and what the demo's `--dtype bf16` does, so a command
    and the demo give the same numbers; the heads stay fp32 (`ViP2CLIPModel._keep_in_fp32_modules_strict`)."""
    import torch

    choices = {None: None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in choices:
        raise UsageError(f"--mixed-precision {mixed_precision!r}: use no, bf16 or fp16.")
    return choices[mixed_precision]


def load_model_and_processor(source: str, device=None, dtype=None, flag: str = "--model"):
    """The one loader of every entry point: `(model, processor)` for a model folder or Hub id, in eval mode.

    * `source` is checked first (:func:`resolve_source`): a missing path or an unreachable id fails at once.
    * A folder written by `vip2clip export` loads as `exported_model.ExportedViP2CLIPModel` (ONNX Runtime or
      OpenVINO, no PyTorch in its forward), with the same `model(pixel_values=...)` outputs.
    * The model is the package's `ViP2CLIPModel` (no remote code runs), `dtype` (default fp32) through the standard
      `from_pretrained(dtype=...)` (the heads stay fp32). A folder whose weights do not fit its config is refused.
    * The processor is the folder's `preprocessor_config.json`, else `ViP2CLIPImageProcessor.for_model(config)`; one
      whose input size differs from the model's is refused (the folder mixes two models).
    """
    resolved = resolve_source(source, flag)  # before the heavy imports: a bad value fails in a second
    from ..deploy.exported_runtime import INFO_FILE, is_exported_folder

    folder = Path(resolved) if Path(resolved).is_dir() else None
    if is_exported_folder(resolved):  # `vip2clip export` output: ONNX Runtime / OpenVINO behind the same interface
        from ..deploy.exported_model import load_exported

        try:
            return load_exported(resolved, device=device, dtype=dtype)
        except Exception as error:  # noqa: BLE001 - a damaged model.onnx / openvino_model.* is the user's to fix
            raise _as_load_error(error, folder, source, flag, "the exported model") from None
    if folder is not None and (folder / INFO_FILE).is_file():  # an export that is not usable: say why
        raise _broken_export(folder / INFO_FILE, source, flag)
    import torch

    from ..modeling_vip2clip import ViP2CLIPModel
    from ..processing_vip2clip import ViP2CLIPImageProcessor

    config = _load_config(resolved, folder, source, flag)
    try:
        model = ViP2CLIPModel.from_pretrained(resolved, config=config, dtype=dtype or torch.float32)
    except Exception as error:  # noqa: BLE001 - turned into one line when expected, re-raised when a bug
        raise _as_load_error(error, folder, source, flag, "the weights") from None
    model.eval()
    if device is not None:
        model.to(device)
    processor = None
    try:
        processor = ViP2CLIPImageProcessor.from_pretrained(resolved)
    except (OSError, ValueError):
        processor = ViP2CLIPImageProcessor.for_model(model.config)
    if int(processor.image_size) != int(model.config.image_size):
        raise UsageError(f"{flag} {source}: its preprocessor_config.json has image_size {processor.image_size} but "
                         f"the model takes {model.config.image_size}; re-save the processor with "
                         f"ViP2CLIPImageProcessor.for_model(model.config).save_pretrained(...).")
    return model, processor


def job_model_and_processor(model, processor=None, *, device=None, mixed_precision: str | None = "no",
                            flag: str = "--model"):
    """The model and processor a job (predict, evaluate, calibrate, export) works with, from what its Python entry
    point was given: a model folder or Hub id is loaded by :func:`load_model_and_processor` in the precision of
    `mixed_precision` (:func:`precision_dtype`); a loaded model is used as it is (its processor: `processor`,
    else `ViP2CLIPProcessor.for_model(model.config)`), in eval mode, on `device` when given."""
    import os

    if isinstance(model, (str, os.PathLike)):
        loaded, loaded_processor = load_model_and_processor(str(model), device=device,
                                                            dtype=precision_dtype(mixed_precision), flag=flag)
        return loaded, processor if processor is not None else loaded_processor
    if mixed_precision not in (None, "no"):
        import logging

        logging.getLogger(__name__).warning(
            "mixed_precision=%r applies when the job loads the model from a folder or Hub id; the model passed in is "
            "used in its own precision (load it with from_pretrained(..., dtype=torch.bfloat16) for bf16).",
            mixed_precision)
    if processor is None:
        from ..processing_vip2clip import ViP2CLIPProcessor

        processor = ViP2CLIPProcessor.for_model(model.config)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def _broken_export(info_path: Path, source: str, flag: str) -> BadFileError:
    """Why a folder with export_info.json is not a usable export: the file does not parse (torn, hand-edited), it
    names a format this package does not run, or the model file it names is gone."""
    import json

    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return explain(error, info_path, f"{flag} {source}: cannot read {info_path.name}") or BadFileError(
            sentence(f"{flag} {source}: cannot read {info_path.name}", info_path, str(error), "export the model again"))
    kind = info.get("format") if isinstance(info, dict) else None
    if kind not in ("onnx", "openvino"):
        return BadFileError(sentence(f"{flag} {source}", info_path, f"{info_path.name} names the format {kind!r}, "
                                     "not onnx or openvino", "export the model again"))
    return BadFileError(sentence(f"{flag} {source}", info_path.parent, f"an exported folder ({info_path.name}) without "
                                 "its model file (model.onnx / openvino_model.xml)", "export the model again"))


def model_name(model) -> str:
    """What a job records as its model: the folder / Hub id it was given, else the loaded model's `name_or_path`."""
    import os

    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def _as_load_error(error: BaseException, folder, source: str, flag: str, part: str) -> BaseException:
    """The typed one-line error for a model folder that does not load (naming the folder), or `error` itself when
    it is not an expected fault (a bug: the boundary says so)."""
    if isinstance(error, UsageError):
        return error
    known = explain(error, path=folder or source, what=f"{flag} {source}: cannot load {part}")
    if known is not None:
        return known
    if isinstance(error, (OSError, ValueError, RuntimeError)):  # transformers' own refusals (missing/mismatched)
        text = " ".join(str(error).split())[:240]
        return BadFileError(sentence(f"{flag} {source}: cannot load {part}", folder or source, text,
                                     "re-save or re-convert the model folder"))
    return error


def _load_config(resolved: str, folder, source: str, flag: str):
    """The folder's `ViP2CLIPConfig`, validated (finite values, sane sizes) and compared with the weight file's
    tensor shapes *before* the model is built: a hand-edited config fails in a second with its value named,
    never after allocating gigabytes."""
    from ..configuration_vip2clip import ViP2CLIPConfig

    where = folder / "config.json" if folder is not None else source
    try:
        config = ViP2CLIPConfig.from_pretrained(resolved)
    except Exception as error:  # noqa: BLE001
        known = explain(error, path=where, what=f"{flag} {source}: invalid config.json")
        if known is None and isinstance(error, (OSError, ValueError, TypeError, KeyError)):
            known = BadFileError(sentence(f"{flag} {source}: invalid config.json", where,
                                          " ".join(str(error).split())[:240], "fix or re-save the model folder"))
        if known is None:
            raise
        raise known from None
    weights = folder / "model.safetensors" if folder is not None else None
    if weights is not None and weights.is_file():
        _check_shapes(config, weights, source, flag)
    if folder is not None:
        _warn_unknown_keys(config, folder / "config.json", flag, source)
    return config


# Written by `save_pretrained` (or by older transformers) but not among a fresh config's keys.
_SAVED_KEYS = {"auto_map", "custom_pipelines", "torch_dtype", "transformers_version", "architectures"}


def _warn_unknown_keys(config, config_file: Path, flag: str, source: str) -> None:
    """A key of config.json that this version does not know — a hand edit's typo such as `blur_sigmaa` — is
    ignored by transformers without a word; say so, so the user does not believe the value took effect."""
    import json
    import logging

    try:
        written = set(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError):  # read fine a moment ago; nothing to add
        return
    unknown = sorted(written - set(type(config)().to_dict()) - _SAVED_KEYS)
    if unknown:
        logging.getLogger(__name__).warning(
            "%s %s: config.json (%s) has keys this version does not use, ignored: %s; check their spelling",
            flag, source, config_file, ", ".join(unknown))


def _check_shapes(config, weights: Path, source: str, flag: str) -> None:
    """Every tensor of the weight file has the shape the config implies (the model built on the meta device:
    no memory)."""
    import torch
    from safetensors import safe_open

    from ..modeling_vip2clip import ViP2CLIPModel

    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001
        known = explain(error, path=weights, what=f"{flag} {source}: cannot read the weights")
        if known is None:
            raise
        raise known from None
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in ViP2CLIPModel(config).state_dict().items()}
    for name, shape in stored.items():
        if name in expected and expected[name] != shape:
            raise InvalidConfigError(sentence(f"{flag} {source}: config.json does not fit the weights", weights,
                                              f"{name} is {list(shape)} in the file but the config implies "
                                              f"{list(expected[name])}", "restore the config.json saved with these "
                                              "weights"))
