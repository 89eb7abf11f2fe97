"""Custom `transformers` pipeline task "anomaly-detection" for ViP²-CLIP.

    from transformers import pipeline
    detector = pipeline(model="vip2clip/vip2clip-vit-l14-336-mvtec", trust_remote_code=True)
    detector("image.png")
    # {"score": 0.83, "is_anomalous": True, "anomaly_map": float32 array (H, W), "mask": PIL "L" image (H, W)}

The default thresholds are the model's calibrated ones (`config.image_threshold` for `is_anomalous`,
`config.pixel_threshold` for `mask`, written by `vip2clip calibrate`), else 0.5; call arguments override them
(`ViP2CLIPConfig.resolve_threshold`, the rule every command and the demo follow).

Every model folder the package writes (`modeling_vip2clip.weights.folder.save_model_folder`) carries this file and
names it under `custom_pipelines` in config.json, so `pipeline("anomaly-detection", model=FOLDER,
trust_remote_code=True)` finds it in any process. The image processor is the folder's (`AutoImageProcessor`), else
`ViP2CLIPImageProcessor.for_model(config)`. This file travels to the Hub: it imports only numpy, PIL, torch,
transformers and its single-dot siblings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .processing_vip2clip import ViP2CLIPImageProcessor

__all__ = ["ViP2CLIPAnomalyDetectionPipeline", "TASK"]

TASK = "anomaly-detection"


class ViP2CLIPAnomalyDetectionPipeline(Pipeline):
    """Image → anomaly score, anomaly map and binary defect mask, each at the image's own size.

    Call arguments: `threshold` binarises the map into `mask` (default: the model's `pixel_threshold`, else 0.5);
    `score_threshold` decides `is_anomalous` (default: the model's `image_threshold`, else 0.5);
    `timeout` for image URLs.
    """

    # The folder's preprocessor_config.json through AutoImageProcessor when it has one (None: try, and go on
    # without it on failure); nothing else to load.
    _load_image_processor = None
    _load_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:  # a folder without preprocessor_config.json, or a model object alone
            self.image_processor = ViP2CLIPImageProcessor.for_model(self.model.config)

    def _sanitize_parameters(self, threshold=None, score_threshold=None, timeout=None, **kwargs):
        preprocess_params = {} if timeout is None else {"timeout": timeout}
        postprocess_params = {}
        if threshold is not None:
            postprocess_params["threshold"] = float(threshold)
        if score_threshold is not None:
            postprocess_params["score_threshold"] = float(score_threshold)
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        if isinstance(image, str):
            image = load_image(image, timeout=timeout)
        pil = self.image_processor.to_pil(image)
        inputs = self.image_processor(images=[pil])
        return {"pixel_values": inputs["pixel_values"].to(self.dtype or torch.float32), "original_size": (pil.height, pil.width)}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        original_size = model_inputs.pop("original_size")
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        return {"anomaly_score": outputs.anomaly_score, "anomaly_map": outputs.anomaly_map, "original_size": original_size}

    def postprocess(self, model_outputs: dict[str, Any], threshold: float | None = None, score_threshold: float | None = None):
        # The one threshold rule (`ViP2CLIPConfig.resolve_threshold`): the call argument, else the calibrated value,
        # else 0.5.
        score_threshold, _ = self.model.config.resolve_threshold("image", score_threshold)
        threshold, _ = self.model.config.resolve_threshold("pixel", threshold)
        size = model_outputs["original_size"]
        size = tuple(int(v) for v in (size.tolist() if isinstance(size, torch.Tensor) else size))
        anomaly_map = self.image_processor.post_process_anomaly_maps(
            model_outputs["anomaly_map"].float().cpu(), target_sizes=[size]
        )[0]
        score = float(model_outputs["anomaly_score"].float().cpu().reshape(-1)[0])
        mask = (anomaly_map >= threshold).numpy().astype(np.uint8) * 255
        return {
            "score": score,
            "is_anomalous": score >= score_threshold,
            "anomaly_map": anomaly_map.numpy().astype(np.float32),
            "mask": Image.fromarray(mask, mode="L"),
        }
