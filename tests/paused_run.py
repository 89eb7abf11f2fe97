"""Run `python -m MODULE ARGS...` in this process with one function of the package made to pause, so that an
interruption test can SIGKILL the run at an exact point (a 0.03 s epoch or a millisecond checkpoint write could
not be hit otherwise). The package itself holds no test hook.

    VIP2CLIP_TEST_PAUSE="modeling_vip2clip.engine.results_csv:CsvLog.write@4:60" \\
        python tests/paused_run.py -m modeling_vip2clip.cli.predict --model M photos/

`VIP2CLIP_TEST_PAUSE` = `MODULE:ATTRIBUTE@N:SECONDS`: after the N-th call of `MODULE.ATTRIBUTE` (a function or a
class's method, looked up where the package calls it) has returned, print `[test hook] pausing after call N of
MODULE:ATTRIBUTE` to stderr and sleep SECONDS. Unset, the module runs untouched. Works under `accelerate launch`
too (launch this file instead of `-m MODULE`): each process counts its own calls.
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import sys
import time

VARIABLE = "VIP2CLIP_TEST_PAUSE"


def pause_after(target: str, call: int, seconds: float) -> None:
    """Wrap `target` ("module:attribute.path") so that it sleeps `seconds` after its `call`-th call returns."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def paused(*args, **kwargs):
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if calls == call:
            print(f"[test hook] pausing after call {call} of {target}", file=sys.stderr, flush=True)
            time.sleep(seconds)
        return result

    setattr(owner, name, paused)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: paused_run.py -m MODULE [ARGS...]")
    sys.path[0] = os.getcwd()  # what `python -m MODULE` puts first (a script's own folder would be tests/)
    spec = os.environ.get(VARIABLE)
    if spec:
        target, _, rest = spec.rpartition("@")
        call, _, seconds = rest.partition(":")
        pause_after(target, int(call), float(seconds or 0))
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
