"""Console output of the commands: log format and levels, and plain progress lines."""

from __future__ import annotations

import logging
import os
import sys
import time

__all__ = ["setup_logging", "show_progress_lines", "test_pause"]

logger = logging.getLogger("modeling_vip2clip")


def setup_logging() -> None:
    """Console logging for the entry points: our INFO messages, the libraries' warnings only."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("accelerate", "datasets", "httpx", "httpx2", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # huggingface_hub logs through its own handler *and* propagates: once is enough.
    logging.getLogger("huggingface_hub").propagate = False


def show_progress_lines(name: str = "vip2clip") -> None:
    """Plain progress lines of the logger `name` (and its children) on stderr, once each: its own handler, no
    propagation to the root, whose handler (logging.basicConfig) would print huggingface_hub's lines twice."""
    target = logging.getLogger(name)
    if not target.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        target.addHandler(handler)
    target.setLevel(logging.INFO)
    target.propagate = False


def test_pause(variable: str, at: int) -> None:
    """TEST-ONLY hook (tests/test_interruptions.py), a no-op unless `variable` is set in the environment.

    With `variable="N:SECONDS"`, print one line to stderr and sleep SECONDS when `at == N`, so that a test can
    SIGKILL the process at that exact point. Variables: VIP2CLIP_TEST_PAUSE_AFTER_STEP (train: after optimiser
    step N), VIP2CLIP_TEST_PAUSE_IN_CHECKPOINT (train: while epoch_N.tmp is written, before its rename),
    VIP2CLIP_TEST_PAUSE_AFTER_BATCH (evaluate / predict: after batch N's results are written).
    """
    spec = os.environ.get(variable)
    if not spec:
        return
    target, _, seconds = spec.partition(":")
    if int(target) == int(at):
        print(f"[test hook] {variable}: pausing {seconds} s at {at}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 0))


test_pause.__test__ = False  # not a pytest test
