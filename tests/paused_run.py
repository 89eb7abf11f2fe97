"""Run `python -m MODULE ARGS...` in this process with one function of the package made to pause, so that an
interruption test can SIGKILL the run at an exact point (a 0.03 s epoch or a millisecond checkpoint write could
not be hit otherwise). The package itself holds no test hook.

    VIP2CLIP_TEST_PAUSE="modeling_vip2clip.engine.results_csv:CsvLog.write@4:60" \\
        python tests/paused_run.py -m modeling_vip2clip.cli.predict --model M photos/

`VIP2CLIP_TEST_PAUSE` = `MODULE:ATTRIBUTE@N:SECONDS`: after the N-th call of `MODULE.ATTRIBUTE` (a function or a
class's method, looked up where the package calls it) has returned, print `[test hook] pausing after call N of
MODULE:ATTRIBUTE` to stderr and sleep SECONDS. Unset, the module runs untouched. Works under `accelerate launch`
too (launch this file instead of `-m MODULE`): each process counts its own calls.

`MODULE:ATTRIBUTE@N:SIGKILL` (any signal name) sends the process that signal instead, right after the N-th call:
a kill at an exact stage without polling. In-process, `signal_after(...)` does the same and returns the undo
(tests/test_faults_at_every_stage.py sends a real SIGINT to pytest's own process that way).
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import signal
import sys
import time
from typing import Callable

VARIABLE = "VIP2CLIP_TEST_PAUSE"


def act_after(target: str, call: int, action: Callable[[], None]) -> Callable[[], None]:
    """Wrap `target` ("module:attribute.path") so that `action()` runs after its `call`-th call returns; returns
    the function that puts the original back."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if calls == call:
            action()
        return result

    setattr(owner, name, wrapped)
    return lambda: setattr(owner, name, original)


def pause_after(target: str, call: int, seconds: float) -> Callable[[], None]:
    """After the `call`-th call of `target`, say so on stderr and sleep `seconds` (the test kills the run then)."""
    def pause():
        print(f"[test hook] pausing after call {call} of {target}", file=sys.stderr, flush=True)
        time.sleep(seconds)

    return act_after(target, call, pause)


def signal_after(target: str, call: int, signum: int) -> Callable[[], None]:
    """After the `call`-th call of `target`, send this process `signum` (a real signal, at an exact stage)."""
    return act_after(target, call, lambda: os.kill(os.getpid(), signum))


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: paused_run.py -m MODULE [ARGS...]")
    sys.path[0] = os.getcwd()  # what `python -m MODULE` puts first (a script's own folder would be tests/)
    spec = os.environ.get(VARIABLE)
    if spec:
        target, _, rest = spec.rpartition("@")
        call, _, what = rest.partition(":")
        if what.startswith("SIG"):
            signal_after(target, int(call), getattr(signal, what))
        else:
            pause_after(target, int(call), float(what or 0))
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
