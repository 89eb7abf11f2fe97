"""Seconds per training epoch with and without the backbone feature cache (`vip2clip train --cache-features`).

Not a test. Builds a randomly initialised ViP²-CLIP at the paper's geometry by default (CLIP ViT-L/14 backbone,
input 518, layers 6/12/18/24, top-k 50: `ViP2CLIPModel(ViP2CLIPConfig())` with placeholder state-token ids —
random weights cost exactly what real ones do), writes a small synthetic benchmark, and runs the real training
loop (`modeling_vip2clip.engine.training.train`) twice: on the images, then with `--cache-features` (pre-pass +
epochs from the cache). Prints one JSON line:

    {"machine": ..., "settings": ..., "s_per_epoch_uncached": ..., "s_per_epoch_cached": ..., "prepass_s": ...,
     "projected_10_epoch_speedup": (10 x uncached) / (prepass + 10 x cached), ...}

Steady-state epochs (all but the first, when there are several) give the per-epoch figures. Examples:

    python benchmarks/bench_training.py --image-size 224 --images 8 --epochs 3     # a few minutes on 2 CPU cores
    python benchmarks/bench_training.py --images 4 --epochs 2                      # real geometry (518)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_vip2clip import ViP2CLIPConfig, ViP2CLIPModel, ViP2CLIPProcessor  # noqa: E402
from modeling_vip2clip.data import generate_synthetic_benchmark  # noqa: E402
from modeling_vip2clip.cli.train import build_parser as train_parser, job_arguments  # noqa: E402
from modeling_vip2clip.engine.training import train  # noqa: E402


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        try:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


def build_model(image_size: int, feature_layers: list[int], top_k: int) -> ViP2CLIPModel:
    base = ViP2CLIPConfig(normal_state_token_id=1, abnormal_state_token_id=2)
    clip_config = base.clip_config.to_dict()
    clip_config["vision_config"]["image_size"] = image_size
    config = ViP2CLIPConfig(clip_config=clip_config, feature_layers=feature_layers, top_k=top_k,
                            normal_state_token_id=1, abnormal_state_token_id=2)
    torch.manual_seed(0)
    return ViP2CLIPModel(config)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def steady(epochs: list[dict]) -> float:
    seconds = [e["seconds"] for e in epochs]
    return statistics.mean(seconds[1:] if len(seconds) > 1 else seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=518, help="input side S (default: 518, the paper's).")
    parser.add_argument("--images", type=int, default=8, help="training images, a multiple of 4 (default: 8).")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size (default: 2).")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run (default: 2).")
    parser.add_argument("--feature-layers", type=int, nargs="+", default=[6, 12, 18, 24], help="default: 6 12 18 24.")
    parser.add_argument("--top-k", type=int, default=50, help="default: 50.")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="default: no.")
    parser.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32", help="default: float32.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.images % 4:
        parser.error("--images must be a multiple of 4 (2 categories x normal/anomalous)")

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        per_half = args.images // 4
        generate_synthetic_benchmark(work / "data", categories=("fabric", "wood_like"), n_train_good=0,
                                     n_test_good=per_half, n_test_bad=per_half, image_size=min(args.image_size, 256), seed=0)
        started = time.perf_counter()
        model = build_model(args.image_size, args.feature_layers, args.top_k)
        build_seconds = time.perf_counter() - started
        processor = ViP2CLIPProcessor(image_size=args.image_size)
        common = ["--model", "unused", "--dataset", str(work / "data"), "--epochs", str(args.epochs),
                  "--batch-size", str(args.batch_size), "--num-workers", "0", "--report-to", "none", "--no-progress",
                  "--mixed-precision", args.mixed_precision, "--cache-dtype", args.cache_dtype]
        initial = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("clip.")}

        reset_accelerate()
        uncached = train(**{**job_arguments(train_parser().parse_args([*common, "--output-dir", str(work / "uncached")])),
                            "model": model}, processor=processor)
        model.load_state_dict(initial, strict=False)  # same starting heads for the second run
        reset_accelerate()
        cached = train(**{**job_arguments(train_parser().parse_args(
            [*common, "--output-dir", str(work / "cached"), "--cache-features", str(work / "cache")])), "model": model},
            processor=processor)
        cache_bytes = sum(f.stat().st_size for f in (work / "cache").iterdir())

    s_uncached, s_cached, prepass = steady(uncached["epochs"]), steady(cached["epochs"]), cached["prepass_seconds"]
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(uncached["history"], cached["history"]))
    print(json.dumps({
        "machine": machine(),
        "settings": {"image_size": args.image_size, "images": args.images, "batch_size": args.batch_size,
                     "epochs": args.epochs, "feature_layers": args.feature_layers, "top_k": args.top_k,
                     "mixed_precision": args.mixed_precision, "cache_dtype": args.cache_dtype,
                     "backbone": "CLIP ViT-L/14 geometry, random weights"},
        "model_build_s": round(build_seconds, 2),
        "epoch_seconds_uncached": [round(e["seconds"], 2) for e in uncached["epochs"]],
        "epoch_seconds_cached": [round(e["seconds"], 2) for e in cached["epochs"]],
        "s_per_epoch_uncached": round(s_uncached, 3),
        "s_per_epoch_cached": round(s_cached, 3),
        "prepass_s": round(prepass, 3),
        "projected_10_epoch_speedup": round(10 * s_uncached / (prepass + 10 * s_cached), 2),
        "cache_mb": round(cache_bytes / 2**20, 1),
        "max_step_loss_gap": loss_gap,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
