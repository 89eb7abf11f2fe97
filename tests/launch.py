"""Helpers for tests that start real processes on localhost: a free TCP port, `accelerate launch` with two
CPU processes (DDP over gloo) of one of the package's modules, a headless Debian Chromium under Playwright; and
`load_script`, a repository script (hub/, benchmarks/) loaded as a module so that its `main(argv)` runs in the
test's process when a fresh interpreter is not the point."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["CHROMIUM", "chromium_context", "free_port", "launch_two_cpu_processes", "load_script"]

# Debian's chromium (apt-get install chromium): Playwright drives it, no browser download.
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def chromium_context(playwright, profile_dir, width: int = 1400, height: int = 1000):
    """A headless, offline-quiet Chromium context (Playwright's `sync_playwright()` object given); close it."""
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=CHROMIUM, headless=True,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
        viewport={"width": width, "height": height},
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_cpu_processes(module: str, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m module argv...` with 2 CPU processes, one thread each, offline.

    `--multi_gpu` with `ACCELERATE_USE_CPU=true` is how Accelerate runs DDP on CPU without mpirun (`--cpu` with
    several processes wants mpirun)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", module, *argv,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def load_script(name: str, path: Path) -> ModuleType:
    """The script at `path` as the module `name` (registered in sys.modules, as dataclasses and pickling expect)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
