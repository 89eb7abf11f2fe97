"""Interrupted and faulty runs (issue #7, "Runs"): real `python -m modeling_vip2clip.{train,evaluate}` processes
killed with SIGKILL, no mocks, tiny random CLIP and 32 px synthetic images (each run takes seconds, mostly imports).
The runs nobody kills (the uninterrupted references, the final resumes, the corrupt-image run) call the same entry
point in the test's process, on one thread like the children, so their floats are the children's.

* Training SIGKILLed (whole process group) right after a checkpoint completed, in the middle of an epoch and while
  a checkpoint folder was being written, then `--resume`d each time: the newest checkpoint after each kill is a
  complete one, no `.tmp` survives the resume, and the final weights equal an uninterrupted run's.
* A corrupt image inside a saved training dataset: the run completes, the sample is reported (path, reason) and
  counted in the end-of-run summary, and the model folder is saved.
* Evaluation SIGKILLed mid-way and `--resume`d: every sample counted exactly once, the same metrics.
(A NaN loss stopping the run with its epoch/step is covered by tests/test_train.py::test_nan_loss_stops_...)

The moments are pinned from the test side (`tests/paused_run.py`): the command runs in a process where one function
(an optimiser step, the write of trainer_state.json, a batch of partial results) sleeps after its N-th call, after
printing one line, and the test kills it there; otherwise a 0.03 s epoch or a millisecond checkpoint write could not
be hit reliably. The package holds no test hook.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_vip2clip.data import convert, generate_synthetic_benchmark
from modeling_vip2clip.engine.results_store import PartialResults
from modeling_vip2clip.engine.checkpointing import find_latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--feature-layers", "1", "2", "--n-ctx", "3", "--n-cls", "2", "--top-k", "5"]
EPOCHS, STEPS_PER_EPOCH = 3, 3  # 6 images, batch 2
PAUSE = "60"  # seconds a hooked process sleeps: far longer than the test needs to kill it
WAIT = 90.0  # upper bound of every wait for a process (import + a few tiny epochs take ~6 s on a loaded machine)


# Each run builds its own Accelerator: start every test from a clean singleton state.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---------------------------------------------------------------------------------------------------- processes


# Where each moment is pinned (`tests/paused_run.py`: MODULE:ATTRIBUTE, paused after its N-th call).
AFTER_STEP = "torch.optim:Adam.step"  # train: after an optimiser step
IN_CHECKPOINT = "modeling_vip2clip.engine.checkpointing:atomic_write_json"  # train: epoch_N.tmp complete, not renamed
AFTER_BATCH = "modeling_vip2clip.engine.results_store:PartialResults.write"  # evaluate: a batch's results stored


def _start(module: str, argv: list, log: Path, pause: str | None = None) -> subprocess.Popen:
    """Start `python -m module argv` in its own session (so the whole group can be killed), output into `log`;
    `pause` = "TARGET@N" pauses the run after the N-th call of TARGET."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VIP2CLIP_TEST_PAUSE", None)
    if pause:
        env["VIP2CLIP_TEST_PAUSE"] = f"{pause}:{PAUSE}"
    with open(log, "w") as handle:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "paused_run.py"), "-m", module,
                                 *map(str, argv)], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _wait_until(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = WAIT) -> None:
    """Poll `condition` every 10 ms; fail (after killing the group) if the process ends first or on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            _kill(proc)
            pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{_tail(log)}")
        time.sleep(0.01)


def _kill_when(condition, proc, log, what) -> None:
    _wait_until(condition, proc, log, what)
    assert proc.poll() is None, f"the run ended before it could be killed at {what}"
    _kill(proc)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def _finish(proc: subprocess.Popen, log: Path, timeout: float = WAIT) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"run did not finish within {timeout} s:\n{_tail(log)}")
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def _paused(log: Path, target: str):
    return lambda: re.search(rf"\[test hook\] pausing after call \d+ of {re.escape(target)}", log.read_text(errors="replace"))


# ---------------------------------------------------------------------------------------------------- training


def _train_argv(clip, data, out, *extra):
    return ["--clip", clip, *TINY, "--dataset", data, "--output-dir", out, "--epochs", EPOCHS, "--batch-size", 2,
            "--num-workers", 0, "--report-to", "none", "--no-progress", *extra]


def _entries(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []


def _assert_same(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7, msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """6 test images of one category (3 normal, 3 anomalous with masks): 3 steps of batch 2 per epoch."""
    root = tmp_path_factory.mktemp("interrupt_data")
    generate_synthetic_benchmark(root, categories=("fabric",), n_train_good=0, n_test_good=3, n_test_bad=3,
                                 image_size=32, seed=0)
    return root


def _train_here(argv: list) -> None:
    """`vip2clip train ARGV` in this process, with the killed children's single thread (the same floats: the
    checkpoints are compared to 1e-7) and a fresh Accelerate state; a second interpreter would only re-import torch."""
    from accelerate.state import AcceleratorState, GradientState

    from modeling_vip2clip.cli.main import main as cli_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        assert cli_main(["train", *map(str, argv)]) == 0
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def reference(tiny_clip_dir, train_data, tmp_path_factory):
    """The uninterrupted run, same settings, one thread as in the killed processes."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _train_here(_train_argv(tiny_clip_dir, train_data, out))
    return out


def test_sigkill_during_training_then_resume_matches_uninterrupted_run(reference, tiny_clip_dir, train_data, tmp_path,
                                                                      caplog):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    argv = _train_argv(tiny_clip_dir, train_data, out)

    def heads(run: Path, epoch: int) -> dict:
        return load_file(run / "checkpoints" / f"epoch_{epoch}" / "model.safetensors")

    # (c) Right after checkpoint epoch_1 is complete (renamed into place). The pause after the next step only
    # guarantees the run cannot get further if the kill is late.
    log = tmp_path / "1_after_checkpoint.log"
    proc = _start("modeling_vip2clip.cli.train", argv, log, pause=f"{AFTER_STEP}@{STEPS_PER_EPOCH + 1}")
    _kill_when(lambda: (checkpoints / "epoch_1").is_dir(), proc, log, "epoch_1 complete")
    assert _entries(checkpoints) == ["epoch_1"]
    assert find_latest_checkpoint(checkpoints).name == "epoch_1"
    assert json.loads((checkpoints / "epoch_1" / "trainer_state.json").read_text())["global_step"] == STEPS_PER_EPOCH
    _assert_same(heads(out, 1), heads(reference, 1), "epoch_1 after the kill")
    assert not (out / "model").exists()

    # (a) In the middle of epoch 2: killed after its 2nd optimiser step (weights changed in memory only); the
    # resumed process counts its own steps, so global step 5 is its 2nd.
    log = tmp_path / "2_mid_epoch.log"
    proc = _start("modeling_vip2clip.cli.train", [*argv, "--resume"], log, pause=f"{AFTER_STEP}@2")
    _kill_when(_paused(log, AFTER_STEP), proc, log, "step 5 (mid epoch 2)")
    text = log.read_text()
    assert "resumed from" in text and "epoch [2/3]" not in text  # really inside epoch 2
    assert _entries(checkpoints) == ["epoch_1"]
    assert find_latest_checkpoint(checkpoints).name == "epoch_1"
    _assert_same(heads(out, 1), heads(reference, 1), "epoch_1 after the mid-epoch kill")

    # (b) While epoch_2 is being written: weights, optimiser, RNG states and even trainer_state.json are in
    # epoch_2.tmp, only the rename is missing. It must never be taken for the newest checkpoint. (Resumed from
    # epoch_1, the first trainer_state.json this process writes is epoch 2's.)
    log = tmp_path / "3_in_checkpoint.log"
    proc = _start("modeling_vip2clip.cli.train", [*argv, "--resume"], log, pause=f"{IN_CHECKPOINT}@1")
    _kill_when(_paused(log, IN_CHECKPOINT), proc, log, "epoch_2.tmp being written")
    assert _entries(checkpoints) == ["epoch_1", "epoch_2.tmp"]
    assert (checkpoints / "epoch_2.tmp" / "model.safetensors").is_file()
    assert find_latest_checkpoint(checkpoints).name == "epoch_1"

    # Resume to the end (in this process: the kills are the point): the half-written folder is removed, nothing is
    # lost, the result is the uninterrupted one.
    with caplog.at_level(logging.INFO, logger="modeling_vip2clip"):
        _train_here([*argv, "--resume"])
    text = caplog.text
    assert "epoch_2.tmp, left by a run interrupted while saving" in text
    assert f"resumed from {checkpoints / 'epoch_1'}" in text
    assert _entries(checkpoints) == ["epoch_1", "epoch_2", "epoch_3"]
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    for epoch in (1, 2, 3):
        _assert_same(heads(out, epoch), heads(reference, epoch), f"checkpoint epoch_{epoch}")
    _assert_same(load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors"),
                 "final model")
    state = json.loads((checkpoints / "epoch_3" / "trainer_state.json").read_text())
    assert state["epoch"] == EPOCHS and state["global_step"] == EPOCHS * STEPS_PER_EPOCH
    summary = json.loads((out / "train_summary.json").read_text())
    expected = json.loads((reference / "train_summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert [e["loss"] for e in summary["epochs"]] == pytest.approx([e["loss"] for e in expected["epochs"]], abs=1e-7)


def test_corrupt_image_in_training_data_is_skipped_reported_and_counted(tiny_clip_dir, tmp_path, caplog):
    # A raw tree converted (the converter verifies every file), then one image rots on disk before the dataset is
    # saved: save_to_disk embeds the garbage bytes, so the converter's check cannot catch it.
    raw = tmp_path / "raw"
    generate_synthetic_benchmark(raw, categories=("fabric",), n_train_good=0, n_test_good=2, n_test_bad=2,
                                 image_size=32, seed=3)
    dataset, report = convert(raw, split="test", progress=False)
    assert not report.skipped
    bad_index = dataset["image_path"].index("fabric/test/good/001.png")
    (raw / "fabric" / "test" / "good" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    saved = tmp_path / "saved"
    dataset.save_to_disk(str(saved))

    out = tmp_path / "run"
    argv = ["--clip", tiny_clip_dir, *TINY, "--dataset", saved, "--output-dir", out, "--epochs", 2,
            "--batch-size", 2, "--num-workers", 0, "--report-to", "none", "--no-progress"]
    with caplog.at_level(logging.INFO, logger="modeling_vip2clip"):  # nothing is killed: this process runs it
        _train_here(argv)
    text = caplog.text

    # Reported when met (each epoch), with path and reason, and once more in the end-of-run summary.
    assert f"skipping bad sample fabric/test/good/001.png (index {bad_index}): image does not decode" in text
    assert "1 unusable training sample(s) skipped in every epoch: fabric/test/good/001.png" in text
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_skipped"] == 1
    [item] = summary["skipped"]
    assert item["index"] == bad_index and item["image_path"] == "fabric/test/good/001.png"
    assert item["reason"].startswith("image does not decode")
    # The 3 good images still trained (batches of 2 and 1 after the drop: 2 steps per epoch), finitely, and the
    # model folder is complete.
    assert summary["global_step"] == 4
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in summary["epochs"])
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in (out / "model").iterdir()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1", "epoch_2"]


# ---------------------------------------------------------------------------------------------------- evaluation


def test_sigkill_during_evaluation_then_resume_counts_each_sample_once(tiny_clip_dir, tmp_path):
    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor
    from modeling_vip2clip.cli.main import main as cli_main

    torch.manual_seed(0)
    model = ViP2CLIPModel.from_clip(tiny_clip_dir, image_size=32, feature_layers=[1, 2], n_ctx=3, n_cls=2, top_k=5)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    ViP2CLIPProcessor(image_size=32).save_pretrained(model_dir)
    bench = tmp_path / "bench"  # 2 categories x (2 normal + 2 anomalous) = 8 samples = 4 batches of 2
    generate_synthetic_benchmark(bench, categories=("fabric", "wood_like"), n_train_good=0, n_test_good=2,
                                 n_test_bad=2, image_size=32, seed=0)
    argv = ["--model", model_dir, "--dataset", bench, "--batch-size", 2, "--num-workers", 0, "--no-progress"]

    def evaluate_here(*extra) -> None:
        # In this process, with the killed child's single thread: the same floats, so the same tie-breaking in
        # the pixel metrics (2 threads move pixel AUROC by ~1e-5).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert cli_main(["evaluate", *map(str, argv), *map(str, extra)]) == 0
        finally:
            torch.set_num_threads(threads)

    evaluate_here("--output-dir", tmp_path / "full")
    reference = json.loads((tmp_path / "full" / "results.json").read_text())

    out = tmp_path / "eval"
    log = tmp_path / "eval.log"
    proc = _start("modeling_vip2clip.cli.evaluate", [*argv, "--output-dir", out], log, pause=f"{AFTER_BATCH}@2")
    _kill_when(_paused(log, AFTER_BATCH), proc, log, "batch 2 of 4 written")
    assert not (out / "results.json").exists()
    partial = PartialResults(out / "partial")
    assert [p.name for p in partial.batch_dirs()] == ["r001_b000001", "r001_b000002"]
    assert partial.done_indices() == {0, 1, 2, 3}

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    evaluate_here("--output-dir", out, "--resume")
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["num_samples"] == reference["num_samples"] == 8
    assert resumed["num_evaluated"] == reference["num_evaluated"] == 8
    assert resumed["counts"] == reference["counts"] == {
        "fabric": {"normal": 2, "anomalous": 2, "with_mask": 2},
        "wood_like": {"normal": 2, "anomalous": 2, "with_mask": 2},
    }
    assert resumed["skipped"] == reference["skipped"] == []
    for category, metrics in reference["per_category"].items():
        for key, value in metrics.items():
            assert resumed["per_category"][category][key] == pytest.approx(value, abs=1e-9), (category, key)
    assert resumed["mean"] == pytest.approx(reference["mean"], abs=1e-9)
    assert not (out / "partial").exists()
