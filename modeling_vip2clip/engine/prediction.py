"""The batch-prediction job behind `vip2clip predict` (`modeling_vip2clip.cli.predict` is its command line):
`predict(model, inputs, output_dir, *, threshold=None, save_maps="none", resume=False, ...)`, also callable from
Python (`modeling_vip2clip.predict`).

Streaming: the inputs (a list of file names, or the rows of a `datasets` dataset) go through a
`torch.utils.data.DataLoader` whose workers decode and preprocess; the main process runs the model and hands the
overlays / maps / masks of each batch to a small thread pool, at most two batches behind. Memory is bounded by the
batch size, the DataLoader's prefetch and those two batches, never by the number of inputs (only the list of
file names, a few hundred bytes per input, is held).

Nothing lost: each process appends its rows to its CSV once the files they name are on disk, then flushes and
fsyncs it, batch by batch. `--resume` reads every CSV of the output folder (a torn last line, the trace of a killed
write, is ignored and cut off), skips the inputs already there and appends the rest, so a run killed at any moment
and resumed holds every input exactly once. Unreadable inputs are retried by a resumed run and listed again in
`skipped.csv` if they still fail.

Distributed (`accelerate launch`): the processes are Accelerate's (`distributed.process_state`, as in calibrate);
the remaining inputs are sharded over them (`inputs[rank::world]`);
process r writes `predictions.part-<r>.csv` (and `skipped.part-<r>.csv`), and at the end the main process appends
the parts' rows to `predictions.csv` (skipping any input already there, so an interrupted merge is harmless) and
deletes them. A resumed run reads the parts like the main CSV, whatever its number of processes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

# torch, the transforms and the output files are imported by the loop itself: `vip2clip predict` with nothing to
# score stops in a fraction of a second, before the seconds torch takes to import (docs/reliability.md).
from ..data.images import collect_inputs
from .results_csv import PREDICTIONS_CSV, SKIPPED_CSV, CsvLog, done_ids, merge_parts, part_files, read_csv_rows
from ..errors import UsageError
from ..distributed import process_state
from ..data.options import DatasetColumns

if TYPE_CHECKING:  # annotations only: torch is imported by the loop
    import torch

logger = logging.getLogger("modeling_vip2clip.cli.predict")

__all__ = [
    "PREDICTIONS_CSV",
    "SKIPPED_CSV",
    "PredictOptions",
    "read_csv_rows",
    "predict",
]



@dataclass
class PredictOptions(DatasetColumns):
    """The options of :func:`predict` (each one a `vip2clip predict` flag of the same name; `overlays` and `progress`
    are the negations of `--no-overlays` / `--no-progress`)."""

    model: Any
    inputs: Sequence[str] = ()
    output_dir: str | os.PathLike = "vip2clip-predictions"
    dataset: str | None = None
    split: str = "test"
    categories: Sequence[str] | None = None
    streaming: bool = False
    threshold: float | None = None
    pixel_threshold: float | None = None
    device: str | None = None
    overlays: bool = True
    plain_overlays: bool = False
    report: bool = True
    save_maps: str = "none"
    save_masks: bool = False
    resume: bool = False
    overwrite: bool = False
    references: str | None = None
    batch_size: int = 8
    num_workers: int | None = None  # None: `default_num_workers`
    mixed_precision: str = "no"
    progress: bool = True


def default_num_workers(device: "torch.device", cores: int | None = None) -> int:
    """DataLoader workers when --num-workers is not given. On a CPU the model uses every core and takes seconds
    per image while decoding and preprocessing a photo takes tens of milliseconds: one worker keeps up, and more
    only take cores and memory from the model. A GPU scores hundreds of images a second, so decoding needs
    several cores: up to 8, leaving one for the main process (benchmarks/README.md, "Batch prediction")."""
    cores = cores or os.cpu_count() or 1
    if device.type == "cpu":
        return 1
    return max(1, min(8, cores - 1))


# ---------------------------------------------------------------------------------------------------- the loop


def predict(model, inputs: Sequence[str] = (), output_dir: str | os.PathLike = "vip2clip-predictions", *,
            processor=None, **options) -> dict:
    """Score `inputs` (image files, folders, glob patterns, `@LIST` files) or `dataset=` (a saved/converted folder,
    raw benchmark folder, parquet folder or Hub id) with `model` (a model folder or Hub id, or a loaded model with
    its `processor`), writing `predictions.csv`, `skipped.csv` and the overlays / maps / masks to `output_dir`.

    `options` are :class:`PredictOptions` (the flags of `vip2clip predict`: `threshold`, `pixel_threshold`,
    `save_maps="png"|"npy"`, `save_masks`, `resume`, `references`, `batch_size`, `mixed_precision`, ...).
    Returns, on the main process, `{"csv", "rows", "anomalous", "scored", "skipped", "skipped_rows", "seconds",
    "threshold", "threshold_source", "pixel_threshold", "pixel_threshold_source"}` (this run's counts and scoring
    time, model loading excluded; `rows` and `anomalous` over the whole CSV; the sources say where each threshold
    came from: "option", "calibrated" or "default", `ViP2CLIPConfig.resolve_threshold`); on the other processes
    of a distributed run, `{"rank": r}`.
    """
    args = PredictOptions(model=model, inputs=list(inputs or []), output_dir=output_dir, **options)
    if bool(args.inputs) == bool(args.dataset):
        raise UsageError("give either INPUT files/folders/globs or --dataset ID_OR_PATH (not both, not neither); "
                         "e.g. `vip2clip predict --model M photos/` or `--dataset org/name --split test`.")
    if isinstance(model, (str, os.PathLike)):
        from ..resolve import resolve_source

        resolve_source(str(model), "--model")  # fail fast, before any data is opened
    found = _images_to_score(args.inputs) if args.inputs else None  # before the folder, the model and torch
    from ..run_folder import claim_output_folder, model_identity
    from ..weights.loader import model_name

    # ---- owned output folder (run_folder.py, docs/reliability.md): manifest + lock, on the main process only ----
    folder = None
    if int(os.environ.get("RANK", "0") or 0) == 0:
        inputs = [item if item.startswith("@") or not os.path.exists(item) else os.path.abspath(item)
                  for item in args.inputs]
        from_path = isinstance(model, (str, os.PathLike))
        manifest = {"written_by": "vip2clip predict",
                    "model": model_identity(str(model)) if from_path else {"source": model_name(model)},
                    "inputs": inputs or {"dataset": args.dataset, "split": args.split, "categories": args.categories},
                    "options": {key: getattr(args, key, None) for key in (
                        "threshold", "pixel_threshold", "overlays", "save_maps", "save_masks", "references",
                        "mixed_precision")}}
        folder = claim_output_folder(args.output_dir, manifest, resume=args.resume, overwrite=args.overwrite,
                                     model_dirs=[str(model)] if from_path else [],
                                     writes=("predictions*.csv", "skipped*.csv", "overlays", "maps", "masks"))
    try:
        return _predict(args, model, processor, found)
    finally:
        if folder is not None:
            folder.release()


def _images_to_score(inputs: Sequence[str]) -> tuple[list, list]:
    """`collect_inputs(inputs)`; none at all is a usage error naming why each input gave nothing."""
    items, problems = collect_inputs(inputs)
    if not items:  # nothing to score is a usage error, not an empty CSV
        raise UsageError("no image to score: " + "; ".join(f"{path}: {reason}" for path, reason in problems[:5])
                         + "; pass image files, folders holding images, or glob patterns that match some.")
    return items, problems


def _predict(args: PredictOptions, model, processor, found: tuple[list, list] | None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from ..data.transforms import FileImages, RowImages, SampleTransform, StreamImages, dataset_rows, make_loader
    from .prediction_files import PredictionFiles, ambiguous_stems

    from ..weights.loader import job_model_and_processor, model_name

    inputs = list(args.inputs)
    procs = process_state()
    output_dir = Path(args.output_dir)

    problems: list[tuple[str, str]] = []
    if found is not None:
        items, problems = found
        ids = [path for path, _ in items]
    else:
        from ..data import load_anomaly_dataset, schema_options

        dataset = load_anomaly_dataset(args.dataset, args.split, args.categories, streaming=args.streaming,
                                       require_labels=False, **schema_options(args))
        if not args.streaming:
            ids, keys = dataset_rows(dataset)

    device = torch.device(args.device or procs.device)  # Accelerate's: this process's GPU, else the CPU
    model, processor = job_model_and_processor(model, processor, device=device, mixed_precision=args.mixed_precision)
    if device.type == "cpu" and args.mixed_precision in ("bf16", "fp16"):
        from ..cpu_fast_path_vip2clip import onednn_bf16_supported

        if not onednn_bf16_supported():  # measured: bf16 ran 6x slower than fp32 on an AVX2-only EPYC (Zen 3)
            logger.warning("--mixed-precision %s: this CPU has no native bf16/fp16 matrix unit (AVX-512 BF16 or AMX), "
                           "so it is emulated and several times slower than fp32; --mixed-precision no is faster here",
                           args.mixed_precision)
    # The dtype the model's first layer takes (an exported ONNX / OpenVINO model takes float32).
    input_dtype = model.clip.vision_model.embeddings.patch_embedding.weight.dtype if hasattr(model, "clip") else torch.float32
    reference_bank = None
    if getattr(args, "references", None):  # few-shot: one bank for every input (docs/few_shot.md)
        from .references import load_reference_bank

        reference_bank = load_reference_bank(model, processor, args.references, batch_size=args.batch_size).to(device)
    extra = {} if reference_bank is None else {"reference_bank": reference_bank}
    config = model.config
    threshold, threshold_source = config.resolve_threshold("image", args.threshold)
    pixel_threshold, pixel_threshold_source = config.resolve_threshold("pixel", args.pixel_threshold)
    input_keys = [key for _, key in items] if inputs else []  # dataset rows' keys are unique without their extension
    outputs = PredictionFiles(output_dir, processor, overlays=args.overlays, maps=args.save_maps,
                              masks=args.save_masks, pixel_threshold=pixel_threshold, threshold=threshold,
                              plain_overlays=args.plain_overlays, ambiguous=ambiguous_stems(input_keys))
    header = outputs.header()

    # Every process reads what is done before the main process touches any file.
    done = done_ids(output_dir, header) if args.resume and output_dir.is_dir() else set()
    procs.wait_for_everyone()
    if procs.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        stale = [*part_files(output_dir, "skipped"), output_dir / SKIPPED_CSV]  # rebuilt: skipped inputs are retried
        if not args.resume:
            stale += [output_dir / PREDICTIONS_CSV, *part_files(output_dir, "predictions")]
        for path in stale:
            path.unlink(missing_ok=True)
    procs.wait_for_everyone()
    suffix = "" if procs.num_processes == 1 else f".part-{procs.process_index:05d}"
    predictions = CsvLog(output_dir / (PREDICTIONS_CSV.replace(".csv", f"{suffix}.csv")), header)
    skipped = CsvLog(output_dir / (SKIPPED_CSV.replace(".csv", f"{suffix}.csv")), ["path", "reason"])
    if procs.is_main_process and problems:
        skipped.write(problems)
        for path, reason in problems:
            print(f"skipped {path}: {reason}", file=sys.stderr)

    prepare = SampleTransform(processor, with_masks=False, keep_image=outputs.overlays)
    if args.dataset and args.streaming:
        dataset, total = StreamImages(dataset, done, procs.process_index, procs.num_processes, prepare), None
    else:
        remaining = [index for index, item_id in enumerate(ids) if item_id not in done]
        mine = remaining[procs.process_index::procs.num_processes]
        if inputs:
            dataset = FileImages([items[i] for i in mine], prepare)
        else:
            dataset = RowImages(dataset, mine, [ids[i] for i in mine], [keys[i] for i in mine], prepare)
        total = len(mine)
        if done and procs.is_main_process:
            logger.info("resuming: %d inputs already in %s, %d to go", len(ids) - len(remaining), output_dir, len(remaining))
    # Not pinned: pinning would also copy the full-size originals kept for the overlays.
    workers = args.num_workers if args.num_workers is not None else default_num_workers(device)
    loader = make_loader(dataset, args.batch_size, workers)
    started = time.perf_counter()  # the scoring time (images/s), model loading excluded

    progress = tqdm(total=total, unit="img", desc="predicting" if procs.num_processes == 1 else f"predicting (process 0 of {procs.num_processes})",
                    disable=not args.progress or not procs.is_main_process, dynamic_ncols=True)
    # Threads suffice: PNG encoding and numpy release the GIL. PNGs use zlib level 1 (the maps' overlays hardly
    # compress better at 6, which costs several times the time).
    writers = min(8, max(2, (os.cpu_count() or 2) // 2))
    pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="vip2clip-outputs") if outputs.needs_files else None
    pending: deque = deque()
    counts = {"scored": 0, "skipped": 0}

    def write_oldest() -> None:
        rows_, bad, count = pending.popleft()
        finished = [entry.result() if isinstance(entry, Future) else entry for entry in rows_]
        predictions.write(finished)
        skipped.write(bad)
        counts["scored"] += len(finished)
        counts["skipped"] += len(bad)
        progress.update(count)

    try:
        for batch in loader:
            bad = list(batch["bad"])
            entries: list = []
            if batch["items"]:
                with torch.inference_mode():
                    output = model(pixel_values=batch["pixel_values"].to(device=device, dtype=input_dtype), **extra)
                scores = output.anomaly_score.float().cpu()
                maps = output.anomaly_map.float().cpu()
                for item, score, anomaly_map in zip(batch["items"], scores.tolist(), maps):
                    if not (math.isfinite(score) and bool(torch.isfinite(anomaly_map).all())):
                        bad.append((item["id"], "the model's score or map is not finite (NaN/inf)"))
                        continue
                    row = [item["id"], f"{score:.6f}", "anomalous" if score >= threshold else "normal"]
                    if pool is None:
                        entries.append([*row, ""])
                    else:
                        entries.append(pool.submit(outputs.write, item, anomaly_map, row,
                                                   outputs.full_size_map(item, anomaly_map)))
            for path, reason in bad:
                progress.write(f"skipped {path}: {reason}", file=sys.stderr)
            pending.append((entries, bad, len(batch["items"]) + len(batch["bad"])))
            while len(pending) > (2 if pool is not None else 0):
                write_oldest()
        while pending:
            write_oldest()
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        predictions.close()
        skipped.close()
    seconds = time.perf_counter() - started

    procs.wait_for_everyone()
    if not procs.is_main_process:
        return {"rank": procs.process_index}
    merge_parts(output_dir, "predictions", header)
    merge_parts(output_dir, "skipped", ["path", "reason"])
    _, final_rows = read_csv_rows(output_dir / PREDICTIONS_CSV)
    _, skipped_rows = read_csv_rows(output_dir / SKIPPED_CSV)
    if not skipped_rows:
        (output_dir / SKIPPED_CSV).unlink(missing_ok=True)
    scored = len(final_rows) - len(done)
    if args.report:  # from the final CSV: every process's and every resumption's rows
        from .html_report import threshold_origin, write_prediction_report

        write_prediction_report(output_dir, model=model_name(args.model), threshold=threshold,
                                threshold_from=threshold_origin(threshold_source, config))
    return {
        "csv": str(output_dir / PREDICTIONS_CSV),
        "rows": len(final_rows),
        "anomalous": sum(1 for row in final_rows if len(row) > 2 and row[2] == "anomalous"),
        "scored": scored,
        "skipped": len(skipped_rows),
        "skipped_rows": skipped_rows,
        "seconds": seconds,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "pixel_threshold": pixel_threshold,
        "pixel_threshold_source": pixel_threshold_source,
    }
