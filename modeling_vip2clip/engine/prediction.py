"""The batch-prediction loop behind `vip2clip predict` (`modeling_vip2clip.cli.predict` is its command line).

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

Distributed (`accelerate launch`): the remaining inputs are sharded over the processes (`inputs[rank::world]`);
process r writes `predictions.part-<r>.csv` (and `skipped.part-<r>.csv`), and at the end the main process appends
the parts' rows to `predictions.csv` (skipping any input already there, so an interrupted merge is harmless) and
deletes them. A resumed run reads the parts like the main CSV, whatever its number of processes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..data.dataset_parts import DatasetPart, open_dataset_parts
from ..data.images import collect_inputs
from ..data.streams import FileImages, Prepare, RowImages, StreamImages, dataset_rows, make_loader
from .prediction_files import PredictionFiles, ambiguous_stems
from .results_csv import PREDICTIONS_CSV, SKIPPED_CSV, CsvLog, done_ids, merge_parts, part_files, read_csv_rows
from ..errors import UsageError, require_extra
from ..distributed import check_distributed_setup
from ..console import test_pause

logger = logging.getLogger("modeling_vip2clip.cli.predict")

__all__ = [
    "PREDICTIONS_CSV",
    "SKIPPED_CSV",
    "read_csv_rows",
    "run_prediction",
]



# ---------------------------------------------------------------------------------------------------- processes


class _Processes:
    """This process's place in an `accelerate launch` job (Accelerate's `PartialState`), or alone."""

    def __init__(self):
        self.state = None
        self.rank, self.world, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            require_extra("accelerate", "train", "a multi-process `vip2clip predict` (accelerate launch)")
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # As Accelerator does: ACCELERATE_USE_CPU=true runs the processes on CPUs (gloo).
            self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            check_distributed_setup(self.state)
            self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------- the loop


def run_prediction(args: argparse.Namespace, model=None, processor=None) -> dict:
    """Score the inputs of `args` (the options of `vip2clip predict`). Returns, on the main process,
    `{"csv", "rows", "anomalous", "scored", "skipped", "seconds", "threshold"}` (this run's counts and scoring
    time, model loading excluded; `rows` and `anomalous` over the whole CSV); on the other processes of a distributed run, `{"rank": r}`."""
    from tqdm.auto import tqdm

    from ..weights.loader import load_model_and_processor
    from ..resolve import resolve_source

    inputs = list(getattr(args, "inputs", None) or [])
    if bool(inputs) == bool(args.dataset):
        raise UsageError("give either INPUT files/folders/globs or --dataset ID_OR_PATH (not both, not neither); "
                         "e.g. `vip2clip predict --model M photos/` or `--dataset org/name --split test`.")
    if model is None:
        resolve_source(args.model, "--model")  # fail fast, before any data is opened
    procs = _Processes()
    output_dir = Path(args.output_dir)

    parts: list[DatasetPart] = []
    problems: list[tuple[str, str]] = []
    if inputs:
        items, problems = collect_inputs(inputs)
        ids = [path for path, _ in items]
    else:
        parts = open_dataset_parts(
            args.dataset, args.split, image_column=args.image_column, label_column=args.label_column,
            mask_column=args.mask_column, category_column=args.category_column, categories=args.categories,
            streaming=args.streaming,
        )
        if not args.streaming:
            rows, ids = dataset_rows(parts)

    device = torch.device(args.device or procs.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, processor = load_model_and_processor(args.model, device=device, dtype=_DTYPES[args.mixed_precision])
    elif processor is None:
        from ..processing_vip2clip import ViP2CLIPProcessor

        processor = ViP2CLIPProcessor.for_model(model.config)
    model = model.to(device).eval()
    # The dtype the model's first layer takes (an exported ONNX / OpenVINO model takes float32).
    input_dtype = model.clip.vision_model.embeddings.patch_embedding.weight.dtype if hasattr(model, "clip") else torch.float32
    reference_bank = None
    if getattr(args, "references", None):  # few-shot: one bank for every input (docs/few_shot.md)
        from .references import load_reference_bank

        reference_bank = load_reference_bank(model, processor, args.references, batch_size=args.batch_size).to(device)
    extra = {} if reference_bank is None else {"reference_bank": reference_bank}
    config = model.config
    threshold = args.threshold if args.threshold is not None else (
        config.image_threshold if getattr(config, "image_threshold", None) is not None else 0.5)
    pixel_threshold = args.pixel_threshold if args.pixel_threshold is not None else (
        config.pixel_threshold if getattr(config, "pixel_threshold", None) is not None else 0.5)
    keys = [key for _, key in items] if inputs else []  # dataset rows' keys are unique without their extension
    outputs = PredictionFiles(output_dir, processor, overlays=not args.no_overlays, maps=args.save_maps,
                              masks=args.save_masks, pixel_threshold=pixel_threshold, threshold=threshold,
                              plain_overlays=bool(getattr(args, "plain_overlays", False)),
                              ambiguous=ambiguous_stems(keys))
    header = outputs.header()

    # Every process reads what is done before the main process touches any file.
    done = done_ids(output_dir, header) if args.resume and output_dir.is_dir() else set()
    procs.barrier()
    if procs.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        stale = [*part_files(output_dir, "skipped"), output_dir / SKIPPED_CSV]  # rebuilt: skipped inputs are retried
        if not args.resume:
            stale += [output_dir / PREDICTIONS_CSV, *part_files(output_dir, "predictions")]
        for path in stale:
            path.unlink(missing_ok=True)
    procs.barrier()
    suffix = "" if procs.world == 1 else f".part-{procs.rank:05d}"
    predictions = CsvLog(output_dir / (PREDICTIONS_CSV.replace(".csv", f"{suffix}.csv")), header)
    skipped = CsvLog(output_dir / (SKIPPED_CSV.replace(".csv", f"{suffix}.csv")), ["path", "reason"])
    if procs.is_main and problems:
        skipped.write(problems)
        for path, reason in problems:
            print(f"skipped {path}: {reason}", file=sys.stderr)

    prepare = Prepare(processor, keep_image=outputs.overlays)
    if args.dataset and args.streaming:
        dataset, total = StreamImages(parts, done, procs.rank, procs.world, prepare), None
    else:
        remaining = [index for index, item_id in enumerate(ids) if item_id not in done]
        mine = remaining[procs.rank::procs.world]
        if inputs:
            dataset = FileImages([items[i] for i in mine], prepare)
        else:
            dataset = RowImages(parts, rows[mine], [ids[i] for i in mine], prepare)
        total = len(mine)
        if done and procs.is_main:
            logger.info("resuming: %d inputs already in %s, %d to go", len(ids) - len(remaining), output_dir, len(remaining))
    # Not pinned: pinning would also copy the full-size originals kept for the overlays.
    loader = make_loader(dataset, args.batch_size, args.num_workers)
    started = time.perf_counter()  # the scoring time (images/s), model loading excluded

    progress = tqdm(total=total, unit="img", desc="predicting" if procs.world == 1 else f"predicting (process 0 of {procs.world})",
                    disable=args.no_progress or not procs.is_main, dynamic_ncols=True)
    # Threads suffice: PNG encoding and numpy release the GIL. PNGs use zlib level 1 (the maps' overlays hardly
    # compress better at 6, which costs several times the time).
    writers = min(8, max(2, (os.cpu_count() or 2) // 2))
    pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="vip2clip-outputs") if outputs.needs_files else None
    pending: deque = deque()
    counts = {"scored": 0, "skipped": 0, "batches": 0}

    def write_oldest() -> None:
        rows_, bad, count = pending.popleft()
        finished = [entry.result() if isinstance(entry, Future) else entry for entry in rows_]
        predictions.write(finished)
        skipped.write(bad)
        counts["scored"] += len(finished)
        counts["skipped"] += len(bad)
        counts["batches"] += 1
        progress.update(count)
        test_pause("VIP2CLIP_TEST_PAUSE_AFTER_BATCH", counts["batches"])  # test-only, no-op unless set

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
                        entries.append(pool.submit(outputs.write, item, anomaly_map, row))
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

    procs.barrier()
    if not procs.is_main:
        return {"rank": procs.rank}
    merge_parts(output_dir, "predictions", header)
    merge_parts(output_dir, "skipped", ["path", "reason"])
    _, final_rows = read_csv_rows(output_dir / PREDICTIONS_CSV)
    _, skipped_rows = read_csv_rows(output_dir / SKIPPED_CSV)
    if not skipped_rows:
        (output_dir / SKIPPED_CSV).unlink(missing_ok=True)
    scored = len(final_rows) - len(done)
    if not getattr(args, "no_report", False):  # from the final CSV: every process's and every resumption's rows
        from .html_report import threshold_origin, write_prediction_report

        write_prediction_report(output_dir, model=str(args.model), threshold=threshold,
                                threshold_from=threshold_origin(args.threshold, config))
    return {
        "csv": str(output_dir / PREDICTIONS_CSV),
        "rows": len(final_rows),
        "anomalous": sum(1 for row in final_rows if len(row) > 2 and row[2] == "anomalous"),
        "scored": scored,
        "skipped": len(skipped_rows),
        "skipped_rows": skipped_rows,
        "seconds": seconds,
        "threshold": threshold,
    }
