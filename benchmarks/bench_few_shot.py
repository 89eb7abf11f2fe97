"""Few-shot mode at the real geometry (ViT-L/14@336 at 518 px, random weights): cost of the reference bank.

Measures, in one process, on the standard load (`AutoModel.from_pretrained(dir, trust_remote_code=True,
dtype=...)` of the random model of `_common.save_random_model`):

* the time to build a k-shot bank (`model.build_reference_bank`, k images through the frozen tower), its size
  in memory and as a safetensors file;
* the time per scored image without and with the bank (`model(pixel_values=x)` vs
  `model(pixel_values=x, reference_bank=bank)`, batch 1, the two alternated so that machine noise hits both)
  and the relative extra time (target of the few-shot issue: ≤ 10 % on CPU in bf16);
* the nearest-neighbour search alone (`bank.patch_scores` + upsampling + blur on precomputed features) for
  banks of `--search-shots` images: its FLOPs (2·n·L·(k·L)·D per image) and time — why the exact search
  needs no approximate index. Banks larger than the built one hold random unit vectors (the search does the
  same work whatever the vectors are).

Prints one JSON line and a Markdown table (for benchmarks/README.md, "Few-shot"). Nothing is downloaded.

    python benchmarks/bench_few_shot.py --dtype bf16 --shots 4 --repeats 3 [--model-dir /tmp/bench_model]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def _best_and_median(seconds: list[float]) -> dict:
    return {"best": min(seconds), "median": statistics.median(seconds)}


def _search_cost(model, built_bank, patch_embeds: torch.Tensor, shots: int, repeats: int) -> dict:
    """Time of the few-shot map alone (search + upsampling + blur) for one image against a `shots`-image bank."""
    config = model.config
    num_layers, num_patches, dim = patch_embeds.shape[1:]
    generator = torch.Generator().manual_seed(shots)
    patches = torch.nn.functional.normalize(torch.randn(num_layers, shots * num_patches, dim, generator=generator), dim=-1)
    bank = type(built_bank)(
        patches, image_size=config.image_size, patch_size=config.patch_size, feature_layers=config.feature_layers,
        backbone_fingerprint=built_bank.backbone_fingerprint, num_images=shots,
    )
    seconds = []
    with torch.inference_mode():
        model.few_shot_map(patch_embeds, bank)  # warm-up
        for _ in range(max(repeats, 5)):  # cheap: more repeats, a better chance of an undisturbed one
            start = time.perf_counter()
            model.few_shot_map(patch_embeds, bank)
            seconds.append(time.perf_counter() - start)
    flops = 2 * num_layers * num_patches * shots * num_patches * dim
    best = min(seconds)
    return {"shots": shots, "bank_mb": bank.nbytes / 1e6, "search_gflop": flops / 1e9, "seconds": best,
            "gflop_per_s": flops / best / 1e9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    parser.add_argument("--shots", type=int, default=4, help="k reference images of the built bank")
    parser.add_argument("--search-shots", type=int, nargs="+", default=[1, 4, 16], help="bank sizes for the search")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model-dir", default=None, help="save the random model there once and reuse it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModel

    with tempfile.TemporaryDirectory(prefix="vip2clip_few_shot_") as tmp:
        work = Path(tmp)
        model_dir = common.save_random_model(args.model_dir or work / "model", args.image_size)
        common.sync_model_code(model_dir)
        for name in ("cpu_fast_path_vip2clip.py", "reference_bank_vip2clip.py"):  # siblings sync_model_code skips
            shutil.copyfile(common.ROOT / "modeling_vip2clip" / name, Path(model_dir) / name)
        dtype = common.DTYPES[args.dtype]
        model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype).eval()
        pixel_values = common.make_pixel_values(args.shots + 1, args.image_size).to(dtype)
        references, query = pixel_values[: args.shots], pixel_values[args.shots :]

        with torch.inference_mode():
            build_seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                bank = model.build_reference_bank(references)
                build_seconds.append(time.perf_counter() - start)
            bank.save(work / "bank.safetensors")
            file_mb = (work / "bank.safetensors").stat().st_size / 1e6

            model(pixel_values=query)  # warm-up (and the prepacked weights) outside the timing
            model(pixel_values=query, reference_bank=bank)
            zero_shot, few_shot = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                plain = model(pixel_values=query)
                zero_shot.append(time.perf_counter() - start)
                start = time.perf_counter()
                fused = model(pixel_values=query, reference_bank=bank)
                few_shot.append(time.perf_counter() - start)
            assert torch.equal(fused.zero_shot_anomaly_map, plain.anomaly_map)
            patch_embeds = model.encode_image(query)[1]
            few_shot_part = []  # what the bank adds to a forward: the check, the search, upsampling and blur
            for _ in range(max(args.repeats, 5)):
                start = time.perf_counter()
                model.few_shot_map(patch_embeds, bank)
                few_shot_part.append(time.perf_counter() - start)
        search = [_search_cost(model, bank, patch_embeds, shots, args.repeats) for shots in args.search_shots]

    zero, few = _best_and_median(zero_shot), _best_and_median(few_shot)
    result = {
        "benchmark": "vip2clip_few_shot",
        "machine": common.machine_info("cpu"),
        "settings": {"dtype": args.dtype, "shots": args.shots, "repeats": args.repeats, "batch": 1,
                     "image_size": args.image_size},
        "bank_build_s": _best_and_median(build_seconds),
        "bank_build_s_per_image": min(build_seconds) / args.shots,
        "bank_mb_in_memory": bank.nbytes / 1e6,
        "bank_mb_file": file_mb,
        "zero_shot_s_per_image": zero,
        "few_shot_s_per_image": few,
        "extra_fraction_best": few["best"] / zero["best"] - 1,
        "extra_fraction_median": few["median"] / zero["median"] - 1,
        "few_shot_part_s": _best_and_median(few_shot_part),
        "extra_fraction_from_parts": min(few_shot_part) / zero["best"],
        "search": search,
    }
    print(json.dumps(result))
    print()
    print(f"| {args.dtype}, batch 1, {args.shots}-shot | best | median |")
    print("| --- | --- | --- |")
    print(f"| build the bank ({args.shots} images) | {result['bank_build_s']['best']:.2f} s | "
          f"{result['bank_build_s']['median']:.2f} s |")
    print(f"| zero-shot, per image | {zero['best']:.3f} s | {zero['median']:.3f} s |")
    print(f"| few-shot, per image | {few['best']:.3f} s | {few['median']:.3f} s |")
    print(f"| extra | {100 * result['extra_fraction_best']:+.1f} % | {100 * result['extra_fraction_median']:+.1f} % |")
    print(f"| the few-shot part alone (check, search, upsampling, blur) | {min(few_shot_part):.3f} s "
          f"({100 * result['extra_fraction_from_parts']:.1f} % of zero-shot) | {statistics.median(few_shot_part):.3f} s |")
    print()
    print("| bank (k images) | size | search per image | time | rate |")
    print("| --- | --- | --- | --- | --- |")
    for row in search:
        print(f"| {row['shots']} | {row['bank_mb']:.0f} MB | {row['search_gflop']:.1f} GFLOP | "
              f"{1000 * row['seconds']:.0f} ms | {row['gflop_per_s']:.0f} GFLOP/s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
