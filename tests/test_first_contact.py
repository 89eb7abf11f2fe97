"""First contact: every wrong usage is refused in one clear line, fast, without a traceback (issue: first contact).

Each case runs the real console entry point in a subprocess, as a user would, and checks the exit status (2, the
argparse convention), that the message names the offending value, that no traceback is printed, and — where the
point is speed — a time bound. Where neither a fresh process nor its start-up time is the point (a folder that is
not a model, `--debug`), the cases call the same entry point in-process (`run_cli`, tests/conftest.py): each fresh
process that reaches `predict` imports torch, seconds apiece. The Hub is made unreachable deterministically by pointing HF_ENDPOINT at a closed
port on 127.0.0.1 (connection refused at once), with HF_HUB_OFFLINE unset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from launch import free_port
from modeling_vip2clip.errors import UsageError
from modeling_vip2clip.resolve import looks_like_path, resolve_source

CLI = [sys.executable, "-m", "modeling_vip2clip.cli"]


def _run(argv, tmp_path, online=False, extra_env=None, timeout=120):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), **(extra_env or {})}
    if online:  # the Hub "reachable" in principle, but at a closed local port: every request is refused
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    return done, time.perf_counter() - started


def _assert_user_error(done, *named):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert lines, done.stderr
    for value in named:
        assert value in done.stderr, (value, done.stderr)


@pytest.mark.parametrize("argv, named", [
    (["predict", "--model", "./no-such-model-dir", "img.png"], ["./no-such-model-dir", "no such file or folder"]),
    (["evaluate", "--model", "./m", "--dataset", "/missing/bench"], ["/missing/bench"]),
    (["train", "--clip", "../nowhere/clip", "--dataset", "d"], ["../nowhere/clip"]),
    (["train", "--clip", "c", "--dataset", "d", "--batch-size", "-2"], ["--batch-size", "'-2'"]),
    (["train", "--clip", "c", "--dataset", "d", "--epochs", "0"], ["--epochs", "'0'"]),
    (["predict", "--model", "m", "img.png", "--threshold", "2"], ["--threshold", "'2'"]),
    (["evaluate", "--model", "m", "--dataset", "d", "--max-batches", "0"], ["--max-batches"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_wrong_usage_is_one_line_exit_2_fast(argv, named, tmp_path):
    done, seconds = _run(argv, tmp_path)
    _assert_user_error(done, *named)
    assert seconds < 20, f"took {seconds:.1f} s to refuse {argv}"


def test_missing_dataset_is_reported_before_the_model_loads(tiny_model_dir, tmp_path):
    done, _ = _run(["evaluate", "--model", str(tiny_model_dir), "--dataset", "/missing/bench"], tmp_path)
    _assert_user_error(done, "--dataset /missing/bench", "no such file or folder")


def test_folder_that_is_not_a_model_is_named(tmp_path, monkeypatch, run_cli):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)  # `--model empty`, relative, as typed
    _assert_user_error(run_cli("predict", "--model", "empty", "x.png"), "--model empty", "not a model folder")


def test_unreachable_hub_id_is_one_line_within_seconds(tmp_path):
    done, seconds = _run(["predict", "--model", "some-org/typo-model", "x.png"], tmp_path, online=True)
    _assert_user_error(done, "some-org/typo-model", "HF_HUB_OFFLINE=1", "local folder")
    assert seconds < 20 and "Retrying" not in done.stderr


def test_offline_hub_id_not_cached_says_so(tmp_path):
    done, _ = _run(["train", "--clip", "openai/clip-vit-large-patch14-336", "--dataset", "d"], tmp_path,
                   extra_env={"HF_HUB_OFFLINE": "1"})
    _assert_user_error(done, "openai/clip-vit-large-patch14-336", "HF_HUB_OFFLINE=1", "not in the local cache")


def test_debug_shows_the_traceback(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VIP2CLIP_DEBUG", raising=False)
    done = run_cli("predict", "--model", "./no-such-model-dir", "img.png", "--debug")
    assert done.returncode == 2 and "Traceback" in done.stderr and "UsageError" in done.stderr
    monkeypatch.setenv("VIP2CLIP_DEBUG", "1")  # read when the error is reported, not at import
    done = run_cli("predict", "--model", "./no-such-model-dir", "img.png")
    assert done.returncode == 2 and "Traceback" in done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"],
                                  ["convert", "--help"]])
def test_help_does_not_import_torch(argv):
    """`vip2clip --help` is fast because it imports neither torch nor transformers (the measured time is in
    benchmarks/README.md; a wall-clock bound here would only measure the CI machine's load)."""
    probe = ("import sys\nfrom modeling_vip2clip.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules]\n"
             "print('HEAVY', heavy, 'CODE', code, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert "HEAVY [] CODE 0" in done.stderr, done.stderr[-2000:]
    assert "usage: vip2clip" in done.stdout


def test_looks_like_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for value in ("./x", "../x", "/x", "~/x", "runs/model", "C:\\models\\x", "."):
        assert looks_like_path(value), value
    for value in ("openai/clip-vit-large-patch14-336", "org/name", "gpt2"):
        assert not looks_like_path(value), value


def test_resolve_source_accepts_a_model_folder_and_refuses_others(tiny_model_dir, tmp_path):
    assert resolve_source(str(tiny_model_dir), "--model") == str(tiny_model_dir.resolve())
    with pytest.raises(UsageError, match="not a model folder"):
        resolve_source(str(tmp_path), "--model")
    with pytest.raises(UsageError, match="neither an existing path nor a valid Hub id"):
        resolve_source("bad id with spaces", "--model")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE=1"):  # the suite runs offline (conftest)
        resolve_source("some-org/never-cached", "--model")
