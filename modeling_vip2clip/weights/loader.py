"""The one model loader of every command, the demo and `hub/publish.py`."""

from __future__ import annotations

from ..errors import UsageError
from ..resolve import _hub_error_reason, resolve_source

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
    from ..deploy.exported_runtime import is_exported_folder

    if is_exported_folder(resolved):  # `vip2clip export` output: ONNX Runtime / OpenVINO behind the same interface
        from ..deploy.exported_model import load_exported

        return load_exported(resolved, device=device, dtype=dtype)
    import torch

    from ..modeling_vip2clip import ViP2CLIPModel
    from ..processing_vip2clip import ViP2CLIPImageProcessor

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


def model_name(model) -> str:
    """What a job records as its model: the folder / Hub id it was given, else the loaded model's `name_or_path`."""
    import os

    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(model, "name_or_path", "") or type(model).__name__)
