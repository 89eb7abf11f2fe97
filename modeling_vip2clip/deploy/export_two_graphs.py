"""INT8 OpenVINO export as two graphs: the vision tower (INT8) and the heads (f32), compiled with different
precision hints — `vip2clip export --format openvino --int8 --two-graphs`.

Why two graphs: OpenVINO's `INFERENCE_PRECISION_HINT` is per compiled model. With one graph, the bf16 hint that
makes the INT8 tower's remaining float ops (LayerNorm, softmax, GELU, the attention products) fast also runs the
heads, the UTPA similarities and the blur in bf16, which flattens the least-contrasted maps (min map Pearson
0.62, benchmarks/README.md); marking the head nodes to stay f32 through rt_info (`disable_fp16_compression_0`,
`precise_0`) is ignored by the CPU plugin under the bf16 hint. Cut at `encode_image`'s outputs, the tower runs
with bf16 where the CPU executes bf16 natively (AVX-512 BF16 / AMX; elsewhere OpenVINO stays f32) and the heads
always in f32: the same function as the one-graph export, only the precision of each part chosen apart.

Graphs: `openvino_tower.xml` `pixel_values` (B, 3, S, S) → `image_embeds` (B, D), `patch_embeds` (B, n, L, D);
`openvino_heads.xml` those two → `anomaly_score` (B,), `anomaly_map` (B, S, S). export_info.json names them
under "graphs" and records the tower's hint ("auto" = bf16 where supported) and the accuracy of the deployed
pair against torch fp32 on held-out images. `vip2clip_runtime.py` (exported_runtime.py) runs the pair.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .exported_runtime import (
    HEADS_INPUT_NAMES,
    INFO_FILE,
    INPUT_NAME,
    OPENVINO_HEADS_FILE,
    OPENVINO_TOWER_FILE,
    OUTPUT_NAMES,
    RUNTIME_FILE,
    openvino_tower_precision,
)

logger = logging.getLogger(__name__)

__all__ = ["TOWER_INT8_IGNORED_PATTERNS", "export_openvino_two_graphs"]

# In the tower graph, only the transformer blocks are quantised (as `export.INT8_IGNORED_PATTERNS` for the one
# graph): the patch embedding, pre/post LayerNorms, the projection and the L2 normalisation stay float. Node names
# follow the module scope of the traced wrapper; a block's nodes contain "layers.N/".
TOWER_INT8_IGNORED_PATTERNS = (r"(?!.*layers\.\d+/)",)


def _wrappers(model):
    import torch

    class Tower(torch.nn.Module):
        def __init__(self, vip2clip):
            super().__init__()
            self.model = vip2clip

        def forward(self, pixel_values):
            return self.model.encode_image(pixel_values)

    class Heads(torch.nn.Module):
        def __init__(self, vip2clip):
            super().__init__()
            self.model = vip2clip

        def forward(self, image_embeds, patch_embeds):
            output = self.model.score_features(image_embeds, patch_embeds)
            return output.anomaly_score, output.anomaly_map

    return Tower(model).eval(), Heads(model).eval()


def _trace(module, example: tuple, path: Path, input_names, output_names, opset: int) -> None:
    import torch

    dynamic = {name: {0: "batch"} for name in (*input_names, *output_names)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks, constant here
        torch.onnx.export(module, example, str(path), input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)


def _run_pair(tower, heads, batches: list) -> tuple:
    import numpy as np

    tower_request, heads_request = tower.create_infer_request(), heads.create_infer_request()
    scores, maps = [], []
    for pixel_values in batches:
        features = tower_request.infer({INPUT_NAME: pixel_values})
        inputs = {name: features[tower.output(name)] for name in HEADS_INPUT_NAMES}
        result = heads_request.infer(inputs)
        scores.append(np.array(result[heads.output(OUTPUT_NAMES[0])]))
        maps.append(np.array(result[heads.output(OUTPUT_NAMES[1])]))
    return np.concatenate(scores), np.concatenate(maps)


def export_openvino_two_graphs(
    model,
    processor,
    out_dir: Any,
    calibration_images: Any,
    calibration_size: int = 300,
    accuracy_images: int = 16,
    opset: int = 17,
    source: str | None = None,
    tower_precision: str = "auto",
    ignored_patterns: Sequence[str] = TOWER_INT8_IGNORED_PATTERNS,
    advanced_parameters: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    int8: bool = True,
) -> Path:
    """Export `model` (float32, CPU) as the INT8 tower + f32 heads pair (module docstring); returns the folder.

    `tower_precision`: the tower's `INFERENCE_PRECISION_HINT` at run time, "auto" (bf16 where the CPU has it,
    else f32), "bf16" or "f32"; recorded in export_info.json, overridable when the folder is opened. The accuracy
    figures are those of the pair as this machine runs it (so "auto" on a CPU without bf16 measures f32).
    `int8=False` leaves the tower in f32 (the same function as the one-graph export; for checks and A/B)."""
    import numpy as np
    import openvino
    import torch

    from .export import (
        _readme,
        _versions,
        accuracy_figures,
        load_calibration_images,
        quantize_int8,
    )
    from ..errors import UsageError, require_extra

    require_extra("onnx", "onnx", "exporting to ONNX")
    require_extra("openvino", "openvino", "exporting to OpenVINO")
    if int8:
        require_extra("nncf", "openvino", "INT8 quantisation")
    if tower_precision not in ("auto", "bf16", "f32"):
        raise UsageError(f"tower precision {tower_precision!r}: use auto, bf16 or f32")
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32 or parameter.device.type != "cpu":
        raise UsageError(f"the model is {parameter.dtype} on {parameter.device}; export a float32 model on CPU")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out_dir} exists and is not empty; pass --overwrite or choose a new folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(model.config.image_size)
    started = time.time()

    # images: calibration + held-out evaluation, as the one-graph export draws them
    if isinstance(calibration_images, (str, os.PathLike)):
        calibration_source = str(calibration_images)
        images = load_calibration_images(calibration_images, calibration_size + accuracy_images)
    else:
        calibration_source = f"{len(calibration_images)} images passed to export"
        images = list(calibration_images)
    calibration = [processor(images=[image])["pixel_values"].numpy() for image in images[:calibration_size]]
    held_out = images[calibration_size:calibration_size + accuracy_images]
    evaluation_images = held_out or images[:accuracy_images]
    evaluation = [processor(images=evaluation_images[i:i + 4])["pixel_values"].numpy()
                  for i in range(0, len(evaluation_images), 4)]

    model.eval()
    fast_path = getattr(model, "cpu_onednn_vision", None)
    model.cpu_onednn_vision = False  # the mkldnn ops of the CPU fast path have no ONNX form
    try:
        with torch.inference_mode():  # the reference: torch fp32 (the one-graph export equals it to 1e-6)
            outputs = [model(pixel_values=torch.from_numpy(batch)) for batch in evaluation]
        reference = (np.concatenate([o.anomaly_score.numpy() for o in outputs]),
                     np.concatenate([o.anomaly_map.numpy() for o in outputs]))
        tower_module, heads_module = _wrappers(model)
        example = torch.randn(2, 3, size, size)  # batch 2: the tracer must not specialise the batch to 1
        with torch.no_grad():
            features = tower_module(example)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".traced_") as scratch:
            logger.info("tracing the tower and the heads to ONNX (opset %d) ...", opset)
            _trace(tower_module, (example,), Path(scratch) / "tower.onnx", [INPUT_NAME], HEADS_INPUT_NAMES, opset)
            _trace(heads_module, tuple(features), Path(scratch) / "heads.onnx", HEADS_INPUT_NAMES, OUTPUT_NAMES, opset)
            tower = openvino.convert_model(str(Path(scratch) / "tower.onnx"))
            heads = openvino.convert_model(str(Path(scratch) / "heads.onnx"))
    finally:
        model.cpu_onednn_vision = fast_path

    if int8:
        logger.info("quantising the tower to INT8 on %d calibration images ...", len(calibration))
        tower = quantize_int8(tower, calibration, ignored_patterns, advanced_parameters)
    core = openvino.Core()
    precision = openvino_tower_precision(core, tower_precision)
    pair = (core.compile_model(tower, "CPU", {"INFERENCE_PRECISION_HINT": precision}),
            core.compile_model(heads, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
    accuracy = accuracy_figures(reference, _run_pair(*pair, evaluation))
    del pair
    openvino.save_model(tower, str(out_dir / OPENVINO_TOWER_FILE), compress_to_fp16=False)
    openvino.save_model(heads, str(out_dir / OPENVINO_HEADS_FILE), compress_to_fp16=False)

    info: dict = {
        "format": "openvino",
        "precision": "int8" if int8 else "fp32",
        "opset": opset,
        "image_size": size,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "outputs": {OUTPUT_NAMES[0]: ["batch"], OUTPUT_NAMES[1]: ["batch", size, size]},
        "graphs": {"tower": OPENVINO_TOWER_FILE, "heads": OPENVINO_HEADS_FILE},
        "inference_precision": "f32",  # the heads'
        "tower_inference_precision": tower_precision,
        "source": str(source) if source is not None else type(model).__name__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "external_data": False,
        "int8" if int8 else "fp32_accuracy": {
            "method": "nncf.quantize (post-training, model_type=TRANSFORMER) of the tower graph; heads f32",
            "calibration_source": calibration_source,
            "calibration_images": len(calibration),
            "ignored_patterns": list(ignored_patterns),
            "advanced_parameters": advanced_parameters or {},
            "accuracy_on": "held-out images" if held_out else "calibration images",
            "accuracy_reference": "torch fp32",
            "accuracy_tower_precision": precision,
            "accuracy_vs_fp32": accuracy,
        },
        "export_seconds": round(time.time() - started, 1),
    }
    model.config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    shutil.copyfile(Path(__file__).with_name("exported_runtime.py"), out_dir / RUNTIME_FILE)
    with open(out_dir / INFO_FILE, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    readme = _readme(info).replace("openvino_model.xml", f"{OPENVINO_TOWER_FILE}` + `{OPENVINO_HEADS_FILE}")
    (out_dir / "README.md").write_text(readme.replace("openvino_model.bin", "the .bin files"), encoding="utf-8")
    logger.info("INT8 tower (%s) + f32 heads vs torch fp32: %s", precision, accuracy)
    return out_dir
