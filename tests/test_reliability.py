"""Issue 19, phase 1: one error boundary, owned output folders, checks at the door, training resume on a damaged
checkpoint. Each test backs rows of docs/reliability.md (the table names them).

Every probe asserts what the user sees (exit status, one `error:` line naming the path or value, no traceback) and
that nothing is lost (files that existed before are byte-equal afterwards; the command works on a rerun). The
command-line probes that need a fresh process (the boundary around imports, a second process racing for a folder)
are subprocesses; the others call `vip2clip`'s `main` in-process, which runs the same boundary (`run_main`)."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_vip2clip.cli.boundary import report
from modeling_vip2clip.cli.main import main as cli_main
from modeling_vip2clip.errors import (BadFileError, FileSystemError, FolderInUseError, InvalidConfigError,
                                      MissingExtraError, OutputFolderError, UsageError, explain)
from modeling_vip2clip.run_folder import (LOCK_FILE, MANIFEST_FILE, claim_output_folder, model_identity,
                                          move_into_place, staging_folder)

ROOT = Path(__file__).resolve().parents[1]
WAIT = 240


def _snapshot(*folders: Path) -> dict[str, str]:
    """Every file under `folders` → its SHA-256 (to prove nothing was lost or changed)."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and path.name != LOCK_FILE:  # the lock names its current holder
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _cli(*argv, env_extra=None, timeout=WAIT, python_code=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("VIP2CLIP_DEBUG", None)
    command = [sys.executable, "-c", python_code, *map(str, argv)] if python_code else [
        sys.executable, "-m", "modeling_vip2clip.cli", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def _one_error_line(stderr: str, *named: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _in_process(capsys, *argv) -> tuple[int, str]:
    code = cli_main([*map(str, argv)])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model (tests edit it)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def _rows(out: Path) -> list[list[str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))[1:]


# ------------------------------------------------------------------------------------------ the error boundary


def _real_os_errors(tmp_path) -> dict[str, OSError]:
    """OSErrors raised by the operating system itself (no hand-made errnos where a real one can be had)."""
    found = {}
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    for name, action in {
        "missing": lambda: open(tmp_path / "nope" / "x.txt"),
        "not a folder": lambda: (tmp_path / "a_file" / "x").mkdir(),
        "is a directory": lambda: open(tmp_path / "a_folder", "w"),
        "exists": lambda: (tmp_path / "a_folder").mkdir(),
        "no space": lambda: Path("/dev/full").write_bytes(b"x" * 65536),
    }.items():
        try:
            action()
        except OSError as error:
            found[name] = error
    return found


@pytest.mark.parametrize("kind, words", [
    ("missing", ["cannot find", "no such file or folder"]),
    ("not a folder", ["a part of this path is a file"]),
    ("is a directory", ["a folder where a file is expected"]),
    ("exists", ["already exists"]),
    ("no space", ["no space left", "then run again (with --resume"]),
])
def test_os_errors_become_one_typed_sentence(tmp_path, kind, words, capsys):
    error = _real_os_errors(tmp_path).get(kind)
    if error is None:
        pytest.skip(f"this system does not raise {kind!r} here")
    known = explain(error)
    assert isinstance(known, FileSystemError)
    for word in words:
        assert word in str(known)
    if error.filename:
        assert str(error.filename) in str(known)
    assert report(error) == 2
    _one_error_line(capsys.readouterr().err, words[0])


@pytest.mark.parametrize("errno_code, words", [
    (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota"),
])
def test_os_error_kinds_root_cannot_provoke(errno_code, words):
    # Running as root, chmod and read-only mounts do not stop writes; these are the OS's own exception shapes.
    known = explain(OSError(errno_code, os.strerror(errno_code), "/some/out/predictions.csv"))
    assert isinstance(known, FileSystemError) and words in str(known) and "/some/out/predictions.csv" in str(known)
    short = explain(OSError("25600 requested and 20416 written"))  # numpy's short write on a full disk
    assert isinstance(short, FileSystemError) and "no space left" in str(short)


def test_library_faults_become_one_typed_sentence(tmp_path, tiny_config):
    import pickle

    from huggingface_hub.errors import StrictDataclassClassValidationError  # noqa: F401 - the class under test
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    cases = {}
    try:
        safe_open(str(tmp_path / "w.safetensors"), framework="pt")
    except Exception as error:  # noqa: BLE001
        cases["safetensors"] = error
    torch.save({"x": Path("/")}, tmp_path / "evil.pt")  # a pickle holding a class: weights_only refuses it
    try:
        torch.load(tmp_path / "evil.pt", weights_only=True)
    except pickle.UnpicklingError as error:
        cases["pickle"] = error
    try:
        tiny_config.__class__(**{**tiny_config.to_dict(), "blur_sigma": float("nan")})
    except Exception as error:  # noqa: BLE001
        cases["config"] = error
    try:
        json.loads("{not json")
    except ValueError as error:
        cases["json"] = error
    try:
        b"\xff\xfe".decode("utf-8")
    except UnicodeDecodeError as error:
        cases["utf8"] = error
    try:
        list(csv.reader(['"a', "b"], strict=True))
    except csv.Error as error:
        cases["csv"] = error
    expected = {"safetensors": (BadFileError, "corrupt, truncated"), "pickle": (BadFileError, "could run code"),
                "config": (InvalidConfigError, "blur_sigma=nan is not a finite number"),
                "json": (BadFileError, "not valid JSON"), "utf8": (BadFileError, "not valid UTF-8"),
                "csv": (BadFileError, "not valid CSV")}
    assert set(cases) == set(expected)
    for name, error in cases.items():
        kind, words = expected[name]
        known = explain(error, path=tmp_path / name)
        assert isinstance(known, kind) and words in str(known), (name, known)
        assert str(tmp_path / name) in str(known) and "\n" not in str(known)


def test_unexpected_failures_say_bug_and_how_to_see_the_traceback(capsys):
    assert report(ZeroDivisionError("division by zero")) == 1
    line = _one_error_line(capsys.readouterr().err, "ZeroDivisionError", "this is a bug", "--debug", "VIP2CLIP_DEBUG=1")
    assert line
    try:
        {}["x"]
    except KeyError as error:
        assert report(error, debug=True) == 1
    assert "Traceback" in capsys.readouterr().err  # --debug shows it
    assert report(KeyboardInterrupt()) == 130


def test_missing_extra_is_named_for_every_command_even_at_import():
    # `vip2clip convert` where only the demo extra is installed (datasets absent): one line naming the extra.
    blocked = ("import sys; sys.modules['datasets'] = None; from modeling_vip2clip.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    done = _cli("convert", "--layout", "mvtec", "--root", ".", "--out", "/tmp/never-written", python_code=blocked)
    assert done.returncode == 2
    _one_error_line(done.stderr, "'datasets'", 'pip install "vip2clip[train]"')
    assert not Path("/tmp/never-written").exists()
    # The net behind every command: a module missing at import time is named with its extra.
    assert isinstance(explain(ModuleNotFoundError("No module named 'onnx'", name="onnx")), MissingExtraError)
    assert 'vip2clip[onnx]' in str(explain(ModuleNotFoundError("x", name="onnx.checker")))


# ------------------------------------------------------------------------------------------ the model at the door


def test_damaged_model_folders_fail_in_one_line_and_stay_untouched(model_dir, images, tmp_path, capsys):
    """`predict --model` on hand-edited folders: a truncated weight file (in a fresh process), a NaN, a huge size,
    a config that does not fit the weights, a model *file*, a missing folder that looks like a Hub id, an
    exported folder without its model file (in-process, the same boundary). Each: exit 2, one line naming the
    file or value, nothing written."""
    def edited(name: str, change) -> Path:
        folder = Path(shutil.copytree(model_dir, tmp_path / name))
        change(folder)
        return folder

    def config_edit(**vision):
        def change(folder):
            config = json.loads((folder / "config.json").read_text())
            for key, value in vision.items():
                if key in ("blur_sigma",):
                    config[key] = value
                else:
                    config["clip_config"]["vision_config"][key] = value
            (folder / "config.json").write_text(json.dumps(config))  # json writes NaN as NaN
        return change

    def truncate(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 3])

    def exported_without_model(folder):
        (folder / "export_info.json").write_text(json.dumps({"format": "onnx"}))

    cases = [
        (edited("truncated", truncate), ["model.safetensors", "corrupt, truncated"]),
        (edited("nan", config_edit(blur_sigma=float("nan"))), ["config.json", "blur_sigma=nan"]),
        (edited("huge", config_edit(hidden_size=10**7)), ["config.json", "hidden_size=10000000"]),
        (edited("misfit", config_edit(intermediate_size=64)), ["does not fit the weights", "[64]"]),
        (edited("exported", exported_without_model), ["export_info.json", "without its model file"]),
        (model_dir / "model.safetensors", ["a file, not a model folder"]),
        ("no_such_model_here", ["no folder named 'no_such_model_here'"]),
    ]
    before = _snapshot(tmp_path)
    for position, (model, named) in enumerate(cases):
        out = tmp_path / f"out_{Path(str(model)).name}"
        if position == 0:
            done = _cli("predict", "--model", model, images, "--output-dir", out)
            code, err = done.returncode, done.stderr
        else:
            code, err = _in_process(capsys, "predict", "--model", model, images, "--output-dir", out)
        assert code == 2, (model, err[-2000:])
        _one_error_line(err, *named)
        assert not out.exists(), model  # no output folder for a run that never started
    assert _snapshot(tmp_path) == before


def test_config_validation_refuses_non_finite_values_and_absurd_sizes(tiny_config):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    values = tiny_config.to_dict()
    for change in ({"blur_sigma": float("nan")}, {"temperature": float("inf")}, {"init_std": float("nan")}):
        with pytest.raises(StrictDataclassClassValidationError, match="not a finite number"):
            tiny_config.__class__(**{**values, **change})
    clip = json.loads(json.dumps(values["clip_config"]))
    clip["vision_config"]["hidden_size"] = 10**7
    with pytest.raises(StrictDataclassClassValidationError, match="hidden_size=10000000 is outside"):
        tiny_config.__class__(**{**values, "clip_config": clip})


def test_a_bank_of_nans_is_refused_naming_the_bank(tiny_model, tmp_path, capsys, tiny_model_dir, images):
    from modeling_vip2clip import ViP2CLIPReferenceBank
    from modeling_vip2clip.engine.references import bank_from_images

    bank = bank_from_images(tiny_model, _processor(tiny_model), [Image.open(images / "0.png")])
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ViP2CLIPReferenceBank(torch.full_like(bank.patch_embeds, float("nan")), image_size=bank.image_size,
                              patch_size=bank.patch_size, feature_layers=bank.feature_layers,
                              backbone_fingerprint=bank.backbone_fingerprint, num_images=bank.num_images)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["patch_embeds"][0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan_bank.safetensors"), metadata=metadata)
    truncated = tmp_path / "cut_bank.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    # a hand-made bank: the format tag but not the geometry (was a KeyError, reported as a bug)
    tensors["patch_embeds"] = bank.patch_embeds
    hand_made = tmp_path / "hand_made_bank.safetensors"
    save_file(tensors, str(hand_made), metadata={k: v for k, v in metadata.items() if k != "num_images"})
    with pytest.raises(ValueError, match=f"{hand_made}: not a complete reference bank, it lacks the metadata key "
                       "'num_images'.*; rebuild it"):
        ViP2CLIPReferenceBank.load(hand_made)
    for bad, words in ((tmp_path / "nan_bank.safetensors", "NaN or infinite"), (truncated, "corrupt, truncated"),
                       (hand_made, "lacks the metadata key 'num_images'")):
        code, err = _in_process(capsys, "predict", "--model", tiny_model_dir, images, "--references", bad,
                                "--output-dir", tmp_path / f"out_{bad.stem}", "--num-workers", "0", "--no-progress")
        assert code == 2
        _one_error_line(err, str(bad), words)
        assert not (tmp_path / f"out_{bad.stem}").exists()


def _processor(model):
    from modeling_vip2clip import ViP2CLIPProcessor

    return ViP2CLIPProcessor.for_model(model.config)


# ------------------------------------------------------------------------------------------ inputs at the door


def test_predict_without_usable_input_stops_before_the_model(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code, err = _in_process(capsys, "predict", "--model", tiny_model_dir, tmp_path / "empty",
                            tmp_path / "missing.png", str(tmp_path / "*.nothing"), "--output-dir", out)
    assert code == 2
    _one_error_line(err, "no image to score", "missing.png", "empty")
    assert not out.exists()
    # A fresh `vip2clip predict`: the same line before torch or transformers is ever imported (they take seconds).
    watch = ("import atexit, sys\n"
             "atexit.register(lambda: print('heavy imports:', [m for m in ('torch', 'transformers') if m in "
             "sys.modules], file=sys.stderr))\n"
             "from modeling_vip2clip.cli.main import main\nsys.exit(main(sys.argv[1:]))")
    run = _cli("predict", "--model", tiny_model_dir, tmp_path / "empty", tmp_path / "missing.png", "--output-dir", out,
               python_code=watch)
    assert run.returncode == 2, run.stderr
    _one_error_line(run.stderr, "no image to score", "missing.png", "empty")
    assert "heavy imports: []" in run.stderr and not out.exists()


def test_file_names_of_any_bytes_keep_the_csv_utf8_and_resumable(tiny_model_dir, images, tmp_path, capsys):
    from modeling_vip2clip.engine.results_csv import csv_text, path_from_csv

    odd = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8
    try:
        shutil.copy(images / "0.png", images / odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    out = tmp_path / "out"
    argv = ["predict", "--model", tiny_model_dir, images, "--output-dir", out, "--num-workers", "0", "--no-progress"]
    assert cli_main([*map(str, argv)]) == 0
    raw = (out / "predictions.csv").read_bytes()
    raw.decode("utf-8")  # valid UTF-8 whatever the names
    rows = _rows(out)
    assert len(rows) == 4
    recovered = {path_from_csv(row[0]) for row in rows}
    assert str(images / odd) in recovered and all(Path(p).is_file() for p in recovered)
    assert all((out / path_from_csv(row[3])).is_file() for row in rows)  # the overlay column too
    assert cli_main([*map(str, argv), "--resume"]) == 0  # resumes over the escaped name: nothing scored twice
    assert _rows(out) == rows
    for name in (odd, "plain.png", "a\\b.png", os.fsdecode(bytes(range(128, 256)))):
        assert path_from_csv(csv_text(name)) == name and csv_text(name).encode("utf-8")


# ------------------------------------------------------------------------------------------ owned output folders


def _manifest(model: Path, **options) -> dict:
    return {"written_by": "test", "model": model_identity(model), "inputs": ["a"], "options": options}


def test_a_second_process_into_a_held_folder_is_refused(tiny_model_dir, images, tmp_path, run_cli):
    """Two `predict` runs into one folder: the second (this test's own process) is refused while the first holds
    it; the first, killed afterwards, resumes to every input exactly once (the lock died with it)."""
    import signal

    out = tmp_path / "out"
    argv = ["--model", tiny_model_dir, images, "--output-dir", out, "--batch-size", "1", "--num-workers", "0",
            "--no-progress"]
    # paused right after batch 1 is on disk (two header writes, then two CSV writes per batch: tests/paused_run.py)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "VIP2CLIP_TEST_PAUSE": "modeling_vip2clip.engine.results_csv:CsvLog.write@4:300"}
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "paused_run.py"), "-m",
                                  "modeling_vip2clip.cli", "predict", *map(str, argv)],
                                 stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + WAIT
        while "[test hook]" not in log.read_text(errors="replace"):
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        second = run_cli("predict", *argv, "--resume")
        assert second.returncode == 2
        _one_error_line(second.stderr, str(out.resolve()), "another vip2clip run is writing to it",
                        f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=WAIT)
    assert len(_rows(out)) == 1  # the first batch, flushed before the pause
    assert cli_main([*map(str, ["predict", *argv, "--resume"])]) == 0  # nothing blocks the rerun
    assert sorted(row[0] for row in _rows(out)) == sorted(str(p) for p in images.glob("*.png"))  # each once


def test_a_forked_child_does_not_keep_a_killed_runs_folder_locked(tmp_path):
    """A run that forked (DataLoader workers, writer pools) and was SIGKILLed: its children, alive a few seconds
    more, must not hold the folder's lock, so the rerun starts at once (the children drop their inherited copy of
    the lock's descriptor when forked; without that the rerun was refused as "in use")."""
    import signal

    out = tmp_path / "out"
    script = (
        "import os, sys, time\n"
        "from modeling_vip2clip.run_folder import claim_output_folder\n"
        f"folder = claim_output_folder({str(out)!r}, {{'written_by': 'test'}})\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(child, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=WAIT)
        os.kill(child, 0)  # the child still lives
        folder = claim_output_folder(out, {"written_by": "test"}, resume=True)
        folder.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_killed_runs_half_written_files_are_cleared_when_the_folder_is_claimed(tmp_path):
    """SIGKILL in the middle of an atomic write leaves its temporary (`.NAME.PID.tmp`, or mkstemp's
    `.NAME.XXXXXXXX.tmp`) beside the file it was writing; the next claim of the folder removes them, and nothing
    else (a user's file that merely ends in .tmp stays)."""
    out = tmp_path / "out"
    (out / "overlays" / "cam").mkdir(parents=True)
    left = [out / "overlays" / "cam" / ".img_04.overlay.png.10003.tmp", out / ".predictions.csv.k2j_x9ab.tmp"]
    kept = [out / "notes.tmp", out / ".my.backup.tmp", out / "overlays" / "cam" / "img_01.overlay.png"]
    for path in left + kept:
        path.write_bytes(b"x")
    folder = claim_output_folder(out, {"written_by": "test"}, resume=True)
    folder.release()
    assert [path.exists() for path in left] == [False, False]
    assert all(path.read_bytes() == b"x" for path in kept)


def test_resume_refuses_another_model_other_inputs_and_other_options(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["predict", images, "--output-dir", out, "--num-workers", "0", "--no-progress"]
    assert cli_main([*map(str, base), "--model", str(tiny_model_dir)]) == 0
    before = _snapshot(out)
    other_model = Path(shutil.copytree(tiny_model_dir, tmp_path / "other"))
    config = json.loads((other_model / "config.json").read_text())
    config["top_k"] = 3  # another model: its scores would differ
    (other_model / "config.json").write_text(json.dumps(config))
    other_images = Path(shutil.copytree(images, tmp_path / "more"))
    for argv, words in [
        (["--model", other_model], ["--resume refused", "another model"]),
        (["--model", tiny_model_dir, "--threshold", "0.9"], ["--resume refused", "threshold was None, now 0.9"]),
        (["--model", tiny_model_dir, "--save-maps", "npy"], ["save_maps was 'none', now 'npy'"]),
    ]:
        code, err = _in_process(capsys, *base, *argv, "--resume")
        assert code == 2
        _one_error_line(err, *words)
    code, err = _in_process(capsys, "predict", other_images, "--output-dir", out, "--num-workers", "0",
                            "--no-progress", "--model", tiny_model_dir, "--resume")
    assert code == 2
    _one_error_line(err, "other inputs")
    # A fresh run into the folder is refused too (it holds results), naming both ways out.
    code, err = _in_process(capsys, *base, "--model", tiny_model_dir)
    assert code == 2
    _one_error_line(err, "exists and is not empty", "--resume", "--overwrite")
    assert _snapshot(out) == before  # nothing changed by the refused runs
    # The same run resumes; --overwrite replaces only what vip2clip wrote there.
    assert cli_main([*map(str, base), "--model", str(tiny_model_dir), "--resume"]) == 0
    (out / "notes.txt").write_text("mine")
    assert cli_main([*map(str, base), "--model", str(other_model), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and len(_rows(out)) == 3
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["model"]["source"] == str(other_model) and "notes.txt" not in manifest["writes"]


def test_overwrite_never_deletes_the_source_model_or_unrelated_files(model_dir, tmp_path, capsys):
    parent = tmp_path / "P"
    parent.mkdir()
    sub = Path(shutil.move(str(model_dir), parent / "sub"))
    (parent / "unrelated.txt").write_text("keep me")
    before = _snapshot(parent)
    for argv in (["calibrate", "--model", sub, "--dataset", tmp_path / "never-read", "--out", parent, "--overwrite"],
                 ["calibrate", "--model", sub, "--dataset", tmp_path / "never-read", "--out", sub, "--overwrite"],
                 ["export", "--model", sub, "--format", "onnx", "--out", sub, "--overwrite"],
                 ["export", "--model", sub, "--format", "onnx", "--out", parent, "--overwrite"]):
        code, err = _in_process(capsys, *argv)
        assert code == 2, argv
        _one_error_line(err, "the model folder", "choose an output folder outside")
    assert _snapshot(parent) == before


def test_claim_lock_resume_overwrite_and_leftovers(model_dir, tmp_path):
    out = tmp_path / "out"
    folder = claim_output_folder(out, _manifest(model_dir, threshold=None), writes=("results*",))
    with pytest.raises(FolderInUseError, match="another vip2clip run"):
        claim_output_folder(out, _manifest(model_dir, threshold=None))
    staged = staging_folder(folder)
    (staged / "results.csv").write_text("a,b\n")
    move_into_place(folder, staged)
    folder.finish()
    folder.release()
    # A killed run's staging folders (and export's old `.traced`) never block the next claim.
    (out / ".staging-dead").mkdir()
    (out / ".traced").mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="exists and is not empty"):
        claim_output_folder(out, _manifest(model_dir, threshold=None))
    with pytest.raises(OutputFolderError, match="threshold was None, now 0.5"):
        claim_output_folder(out, _manifest(model_dir, threshold=0.5), resume=True)
    again = claim_output_folder(out, _manifest(model_dir, threshold=0.5), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, MANIFEST_FILE, "mine.txt"])
    again.release()
    assert (out / "mine.txt").read_text() == "mine"
    # A run that wrote nothing leaves no folder behind; a file where the folder goes is refused.
    fresh = claim_output_folder(tmp_path / "fresh", _manifest(model_dir))
    fresh.release()
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        claim_output_folder(tmp_path / "a_file", _manifest(model_dir))
    assert (tmp_path / "a_file").read_text() == "x"


def test_written_files_follow_the_users_umask(tiny_model_dir, images, tmp_path):
    from modeling_vip2clip.files import atomic_write_json, atomic_write_text

    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        folder = claim_output_folder(tmp_path / "out", _manifest(Path(tiny_model_dir)))
        staged = staging_folder(folder)
        shutil.copy(Path(tiny_model_dir) / "model.safetensors", staged / "model.safetensors")
        os.chmod(staged / "model.safetensors", 0o600)  # what safetensors' own writer leaves
        (staged / "sub").mkdir(mode=0o700)
        move_into_place(folder, staged)
        folder.release()
    finally:
        os.umask(previous)
    for path in [tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "out" / MANIFEST_FILE,
                 tmp_path / "out" / "model.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o750


def test_predict_outputs_follow_the_umask(tiny_model_dir, images, tmp_path):
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert cli_main([*map(str, ["predict", "--model", tiny_model_dir, images, "--output-dir", out,
                                    "--num-workers", "0", "--no-progress", "--save-maps", "npy"])]) == 0
    finally:
        os.umask(previous)
    written = list(out.rglob("*"))
    assert len(written) >= 9  # CSV, manifest, lock, 2 folders, 3 overlays, 3 maps
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_export_int8_skips_an_unreadable_calibration_image(tmp_path, caplog):
    from modeling_vip2clip.deploy.export import load_calibration_images

    folder = tmp_path / "calibration"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (16, 16), (index * 40, 0, 0)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with caplog.at_level(logging.WARNING):
        loaded = load_calibration_images(folder, 10)
    assert len(loaded) == 3 and "broken.png" in caplog.text
    for index in range(3):
        (folder / f"{index}.png").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="none of its 4 images could be read"):
        load_calibration_images(folder, 10)


# ------------------------------------------------------------------------------------------ training resume


def _fake_checkpoint(root: Path, epoch: int) -> Path:
    from safetensors.torch import save_file

    folder = root / f"epoch_{epoch}"
    folder.mkdir(parents=True)
    save_file({"ica.w": torch.full((8,), float(epoch))}, str(folder / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(8)}}}, folder / "optimizer.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch}))
    return folder


@pytest.mark.parametrize("damage", ["truncated weights", "corrupt optimizer", "torn state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog, damage):
    from modeling_vip2clip.engine.checkpointing import checkpoint_problem, prepare_checkpoint_root

    root = tmp_path / "checkpoints"
    older, newest = _fake_checkpoint(root, 1), _fake_checkpoint(root, 2)
    assert checkpoint_problem(newest) is None
    if damage == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[:-10])
    elif damage == "corrupt optimizer":  # one flipped bit in a tensor's stored bytes: only its CRC tells
        import zipfile

        with zipfile.ZipFile(newest / "optimizer.bin") as archive:
            member = next(info for info in archive.infolist() if "/data/" in info.filename)
        data = bytearray((newest / "optimizer.bin").read_bytes())
        header = member.header_offset  # local header: 30 bytes, then the name and the extra field
        start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + int.from_bytes(
            data[header + 28:header + 30], "little")
        data[start] ^= 0x01
        (newest / "optimizer.bin").write_bytes(bytes(data))
    else:
        (newest / "trainer_state.json").write_text('{"epoch": ')
    before = _snapshot(root)
    log = logging.getLogger("test_reliability")
    with caplog.at_level(logging.WARNING, logger="test_reliability"):
        resume_dir, start_over = prepare_checkpoint_root(root, "latest", False, log=log)
    assert resume_dir == older and not start_over
    assert "epoch_2 is damaged" in caplog.text and "falling back to" in caplog.text
    with pytest.raises(UsageError, match="the checkpoint is damaged"):
        prepare_checkpoint_root(root, str(newest), False, log=log)
    shutil.rmtree(older)
    with pytest.raises(UsageError, match="every checkpoint .* is damaged"):
        prepare_checkpoint_root(root, "latest", False, log=log)
    assert {k: v for k, v in _snapshot(root).items() if "epoch_1" not in k} == {
        k: v for k, v in before.items() if "epoch_1" not in k}  # the damaged checkpoint is kept for inspection


# ------------------------------------------------------------------------------------------ the demo's file cache


def test_identical_results_never_rewrite_a_file_being_served(tmp_path):
    """The demo's `Too little data for declared Content-Length` with 5 clients sending the same image: Gradio wrote
    each output image in place at its content-hash path, so an identical result truncated and refilled the file
    another client was downloading. With `make_gradio_cache_writes_atomic` a reader streaming the file while
    identical results are saved always gets the whole file. (The load test, tests/test_demo_load.py, sends
    identical images through the real server.)"""
    import threading

    from gradio import processing_utils

    from modeling_vip2clip.gradio_cache import make_gradio_cache_writes_atomic

    make_gradio_cache_writes_atomic()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    path = processing_utils.save_pil_to_cache(image, str(tmp_path), format="png")
    expected = Path(path).read_bytes()
    stop = threading.Event()

    def identical_results():
        while not stop.is_set():
            assert processing_utils.save_pil_to_cache(image, str(tmp_path), format="png") == path

    writer = threading.Thread(target=identical_results)
    writer.start()
    torn = 0
    try:
        for _ in range(30):
            declared = os.stat(path).st_size  # what the server puts in Content-Length
            served = b""
            with open(path, "rb") as handle:  # then streamed in chunks
                while chunk := handle.read(16384):
                    served += chunk
                    time.sleep(0.0005)
            torn += served != expected or declared != len(served)
    finally:
        stop.set()
        writer.join()
    assert torn == 0
    assert Path(path).stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]  # no staging file left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ the re-probe of issue 19


def test_resume_names_a_damaged_csv_and_inputs_that_are_broken_links(tiny_model_dir, images, tmp_path, capsys):
    """One run, then three hand-damaged copies of its CSV: each `--resume` is one line naming the CSV and what is
    wrong (was `cannot read the file: not valid UTF-8` without a path, or exit 0 over a row it could not use),
    and the folder is byte-equal afterwards. The inputs hold a symlink loop and a dangling link: both are listed
    as skipped with why (were silently left out), and given alone they are named as links, not as missing."""
    (images / "loop.png").symlink_to("loop.png")
    (images / "gone.png").symlink_to("nowhere.png")
    out = tmp_path / "out"
    argv = ["predict", "--model", tiny_model_dir, images, "--num-workers", "0", "--no-progress", "--no-report"]
    assert cli_main([*map(str, [*argv, "--output-dir", out])]) == 0
    with open(out / "skipped.csv", newline="", encoding="utf-8") as handle:
        skipped = dict(list(csv.reader(handle))[1:])
    assert "leads back to itself" in skipped[str(images / "loop.png")]
    assert "nowhere.png, which does not exist" in skipped[str(images / "gone.png")]
    assert len(_rows(out)) == 3
    for damage, named in [(b"\xff\xfe,0.5,normal,x\n", "not valid UTF-8"), (b'"torn,0.5\n', "row 5 has 1 fields"),
                          (b"x.png,nan?,normal,y\n", "row 5 has the score 'nan?'")]:
        copy = Path(shutil.copytree(out, tmp_path / f"damaged{len(damage)}"))
        with open(copy / "predictions.csv", "ab") as handle:
            handle.write(damage)
        before = _snapshot(copy)
        code, err = _in_process(capsys, *argv, "--output-dir", copy, "--resume")
        assert code == 2
        _one_error_line(err, "cannot read the results of an earlier run", str(copy / "predictions.csv"), named)
        assert _snapshot(copy) == before
    code, err = _in_process(capsys, *argv[:3], images / "loop.png", "--output-dir", tmp_path / "none")
    assert code == 2 and not (tmp_path / "none").exists()
    _one_error_line(err, "loop.png: a symbolic link that leads back to itself")


def test_config_fields_of_the_wrong_type_are_named(tiny_config):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    values = tiny_config.to_dict()
    for change, named in [({"top_k": "fifty"}, "top_k='fifty' is not a whole number"),
                          ({"top_k": True}, "top_k=True is not a whole number"),
                          ({"temperature": "0.07"}, "temperature='0.07' is not a number"),
                          ({"official_compat": 1}, "official_compat=1 is not true or false"),
                          ({"normal_state_word": 3}, "normal_state_word=3 is not a string")]:
        with pytest.raises(StrictDataclassClassValidationError, match=named):  # was "'<' not supported between …"
            tiny_config.__class__(**{**values, **change})
    with pytest.raises(ValueError, match=r"feature_layers=5 is not a list"):  # was "'int' object is not iterable"
        tiny_config.__class__(**{**values, "feature_layers": 5})


def test_a_write_that_fails_without_a_file_name_is_named_and_leaves_no_temporary(tmp_path, capsys):
    from modeling_vip2clip.files import atomic_save

    target = tmp_path / "out" / "a.overlay.png"
    # the kernel's own ENOSPC, raised by a write that names no file (as a full disk shows up at `write` / `close`)
    with pytest.raises(OSError) as caught:
        atomic_save(target, lambda handle: Path("/dev/full").write_bytes(b"x" * 65536))
    if caught.value.errno != errno.ENOSPC:
        pytest.skip("/dev/full does not raise ENOSPC here")
    assert report(caught.value) == 2
    _one_error_line(capsys.readouterr().err, f"cannot write ({target}): no space left", "--resume")
    assert list(target.parent.iterdir()) == []


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_checkpoints_follow_the_umask(tmp_path):
    from accelerate import Accelerator

    from modeling_vip2clip.engine.checkpointing import save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    previous = os.umask(0o027)
    try:
        folder = save_checkpoint(accelerator, tmp_path / "checkpoints", 1, {"epoch": 1})
    finally:
        os.umask(previous)
    written = {path.name: path.stat().st_mode & 0o777 for path in folder.rglob("*")}
    assert "model.safetensors" in written  # safetensors' writer made it 0600: unreadable to the user's group
    assert set(written.values()) == {0o640}, written


def test_unknown_config_keys_are_warned_about_and_library_chatter_stays_quiet(model_dir, caplog):
    from modeling_vip2clip.console import setup_logging
    from modeling_vip2clip.weights.loader import load_model_and_processor

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "blur_sigmaa": 4}))  # a hand edit's typo
    with caplog.at_level(logging.WARNING, logger="modeling_vip2clip.weights.loader"):
        load_model_and_processor(str(model_dir), flag="--model")
    assert "has keys this version does not use, ignored: blur_sigmaa; check their spelling" in caplog.text
    caplog.clear()
    (model_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="modeling_vip2clip.weights.loader"):
        load_model_and_processor(str(model_dir), flag="--model")
    assert "does not use" not in caplog.text  # a folder as save_pretrained wrote it: no warning
    setup_logging()  # torch's INFO lines at exit (FakeTensor cache stats) used to follow a Ctrl-C's "interrupted"
    assert logging.getLogger("torch._subclasses.fake_tensor").getEffectiveLevel() >= logging.WARNING
