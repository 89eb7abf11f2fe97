"""The package's bottom layer of errors: every module may import this one, and it imports nothing of the package.

A mistake the user can fix raises :class:`UsageError` (or a subclass); the command line's error boundary
(`cli/boundary.py`) prints it as one line, ``error: <what is wrong with which value>; <the fix>``, and exits 2.
"""

from __future__ import annotations

import importlib.util

__all__ = ["UsageError", "require_extra"]


class UsageError(Exception):
    """A mistake the user can fix (a bad value, a missing file, an unreachable Hub id, a missing extra).

    The message names the value and says how to fix it: ``"--model ./x: no such folder; pass a model folder …"``.
    """


def require_extra(module: str, extra: str, why: str) -> None:
    """Fail at the start of a command, not after its work, when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{why} needs the Python package {module!r}, which is not installed; install it with "
                         f"pip install \"vip2clip[{extra}]\"")
