"""Run an exported ViP²-CLIP folder (`vip2clip export`) without PyTorch: numpy, Pillow and ONNX Runtime or OpenVINO.

    from exported_runtime import ExportedViP2CLIP      # or: from modeling_vip2clip.deploy.exported_runtime import ...
    model = ExportedViP2CLIP.from_folder("M-ov")       # detects ONNX vs OpenVINO from export_info.json
    output = model(model.preprocess([Image.open("part.png")]))
    output.anomaly_score  # (B,) in [0, 1]      output.anomaly_map  # (B, S, S) in [0, 1]

The graph takes `pixel_values` (B, 3, S, S) float32 (any B) and returns `anomaly_score` (B,) and `anomaly_map`
(B, S, S) — what `ViP2CLIPModel` returns, blur included. `preprocess` is `ViP2CLIPProcessor`'s image path
(docs/method.md §7) in numpy: EXIF orientation, RGB conversion, PIL bicubic resize to S×S, OpenAI CLIP mean/std.

This file is standalone on purpose — it imports only the standard library, numpy, PIL and (lazily) the runtime
— and `vip2clip export` copies it into every exported folder as `vip2clip_runtime.py`, so a deployment needs
neither this package nor torch. `python vip2clip_runtime.py FOLDER IMAGE...` prints one JSON line per image; an
image it cannot read is reported on stderr and skipped, as `vip2clip predict` does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ExportedOutput",
    "ExportedViP2CLIP",
    "is_exported_folder",
    "INFO_FILE",
    "ONNX_FILE",
    "ONNX_DATA_FILE",
    "OPENVINO_FILE",
    "RUNTIME_FILE",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "OPENVINO_TOWER_FILE",
    "OPENVINO_HEADS_FILE",
    "HEADS_INPUT_NAMES",
    "openvino_tower_precision",
]

INFO_FILE = "export_info.json"
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx_data"  # external weights, only for models over protobuf's 2 GB
OPENVINO_FILE = "openvino_model.xml"  # + openvino_model.bin
RUNTIME_FILE = "vip2clip_runtime.py"  # this file, copied into the exported folder
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("anomaly_score", "anomaly_map")
_MODEL_FILES = {"onnx": ONNX_FILE, "openvino": OPENVINO_FILE}
# The two-graph INT8 export (export_two_graphs.py): the tower and the heads, each compiled with its own precision.
OPENVINO_TOWER_FILE = "openvino_tower.xml"
OPENVINO_HEADS_FILE = "openvino_heads.xml"
HEADS_INPUT_NAMES = ("image_embeds", "patch_embeds")


def _model_file(info: dict) -> str | None:
    graphs = info.get("graphs")
    if isinstance(graphs, dict):
        return graphs.get("tower")
    return _MODEL_FILES.get(info.get("format"))

# ViP2CLIPProcessor's defaults, used when a folder's preprocessor_config.json lacks a key.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


@dataclass
class ExportedOutput:
    """Output of [`ExportedViP2CLIP`] for B images of S×S.

    Args:
        anomaly_score (`np.ndarray` float32 of shape `(B,)`): image anomaly score in [0, 1].
        anomaly_map (`np.ndarray` float32 of shape `(B, S, S)`): pixel anomaly map in [0, 1] (blurred).
    """

    anomaly_score: np.ndarray
    anomaly_map: np.ndarray


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_exported_folder(path: Any) -> bool:
    """True when `path` is a folder written by `vip2clip export` (its export_info.json and model file)."""
    folder = Path(path)
    if not (folder / INFO_FILE).is_file():
        return False
    try:
        info = _read_json(folder / INFO_FILE)
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict):
        return False
    files = list(info["graphs"].values()) if isinstance(info.get("graphs"), dict) else [_model_file(info)]
    return all(name is not None and (folder / name).is_file() for name in files)


# The image conversions below repeat processing_vip2clip.py's on purpose: that file imports torch, and this one must
# run where neither torch nor this package is installed (it is copied into every exported folder).
# tests/test_export.py checks that both give the same pixels (1e-6) for every image mode.
def _wide_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """16-bit / 32-bit / float pixels → uint8 exactly as ViP2CLIPProcessor does (÷257, ×255, or min–max)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite pixel values; fix or drop the file.")
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            return np.round(array * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.round(array).astype(np.uint8)
        span = high - low if high > low else 1.0
        return np.round((array - low) / span * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        if low >= 0 and high <= 65535:
            return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
        raise ValueError(f"{what} has integer pixel values in [{low}, {high}], outside 0..65535; rescale it first.")
    raise ValueError(f"{what} has unsupported pixel dtype {array.dtype}.")


def _check_contract(path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Refuse a graph that loads but is not a vip2clip export (another model saved under the same name): its
    names, not a failure at the first image."""
    if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= set(outputs):
        raise ValueError(f"the graph in {path.name} takes {', '.join(inputs) or 'nothing'} and gives "
                         f"{', '.join(outputs) or 'nothing'}, not {INPUT_NAME} → {', '.join(OUTPUT_NAMES)}: it is not "
                         "a vip2clip export")


class _OnnxRuntimeBackend:
    def __init__(self, path: Path, device: str, num_threads: int | None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                "this exported folder is ONNX and needs onnxruntime: pip install onnxruntime "
                "(or pip install 'vip2clip[onnx]')"
            ) from error
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        providers = ["CPUExecutionProvider"]
        if device.lower().startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        _check_contract(path, [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        self.name = f"onnxruntime {onnxruntime.__version__} ({self.session.get_providers()[0]})"

    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixel_values})
        return scores, maps


class _OpenVINOBackend:
    def __init__(self, path: Path, device: str, precision: str, num_threads: int | None):
        try:
            import openvino
        except ImportError as error:
            raise ImportError(
                "this exported folder is OpenVINO and needs openvino: pip install openvino "
                "(or pip install 'vip2clip[openvino]')"
            ) from error
        # OpenVINO's CPU plugin defaults to bf16 where the CPU has it; the precision is chosen here explicitly
        # (f32 = the exact export, bf16 = faster and close, see docs/deployment.md).
        properties = {"INFERENCE_PRECISION_HINT": precision}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = int(num_threads)
        device = "CPU" if device.lower() == "cpu" else device.upper()
        core = openvino.Core()
        graph = core.read_model(str(path))
        _check_contract(path, [name for port in graph.inputs for name in sorted(port.get_names())],
                        [name for port in graph.outputs for name in port.get_names()])
        self.compiled = core.compile_model(graph, device, properties)
        self.request = self.compiled.create_infer_request()
        self.name = f"openvino {openvino.get_version()} ({device}, {precision})"

    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = self.request.infer({INPUT_NAME: pixel_values})
        outputs = {name: results[self.compiled.output(name)] for name in OUTPUT_NAMES}
        # copies: the request reuses its output buffers on the next call
        return np.array(outputs["anomaly_score"]), np.array(outputs["anomaly_map"])


def openvino_tower_precision(core, requested: str) -> str:
    """The tower's precision hint: "auto" = bf16 where OpenVINO's CPU plugin runs bf16 natively (AVX-512 BF16,
    AMX), else f32 (without it the bf16 hint would fall back to f32 anyway)."""
    if requested != "auto":
        return requested
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


class _OpenVINOTwoGraphBackend:
    """The tower graph (INT8) compiled with its own precision hint, then the heads graph in f32: bf16 where it is
    fast and harmless, f32 where the maps need it (export_two_graphs.py)."""

    def __init__(self, folder: Path, info: dict, device: str, tower_precision: str | None, num_threads: int | None):
        try:
            import openvino
        except ImportError as error:
            raise ImportError("this exported folder is OpenVINO and needs openvino: pip install openvino") from error
        core = openvino.Core()
        device = "CPU" if device.lower() == "cpu" else device.upper()
        precision = openvino_tower_precision(core, tower_precision or info.get("tower_inference_precision", "auto"))
        extra = {"INFERENCE_NUM_THREADS": int(num_threads)} if num_threads else {}
        graphs = info["graphs"]
        self.tower = core.compile_model(core.read_model(str(folder / graphs["tower"])), device,
                                        {"INFERENCE_PRECISION_HINT": precision, **extra})
        self.heads = core.compile_model(core.read_model(str(folder / graphs["heads"])), device,
                                        {"INFERENCE_PRECISION_HINT": "f32", **extra})
        self.tower_request, self.heads_request = self.tower.create_infer_request(), self.heads.create_infer_request()
        self.name = f"openvino {openvino.get_version()} ({device}, tower {precision} + heads f32)"

    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = self.tower_request.infer({INPUT_NAME: pixel_values})
        results = self.heads_request.infer({name: features[self.tower.output(name)] for name in HEADS_INPUT_NAMES})
        outputs = {name: results[self.heads.output(name)] for name in OUTPUT_NAMES}
        return np.array(outputs["anomaly_score"]), np.array(outputs["anomaly_map"])


class ExportedViP2CLIP:
    """An exported ViP²-CLIP folder, ready to score images (see the module docstring).

    Attributes:
        folder (`Path`): the exported folder.
        config (`dict`): its config.json (the model's ViP2CLIPConfig, thresholds included when calibrated).
        info (`dict`): its export_info.json (format, precision, opset, source, INT8 accuracy figures).
        image_size (`int`): S, the side of the square input.
        backend_name (`str`): the runtime in use, e.g. "openvino 2026.4 (CPU, f32)".
    """

    def __init__(self, folder: Path, backend, info: dict, config: dict, processor_config: dict):
        self.folder = folder
        self._backend = backend
        self.info = info
        self.config = config
        self.processor_config = processor_config
        self.image_size = int(info.get("image_size") or processor_config.get("image_size"))
        self.image_mean = np.asarray(processor_config.get("image_mean", _CLIP_MEAN), dtype=np.float32)
        self.image_std = np.asarray(processor_config.get("image_std", _CLIP_STD), dtype=np.float32)
        self.min_image_size = int(processor_config.get("min_image_size", 14))
        max_pixels = processor_config.get("max_image_pixels")
        self.max_image_pixels = None if max_pixels is None else int(max_pixels)
        self.backend_name = backend.name

    @classmethod
    def from_folder(
        cls,
        folder: Any,
        device: str = "cpu",
        inference_precision: str | None = None,
        num_threads: int | None = None,
    ) -> "ExportedViP2CLIP":
        """Open an exported folder with the runtime its format needs.

        Args:
            folder: a folder written by `vip2clip export`.
            device: "cpu" (default); "cuda" (ONNX Runtime's CUDA provider) or an OpenVINO device name ("GPU").
            inference_precision: OpenVINO only: "f32" or "bf16" for the floating-point ops; default: the one
                recorded at export (f32). A two-graph INT8 export: the tower's ("auto", "bf16", "f32"; the heads
                stay f32).
            num_threads: intra-op threads (default: the runtime's, all cores).
        """
        folder = Path(folder)
        if not is_exported_folder(folder):
            raise ValueError(
                f"{folder} is not an exported ViP2-CLIP folder (no {INFO_FILE} with its model file); "
                "create one with `vip2clip export --model M --format onnx|openvino --out DIR`."
            )
        info = _read_json(folder / INFO_FILE)
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        processor_path = folder / "preprocessor_config.json"
        processor_config = _read_json(processor_path) if processor_path.is_file() else {}
        model_path = folder / _model_file(info)
        if isinstance(info.get("graphs"), dict):  # two graphs: inference_precision is the tower's
            backend = _OpenVINOTwoGraphBackend(folder, info, device, inference_precision, num_threads)
        elif info["format"] == "onnx":
            backend = _OnnxRuntimeBackend(model_path, device, num_threads)
        else:
            precision = inference_precision or info.get("inference_precision", "f32")
            backend = _OpenVINOBackend(model_path, device, precision, num_threads)
        return cls(folder, backend, info, config, processor_config)

    # ------------------------------------------------------------------ docs/method.md §7 preprocessing
    def to_pil(self, image: Any, what: str = "image") -> Image.Image:
        """An image (PIL, or an array (H, W) / (H, W, 3|4) / (3, H, W)) → RGB PIL at its own size, with
        ViP2CLIPProcessor's conversions and size checks."""
        if not isinstance(image, Image.Image) and hasattr(image, "__array__"):
            array = np.asarray(image)
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = np.moveaxis(array, 0, -1)  # (C, H, W) → (H, W, C)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
                raise ValueError(f"{what}: array of shape {array.shape} is not an image (H, W), (H, W, 3|4) or (3, H, W).")
            image = Image.fromarray(np.ascontiguousarray(_wide_to_uint8(array, what)))
        if not isinstance(image, Image.Image):
            raise TypeError(f"{what}: expected a PIL image or numpy array, got {type(image).__name__}.")
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block must not cost the image (as the processor)
            pass
        width, height = image.size
        if min(width, height) < self.min_image_size:
            raise ValueError(
                f"{what} is {width}x{height} px, smaller than the minimum side of {self.min_image_size} px "
                "(one ViT patch); it carries no usable detail — use the original, larger image."
            )
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            raise ValueError(
                f"{what} is {width}x{height} = {width * height:,} px, over the limit of {self.max_image_pixels:,} "
                f"pixels; downscale it first (the model sees it at {self.image_size}x{self.image_size} anyway)."
            )
        if image.mode in _WIDE_MODES:
            image = Image.fromarray(_wide_to_uint8(np.asarray(image), what))
        return image if image.mode == "RGB" else image.convert("RGB")

    def preprocess(self, images: Any) -> np.ndarray:
        """One image or a list → `pixel_values` `(B, 3, S, S)` float32, equal to ViP2CLIPProcessor's."""
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if not image_list:
            raise ValueError("images is an empty list.")
        size = self.image_size
        batch = np.empty((len(image_list), 3, size, size), dtype=np.float32)
        mean, std = self.image_mean[:, None, None], self.image_std[:, None, None]
        for index, image in enumerate(image_list):
            resized = self.to_pil(image, what=f"image {index}").resize((size, size), Image.Resampling.BICUBIC)
            pixels = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
            batch[index] = (pixels - mean) / std
        return batch

    # ------------------------------------------------------------------ inference
    def __call__(self, pixel_values: Any) -> ExportedOutput:
        """`pixel_values` `(B, 3, S, S)` (from `preprocess`) → [`ExportedOutput`] (numpy)."""
        pixel_values = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        size = self.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}; use .preprocess(images)."
            )
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[2]}x{pixel_values.shape[3]} but this exported model takes "
                f"{size}x{size}; preprocess with .preprocess(images) (or ViP2CLIPProcessor(image_size={size}))."
            )
        scores, maps = self._backend(pixel_values)
        return ExportedOutput(anomaly_score=scores, anomaly_map=maps)

    def predict(self, images: Any) -> ExportedOutput:
        """`self(self.preprocess(images))`."""
        return self(self.preprocess(images))

    def __repr__(self) -> str:
        return (f"ExportedViP2CLIP({str(self.folder)!r}, {self.info.get('format')} {self.info.get('precision')}, "
                f"{self.image_size}px, {self.backend_name})")


# What an unreadable image raises while it is opened, decoded or checked (PIL's DecompressionBombError is none of
# these): the image is skipped, never the run.
_IMAGE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


def _reason(error: BaseException) -> str:
    """One line saying why an image could not be read."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return " ".join(str(error).split()) or type(error).__name__


def _pixels(model: ExportedViP2CLIP, path: str) -> np.ndarray:
    """`pixel_values` of one image file, fully decoded inside (a truncated file fails here, not at inference)."""
    with Image.open(path) as handle:
        handle.load()
        return model.preprocess(handle)


def main(argv: Sequence[str] | None = None) -> int:
    """`python vip2clip_runtime.py FOLDER IMAGE...`: one JSON line (path, score) per image on stdout.

    As `vip2clip predict`: an image that cannot be read is reported (`skipped PATH: REASON` on stderr) and the
    others are scored; the skipped ones are listed again at the end. Exit status 0 when at least one image was
    scored, 1 when none could be, 2 for a folder that is not an exported model or whose model file cannot be
    loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print("usage: python vip2clip_runtime.py EXPORTED_FOLDER IMAGE [IMAGE ...]", file=sys.stderr)
        return 2
    try:
        model = ExportedViP2CLIP.from_folder(argv[0])
    except (ValueError, ImportError) as error:  # not an exported folder, or its runtime is not installed
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    except Exception as error:  # noqa: BLE001 - a truncated model.onnx / openvino_model.bin: a line, not 15
        why = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        print(f"error: cannot load the exported model ({argv[0]}): the model file is damaged or truncated "
              f"({why}); export the model again", file=sys.stderr, flush=True)
        return 2
    skipped = []
    for path in argv[1:]:
        try:
            pixel_values = _pixels(model, path)
        except _IMAGE_ERRORS as error:
            skipped.append(path)
            print(f"skipped {path}: {_reason(error)}", file=sys.stderr, flush=True)
            continue
        output = model(pixel_values)
        print(json.dumps({"path": path, "score": float(output.anomaly_score[0]),
                          "map_max": float(output.anomaly_map[0].max())}), flush=True)
    scored = len(argv) - 1 - len(skipped)
    if skipped:
        print(f"scored {scored} of {len(argv) - 1} images; skipped {len(skipped)} that could not be read: "
              + ", ".join(skipped), file=sys.stderr, flush=True)
    return 0 if scored else 1


if __name__ == "__main__":
    raise SystemExit(main())
