"""Inference benchmark of ViP²-CLIP at the real geometry (ViT-L/14@336 at 518 px) with random weights.

Each configuration (dtype × batch size) runs in a fresh Python process so that peak memory is its own, and
prints ONE JSON line: machine, settings, s/image, images/s, vision / text / heads split, peak memory, the
large-matmul rates measured in the same process for the dtype in use, the analytic model FLOPs per image and the
model FLOP utilisation (MFU = achieved FLOP/s ÷ the best measured matmul rate); bf16 lines add their deviation
from fp32 on the same inputs (min per-image Pearson correlation of the anomaly maps, max |score difference|).

Times: `s_per_image` / `images_per_s` / `mfu` use the best of `--repeats` timed forwards (after `--warmup`),
`s_per_image_median` the median — on a shared machine the best is the least disturbed. The load average at the
start and end of each run is in the JSON. Matmul rates: `torch_matmul` (ATen → MKL sgemm for fp32 on CPU) and
`onednn_linear` (oneDNN); on AMD Zen MKL's fp32 kernels reach about half of oneDNN's, so MFU is against `best`.

fp32 is the exact path; bf16 is loaded the standard way: the fp32 random model is `save_pretrained` to a temp
dir and reloaded with `AutoModel.from_pretrained(dir, trust_remote_code=True, dtype=torch.bfloat16)`; the model
keeps `ica` / `fgp` in fp32 (`_keep_in_fp32_modules_strict`) and the run checks that it did.

Usage::

    python benchmarks/bench_inference.py --batch-sizes 1 8 --dtype fp32 bf16 --device cpu --repeats 3
    python benchmarks/bench_inference.py --batch-sizes 4 --dtype fp32 --attn eager --repeats 2
    python benchmarks/bench_inference.py --device cuda --batch-sizes 1 8 32 --dtype fp32 bf16 --repeats 10
    # a patched copy of the package (e.g. a proposed model patch applied in a scratch tree):
    python benchmarks/bench_inference.py --package-root /tmp/scratch_main --model-dir /tmp/m --work-dir /tmp/w

Memory: on CPU `peak_rss_gib` is the process's lifetime max RSS (getrusage; loading included) and
`inference_peak_rss_gib` the peak RSS of the forwards alone (VmHWM reset after loading); on GPU
`torch.cuda.max_memory_allocated` over the forwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _parameter_dtypes(model) -> dict:
    vision = model.clip.vision_model
    return {
        "vision": str(vision.encoder.layers[0].self_attn.q_proj.weight.dtype).replace("torch.", ""),
        "text": str(model.clip.text_model.encoder.layers[0].mlp.fc1.weight.dtype).replace("torch.", ""),
        "ica": sorted({str(p.dtype).replace("torch.", "") for p in model.ica.parameters()}),
        "fgp": sorted({str(p.dtype).replace("torch.", "") for p in model.fgp.parameters()}),
    }


def worker(spec: dict) -> dict:
    from transformers import AutoModel

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, dtype_name, batch = spec["device"], spec["dtype"], spec["batch"]
    dtype = common.DTYPES[dtype_name]
    pixel_values = torch.load(spec["inputs"])[:batch]

    model = AutoModel.from_pretrained(
        spec["model_dir"], trust_remote_code=True, dtype=dtype, attn_implementation=spec["attn"]
    ).eval()
    model.to(device)
    dtypes = _parameter_dtypes(model)
    expected_vision = dtype_name if dtype_name != "fp32" else "float32"
    expected_vision = {"bf16": "bfloat16", "fp16": "float16"}.get(expected_vision, expected_vision)
    dtype_ok = dtypes["ica"] == ["float32"] and dtypes["fgp"] == ["float32"] and dtypes["vision"] == expected_vision
    if not dtype_ok:
        raise SystemExit(f"unexpected parameter dtypes after loading with dtype={dtype}: {dtypes}")

    config = model.config
    model_fast_path = common.fast_path_in_use(model, device)  # None for model code without the CPU fast path
    x = pixel_values.to(device)
    rss_after_load = common.current_rss_gib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        common.reset_peak_rss()

    times, vision_times, scoring_times, text_times = [], [], [], []
    with torch.inference_mode():
        for step in range(spec["warmup"] + max(spec["repeats"], 1)):
            _sync(device)
            start = time.perf_counter()
            image_embeds, patch_embeds = model.encode_image(x)
            _sync(device)
            middle = time.perf_counter()
            output = model.score_features(image_embeds, patch_embeds)
            _sync(device)
            end = time.perf_counter()
            # text encoder alone (ICA + prompts through the text tower), for the split; not in `times`
            start_text = time.perf_counter()
            model.encode_text(image_embeds)
            _sync(device)
            if step >= spec["warmup"]:
                times.append(end - start)
                vision_times.append(middle - start)
                scoring_times.append(end - middle)
                text_times.append(time.perf_counter() - start_text)

    if device.startswith("cuda"):
        peak = {"inference_peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / common.GIB, 3)}
    else:
        peak = {"inference_peak_rss_gib": round(common.current_peak_rss_gib() or float("nan"), 3)}
    peak["peak_rss_gib"] = round(common.lifetime_peak_rss_gib(), 3)
    peak["rss_after_load_gib"] = round(rss_after_load or float("nan"), 3)

    scores = output.anomaly_score.float().cpu()
    maps = output.anomaly_map.float().cpu()
    out_path = Path(spec["out_dir"]) / f"out_{dtype_name}_{spec['attn']}_b{batch}.pt"
    torch.save({"scores": scores, "maps": maps}, out_path)

    del model, output, image_embeds, patch_embeds
    rates = common.matmul_rates(dtype, device)

    flops = common.model_flops_per_image(config)
    median, best = statistics.median(times), min(times)
    achieved = flops["total"] * batch / best / 1e9
    record = {
        "benchmark": "vip2clip_inference",
        "implementation": "vip2clip (this package)",
        "machine": common.machine_info(device),
        "settings": {
            "batch": batch, "dtype": dtype_name, "device": device, "attn": spec["attn"],
            "image_size": config.image_size, "feature_layers": config.feature_layers, "n_ctx": config.n_ctx,
            "n_cls": config.n_cls, "top_k": config.top_k, "repeats": len(times), "warmup": spec["warmup"],
            "grad_mode": "torch.inference_mode", "weights": "random (seed 0), real ViT-L/14@336 geometry",
            "package": str(common.ROOT),
            "cpu_fast_path": bool(model_fast_path) if model_fast_path is not None else "n/a (not in this code)",
        },
        "s_per_image": round(best / batch, 4),
        "images_per_s": round(batch / best, 4),
        "s_per_image_median": round(median / batch, 4),
        "s_per_batch_all": [round(t, 4) for t in times],
        "split_s_per_image": {
            "vision": round(min(vision_times) / batch, 4),
            "text": round(min(text_times) / batch, 4),
            "heads": round(max(min(scoring_times) - min(text_times), 0.0) / batch, 4),
        },
        **peak,
        "matmul_gflops": rates,
        "flops_per_image_g": {k: (round(v / 1e9, 3) if k != "text_tokens" else v) for k, v in flops.items()},
        "achieved_gflops": round(achieved, 1),
        "mfu": round(achieved / rates["best"], 4),
        "mfu_vs_torch_matmul": round(achieved / rates["torch_matmul"], 4),
        "parameter_dtypes": dtypes,
        "loadavg_1m_at_end": round(__import__("os").getloadavg()[0], 2),
    }
    if dtype_name != "fp32":
        reference = _fp32_outputs(Path(spec["out_dir"]), spec["attn"], batch)
        if reference is not None:
            pearson = common.pearson_per_image(maps, reference["maps"][:batch])
            record["deviation_vs_fp32"] = {
                "maps_pearson_min": round(float(pearson.min()), 6),
                "maps_max_abs_diff": round(float((maps - reference["maps"][:batch]).abs().max()), 6),
                "scores_max_abs_diff": round(float((scores - reference["scores"][:batch]).abs().max()), 6),
                "fp32_scores": [round(float(s), 5) for s in reference["scores"][:batch]],
                "fp32_map_std_min": round(float(reference["maps"][:batch].flatten(1).std(1).min()), 6),
            }
    return record


def _fp32_outputs(out_dir: Path, attn: str, batch: int):
    candidates = sorted(out_dir.glob(f"out_fp32_{attn}_b*.pt"), key=lambda p: int(p.stem.split("_b")[-1]))
    for path in candidates:
        if int(path.stem.split("_b")[-1]) >= batch:
            return torch.load(path)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--model-dir", default=None, help="reuse a saved random model (else a temp one)")
    parser.add_argument("--work-dir", default=None, help="where inputs/outputs go (default: a temp dir)")
    parser.add_argument("--package-root", default=None,
                        help="benchmark the package in this tree instead of this checkout (e.g. a patched copy)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.package_root and args._worker is None:  # re-run with the package root set before any import
        os.environ["VIP2CLIP_PACKAGE_ROOT"] = str(Path(args.package_root).resolve())
        argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        index = argv.index("--package-root")
        del argv[index:index + 2]
        import subprocess

        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *argv])

    if args._worker is not None:
        print(json.dumps(worker(json.loads(args._worker))), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="vip2clip_bench_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = Path(args.model_dir) if args.model_dir else work / "model"
        common.save_random_model(model_dir, args.image_size)
        common.sync_model_code(model_dir)
        inputs = work / "inputs.pt"
        torch.save(common.make_pixel_values(max(args.batch_sizes), args.image_size), inputs)
        base = {
            "device": args.device, "attn": args.attn, "warmup": args.warmup, "repeats": args.repeats,
            "threads": args.threads, "model_dir": str(model_dir), "inputs": str(inputs), "out_dir": str(work),
        }
        dtypes = sorted(args.dtype, key=lambda name: name != "fp32")  # fp32 first: bf16 compares against it
        if "fp32" not in dtypes and _fp32_outputs(work, args.attn, max(args.batch_sizes)) is None:
            # untimed fp32 outputs for the deviation (unless a reused --work-dir already has them)
            common.run_worker(Path(__file__), {**base, "dtype": "fp32", "batch": max(args.batch_sizes),
                                               "warmup": 0, "repeats": 1})
        for dtype_name in dtypes:
            for batch in args.batch_sizes:
                record = common.run_worker(Path(__file__), {**base, "dtype": dtype_name, "batch": batch})
                print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
