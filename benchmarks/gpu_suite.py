"""The GPU suite: every GPU figure of benchmarks/README.md in one run, one JSON line per figure (issue 21).

    python benchmarks/gpu_suite.py --out benchmarks/results_gpu_$(date +%F).jsonl     # on a GPU machine
    python benchmarks/gpu_suite.py --tiny                                             # CPU check of the script

Figures, in this order (each line has "figure", the device and the elapsed time of the suite):

1. `machine`: the card (name, memory, compute capability), its dense bf16 peak used for MFU, torch/CUDA versions,
   the CPU (model name, family/model, ISA flags) and the load average.
2. `forward` per dtype (bf16, fp16) × batch (1, 8, 32): images/s, ms/image, MFU against the card's dense bf16
   peak (`DENSE_BF16_TFLOPS`, by the card's name; unknown cards: the measured 8192³ bf16 matmul rate) and against
   that measured rate, peak GPU memory. The real geometry (ViT-L/14@336 at 518 px) with random weights, loaded
   the standard way (`from_pretrained(dtype=...)`: the heads stay fp32).
3. `compile`: `torch.compile` of the whole forward on and off at the largest batch in bf16 (compile time apart).
4. `predict`: `vip2clip predict`'s loop (DataLoader workers, overlays written by threads) at batch 32 in bf16 on
   640×480 PNG files, against the model alone on the same images; with and without overlays.
5. `onnxruntime_cuda`: the ONNX export (`vip2clip export --format onnx`, fp32) under ONNX Runtime's CUDA provider
   at batch 8, if onnxruntime with CUDA imports (else a line saying why not).

Budget: it is built to finish in under 8 minutes on one H100; `--budget-s` (default 450) skips what would start
after the budget is spent (a `skipped` line says so). Without a GPU it runs on the CPU (`--tiny` for the test
geometry, so that the whole path is exercised in seconds); MFU there is against the measured matmul rate.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, matched on the name
# torch reports; the first key contained in the name wins, so the more specific names come first.
DENSE_BF16_TFLOPS = {
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM5
    "H200": 989.4,
    "H800": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 6000 Ada": 364.2,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (no bf16 on Volta)
    "T4": 65.0,  # fp16 (no bf16 on Turing)
}


def card_peak_tflops(name: str) -> float | None:
    for key, value in DENSE_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


class Suite:
    """Runs the figures in order, prints each line, stops starting new ones once the budget is spent."""

    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.device = args.device
        self.lines: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def emit(self, record: dict) -> None:
        record = {"figure": record.pop("figure"), "device": self.device, **record,
                  "suite_elapsed_s": round(self.elapsed(), 1)}
        self.lines.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def step(self, name: str, function, *arguments, **keywords):
        """Run one part; a failure or an exhausted budget is a JSON line, never the end of the suite."""
        if self.elapsed() > self.args.budget_s:
            self.emit({"figure": name, "skipped": f"budget of {self.args.budget_s} s spent"})
            return None
        try:
            return function(*arguments, **keywords)
        except Exception as error:  # noqa: BLE001 - the suite reports and goes on
            self.emit({"figure": name, "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc(limit=3)[-1500:]})
            return None

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- figures
def machine_line(suite: Suite) -> dict:
    info = common.machine_info(suite.device)
    record = {"figure": "machine", **info, "geometry": "tiny" if suite.args.tiny else "ViT-L/14@336 at 518 px"}
    if suite.device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(suite.device)
        record.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / common.GIB, 1),
                      compute_capability=f"{properties.major}.{properties.minor}", cuda=torch.version.cuda,
                      card_dense_bf16_tflops=card_peak_tflops(properties.name))
    dtype = torch.bfloat16 if suite.device.startswith("cuda") else torch.float32
    size = 8192 if suite.device.startswith("cuda") else (1024 if suite.args.tiny else 4096)
    measured = common.matmul_rate_gflops(dtype, suite.device, size=size, repeats=3) / 1000
    record["measured_matmul_tflops"] = round(measured, 4)
    record["measured_matmul_dtype"] = str(dtype).replace("torch.", "")
    suite.peak_tflops = record.get("card_dense_bf16_tflops") or measured
    suite.measured_tflops = measured
    suite.emit(record)
    return record


def _load(suite: Suite, dtype: torch.dtype):
    from modeling_vip2clip import ViP2CLIPModel

    model = ViP2CLIPModel.from_pretrained(suite.model_dir, dtype=dtype).eval().to(suite.device)
    heads = {str(p.dtype) for p in list(model.ica.parameters()) + list(model.fgp.parameters())}
    if heads != {"torch.float32"}:
        raise RuntimeError(f"the heads were loaded as {heads}, not fp32")
    return model


def _time_forward(suite: Suite, forward, pixel_values: torch.Tensor, repeats: int, warmup: int = 2) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            forward(pixel_values)
        suite.sync()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            output = forward(pixel_values)
            output.anomaly_map.float().sum().item()  # waits for the GPU and reads a result, as a caller would
            seconds.append(time.perf_counter() - start)
    return seconds


def _rates(suite: Suite, seconds: list[float], batch: int) -> dict:
    best = min(seconds)
    median = sorted(seconds)[len(seconds) // 2]
    achieved = suite.flops_per_image * batch / best / 1e12
    return {
        "images_per_s": round(batch / best, 2), "ms_per_image": round(best / batch * 1000, 3),
        "ms_per_image_median": round(median / batch * 1000, 3), "achieved_tflops": round(achieved, 2),
        "mfu_vs_card_peak": round(achieved / suite.peak_tflops, 4),
        "mfu_vs_measured_matmul": round(achieved / suite.measured_tflops, 4),
    }


def _peak_memory(suite: Suite) -> dict:
    if suite.device.startswith("cuda"):
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(suite.device) / common.GIB, 3)}
    return {"peak_rss_gib": round(common.current_peak_rss_gib() or float("nan"), 3)}


def _reset_peak_memory(suite: Suite) -> None:
    if suite.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(suite.device)
    else:
        common.reset_peak_rss()


def forward_lines(suite: Suite, dtype_name: str) -> None:
    dtype = common.DTYPES[dtype_name]
    model = _load(suite, dtype)
    for batch in suite.args.batch_sizes:
        if suite.elapsed() > suite.args.budget_s:
            suite.emit({"figure": "forward", "dtype": dtype_name, "batch": batch, "skipped": "budget spent"})
            continue
        x = suite.pixel_values[:batch].to(suite.device, dtype)
        _reset_peak_memory(suite)
        seconds = _time_forward(suite, lambda v: model(pixel_values=v), x, suite.args.repeats)
        suite.emit({"figure": "forward", "dtype": dtype_name, "batch": batch, "compiled": False,
                    **_rates(suite, seconds, batch), **_peak_memory(suite)})
    del model
    if suite.device.startswith("cuda"):
        torch.cuda.empty_cache()


def compile_lines(suite: Suite) -> None:
    batch = max(suite.args.batch_sizes)
    model = _load(suite, torch.bfloat16)
    model.cpu_onednn_vision = False  # the CPU fast path's mkldnn ops are not for the compiler (CPU fallback only)
    x = suite.pixel_values[:batch].to(suite.device, torch.bfloat16)
    eager = _time_forward(suite, lambda v: model(pixel_values=v), x, suite.args.repeats)
    compiled = torch.compile(model, mode=suite.args.compile_mode)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(pixel_values=x).anomaly_map.float().sum().item()
    compile_s = time.perf_counter() - start
    _reset_peak_memory(suite)
    timed = _time_forward(suite, lambda v: compiled(pixel_values=v), x, suite.args.repeats)
    with torch.inference_mode():
        difference = (compiled(pixel_values=x).anomaly_score.float() - model(pixel_values=x).anomaly_score.float())
    suite.emit({"figure": "compile", "dtype": "bf16", "batch": batch, "mode": suite.args.compile_mode,
                "compile_s": round(compile_s, 1), "eager": _rates(suite, eager, batch),
                "compiled": _rates(suite, timed, batch),
                "speedup": round(min(eager) / min(timed), 3), "max_abs_score_diff": float(difference.abs().max()),
                **_peak_memory(suite)})
    del model, compiled
    torch._dynamo.reset()


def predict_lines(suite: Suite) -> None:
    from PIL import Image

    from modeling_vip2clip.cli.predict import build_parser, job_arguments
    from modeling_vip2clip.engine.prediction import predict
    from modeling_vip2clip.processing_vip2clip import ViP2CLIPProcessor

    batch = suite.args.predict_batch
    work = Path(suite.work)
    images = work / "predict_images"
    images.mkdir(exist_ok=True)
    distinct = common.smooth_images(16, seed=0)
    for index in range(suite.args.predict_images):
        path = images / f"img_{index:05d}.png"
        if not path.exists():
            distinct[index % 16].save(path)
    files = sorted(str(p) for p in images.glob("*.png"))[: suite.args.predict_images]
    model = _load(suite, torch.bfloat16)
    processor = ViP2CLIPProcessor.for_model(model.config)
    pixel_values = processor(images=[Image.open(f).convert("RGB") for f in files])["pixel_values"]

    def model_only() -> float:
        with torch.inference_mode():
            model(pixel_values=pixel_values[:batch].to(suite.device, torch.bfloat16))
            suite.sync()
            start = time.perf_counter()
            for begin in range(0, len(files), batch):
                output = model(pixel_values=pixel_values[begin:begin + batch].to(suite.device, torch.bfloat16))
                output.anomaly_score.float().cpu(), output.anomaly_map.float().cpu()
        return len(files) / (time.perf_counter() - start)

    def arguments(out: Path, inputs: list[str], overlays: bool) -> dict:
        """predict's keywords for these `vip2clip predict` flags, with the model already loaded in bf16."""
        keywords = job_arguments(build_parser().parse_args([
            "--model", str(suite.model_dir), *inputs, "--output-dir", str(out), "--batch-size", str(batch),
            "--num-workers", str(suite.args.workers), "--device", suite.device, "--overwrite",
            "--no-progress", *([] if overlays else ["--no-overlays"])]))
        return {**keywords, "model": model}

    predict(**arguments(work / "warmup", files[:batch], True), processor=processor)
    for overlays in (True, False):
        before = model_only()
        result = predict(**arguments(work / f"e2e_{overlays}", files, overlays), processor=processor)
        after = model_only()
        e2e = result["rows"] / result["seconds"]
        suite.emit({"figure": "predict", "dtype": "bf16", "batch": batch, "workers": suite.args.workers,
                    "overlays": overlays, "images": len(files), "image_size": "640x480",
                    "e2e_images_per_s": round(e2e, 2),
                    "model_only_images_per_s": [round(before, 2), round(after, 2)],
                    "e2e_vs_model_only": round(e2e / ((before + after) / 2), 3),
                    "loadavg_1m": round(os.getloadavg()[0], 2)})


def onnxruntime_lines(suite: Suite) -> None:
    try:
        import onnxruntime
    except ImportError as error:
        suite.emit({"figure": "onnxruntime_cuda", "skipped": f"onnxruntime does not import: {error}"})
        return
    providers = onnxruntime.get_available_providers()
    provider = "CUDAExecutionProvider" if suite.device.startswith("cuda") else "CPUExecutionProvider"
    if provider not in providers:
        suite.emit({"figure": "onnxruntime_cuda", "skipped": f"{provider} not in {providers}"})
        return
    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor
    from modeling_vip2clip.deploy.export import export

    model = ViP2CLIPModel.from_pretrained(suite.model_dir, dtype=torch.float32).eval()
    folder = Path(suite.work) / "onnx"
    start = time.perf_counter()
    export(model, folder, processor=ViP2CLIPProcessor.for_model(model.config), format="onnx", overwrite=True,
           progress=False)
    export_s = time.perf_counter() - start
    del model
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=[provider])
    batch = min(8, max(suite.args.batch_sizes))
    x = suite.pixel_values[:batch].numpy()
    session.run(None, {"pixel_values": x})
    seconds = []
    for _ in range(suite.args.repeats):
        start = time.perf_counter()
        session.run(None, {"pixel_values": x})
        seconds.append(time.perf_counter() - start)
    best = min(seconds)
    achieved = suite.flops_per_image * batch / best / 1e12
    suite.emit({"figure": "onnxruntime_cuda", "provider": session.get_providers()[0], "dtype": "fp32",
                "batch": batch, "onnxruntime": onnxruntime.__version__, "export_s": round(export_s, 1),
                "images_per_s": round(batch / best, 2), "ms_per_image": round(best / batch * 1000, 3),
                "mfu_vs_card_peak": round(achieved / suite.peak_tflops, 4)})


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny geometry (a quick check of the script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["forward", "compile", "predict", "onnxruntime"],
                        choices=["forward", "compile", "predict", "onnxruntime"])
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode (default: max-autotune-no-cudagraphs)")
    parser.add_argument("--predict-images", type=int, default=512)
    parser.add_argument("--predict-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the predict figure (default: min(8, cores))")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start nothing new after this many seconds")
    parser.add_argument("--work-dir", default=None, help="keep the random model, images and exports here")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.predict_images = min(args.predict_images, 16)
        args.predict_batch = min(args.predict_batch, 4)

    suite = Suite(args)
    suite.work = args.work_dir or tempfile.mkdtemp(prefix="vip2clip_gpu_suite_")
    Path(suite.work).mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from modeling_vip2clip.testing_utils import save_tiny_vip2clip, tiny_vip2clip_config

        suite.model_dir = Path(suite.work) / "tiny_model"
        if not (suite.model_dir / "config.json").is_file():
            save_tiny_vip2clip(suite.model_dir)
        config = tiny_vip2clip_config()
    else:
        suite.model_dir = common.save_random_model(Path(suite.work) / "real_model")
        config = common.real_geometry_config()
    suite.flops_per_image = common.model_flops_per_image(config)["total"]
    suite.pixel_values = common.make_pixel_values(max(args.batch_sizes), config.image_size)

    suite.step("machine", machine_line, suite)
    if not hasattr(suite, "peak_tflops"):
        return suite.lines
    if "forward" in args.parts:
        for dtype_name in args.dtypes:
            suite.step("forward", forward_lines, suite, dtype_name)
    if "compile" in args.parts:
        suite.step("compile", compile_lines, suite)
    if "predict" in args.parts:
        suite.step("predict", predict_lines, suite)
    if "onnxruntime" in args.parts:
        suite.step("onnxruntime_cuda", onnxruntime_lines, suite)
    suite.emit({"figure": "done", "lines": len(suite.lines), "errors": sum("error" in line for line in suite.lines)})
    return suite.lines


if __name__ == "__main__":
    main()
