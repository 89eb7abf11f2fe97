"""The one model loader of every command, the demo and `hub/publish.py`."""

from __future__ import annotations

from ..errors import UsageError
from ..resolve import _hub_error_reason, resolve_source

__all__ = ["load_model_and_processor"]


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
