"""Distributed runs (`accelerate launch`): refuse a launcher Accelerate does not see, and tear the group down."""

from __future__ import annotations

import os
import sys

from .errors import UsageError

__all__ = ["check_distributed_setup", "teardown_distributed"]


def check_distributed_setup(accelerator) -> None:
    """Refuse a launcher that started several processes that Accelerate does not see as one distributed job.

    E.g. `accelerate launch --multi_gpu` (torchrun) on a machine without GPUs: every process would work alone and
    overwrite the others' outputs. On CPUs set `ACCELERATE_USE_CPU=true` (see docs/training.md).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes == 1:
        raise UsageError(
            f"the launcher started {world_size} processes (WORLD_SIZE={world_size}) but Accelerate runs this one "
            "alone (no GPU found?); for several CPU processes use `ACCELERATE_USE_CPU=true accelerate launch "
            "--multi_gpu --num_processes N -m ...` (or torchrun with ACCELERATE_USE_CPU=1)."
        )


def teardown_distributed() -> None:
    """Destroy the process group of an `accelerate launch` run before the interpreter exits.

    A group left alive at exit lets gloo's threads be destroyed while still joinable: the process then aborts
    ("terminate called without an active exception", SIGABRT) after a run that succeeded, and the launcher reports
    a failure.
    """
    if "torch" not in sys.modules:  # nothing can have started a process group
        return
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
