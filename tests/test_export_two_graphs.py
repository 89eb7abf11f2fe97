"""The two-graph OpenVINO export's tests (tests/two_graphs_cases.py), run in a pytest process of their own.

In the suite's one process, after test_export.py's in-process OpenVINO/NNCF work, the two-graph INT8 export and
a torch forward in the same process crashed the interpreter (SIGSEGV, exit 139) — alone the cases pass. Running
them in their own process keeps every assertion and keeps one native crash from ending the whole suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_two_graph_export_cases_pass_in_their_own_process():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                          str(HERE / "two_graphs_cases.py")], capture_output=True, text=True, timeout=900,
                         cwd=HERE.parent)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
