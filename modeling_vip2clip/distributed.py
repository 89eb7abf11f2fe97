"""Distributed runs (`accelerate launch`): this process's place in the run, a launcher Accelerate does not see
refused, and the group torn down. Every multi-process command goes through Accelerate: evaluate and train with an
`Accelerator` (`prepare`d loaders), predict and calibrate with the same `PartialState` sharding their inputs."""

from __future__ import annotations

import os
import sys

from .errors import UsageError

__all__ = ["process_state", "check_distributed_setup", "teardown_distributed"]


def process_state():
    """Accelerate's `PartialState` of this process (alone, or one of an `accelerate launch` job), checked.

    It gives `process_index`, `num_processes`, `is_main_process`, `wait_for_everyone()` and `device` (this
    process's GPU, else the CPU). `ACCELERATE_USE_CPU=true` runs the processes on CPUs (gloo), as `Accelerator`
    does. Accelerate comes with the `train` extra: without it a single process still runs.
    """
    from .errors import require_extra

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        require_extra("accelerate", "train", "a multi-process run (accelerate launch)")
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:  # the base install: one process, the state below is what PartialState reports alone
        return _SingleProcess()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_distributed_setup(state)
    return state


class _SingleProcess:
    """What `PartialState` says in a process that runs alone, for an install without Accelerate."""

    process_index, num_processes, is_main_process = 0, 1, True

    @property
    def device(self):
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait_for_everyone(self) -> None:
        pass


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
