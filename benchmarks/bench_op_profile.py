"""Where a forward's time goes, by kind of operation: the profile behind issue 21's target 2 (torch paths at
≥ 0.9 of the machine's best matmul rate).

One process, the random-weight model of the real geometry (ViT-L/14@336 at 518 px), one timed forward
(`encode_image` + `score_features`, as `bench_inference.py` times it) under `torch.profiler` after a warm-up.
Every ATen op's *self* time is put in one bucket — GEMM (linear / matmul / bmm / addmm / the oneDNN linear),
attention (scaled-dot-product kernels), conv (the patch embedding), layer norm, GELU, softmax, copies (copy_,
contiguous, cat, clone, to), other element-wise — and the line reports each bucket's share of the forward, the
GEMM bucket's own rate (its FLOPs from `with_flops`, else the analytic count) against the best square matmul
rate measured in the same process and against a matmul of the tower's own GEMM shapes, and the ceiling that
follows: the MFU if every non-GEMM op took no time at all.

    python benchmarks/bench_op_profile.py --model-dir /tmp/vip2clip_real --dtype fp32
    python benchmarks/bench_op_profile.py --dtype bf16 --out benchmarks/results_….jsonl

One JSON line on stdout (and appended to `--out`), with the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# Op-name fragments → bucket, first match wins (names as the profiler prints them, e.g. "aten::addmm").
BUCKETS = (
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("gemm", ("addmm", "::mm", "bmm", "matmul", "linear_pointwise", "mkldnn_linear", "::linear", "baddbmm")),
    ("conv", ("conv",)),
    ("layer_norm", ("layer_norm",)),
    ("gelu", ("gelu", "sigmoid")),  # QuickGELU is x·sigmoid(1.702x)
    ("softmax", ("softmax",)),
    ("copies", ("copy_", "contiguous", "::cat", "clone", "::to", "_to_copy", "permute", "transpose", "reshape",
                "view", "expand", "select", "slice", "unsqueeze", "empty", "stack", "index")),
)


def bucket_of(name: str) -> str:
    for bucket, fragments in BUCKETS:
        if any(fragment in name for fragment in fragments):
            return bucket
    return "elementwise_other"


def gemm_shape_rate(config, dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of the vision tower's four GEMM shapes (q/k/v/o, MLP up, MLP down) on its own token count, run
    as `nn.functional.linear` the way the tower runs them, weighted by their FLOPs."""
    vision = config.clip_config.vision_config
    tokens, width, ffn = config.num_patches + 1, int(vision.hidden_size), int(vision.intermediate_size)
    shapes = [(width, width, 4), (width, ffn, 1), (ffn, width, 1)]  # (in, out, count per block)
    total_flops, total_time = 0.0, 0.0
    generator = torch.Generator().manual_seed(0)
    for fan_in, fan_out, count in shapes:
        x = torch.randn(tokens, fan_in, generator=generator).to(dtype)
        w = torch.randn(fan_out, fan_in, generator=generator).to(dtype)
        torch.nn.functional.linear(x, w)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - start)
        total_flops += count * 2 * tokens * fan_in * fan_out
        total_time += count * best
    return total_flops / total_time / 1e9


def profile(model_dir: Path, dtype_name: str, batch: int, image_size: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from transformers import AutoModel

    dtype = common.DTYPES[dtype_name]
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype).eval()
    x = common.make_pixel_values(batch, image_size)
    load_start = os.getloadavg()

    def forward():
        image_embeds, patch_embeds = model.encode_image(x)
        return model.score_features(image_embeds, patch_embeds)

    with torch.inference_mode():
        forward()  # warm-up (oneDNN primitive creation, weight packing)
        start = time.perf_counter()
        forward()
        plain_seconds = time.perf_counter() - start
        with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            start = time.perf_counter()
            forward()
            profiled_seconds = time.perf_counter() - start

    seconds, flops, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    for event in prof.key_averages():
        if not event.key.startswith("aten::") and not event.key.startswith("mkldnn::"):
            continue
        bucket = bucket_of(event.key)
        seconds[bucket] += event.self_cpu_time_total / 1e6
        flops[bucket] += float(getattr(event, "flops", 0) or 0)
        calls[bucket] += event.count
    op_total = sum(seconds.values())

    analytic = common.model_flops_per_image(model.config)
    rates = common.matmul_rates(dtype)
    shape_rate = gemm_shape_rate(model.config, dtype)
    gemm_seconds = seconds["gemm"] + seconds["attention"]  # attention is GEMM work (QKᵀ, AV) plus its softmax
    achieved = analytic["total"] * batch / plain_seconds / 1e9
    ceiling = analytic["total"] * batch / gemm_seconds / 1e9 if gemm_seconds else float("nan")
    return {
        "benchmark": "op_profile",
        **common.machine_info("cpu"),
        "dtype": dtype_name, "batch": batch, "image_size": image_size,
        "load_avg_start": [round(v, 2) for v in load_start],
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "s_per_image": round(plain_seconds / batch, 3),
        "s_per_image_profiled": round(profiled_seconds / batch, 3),
        "share": {k: round(v / op_total, 4) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "calls": dict(calls),
        "profiler_gemm_gflop": round(flops["gemm"] / 1e9, 1),
        "analytic_gflop_per_image": round(analytic["total"] / 1e9, 1),
        "matmul_gflops": rates,
        "tower_gemm_shapes_gflops": round(shape_rate, 1),
        "tower_gemm_shapes_vs_best": round(shape_rate / rates["best"], 4),
        "gemm_bucket_gflops": round(flops["gemm"] / seconds["gemm"] / 1e9, 1) if seconds["gemm"] else None,
        "achieved_gflops": round(achieved, 1),
        "mfu": round(achieved / rates["best"], 4),
        "mfu_if_only_gemm_and_attention_ran": round(ceiling / rates["best"], 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--model-dir", default=None, help="reuse a saved random model (else a temp one)")
    parser.add_argument("--out", default=None, help="also append the JSON line to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vip2clip_profile_") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        common.save_random_model(model_dir, args.image_size)
        common.sync_model_code(model_dir)
        line = json.dumps(profile(model_dir, args.dtype, args.batch, args.image_size))
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
