"""The command line's error boundary: one `error: ...; fix` line and exit 2 for a user error, the traceback only
with `--debug` or `VIP2CLIP_DEBUG=1`. Every command, the demo's start-up and the `hub/` scripts run through it."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Callable

from ..console import setup_logging
from ..distributed import teardown_distributed
from ..errors import UsageError

__all__ = ["debug_enabled", "run_main", "entry_point_main", "run_job"]


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """`--debug` on the command line or `VIP2CLIP_DEBUG=1` in the environment: show tracebacks of user errors."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get("VIP2CLIP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run an entry point's `run(args)` with the project's error style (see the module docstring)."""
    try:
        return int(run(args) or 0)
    except UsageError as error:
        if debug_enabled(args):
            traceback.print_exc()
        message = " ".join(str(error).split())  # one line, whatever the message was built from
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def entry_point_main(run: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv=None) -> int:
    """`python -m modeling_vip2clip.X` (and `accelerate launch -m ...`): parse, then :func:`run_main`."""
    return run_main(run, parser.parse_args(argv))


def run_job(work: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Console logging, `work(args)`, and the process group torn down however it ends (train, evaluate, predict
    under `accelerate launch`)."""
    setup_logging()
    try:
        work(args)
    finally:
        teardown_distributed()
    return 0
