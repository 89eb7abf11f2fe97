"""Deployment benchmark: this package's torch CPU paths against its ONNX / OpenVINO exports, real geometry.

ViT-L/14@336 at 518 px with random weights (benchmarks/_common.py), one process, the same inputs for every path:

* `torch_fp32`, `torch_bf16`: `ViP2CLIPModel` loaded in fp32 / bf16 (the CPU oneDNN fast path, heads in fp32);
* `ort_fp32`: the ONNX export under ONNX Runtime (CPU provider);
* `ov_f32`, `ov_bf16`: the OpenVINO export with the f32 / bf16 inference-precision hint;
* `ov_int8` (`ov_int8_bf16`): the NNCF INT8 export, its floating-point ops in f32 (bf16).
* `ov_int8_2g`: the two-graph INT8 export (`--two-graphs`, export_two_graphs.py): INT8 tower with its float ops
  in bf16 where the CPU has native bf16 (else f32), heads in f32; `ov_int8_2g_f32`: the tower forced to f32.

Each path is loaded and run on the evaluation images in turn (its warm-up; the peak RSS of that phase is
`peak_rss_gib`, VmHWM reset before it, `rss_before_gib` what the process held already); then all loaded paths are
timed round-robin, `--repeats` rounds (s/image: best and median per batch size), so that other processes on a
shared machine slow every path alike. Accuracy is against `torch_fp32` on `--eval-images` held-out images of the
real-looking synthetic benchmark (modeling_vip2clip/data/synthetic.py): minimum per-image map Pearson, max |Δmap|,
max |Δscore|. INT8 is calibrated on `--calibration-size` other synthetic images (another seed).

`--int8-experiments NAME...` quantises the named variants of `INT8_VARIANTS` (what stays in floating point,
SmoothQuant, NNCF's advanced parameters), and prints accuracy and batch-1 s/image for each, to choose the recipe.
Exports and quantised models are cached in `--work-dir`, so reruns skip them.

    flock /tmp/bench.lock python benchmarks/bench_export.py --work-dir /tmp/vip2clip_export --batch-sizes 1 8
    flock /tmp/bench.lock python benchmarks/bench_export.py --work-dir /tmp/vip2clip_export \\
        --int8-experiments naive default no_attention_matmuls sq_0.5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor  # noqa: E402
from modeling_vip2clip import export as export_module  # noqa: E402
from modeling_vip2clip.deploy.exported_runtime import INFO_FILE, OPENVINO_FILE, ExportedViP2CLIP  # noqa: E402

# Vision blocks are `/model/layers.N/` in the traced graph (export.INT8_IGNORED_PATTERNS); N counts from 0.
_HEADS = r"(?!/model/layers\.\d+/)"  # everything but the vision blocks (the package default)
_ATTENTION_MATMULS = r"/model/layers\.\d+/self_attn/MatMul"  # q·kᵀ and softmax·v (activation × activation)


def _blocks(indices) -> str:
    return r"/model/layers\.(" + "|".join(str(i) for i in indices) + r")/"


# name → (ignored patterns, nncf.AdvancedQuantizationParameters kwargs, note)
INT8_VARIANTS: dict[str, tuple[list[str], dict, str]] = {
    "naive": ([], {}, "everything quantised (the issue's first try)"),
    "default": ([_HEADS], {}, "vision blocks only (export.INT8_IGNORED_PATTERNS)"),
    "no_attention_matmuls": ([_HEADS, _ATTENTION_MATMULS], {}, "+ attention products in float"),
    "keep_last_2": ([_HEADS, _blocks([22, 23])], {}, "+ the last 2 blocks in float"),
    "keep_last_4": ([_HEADS, _blocks([20, 21, 22, 23])], {}, "+ the last 4 blocks in float"),
    "keep_tap_fc2": ([_HEADS, r"/model/layers\.(5|11|17|23)/mlp/fc2/"], {}, "+ fc2 of the tapped blocks in float"),
    "sq_off": ([_HEADS], {"smooth_quant_alpha": -1}, "default without SmoothQuant"),
    "sq_0.5": ([_HEADS], {"smooth_quant_alpha": 0.5}, "SmoothQuant alpha 0.5"),
    "sq_0.95": ([_HEADS], {"smooth_quant_alpha": 0.95}, "SmoothQuant alpha 0.95"),
    "no_overflow_fix": ([_HEADS], {"overflow_fix": "disable"}, "full 8-bit weights (VNNI has no overflow)"),
    "no_attention_no_overflow_fix": ([_HEADS, _ATTENTION_MATMULS], {"overflow_fix": "disable"},
                                     "attention products in float + full 8-bit weights"),
}


def _advanced(kwargs: dict) -> dict:
    """JSON-able variant settings → nncf objects."""
    kwargs = dict(kwargs)
    if "overflow_fix" in kwargs:
        import nncf

        kwargs["overflow_fix"] = nncf.OverflowFix(kwargs["overflow_fix"])
    return kwargs


# ---------------------------------------------------------------------------------------------- inputs
def synthetic_images(root: Path, seed: int, count: int) -> list:
    """`count` real-looking images (normal and defective, all four categories) of the synthetic benchmark."""
    from PIL import Image

    from modeling_vip2clip.data import generate_synthetic_benchmark

    per_category = max(1, -(-count // 8))  # 4 categories × (good + bad)
    records = generate_synthetic_benchmark(root, n_train_good=0, n_test_good=per_category, n_test_bad=per_category,
                                           image_size=518, seed=seed, layout="folder")
    records = sorted(records, key=lambda r: (r["label"], r["category"], r["image_path"]))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(records), size=min(count, len(records)), replace=False))
    return [Image.open(root / records[i]["image_path"]).convert("RGB") for i in chosen]


# ---------------------------------------------------------------------------------------------- paths
def _torch_runner(model):
    def run(pixel_values: np.ndarray):
        with torch.inference_mode():
            output = model(pixel_values=torch.from_numpy(pixel_values))
        return output.anomaly_score.float().numpy(), output.anomaly_map.float().numpy()

    return run


def _exported_runner(folder: Path, precision: str | None = None):
    exported = ExportedViP2CLIP.from_folder(folder, inference_precision=precision)

    def run(pixel_values: np.ndarray):
        output = exported(pixel_values)
        return output.anomaly_score, output.anomaly_map

    return run, exported


def load_path(name: str, load, eval_pixels: np.ndarray, reference=None) -> tuple[dict, Any, tuple]:
    """Load a path (`load()` → runner) and run it on the evaluation images one by one (its warm-up too);
    returns (record with load time, peak RSS and accuracy against `reference`, the runner, its outputs)."""
    gc.collect()
    rss_before = common.current_rss_gib()
    common.reset_peak_rss()
    started = time.perf_counter()
    runner = load()
    load_s = time.perf_counter() - started
    outputs = [runner(eval_pixels[i:i + 1]) for i in range(len(eval_pixels))]
    outputs = (np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs]))
    record = {"path": name, "load_s": round(load_s, 2),
              "peak_rss_gib": round(common.current_peak_rss_gib() or float("nan"), 3),
              "rss_before_gib": round(rss_before or float("nan"), 3)}
    if reference is not None:
        record["vs_torch_fp32"] = export_module.accuracy_figures(reference, outputs)
    return record, runner, outputs


def time_paths(runners: dict, bench_pixels: np.ndarray, batch_sizes, repeats: int, batch1_once=()) -> dict:
    """Round-robin timing (every path once per round, `repeats` rounds), so that load from other processes on a
    shared machine hits all paths alike; per path and batch: best and median s/image. Paths in `batch1_once`
    (minutes per image, e.g. bf16 where the CPU emulates it) run at batch 1 in the first round only."""
    times = {name: {batch: [] for batch in (batch_sizes if name not in batch1_once else [1])} for name in runners}
    for round_index in range(repeats):
        for name, runner in runners.items():
            if name in batch1_once and round_index > 0:
                continue
            for batch in times[name]:
                start = time.perf_counter()
                runner(bench_pixels[:batch])
                times[name][batch].append(time.perf_counter() - start)
    return {name: {str(batch): {"s_per_image": round(min(values) / batch, 4),
                                "s_per_image_median": round(statistics.median(values) / batch, 4)}
                   for batch, values in per_batch.items()} for name, per_batch in times.items()}


def _int8_folder(work: Path, ov_folder: Path, variant: str, calibration: list) -> Path:
    """The INT8 export of `variant`, quantised from the cached f32 OpenVINO model (cached too)."""
    import openvino

    folder = work / f"int8_{variant}_c{len(calibration)}"
    if (folder / OPENVINO_FILE).is_file():
        return folder
    patterns, advanced, note = INT8_VARIANTS[variant]
    started = time.perf_counter()
    ov_model = openvino.Core().read_model(str(ov_folder / OPENVINO_FILE))
    quantized = export_module.quantize_int8(ov_model, calibration, patterns, _advanced(advanced))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ov_folder, tmp, ignore=shutil.ignore_patterns("openvino_model.*"))
    openvino.save_model(quantized, str(tmp / OPENVINO_FILE), compress_to_fp16=False)
    info = json.loads((tmp / INFO_FILE).read_text())
    info["precision"] = "int8"
    info["int8"] = {"variant": variant, "note": note, "ignored_patterns": patterns, "advanced_parameters": advanced,
                    "calibration_images": len(calibration), "quantize_s": round(time.perf_counter() - started, 1)}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    tmp.rename(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/vip2clip_bench_export")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+",
                        default=["torch_fp32", "torch_bf16", "ort_fp32", "ov_f32", "ov_bf16", "ov_int8",
                                 "ov_int8_bf16"])
    parser.add_argument("--int8-variant", default="default", choices=sorted(INT8_VARIANTS))
    parser.add_argument("--int8-experiments", nargs="*", default=None, metavar="VARIANT",
                        help="quantise these variants (all when empty) and report accuracy + batch-1 s/image")
    parser.add_argument("--experiment-precisions", nargs="+", default=["f32"], choices=["f32", "bf16"],
                        help="OpenVINO precision hints of the float ops tried for each --int8-experiments variant")
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--output", default=None, help="append the JSON lines to this file too")
    parser.add_argument("--batch1-once", nargs="*", default=[], metavar="PATH",
                        help="paths timed at batch 1 in one round only (e.g. torch_bf16 where bf16 is emulated)")
    parser.add_argument("--no-accuracy", nargs="*", default=[], metavar="PATH",
                        help="paths loaded and warmed up on one image only, without accuracy figures")
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model_dir = common.save_random_model(work / "model", 518)
    processor = ViP2CLIPProcessor(image_size=518)
    eval_images = synthetic_images(work / "synthetic_eval", seed=0, count=args.eval_images)
    eval_pixels = processor(images=eval_images)["pixel_values"].numpy()
    bench_pixels = common.make_pixel_values(max(args.batch_sizes), 518).numpy()

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    emit({"benchmark": "vip2clip_export", "machine": common.machine_info("cpu"),
          "settings": {"image_size": 518, "weights": "random (seed 0), real ViT-L/14@336 geometry",
                       "eval_images": len(eval_pixels), "batch_sizes": args.batch_sizes, "repeats": args.repeats,
                       "calibration_size": args.calibration_size, "eval": "synthetic benchmark seed 0",
                       "calibration": "synthetic benchmark seed 1"}})

    # exports (cached): traced once from the fp32 model
    onnx_folder, ov_folder = work / "onnx", work / "ov_f32"
    fp32 = ViP2CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    needed = {"onnx": "ort_fp32" in args.paths,
              "openvino": args.int8_experiments is not None or any(
                  p in ("ov_f32", "ov_bf16") or (p.startswith("ov_int8") and not p.startswith("ov_int8_2g"))
                  for p in args.paths)}
    for folder, fmt in ((onnx_folder, "onnx"), (ov_folder, "openvino")):
        if needed[fmt] and not (folder / INFO_FILE).is_file():
            started = time.perf_counter()
            export_module.export(fp32, folder, processor=processor, format=fmt, source="random ViT-L/14@518",
                                 overwrite=True)
            emit({"export": fmt, "seconds": round(time.perf_counter() - started, 1)})

    # the reference: torch fp32 on the evaluation images (outputs cached with the work dir)
    records, runners = {}, {}
    if "torch_fp32" in args.paths or not (work / "reference.npz").is_file():
        records["torch_fp32"], runners["torch_fp32"], reference = load_path(
            "torch_fp32", lambda: _torch_runner(fp32), eval_pixels)
        np.savez(work / "reference.npz", scores=reference[0], maps=reference[1])
    cached = np.load(work / "reference.npz")
    reference = (cached["scores"], cached["maps"])
    gc.collect()

    calibration = None
    if args.int8_experiments is not None or any(p.startswith("ov_int8") for p in args.paths):
        calibration_images = synthetic_images(work / "synthetic_calibration", seed=1, count=args.calibration_size)
        calibration = [processor(images=[image])["pixel_values"].numpy() for image in calibration_images]
    if any(p.startswith("ov_int8_2g") for p in args.paths):
        from modeling_vip2clip.deploy.export_two_graphs import export_openvino_two_graphs

        two_graph_folder = work / f"int8_2g_c{args.calibration_size}"
        if not (two_graph_folder / INFO_FILE).is_file():  # a real export: it writes its accuracy figures
            started = time.perf_counter()
            export_openvino_two_graphs(fp32, processor, two_graph_folder, calibration_images + eval_images,
                                       calibration_size=len(calibration_images), accuracy_images=len(eval_images),
                                       source="random ViT-L/14@518", overwrite=True)
            emit({"export": "openvino two graphs, INT8 tower", "seconds": round(time.perf_counter() - started, 1),
                  "export_info": json.loads((two_graph_folder / INFO_FILE).read_text())})
    if "torch_fp32" not in args.paths:
        runners.pop("torch_fp32", None)
        del fp32
    gc.collect()

    if args.int8_experiments is not None:  # accuracy first (what decides), then batch-1 speed of each
        for variant in args.int8_experiments or sorted(INT8_VARIANTS):
            folder = _int8_folder(work, ov_folder, variant, calibration)
            info = json.loads((folder / INFO_FILE).read_text())["int8"]
            for precision in args.experiment_precisions:
                name = f"ov_int8[{variant}]" + ("_bf16" if precision == "bf16" else "")
                record, runner, _ = load_path(name, lambda: _exported_runner(folder, precision)[0], eval_pixels,
                                              reference)
                record["timings"] = time_paths({name: runner}, bench_pixels, [1], max(1, args.repeats))[name]
                emit({**record, "variant": variant, "note": info["note"], "quantize_s": info.get("quantize_s")})
                del runner
                gc.collect()
        return 0

    loaders = {
        "torch_bf16": lambda: _torch_runner(ViP2CLIPModel.from_pretrained(model_dir, dtype=torch.bfloat16).eval()),
        "ort_fp32": lambda: _exported_runner(onnx_folder)[0],
        "ov_f32": lambda: _exported_runner(ov_folder, "f32")[0],
        "ov_bf16": lambda: _exported_runner(ov_folder, "bf16")[0],
    }
    if any(p.startswith("ov_int8_2g") for p in args.paths):
        loaders["ov_int8_2g"] = lambda: _exported_runner(two_graph_folder)[0]
        loaders["ov_int8_2g_f32"] = lambda: _exported_runner(two_graph_folder, "f32")[0]
    if calibration is not None and any(p in ("ov_int8", "ov_int8_bf16") for p in args.paths):
        int8_folder = _int8_folder(work, ov_folder, args.int8_variant, calibration)
        loaders["ov_int8"] = lambda: _exported_runner(int8_folder, "f32")[0]
        loaders["ov_int8_bf16"] = lambda: _exported_runner(int8_folder, "bf16")[0]
    for name in args.paths:  # any variant as a path: ov_int8[VARIANT] or ov_int8[VARIANT]_bf16
        if name.startswith("ov_int8[") and name not in loaders:
            variant = name[len("ov_int8["):name.index("]")]
            folder = _int8_folder(work, ov_folder, variant, calibration)
            loaders[name] = (lambda f, p: lambda: _exported_runner(f, p)[0])(folder, "bf16" if name.endswith("_bf16")
                                                                            else "f32")
    for name in args.paths:
        if name != "torch_fp32":
            pixels = eval_pixels[:1] if name in args.no_accuracy else eval_pixels
            records[name], runners[name], _ = load_path(name, loaders[name], pixels,
                                                        None if name in args.no_accuracy else reference)
    timings = time_paths(runners, bench_pixels, args.batch_sizes, args.repeats, set(args.batch1_once))
    for name in args.paths:
        record = {**records[name], "timings": timings[name], "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
        if name in ("ov_int8", "ov_int8_bf16"):
            record["variant"] = args.int8_variant
        emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
