"""A/B of two versions of the model code inside ONE process, forwards alternated: the noise-resistant comparison.

On a shared machine whole-model runs in separate processes (`bench_inference.py`) swing by ±7 % from one run to
the next, enough to hide or invent a 10 % change. Here the same saved random model (real ViT-L/14@336 geometry
at 518 px) is loaded twice with `AutoModel.from_pretrained(..., trust_remote_code=True)`, once with each tree's
`modeling_vip2clip.py` (each copy gets its own remote-code module), and the variants run one after the other,
round after round, on the same inputs; the minimum and median seconds per image of each are reported, with the
largest score difference against the first variant. The CPU fast path's prepacked-weight switch
(`model.cpu_prepacked_weights`) is a variant of its own when the code has it.

Usage::

    git worktree add /tmp/before <commit>
    python benchmarks/bench_ab_inprocess.py --before /tmp/before --after . --dtype bf16 --batch 1 --rounds 8

Prints one JSON line. Two models are resident at once: about 2× the memory of one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model_folder(saved: Path, tree: Path, work: Path, name: str) -> Path:
    """A copy of the saved model whose Hub files come from `tree` (symlinked weights, copied code)."""
    folder = work / name
    folder.mkdir()
    for item in saved.iterdir():
        if item.suffix == ".py":
            continue
        (folder / item.name).symlink_to(item.resolve())
    for source in sorted((tree / "modeling_vip2clip").glob("*_vip2clip.py")):
        shutil.copy(source, folder / source.name)
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="tree with the old modeling_vip2clip/")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--model-dir", type=Path, default=None, help="saved random model to reuse (made if absent)")
    args = parser.parse_args(argv)

    from transformers import AutoModel

    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="vip2clip_ab_") as tmp:
        work = Path(tmp)
        saved = common.save_random_model(args.model_dir or work / "saved", args.image_size)
        models = {}
        for name, tree in (("before", args.before), ("after", args.after)):
            folder = _model_folder(Path(saved), tree.resolve(), work, name)
            models[name] = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
        variants = {}
        for name, model in models.items():
            if hasattr(model, "cpu_prepacked_weights"):
                variants[f"{name}_prepacked"] = (model, True)
                variants[f"{name}_plain_weights"] = (model, False)
            else:
                variants[name] = (model, None)
        pixel_values = common.make_pixel_values(args.batch, args.image_size).to(dtype)
        seconds = {key: [] for key in variants}
        scores = {}
        with torch.inference_mode():
            for key, (model, prepacked) in variants.items():  # warm-up (and packing) outside the timing
                model.cpu_prepacked_weights = prepacked
                scores[key] = model(pixel_values=pixel_values).anomaly_score
            for _ in range(args.rounds):
                for key, (model, prepacked) in variants.items():
                    model.cpu_prepacked_weights = prepacked
                    start = time.perf_counter()
                    model(pixel_values=pixel_values)
                    seconds[key].append((time.perf_counter() - start) / args.batch)
    first = next(iter(scores.values()))
    result = {
        "benchmark": "vip2clip_ab_inprocess",
        "machine": common.machine_info("cpu"),
        "settings": {"dtype": args.dtype, "batch": args.batch, "rounds": args.rounds, "image_size": args.image_size,
                     "before": str(args.before), "after": str(args.after)},
        "s_per_image_min": {key: round(min(values), 4) for key, values in seconds.items()},
        "s_per_image_median": {key: round(sorted(values)[len(values) // 2], 4) for key, values in seconds.items()},
        "scores_max_abs_diff_vs_first": {key: float((value - first).abs().max()) for key, value in scores.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
