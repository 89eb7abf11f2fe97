"""`vip2clip predict --model DIR INPUT...`: score images with a trained ViP²-CLIP model.

INPUT is any mix of image files, folders (searched recursively for image files) and glob patterns (quoted, so the
shell leaves them alone; `**` recurses). Writes to `--output-dir`:

* `predictions.csv`: one row per readable image — `path`, `score` (image anomaly score in [0, 1]) and `verdict`
  (`anomalous` when score >= `--threshold`, else `normal`);
* `overlays/<name>.png`: the anomaly map blended over the image, at the image's own size (unless `--no-overlays`);
* `skipped.csv` (path, reason) when some inputs could not be read — they are also printed, never silently dropped.

The exit status is 0 when at least one image was scored, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from .runtime import add_debug_argument, positive_int, probability

logger = logging.getLogger("modeling_vip2clip.predict")

__all__ = ["DESCRIPTION", "add_arguments", "build_parser", "collect_inputs", "run_prediction", "run", "main"]

DESCRIPTION = ("Score images for anomalies with a trained ViP2-CLIP model: a CSV of (path, score, verdict) and an "
               "anomaly-map overlay per image.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, metavar="DIR", help="trained ViP2CLIP model folder (or Hub id).")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns.")
    parser.add_argument("--output-dir", default="vip2clip-predictions", help="where predictions.csv and the overlays go (default: vip2clip-predictions).")
    parser.add_argument("--threshold", type=probability, default=0.5, help="score at or above which an image is called anomalous (default: 0.5).")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default: 8).")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 or cpu (default: cuda if available, else cpu).")
    parser.add_argument("--no-overlays", action="store_true", help="do not write the overlay PNGs.")
    add_debug_argument(parser)
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog or "vip2clip predict", description=DESCRIPTION))


def _image_extensions() -> set[str]:
    try:
        from .data import IMAGE_EXTENSIONS

        return {ext.lower() for ext in IMAGE_EXTENSIONS}
    except ImportError:  # pragma: no cover
        return {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files / folders / globs into image paths (deduplicated, in order); unmatched inputs are reported."""
    extensions = _image_extensions()
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                problems.append((item, "folder contains no image files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                problems.append((item, "pattern matched no file"))
            files.extend(found)
        else:
            problems.append((item, "no such file or folder"))
    unique: dict[str, Path] = {}
    for file in files:
        unique.setdefault(os.path.abspath(file), file)
    return list(unique.values()), problems


def _open_image(path: Path, processor):
    from PIL import Image

    with Image.open(path) as handle:
        handle.load()
        image = handle.copy()
    return processor.to_pil(image, what=str(path))


def _overlay_name(path: Path, used: set[str]) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem) or "image"
    name, counter = f"{stem}.png", 1
    while name in used:
        name = f"{stem}_{counter}.png"
        counter += 1
    used.add(name)
    return name


def run_prediction(args: argparse.Namespace, model=None, processor=None) -> dict:
    """Score the inputs; returns {"predictions": [(path, score, verdict)], "skipped": [(path, reason)], ...}."""
    from .runtime import load_model_and_processor, resolve_source

    if model is None:
        resolve_source(args.model, "--model")  # fail fast, before torch is imported
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, processor = load_model_and_processor(args.model, device=device)
    model = model.to(device).eval()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files, skipped = collect_inputs(args.inputs)

    readable = []
    for file in files:
        try:
            readable.append((file, _open_image(file, processor)))
        except Exception as error:  # noqa: BLE001 - reported with its reason, then skipped
            skipped.append((str(file), f"{type(error).__name__}: {error}"))

    predictions: list[tuple[str, float, str]] = []
    used_names: set[str] = set()
    overlay_dir = output_dir / "overlays"
    for start in range(0, len(readable), max(1, args.batch_size)):
        chunk = readable[start:start + args.batch_size]
        inputs = processor(images=[image for _, image in chunk])
        with torch.no_grad():
            output = model(pixel_values=inputs["pixel_values"].to(device))
        for (file, image), score, anomaly_map in zip(chunk, output.anomaly_score.float().cpu(), output.anomaly_map.float().cpu()):
            score = float(score)
            if not (math.isfinite(score) and bool(torch.isfinite(anomaly_map).all())):
                skipped.append((str(file), "the model's score or map is not finite (NaN/inf)"))
                continue
            predictions.append((str(file), score, "anomalous" if score >= args.threshold else "normal"))
            if not args.no_overlays:
                overlay_dir.mkdir(parents=True, exist_ok=True)
                processor.overlay(image, anomaly_map).save(overlay_dir / _overlay_name(file, used_names))

    with open(output_dir / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "verdict"])
        for path, score, verdict in predictions:
            writer.writerow([path, f"{score:.6f}", verdict])
    skipped_csv = output_dir / "skipped.csv"
    if skipped:
        with open(skipped_csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)
    elif skipped_csv.exists():
        skipped_csv.unlink()
    return {"predictions": predictions, "skipped": skipped, "csv": str(output_dir / "predictions.csv")}


def run(args: argparse.Namespace) -> int:
    from .runtime import setup_logging

    setup_logging()
    result = run_prediction(args)
    for path, reason in result["skipped"]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    anomalous = sum(1 for _, _, verdict in result["predictions"] if verdict == "anomalous")
    print(f"scored {len(result['predictions'])} images ({anomalous} anomalous at threshold {args.threshold}), "
          f"skipped {len(result['skipped'])}; wrote {result['csv']}")
    return 0 if result["predictions"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime import run_main

    return run_main(run, build_parser(prog="modeling_vip2clip.predict").parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
