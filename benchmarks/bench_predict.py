"""Batch prediction (`vip2clip predict`): end-to-end images/s against the model alone, and peak memory against
the number of images.

* `rate` (per model: `tiny`, the tests' random tiny ViP²-CLIP at 32 px; `real`, the random-weight model of the
  real geometry, ViT-L/14@336 at 518 px, loaded in bf16 by default): in one fresh process, the model-only rate
  (the images decoded and preprocessed beforehand, then `model(pixel_values)` batch after batch, the outputs
  moved to the CPU), then `predict`'s rate on the same image files (`predict`: DataLoader workers decode
  and preprocess, the main process runs the model, a thread pool writes the overlays, the CSV is appended and
  fsynced batch by batch; model loading excluded, a warm-up run first), then the model-only rate again. The
  ratio is e2e ÷ the mean of the two model-only rates (bracketing drift on a shared machine).
* `rss`: `vip2clip predict` over N and over 5N image files, each in a fresh process (tiny model, overlays on):
  the peak RSS of the main process and of its largest DataLoader worker. Streaming means the difference stays
  near zero; the old predict kept every decoded image in memory.

The images are `_common.smooth_images` (640×480 RGB, blob "defects") saved as PNG files. Nothing is downloaded.

    python benchmarks/bench_predict.py                                   # all: tiny + real rates, rss
    python benchmarks/bench_predict.py --parts tiny rss --images 64
    python benchmarks/bench_predict.py --parts real --real-images 8 --batch-size 4 --dtype bf16
    python benchmarks/bench_predict.py --parts real --device cuda --batch-size 32 --real-images 512   # on a GPU

One JSON line per measurement on stdout (and appended to `--out FILE` if given).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import _common as common  # noqa: E402  (puts the package on sys.path)

HERE = Path(__file__).resolve()


def _make_images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.png"))
    if len(existing) >= count:
        return folder
    distinct = common.smooth_images(min(count, 16), seed=seed)
    for index in range(count):
        distinct[index % len(distinct)].save(folder / f"img_{index:05d}.png")
    return folder


def _tiny_model(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        tests = str(common.ROOT / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        from modeling_vip2clip.testing_utils import save_tiny_vip2clip

        save_tiny_vip2clip(folder)
    return folder


def _predict_args(model, inputs: list[str], out: Path, batch: int, workers: int | None, device: str,
                  overlays: bool = True) -> dict:
    """`predict`'s keywords for these `vip2clip predict` flags, with the model already loaded in its dtype."""
    from modeling_vip2clip.cli.predict import build_parser, job_arguments

    keywords = job_arguments(build_parser().parse_args([
        "--model", "unused", *inputs, "--output-dir", str(out), "--batch-size", str(batch),
        *([] if workers is None else ["--num-workers", str(workers)]), "--device", device, "--overwrite",
        "--no-progress", *([] if overlays else ["--no-overlays"]),
    ]))
    return {**keywords, "model": model}


def _stage_split(model, processor, files: list[str], device, input_dtype, batch: int, overlays: bool) -> dict:
    """Seconds per image of each stage of `predict`, run one after the other on the same files in this process:
    decode (PIL open + RGB), preprocess (the processor), postprocess (scores and maps to the CPU, the full-size
    map where saved) and write (overlay + PNG at zlib level 1); `model` is timed in `_worker_rate`."""
    import io

    import torch
    from PIL import Image

    timings = {}
    start = time.perf_counter()
    images = [Image.open(f).convert("RGB") for f in files]
    timings["decode"] = (time.perf_counter() - start) / len(files)
    start = time.perf_counter()
    pixel_values = processor(images=images)["pixel_values"]
    timings["preprocess"] = (time.perf_counter() - start) / len(files)
    with torch.inference_mode():
        output = model(pixel_values=pixel_values[:batch].to(device=device, dtype=input_dtype))
    start = time.perf_counter()
    maps = output.anomaly_map.float().cpu()
    output.anomaly_score.float().cpu().tolist()
    timings["postprocess"] = (time.perf_counter() - start) / len(maps)
    start = time.perf_counter()
    for image, anomaly_map in zip(images, maps):
        if overlays:
            processor.overlay(image, anomaly_map).save(io.BytesIO(), format="PNG", compress_level=1)
    timings["write"] = (time.perf_counter() - start) / len(maps)
    return {key: round(value, 4) for key, value in timings.items()}


# ---------------------------------------------------------------------------------------------------- workers


def _worker_rate(spec: dict) -> dict:
    import torch

    from modeling_vip2clip.engine.prediction import predict
    from modeling_vip2clip.weights.loader import load_model_and_processor

    device = torch.device(spec["device"])
    dtype = common.DTYPES[spec["dtype"]]
    model, processor = load_model_and_processor(spec["model_dir"], device=device, dtype=None if spec["dtype"] == "fp32" else dtype)
    files = sorted(str(p) for p in Path(spec["images"]).glob("*.png"))[: spec["count"]]
    batch = spec["batch"]
    input_dtype = model.clip.vision_model.embeddings.patch_embedding.weight.dtype

    from PIL import Image

    pixel_values = processor(images=[Image.open(f).convert("RGB") for f in files])["pixel_values"]

    def model_only(timed) -> float:
        def one(chunk):
            with torch.inference_mode():
                output = model(pixel_values=chunk.to(device=device, dtype=input_dtype))
            output.anomaly_score.float().cpu(), output.anomaly_map.float().cpu()

        one(pixel_values[:batch])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for begin in range(0, len(timed), batch):
            one(timed[begin:begin + batch])
        return len(timed) / (time.perf_counter() - start)

    class _TimedModel:
        """The model, with the seconds spent in its forwards inside `predict` summed: e2e wall time minus
        this is what the loop costs beyond the model (waiting for data, CSV, waiting for the writers)."""

        def __init__(self, inner):
            self.inner, self.seconds = inner, 0.0

        def __call__(self, *args, **kwargs):
            start = time.perf_counter()
            output = self.inner(*args, **kwargs)
            output.anomaly_map.float().cpu()
            self.seconds += time.perf_counter() - start
            return output

        def to(self, *args, **kwargs):
            self.inner.to(*args, **kwargs)
            return self

        def eval(self):
            self.inner.eval()
            return self

        def __getattr__(self, name):
            return getattr(self.inner, name)

    work = Path(spec["work"])
    overlays = spec.get("overlays", True)
    split = _stage_split(model, processor, files[:batch], device, input_dtype, batch, overlays)
    common.reset_peak_rss()
    load_start = os.getloadavg()
    # model-only on `model_only_images` files (default all) before and after e2e: brackets drift
    model_files = pixel_values[: spec.get("model_only_images") or len(files)]
    before_rate = model_only(model_files)
    predict(**_predict_args(model, files[:batch], work / "warmup", batch, spec["workers"], spec["device"], overlays),
                processor=processor)
    timed_model = _TimedModel(model)
    rounds = max(1, int(spec.get("rounds") or 1))
    if rounds == 1:
        result = predict(**_predict_args(timed_model, files, work / "e2e", batch, spec["workers"], spec["device"], overlays),
                processor=processor)
        after_rate = model_only(model_files)
        e2e = result["rows"] / result["seconds"]
        model_rate = (before_rate + after_rate) / 2
    else:
        # Alternation: `rounds` × (the model alone on its images, then predict on the next share of the files), so
        # that the machine's drift hits both alike; rates from the summed times.
        e2e_seconds = e2e_rows = model_seconds = model_images = 0.0
        model_seconds, model_images = len(model_files) / before_rate, len(model_files)
        share = -(-len(files) // rounds)
        for index in range(rounds):
            chunk = files[index * share:(index + 1) * share]
            if not chunk:
                break
            part = predict(**_predict_args(timed_model, chunk, work / f"e2e_{index}", batch, spec["workers"], spec["device"], overlays),
                processor=processor)
            e2e_seconds += part["seconds"]
            e2e_rows += part["rows"]
            rate = model_only(model_files)
            model_seconds += len(model_files) / rate
            model_images += len(model_files)
        result = {"rows": int(e2e_rows), "seconds": e2e_seconds}
        e2e = e2e_rows / e2e_seconds
        model_rate = model_images / model_seconds
        after_rate = rate
    split["model"] = round(1 / model_rate, 4)
    return {
        "part": "rate", "model": spec["label"], "dtype": spec["dtype"], "device": spec["device"], "batch": batch,
        "workers": spec["workers"] if spec["workers"] is not None else "default", "overlays": overlays, "images": len(files), "image_size": "640x480",
        "model_only_images": len(model_files), "rounds": rounds,
        "model_only_images_per_s": [round(before_rate, 4), round(after_rate, 4)],
        "e2e_images_per_s": round(e2e, 4), "e2e_vs_model_only": round(e2e / model_rate, 3),
        "e2e_seconds": round(result["seconds"], 2), "e2e_model_forward_seconds": round(timed_model.seconds, 2),
        "e2e_model_share": round(timed_model.seconds / result["seconds"], 4),
        "e2e_model_s_per_image": round(timed_model.seconds / result["rows"], 4),
        "stage_seconds_per_image": split,
        "fast_path": common.fast_path_in_use(model, spec["device"]),
        "peak_rss_gib": round(common.current_peak_rss_gib() or float("nan"), 3),
        "loadavg_start": [round(v, 2) for v in load_start], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "machine": common.machine_info(spec["device"]),
    }


def _worker_rss(spec: dict) -> dict:
    from modeling_vip2clip.cli.predict import main

    code = main(["--model", spec["model_dir"], spec["images"], "--output-dir", spec["out"], "--batch-size",
                 str(spec["batch"]), *([] if spec["workers"] is None else ["--num-workers", str(spec["workers"])]),
                 "--no-progress"])
    return {"exit": code, "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["tiny", "real", "rss"], default=["tiny", "real", "rss"])
    parser.add_argument("--images", type=int, default=64, help="images of the tiny rate run and N of the rss run (5N too).")
    parser.add_argument("--real-images", type=int, default=8, help="images of the real-geometry rate run.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=None, help="default: predict's own default")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16", help="dtype of the real model.")
    parser.add_argument("--no-overlays", action="store_true", help="e2e without overlays (predict --no-overlays).")
    parser.add_argument("--model-only-images", type=int, default=None,
                        help="images of each model-only pass (default: all of the e2e run's).")
    parser.add_argument("--model-dir", default=None, help="reuse this saved real-geometry random model.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate model-only and e2e this many times (e2e on 1/rounds of the files each time).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", default=None, help="keep models and images here (default: a temp dir).")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file.")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(_worker_rate(spec) if spec["kind"] == "rate" else _worker_rss(spec)), flush=True)
        return

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_predict_"))
    records = []

    def emit(record: dict) -> None:
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    tiny = str(_tiny_model(work / "tiny_model"))
    if "tiny" in args.parts:
        images = _make_images(work / "images", max(args.images, args.real_images))
        emit(common.run_worker(HERE, {"kind": "rate", "label": "tiny", "model_dir": tiny, "images": str(images),
                                      "count": args.images, "batch": args.batch_size, "workers": args.num_workers,
                                      "dtype": "fp32", "device": args.device, "work": str(work / "run_tiny")}))
    if "real" in args.parts:
        images = _make_images(work / "images", max(args.images, args.real_images))
        real = str(common.save_random_model(args.model_dir or work / "real_model"))
        emit(common.run_worker(HERE, {"kind": "rate", "label": "real ViT-L/14@518", "model_dir": real,
                                      "images": str(images), "count": args.real_images, "batch": args.batch_size,
                                      "workers": args.num_workers, "dtype": args.dtype, "device": args.device,
                                      "work": str(work / "run_real"), "overlays": not args.no_overlays,
                                      "model_only_images": args.model_only_images, "rounds": args.rounds}))
    if "rss" in args.parts:
        peaks = {}
        for count in (args.images, 5 * args.images):
            folder = _make_images(work / f"rss_{count}", count)
            peaks[count] = common.run_worker(HERE, {"kind": "rss", "model_dir": tiny, "images": str(folder),
                                                    "out": str(work / f"rss_out_{count}"), "batch": args.batch_size,
                                                    "workers": args.num_workers})
        small, large = peaks[args.images], peaks[5 * args.images]
        emit({"part": "rss", "model": "tiny", "image_size": "640x480", "batch": args.batch_size,
              "workers": args.num_workers, "n": args.images, "5n": 5 * args.images,
              "main_peak_rss_mb": [round(small["main_peak_rss_mb"], 1), round(large["main_peak_rss_mb"], 1)],
              "worker_peak_rss_mb": [round(small["worker_peak_rss_mb"], 1), round(large["worker_peak_rss_mb"], 1)],
              "main_growth_mb": round(large["main_peak_rss_mb"] - small["main_peak_rss_mb"], 1),
              "loadavg_1m": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
