"""Console output of the commands: log format and levels, and plain progress lines."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging", "show_progress_lines"]

logger = logging.getLogger("modeling_vip2clip")


def setup_logging() -> None:
    """Console logging for the entry points: our INFO messages, the libraries' warnings only."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # torch: its INFO lines at exit (FakeTensor cache stats) would follow a Ctrl-C's "interrupted"
    for name in ("accelerate", "datasets", "httpx", "httpx2", "urllib3", "huggingface_hub", "filelock", "torch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # huggingface_hub logs through its own handler *and* propagates: once is enough.
    logging.getLogger("huggingface_hub").propagate = False


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to `sys.stderr` as it is when a record comes, not when the handler was made:
    a second call from Python after stderr was redirected (or closed, as a captured one is) still prints."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_progress_lines(name: str = "vip2clip") -> None:
    """Plain progress lines of the logger `name` (and its children) on stderr, once each: its own handler, no
    propagation to the root, whose handler (logging.basicConfig) would print huggingface_hub's lines twice."""
    target = logging.getLogger(name)
    if not target.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        target.addHandler(handler)
    target.setLevel(logging.INFO)
    target.propagate = False
