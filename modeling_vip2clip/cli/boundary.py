"""The command line's error boundary: one `error: <what> (<path>): <why>; <fix>` line and exit 2 for an expected
fault (`errors.explain` lists them), one line saying "this is a bug" and exit 1 for anything else, 130 for Ctrl-C;
the traceback only with `--debug` or `VIP2CLIP_DEBUG=1`. Every command, the demo's start-up and the `hub/`
scripts run through it (docs/reliability.md)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Callable

from ..console import setup_logging
from ..distributed import teardown_distributed
from ..errors import explain

__all__ = ["debug_enabled", "report", "guarded", "run_main", "entry_point_main", "run_job"]


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """`--debug` on the command line or `VIP2CLIP_DEBUG=1` in the environment: show tracebacks of user errors."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get("VIP2CLIP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def report(error: BaseException, debug: bool = False) -> int:
    """Print the one line for `error` and return the exit status: 2 for an expected fault (a `UsageError`, or a
    library exception that `errors.explain` knows: file system, corrupt file, refused pickle, invalid config,
    decode error, missing extra), 130 for Ctrl-C, 1 for anything else — a bug, said so, with how to see the
    traceback. With `debug` the traceback is printed first."""
    if isinstance(error, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    if debug:
        traceback.print_exception(error)
    known = explain(error)
    if known is not None:
        message = " ".join(str(known).split())  # one line, whatever the message was built from
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    text = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    print(f"error: unexpected failure ({text}); this is a bug in vip2clip — rerun with --debug (or "
          "VIP2CLIP_DEBUG=1) for the traceback and report it", file=sys.stderr, flush=True)
    return 1


def guarded(run: Callable[[], Any], debug: bool | None = None) -> int:
    """`run()` inside the boundary: its int result (0 for None), or :func:`report`'s status. For the demo's
    start-up and the `hub/` scripts, which have no argparse namespace of ours."""
    try:
        return int(run() or 0)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - the boundary: every failure becomes one line
        return report(error, debug_enabled() if debug is None else debug)


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run an entry point's `run(args)` with the project's error style (see the module docstring)."""
    return guarded(lambda: run(args), debug_enabled(args))


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
