"""An exported folder (`vip2clip export`) behind the torch model's inference interface, for predict and the demo.

    from modeling_vip2clip.deploy.exported_model import load_exported
    model, processor = load_exported("M-ov")          # (ExportedViP2CLIPModel, ViP2CLIPProcessor)
    output = model(pixel_values=processor(images=[image])["pixel_values"])
    output.anomaly_score, output.anomaly_map          # torch tensors, as ViP2CLIPModel returns them

Only inference: `anomaly_score` and `anomaly_map` are set in the returned `ViP2CLIPOutput` (the exported graph has
no losses, layer maps or embeddings). The runtime's device and precision are chosen at load time; `.to()` and
`.eval()` exist so that code written for the torch model runs unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..configuration_vip2clip import ViP2CLIPConfig
from .exported_runtime import ExportedViP2CLIP, is_exported_folder
from ..modeling_vip2clip import ViP2CLIPOutput
from ..processing_vip2clip import ViP2CLIPProcessor

__all__ = ["ExportedViP2CLIPModel", "load_exported", "is_exported_folder"]


class ExportedViP2CLIPModel:
    """[`ExportedViP2CLIP`] with torch tensors in and out and a [`ViP2CLIPConfig`] as `.config`."""

    def __init__(self, exported: ExportedViP2CLIP):
        self.exported = exported
        self.config = ViP2CLIPConfig.from_pretrained(exported.folder)
        self.info = exported.info
        self.device = torch.device("cpu")  # where the outputs are made; they follow the input's device
        self.dtype = torch.float32

    @classmethod
    def from_pretrained(cls, folder: Any, **runtime_kwargs) -> "ExportedViP2CLIPModel":
        """`runtime_kwargs` go to `ExportedViP2CLIP.from_folder` (device, inference_precision, num_threads)."""
        return cls(ExportedViP2CLIP.from_folder(folder, **runtime_kwargs))

    def __call__(self, pixel_values: torch.Tensor, labels=None, masks=None, return_dict: bool | None = None,
                 **kwargs) -> ViP2CLIPOutput | tuple:
        """`pixel_values` `(B, 3, S, S)` → `ViP2CLIPOutput` with `anomaly_score` `(B,)` and `anomaly_map`
        `(B, S, S)` (float32, on the input's device)."""
        if labels is not None or masks is not None:
            raise ValueError("an exported model only scores images (no losses): call it without labels/masks, or "
                             "train and evaluate losses with the torch model folder.")
        device = pixel_values.device if isinstance(pixel_values, torch.Tensor) else torch.device("cpu")
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().to("cpu", torch.float32).numpy()
        output = self.exported(pixel_values)
        result = ViP2CLIPOutput(
            anomaly_score=torch.from_numpy(output.anomaly_score).to(device),
            anomaly_map=torch.from_numpy(output.anomaly_map).to(device),
        )
        return result if return_dict is not False else result.to_tuple()

    forward = __call__

    def to(self, *args, **kwargs) -> "ExportedViP2CLIPModel":
        return self

    def eval(self) -> "ExportedViP2CLIPModel":
        return self

    def __repr__(self) -> str:
        return f"ExportedViP2CLIPModel({self.exported!r})"


def load_exported(source: Any, device: Any = None, dtype: torch.dtype | None = None, **runtime_kwargs):
    """(model, processor) of an exported folder, like `load_model_and_processor` for a torch folder.

    `device`: a CUDA device selects ONNX Runtime's CUDA provider (ONNX exports); else CPU. `dtype=torch.bfloat16`
    asks OpenVINO for bf16 inference of its floating-point ops (ignored for ONNX); default: what the export
    recorded (f32).
    """
    if not is_exported_folder(source):
        raise ValueError(f"{source} is not an exported ViP2-CLIP folder (no export_info.json with its model file).")
    if device is not None and torch.device(device).type == "cuda":
        runtime_kwargs.setdefault("device", "cuda")
    if dtype == torch.bfloat16:
        runtime_kwargs.setdefault("inference_precision", "bf16")
    model = ExportedViP2CLIPModel.from_pretrained(Path(source), **runtime_kwargs)
    processor = ViP2CLIPProcessor.from_pretrained(source)
    return model, processor
