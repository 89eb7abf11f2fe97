"""Which CPU kernels win on THIS machine: the vision tower's fast path (oneDNN) against transformers' layers
(ATen → MKL), whole-model forwards alternated in one process, plus the GEMM rates of the tower's own shapes.

Machines of this project change between sessions (AMD Zen 3 with AVX2 only, Zen 4 with AVX-512 on 256-bit
halves, Zen 5 with full AVX-512 + BF16), and a kernel that wins on one can lose on another; the package picks per
CPU at run time (`cpu_fast_path_vip2clip.fp32_fast_path_wins`), and this script is the measurement behind that
choice. Prints one JSON line with the CPU's identity (model name, family/model, ISA flags, Zen generation).

    python benchmarks/bench_cpu_kernels.py --rounds 3 --model-dir /tmp/vip2clip_real
    python benchmarks/bench_cpu_kernels.py --rounds 3 --bf16-once    # + one bf16 forward where bf16 is emulated
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def _gemm_rates(dtype: torch.dtype, tokens: int, width: int, ffn: int, repeats: int = 3) -> dict:
    """GFLOP/s of the tower's linears (q/k/v/o, fc1, fc2 on `tokens` rows) with ATen (MKL), oneDNN and oneDNN
    on a prepacked weight."""
    rates = {}
    for name, (n_out, n_in) in {"qkvo": (width, width), "fc1": (ffn, width), "fc2": (width, ffn)}.items():
        a = torch.randn(tokens, n_in, dtype=dtype)
        w = torch.randn(n_out, n_in, dtype=dtype)
        b = torch.randn(n_out, dtype=dtype)
        candidates = {"aten_addmm": lambda: torch.addmm(b, a, w.t())}
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, tokens)
            torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
            candidates["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
            candidates["onednn_prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, b, "none", [], "")
        except RuntimeError:
            pass  # no oneDNN kernel for this dtype on this CPU
        flops = 2 * tokens * n_in * n_out
        for kernel, run in candidates.items():
            run()
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            rates[f"{name}/{kernel}"] = round(flops / best / 1e9, 1)
    return rates


def _profile(model, pixel_values, top: int = 12) -> dict:
    """torch.profiler over one forward of the package's default path: the ops' shares of self CPU time, so that
    the time not spent in GEMMs (attention, LayerNorm, GELU, copies) is named."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(pixel_values=pixel_values)
    events = [event for event in profiler.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events)
    events.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    return {"total_self_s": round(total / 1e6, 3),
            "share": {event.key: round(event.self_cpu_time_total / total, 4) for event in events[:top]}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--model-dir", type=Path, default=None, help="saved random model to reuse (made if absent)")
    parser.add_argument("--bf16-once", action="store_true",
                        help="also time one bf16 forward on transformers' layers (minutes where bf16 is emulated)")
    parser.add_argument("--profile", action="store_true", help="also profile one forward of the default path")
    parser.add_argument("--variants", nargs="+", default=["fast", "fast_prepacked", "plain"])
    args = parser.parse_args(argv)

    from modeling_vip2clip import ViP2CLIPModel
    from modeling_vip2clip import cpu_fast_path_vip2clip as fast_path

    model_dir = common.save_random_model(args.model_dir or Path("/tmp/vip2clip_real"), args.image_size)
    model = ViP2CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixel_values = common.make_pixel_values(1, args.image_size)
    settings = {"fast": (True, False), "fast_prepacked": (True, True), "plain": (False, None)}
    variants = {name: settings[name] for name in args.variants}
    flops = common.model_flops_per_image(model.config)["total"]
    seconds = {name: [] for name in variants}
    scores = {}
    with torch.inference_mode():
        for name, (fast, packed) in variants.items():  # warm-up (and packing) outside the timing
            model.cpu_onednn_vision, model.cpu_prepacked_weights = fast, packed
            scores[name] = model(pixel_values=pixel_values).anomaly_score
        for _ in range(args.rounds):
            for name, (fast, packed) in variants.items():
                model.cpu_onednn_vision, model.cpu_prepacked_weights = fast, packed
                start = time.perf_counter()
                model(pixel_values=pixel_values)
                seconds[name].append(time.perf_counter() - start)
        model.cpu_onednn_vision, model.cpu_prepacked_weights = None, None  # the package's defaults
        default_fast = model.uses_cpu_fast_path("cpu")
    vision = model.config.clip_config.vision_config
    tokens = model.config.num_patches + 1
    rates_fp32 = common.matmul_rates(torch.float32)
    result = {
        "benchmark": "vip2clip_cpu_kernels",
        "machine": common.machine_info("cpu"),
        "settings": {"dtype": "fp32", "batch": 1, "rounds": args.rounds, "image_size": args.image_size},
        "default_uses_fast_path": default_fast,
        "onednn_bf16_supported": fast_path.onednn_bf16_supported(),
        "s_per_image_min": {name: round(min(values), 3) for name, values in seconds.items()},
        "s_per_image_median": {name: round(sorted(values)[len(values) // 2], 3) for name, values in seconds.items()},
        "s_per_image_all": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "scores_max_abs_diff_vs_first": {
            name: float((value - next(iter(scores.values()))).abs().max()) for name, value in scores.items()},
        "matmul_rates_fp32": rates_fp32,
        "tower_gemm_rates_fp32": _gemm_rates(torch.float32, tokens, int(vision.hidden_size),
                                             int(vision.intermediate_size)),
        "tower_gemm_rates_bf16": _gemm_rates(torch.bfloat16, tokens, int(vision.hidden_size),
                                             int(vision.intermediate_size), repeats=1),
        "flops_per_image_g": round(flops / 1e9, 1),
    }
    result["mfu_vs_best_fp32"] = {name: round(flops / value / 1e9 / rates_fp32["best"], 3)
                                  for name, value in result["s_per_image_min"].items()}
    if args.profile:
        result["profile_default_path"] = _profile(model, pixel_values)
    if args.bf16_once:
        bf16 = ViP2CLIPModel.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        with torch.inference_mode():
            start = time.perf_counter()
            output = bf16(pixel_values=pixel_values.to(torch.bfloat16))
            result["bf16_s_per_image_once"] = round(time.perf_counter() - start, 2)
            result["bf16_fast_path"] = bf16.uses_cpu_fast_path("cpu")
            result["bf16_score_diff_vs_fp32"] = float((output.anomaly_score.float() - scores[next(iter(scores))]).abs().max())
    result["loadavg_end"] = [round(value, 2) for value in os.getloadavg()]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
