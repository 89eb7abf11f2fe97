"""Issue 19, phase 2B: faults at every stage of the commands that write — a real Ctrl-C (SIGINT) and a real
SIGKILL at each stage of `calibrate`, `export`, `convert` and `download-authors`, a real full disk at every write
of `predict`, `calibrate`, `export`, `convert` and `train`, a download whose network is lost or stalls, and hostile
files of every format the package reads. Each test backs rows of docs/reliability.md ("phase 2B").

How the stages are hit: `tests/paused_run.py` wraps the package function that ends a stage and, right after its
N-th call, sends the process a real signal — SIGINT to this very process for Ctrl-C (the command runs in-process
through `vip2clip`'s `main` and its error boundary), SIGKILL to a subprocess for a kill. Every probe then checks
what the user sees (exit 130 and `interrupted`, or one `error:` line and exit 2, never a traceback), that the files
that existed before are byte-equal, that no final file is half-written (only staging may hold partial work), and
that the same command run again gives what an uninterrupted run gives. Probes into one output folder are chained:
each rerun is the next probe, so the chain also proves that no stage leaves anything that blocks the next run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from paused_run import signal_after
from PIL import Image
from test_authors_checkpoint import authors_pth, cache_files, hf_home, server  # noqa: F401 - shared fixtures
from test_reliability import _in_process, _one_error_line, _snapshot

from modeling_vip2clip.errors import explain
from modeling_vip2clip.run_folder import MANIFEST_FILE

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--num-workers", "0", "--no-progress"]
WAIT = 240


# ---------------------------------------------------------------------------------------------- helpers
def _interrupted(capsys, target: str, call: int, *argv) -> None:
    """`vip2clip ARGV` in this process with a real SIGINT sent to it right after the `call`-th call of `target`:
    the user sees `interrupted` as the last line and exit 130, no traceback."""
    # Python's own Ctrl-C handler, as in a fresh `vip2clip` process: a library loaded by an earlier test of this
    # pytest process (a server's) may have left its own SIGINT handler installed.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    restore = signal_after(target, call, signal.SIGINT)
    try:
        code, err = _in_process(capsys, *argv)
    finally:
        restore()
        signal.signal(signal.SIGINT, handler)
    assert code == 130 and err.rstrip().endswith("interrupted") and "Traceback" not in err, (target, code, err[-2000:])


def _killed(target: str, call: int, *argv, env: dict | None = None) -> None:
    """`vip2clip ARGV` in a subprocess that gets a real SIGKILL right after the `call`-th call of `target`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {}),
           "VIP2CLIP_TEST_PAUSE": f"{target}@{call}:SIGKILL"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "paused_run.py"), "-m", "modeling_vip2clip.cli",
                          *map(str, argv)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=WAIT)
    assert run.returncode == -signal.SIGKILL, (target, run.returncode, run.stderr[-3000:])


def _results(folder: Path) -> dict[str, bytes]:
    """The files a reader sees in an output folder (hidden entries — manifest, lock, staging — left out)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)}


def _stamped(name: str, data: bytes) -> bytes:
    """A result without its dates (export_info.json and README.md say when they were written)."""
    if name == "export_info.json":
        info = json.loads(data)
        info.pop("exported_at"), info.pop("export_seconds")
        return json.dumps(info, sort_keys=True).encode()
    if name == "README.md":
        return b"\n".join(line for line in data.splitlines() if not line.startswith(b"Exported by"))
    return data


def _assert_partial_of(folder: Path, reference: Path) -> None:
    """Every result visible in `folder` is complete: byte-equal to the uninterrupted run's (dates aside)."""
    expected = _results(reference)
    for name, data in _results(folder).items():
        assert name in expected and _stamped(name, data) == _stamped(name, expected[name]), name


def _assert_same_results(folder: Path, reference: Path) -> None:
    got, expected = _results(folder), _results(reference)
    assert sorted(got) == sorted(expected)
    for name in got:
        assert _stamped(name, got[name]) == _stamped(name, expected[name]), name


def _staging(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith(".staging-")) if folder.is_dir() else []


def _beside(path: Path) -> list[str]:
    """Staging a `files.staged_folder` writer left beside `path` (`.NAME.PID.TOKEN.partial` / `.old`)."""
    return sorted(entry.name for entry in path.parent.glob(f".{path.name}.*"))


def _same_dataset(folder: Path, reference: Path) -> bool:
    """The same saved dataset: its data and info files byte-equal (state.json holds a fresh random fingerprint;
    the reference may hold cache files that `calibrate` added)."""
    got, expected = _results(folder), _results(reference)
    return sorted(got) == sorted(name for name in expected if not name.startswith("cache-")) and all(
        got[name] == expected[name] for name in got if name != "state.json")


def _unchanged(before: dict[str, str]) -> None:
    """The files that existed before are byte-equal (a command may add its own cache files beside them)."""
    after = _snapshot(*{Path(name).parent for name in before})
    assert {name: after.get(name) for name in before} == before


# ---------------------------------------------------------------------------------------------- inputs, references
@pytest.fixture(scope="module")
def raw_benchmark(tmp_path_factory) -> Path:
    from modeling_vip2clip.data import generate_synthetic_benchmark

    raw = tmp_path_factory.mktemp("raw") / "tile_raw"
    generate_synthetic_benchmark(raw, categories=("tile",), n_train_good=0, n_test_good=2, n_test_bad=2,
                                 image_size=32, layout="meta_json")
    return raw


@pytest.fixture(scope="module")
def dataset_dir(raw_benchmark, tmp_path_factory) -> Path:
    """The benchmark converted by an uninterrupted `vip2clip convert` (the convert probes' reference too)."""
    from modeling_vip2clip.cli.main import main

    out = tmp_path_factory.mktemp("datasets") / "tile"
    assert main(["convert", "--root", str(raw_benchmark), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, dataset_dir, tmp_path_factory) -> Path:
    from modeling_vip2clip.cli.main import main

    out = tmp_path_factory.mktemp("calibrated") / "model"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--dataset", str(dataset_dir), "--out", str(out),
                 *QUIET]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> Path:
    from modeling_vip2clip.cli.main import main

    out = tmp_path_factory.mktemp("exported") / "onnx"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "onnx", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images") / "parts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


# ---------------------------------------------------------------------------------------------- signals
def test_calibrate_stopped_at_every_stage_then_rerun(tiny_model_dir, dataset_dir, calibrated, tmp_path, capsys):
    """Ctrl-C after the claim, after the model folder is staged, after the manifest lists what is moved; SIGKILL
    half-way through moving the files into place. Each time: the model and the dataset are
    byte-equal, what is visible is complete, and `--overwrite` (calibrate's rerun) ends with the reference."""
    out = tmp_path / "calibrated"
    argv = ["calibrate", "--model", tiny_model_dir, "--dataset", dataset_dir, "--out", out, *QUIET, "--overwrite"]
    before = _snapshot(tiny_model_dir, dataset_dir)
    for target, call in (("modeling_vip2clip.run_folder:atomic_write_json", 1),  # claimed: the manifest only
                         ("modeling_vip2clip.files:apply_umask", 1),  # the model folder complete in staging
                         ("modeling_vip2clip.run_folder:atomic_write_json", 2)):  # recorded, nothing moved yet
        _interrupted(capsys, target, call, *argv)
        _unchanged(before)
        assert _staging(out) == []  # Ctrl-C runs the clean-up: no staging left
        if out.exists():
            _assert_partial_of(out, calibrated)
    _killed("modeling_vip2clip.run_folder:_move_entry", 3, *argv)
    _unchanged(before)
    assert _staging(out) and len(_results(out)) == 3  # three entries moved, the rest still staged
    assert not (out / "config.json").exists()  # the marker goes last: nothing loads a half-moved model
    _assert_partial_of(out, calibrated)
    code, err = _in_process(capsys, *argv)
    assert code == 0, err[-2000:]
    assert _staging(out) == [] and (out / MANIFEST_FILE).is_file()
    _assert_same_results(out, calibrated)
    _unchanged(before)


def test_export_stopped_at_every_stage_then_rerun(tiny_model_dir, exported, tmp_path, capsys):
    """Ctrl-C after the claim and after the graph is saved in staging; SIGKILL half-way through the move into
    place; `--overwrite` then gives the reference export. (INT8 adds one stage, NNCF's quantisation, before the
    same save and move; it is not probed here: its NNCF run costs more than this whole file.)"""
    out = tmp_path / "onnx"
    argv = ["export", "--model", tiny_model_dir, "--format", "onnx", "--out", out, "--overwrite"]
    before = _snapshot(tiny_model_dir)
    for target, call in (("modeling_vip2clip.run_folder:atomic_write_json", 1), ("onnx:save_model", 1)):
        _interrupted(capsys, target, call, *argv)
        _unchanged(before)
        assert not out.exists() or (_staging(out) == [] and _results(out) == {})
    _killed("modeling_vip2clip.run_folder:_move_entry", 4, *argv)
    _unchanged(before)
    assert _staging(out) and len(_results(out)) == 4 and not (out / "export_info.json").exists()
    _assert_partial_of(out, exported)
    code, err = _in_process(capsys, *argv)
    assert code == 0, err[-2000:]
    assert _staging(out) == []
    _assert_same_results(out, exported)


def test_convert_stopped_at_every_stage_then_rerun(raw_benchmark, dataset_dir, tmp_path, capsys):
    """Ctrl-C once the dataset is saved in staging (a fresh --out shows no dataset and the same command then runs);
    SIGKILL with --overwrite over an earlier result once the new dataset is staged, before anything is moved (the
    earlier dataset is kept byte-equal); the rerun clears the dead staging and writes what an uninterrupted convert
    writes."""
    out = tmp_path / "tile"
    argv = ["convert", "--root", raw_benchmark, "--out", out]
    before = _snapshot(raw_benchmark)
    _interrupted(capsys, "datasets:Dataset.save_to_disk", 1, *argv)
    assert _results(out) == {} and _staging_in(out) == []
    assert _in_process(capsys, *argv)[0] == 0
    first = _results(out)
    _killed("modeling_vip2clip.run_folder:apply_umask", 1, *argv, "--overwrite")
    assert _results(out) == first and len(_staging_in(out)) == 1  # the dead run's staging, the old dataset whole
    _unchanged(before)
    assert _in_process(capsys, *argv, "--overwrite")[0] == 0
    assert _staging_in(out) == [] and _same_dataset(out, dataset_dir)
    _unchanged(before)


def _staging_in(folder: Path) -> list[str]:
    """The staging folders a run of an owned output folder left inside it (`run_folder.staging_folder`)."""
    return sorted(entry.name for entry in folder.glob(".staging-*"))


def test_a_writer_killed_between_its_two_renames_loses_nothing(tmp_path):
    """`files.staged_folder` (the model-folder writer's) killed after moving the old folder aside and before
    renaming the new one in: only its `.old` holds the folder. The next writer of that folder puts it back first,
    so even a next write that fails leaves the previous folder complete, and nothing beside it."""
    from modeling_vip2clip.files import staged_folder

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.replace(out, out.with_name(f".{out.name}.{int(dead.stdout)}.0badf00d.old"))
    with pytest.raises(RuntimeError):
        with staged_folder(out) as staging:
            (staging / "config.json").write_text('{"new": 1}')
            raise RuntimeError("the next write fails")
    assert (out / "config.json").read_text() == "{}" and _beside(out) == []
    with staged_folder(out) as staging:
        (staging / "config.json").write_text('{"new": 1}')
    assert (out / "config.json").read_text() == '{"new": 1}' and _beside(out) == []


# ---------------------------------------------------------------------------------------------- download-authors
AUTHORS_OPTIONS = ["--image-size", "32", "--feature-layers", "1", "2", "--top-k", "5"]


@pytest.fixture(scope="module")
def authors_file(authors_pth) -> tuple[bytes, str]:
    from loopback_server import blob_id

    data = authors_pth.read_bytes()
    return data, blob_id(data)


def test_download_authors_stopped_at_every_stage_then_rerun(server, authors_file, tiny_clip_dir, hf_home, tmp_path,
                                                           capsys):
    """SIGKILL once the whole file is received but before it is verified and renamed (the rerun finds it complete,
    asks the server for nothing and verifies it); Ctrl-C once the model is converted into the cache and while the
    cached folder is copied to --out (a fresh --out stays absent, nothing of it beside). The final --out equals
    the one an uninterrupted run into a fresh cache writes."""
    data, blob = authors_file
    argv = ["download-authors", "mvtec", "--out", tmp_path / "mvtec", "--clip", tiny_clip_dir, "--url", server.url(),
            "--git-blob-sha1", blob, *AUTHORS_OPTIONS]
    out = tmp_path / "mvtec"
    _killed("modeling_vip2clip.weights.authors_release:compute_git_blob_sha1", 1, *argv,
            env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0"})
    assert cache_files(hf_home) == [f"checkpoints/{blob}/mvtec_train_epoch_10.pth.incomplete"]
    assert not out.exists() and _beside(out) == []
    gets = len(server.state.gets())
    _interrupted(capsys, "modeling_vip2clip.weights.authors_checkpoint:model_from_authors_checkpoint", 1, *argv)
    assert len(server.state.gets()) == gets  # complete on disk: verified, not fetched again
    assert f"checkpoints/{blob}/mvtec_train_epoch_10.pth" in cache_files(hf_home)
    assert not out.exists() and _beside(out) == []
    _interrupted(capsys, "modeling_vip2clip.weights.folder:_carry_over", 1, *argv)
    assert not out.exists() and _beside(out) == []
    code, err = _in_process(capsys, *argv)
    assert code == 0, err[-2000:]
    assert len(server.state.gets()) == gets and not [n for n in cache_files(hf_home) if ".incomplete" in n or ".partial" in n]
    fresh = tmp_path / "fresh"
    hf_home.rename(tmp_path / "first_home")  # an uninterrupted run into a fresh cache
    assert _in_process(capsys, *[fresh if value == out else value for value in argv])[0] == 0
    assert _results(out) == _results(fresh)


@pytest.mark.parametrize("fault", ["lost", "stalled"])
def test_network_lost_or_stalled_mid_download(fault, server, authors_file, tiny_clip_dir, hf_home, tmp_path, capsys,
                                              monkeypatch):
    """The link is lost half-way (the connection cut after half the body, then every request answered with
    headers and no body) or stalls (headers, then silence past HF_HUB_DOWNLOAD_TIMEOUT): one `error:` line naming
    the URL and the way out, exit 2; the cache holds only `.incomplete` — a prefix of the file, never a file that
    passes as verified — and the rerun with the server healthy completes it (Range) with a verified checksum."""
    import huggingface_hub.constants
    import huggingface_hub.file_download
    import time as real_time
    from types import SimpleNamespace

    # huggingface_hub waits 1 s before each of its 5 retries: the faults stay real, the waiting is skipped.
    clock = {name: getattr(real_time, name) for name in dir(real_time) if not name.startswith("_")}
    monkeypatch.setattr(huggingface_hub.file_download, "time", SimpleNamespace(**{**clock, "sleep": lambda _: None}))
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    data, blob = authors_file
    if fault == "lost":
        server.state.drop_after, server.state.cut_after_drop = len(data) // 2, True
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.3)
        server.state.stall_after, server.state.stall_seconds = 0, 2.0
    out = tmp_path / "mvtec"
    argv = ["download-authors", "mvtec", "--out", out, "--clip", tiny_clip_dir, "--url", server.url(),
            "--git-blob-sha1", blob, *AUTHORS_OPTIONS]
    code, err = _in_process(capsys, *argv)
    assert code == 2
    line = _one_error_line(err, f"cannot download the authors' mvtec checkpoint from {server.url()}",
                           "run the command again (a partial download is resumed)")
    assert ("RemoteProtocolError" if fault == "lost" else "Timeout") in line
    assert not out.exists() and _beside(out) == []
    cached = cache_files(hf_home)
    assert all(name.endswith(".incomplete") for name in cached)
    partial = (hf_home / "vip2clip" / "authors" / cached[0]) if cached else None
    if fault == "lost":
        assert partial is not None and 0 < partial.stat().st_size < len(data)
        assert data.startswith(partial.read_bytes())
    server.state.drop_after = server.state.stall_after = None
    assert _in_process(capsys, *argv)[0] == 0
    assert f"checkpoints/{blob}/mvtec_train_epoch_10.pth" in cache_files(hf_home)
    from modeling_vip2clip.weights.authors_release import compute_git_blob_sha1

    assert compute_git_blob_sha1(hf_home / "vip2clip" / "authors" / "checkpoints" / blob / "mvtec_train_epoch_10.pth") == blob
    if fault == "lost":
        assert server.state.gets()[-1].startswith("bytes=")  # resumed, not restarted


# ---------------------------------------------------------------------------------------------- disk full
@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A real small file system (tmpfs, resized per probe) that fills up: writes there meet ENOSPC. Needs the
    right to mount (root, as in CI); skipped where it is refused."""
    mount_point = tmp_path_factory.mktemp("small_disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")

    def emptied(kib: int) -> Path:
        for entry in mount_point.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        _grow(mount_point, kib)
        return mount_point

    yield emptied
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _grow(disk: Path, kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(disk)], check=True)


def _disk_full(capsys, *argv) -> str | None:
    """`vip2clip ARGV` meets the full disk: exit 2, one `error:` line naming what it was writing; returns the path
    named there (None when the run fitted on the disk after all)."""
    code, err = _in_process(capsys, *argv)
    if code == 0:
        return None
    assert code == 2, err[-2000:]
    line = _one_error_line(err, "no space left on the device", "then run again")
    return line.split("(", 1)[1].split(")", 1)[0]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("command", ["predict", "calibrate", "export", "convert", "train"])
def test_disk_full_at_every_write(command, small_disk, tiny_model_dir, tiny_clip_dir, images, dataset_dir,
                                  raw_benchmark, calibrated, exported, capsys):
    """The output folder on a disk that fills up at each write in turn (the disk grows between probes, so each
    one fails one write further): one line naming the file, exit 2, the inputs byte-equal, results already
    written kept whole, and nothing that blocks the rerun — the same command, once there is space, completes
    (`--resume` for predict and train, `--overwrite` for the others) with the results of a run that never failed."""
    before = _snapshot(tiny_model_dir, dataset_dir, raw_benchmark, images)
    disk = small_disk(4)
    out = disk / "out"
    argv, rerun, sizes = {
        "predict": (["predict", "--model", tiny_model_dir, images, "--output-dir", out, *QUIET], ["--resume"],
                    range(4, 33, 4)),  # a page more each time: the files are a page or two each
        "calibrate": (["calibrate", "--model", tiny_model_dir, "--dataset", dataset_dir, "--out", out, *QUIET],
                      ["--overwrite"], (4, 8, 480)),
        "export": (["export", "--model", tiny_model_dir, "--format", "onnx", "--out", out], ["--overwrite"], (4, 64)),
        "convert": (["convert", "--root", raw_benchmark, "--out", out], ["--overwrite"], (4, 16)),
        "train": (["train", "--clip", tiny_clip_dir, "--image-size", "32", "--feature-layers", "1", "2", "--n-ctx",
                   "3", "--n-cls", "2", "--top-k", "5", "--dataset", raw_benchmark, "--split", "test", "--output-dir",
                   out, "--epochs", "1", "--batch-size", "4", "--report-to", "none", *QUIET], ["--resume"],
                  (4, 480, 960)),
    }[command]
    named = []
    for kib in sizes:
        _grow(disk, kib)  # what the failed probe left stays: the next one is its rerun
        _reset_accelerate()
        path = _disk_full(capsys, *argv, *(rerun if named else []))
        if path is None:  # everything fitted: the writes after the last one named are small
            break
        named += [path] if path not in named else []
        _unchanged(before)
        if command in ("calibrate", "export") and out.exists():
            _assert_partial_of(out, calibrated if command == "calibrate" else exported)
    expected = {"predict": (MANIFEST_FILE, "predictions.csv", "overlays/0.overlay.png", "overlays/1.overlay.png"),
                "calibrate": (MANIFEST_FILE, "model.safetensors", "_vip2clip.py"),  # the manifest, weights, code
                "export": (MANIFEST_FILE, "out"),  # the manifest, then the graph (the folder is named)
                "convert": ("out",),
                "train": ("epoch_1.tmp", "model")}[command]  # the checkpoint (weights, then optimizer), the model
    found = iter(named)  # each expected write met, in this order
    assert all(any(path.endswith(end) for path in found) for end in expected), named
    _grow(disk, 8 << 10)
    _reset_accelerate()
    code, err = _in_process(capsys, *argv, *rerun)
    assert code == 0, err[-2000:]
    assert not [p for p in disk.rglob("*") if p.name.startswith(".staging-") or p.suffix in (".partial", ".tmp")]
    _unchanged(before)


def test_a_file_size_limit_reads_as_disk_full(tiny_model_dir, dataset_dir, tmp_path, capsys):
    """`ulimit -f` (RLIMIT_FSIZE; SIGXFSZ ignored, as shells and schedulers that set it do): the weights copy
    meets EFBIG and the user gets the disk-full line with its own reason and fix; the rerun without the limit
    works."""
    out = tmp_path / "calibrated"
    argv = ["calibrate", "--model", tiny_model_dir, "--dataset", dataset_dir, "--out", out, *QUIET]
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limits[1]))
    try:
        code, err = _in_process(capsys, *argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2
    _one_error_line(err, "cannot write (", "model.safetensors", "larger than this system allows",
                    "raise the limit or write to another file system")
    assert not out.exists()
    assert _in_process(capsys, *argv)[0] == 0


# ---------------------------------------------------------------------------------------------- hostile files
def _refused(capsys, *argv, named=()) -> str:
    code, err = _in_process(capsys, *argv)
    assert code == 2, err[-2000:]
    return _one_error_line(err, *named)


def _other_graph(path: Path) -> None:
    """A valid ONNX file of another model (y = x) saved under the export's name."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))


def _tiny_openvino_graph(path: Path) -> None:
    """An OpenVINO IR (xml + bin) that keeps the export's contract — `pixel_values` (B, 3, S, S) → `anomaly_score`,
    `anomaly_map` — built op by op (converting the real export's ONNX costs seconds): the runtime runs it."""
    import openvino
    import openvino.opset13 as ops

    pixels = ops.parameter([-1, 3, 32, 32], np.float32, name="pixel_values")
    weights = ops.constant(np.full((1, 3, 1, 1), 1 / 3, np.float32))  # something for the .bin to hold
    maps = ops.sigmoid(ops.reduce_sum(ops.multiply(pixels, weights), np.array([1], np.int64), keep_dims=False))
    score = ops.reduce_max(maps, np.array([1, 2], np.int64), keep_dims=False)
    for node, name in ((score, "anomaly_score"), (maps, "anomaly_map")):
        node.output(0).get_tensor().set_names({name})
    openvino.save_model(openvino.Model([score, maps], [pixels], "contract"), str(path), compress_to_fp16=False)


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_hostile_exported_folders_fail_in_one_line(exported, images, tmp_path, capsys):
    """`model.onnx` truncated, random bytes, or a valid ONNX file of another graph; `openvino_model.xml` or `.bin`
    truncated; `export_info.json` torn or naming a format that does not exist: `predict` says what is wrong with
    which file in one line, exit 2, before any output folder exists; the folder is byte-equal."""
    openvino_folder = tmp_path / "openvino"
    shutil.copytree(exported, openvino_folder)
    (openvino_folder / "model.onnx").unlink()
    _tiny_openvino_graph(openvino_folder / "openvino_model.xml")
    info = json.loads((exported / "export_info.json").read_text())
    (openvino_folder / "export_info.json").write_text(json.dumps({**info, "format": "openvino"}))
    out = tmp_path / "out"
    assert _in_process(capsys, "predict", "--model", openvino_folder, images, "--output-dir", out, *QUIET)[0] == 0
    cases = {
        "onnx truncated": (exported, "model.onnx", _halve, ("corrupt, truncated", "INVALID_PROTOBUF")),
        "onnx random bytes": (exported, "model.onnx", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)),
                              ("corrupt, truncated",)),
        "onnx of another graph": (exported, "model.onnx", _other_graph,
                                  ("the graph in model.onnx takes x and gives y", "it is not a vip2clip export")),
        "openvino xml truncated": (openvino_folder, "openvino_model.xml", _halve, ("cannot load the exported model",)),
        "openvino bin truncated": (openvino_folder, "openvino_model.bin", _halve, ("Incorrect weights in bin file",)),
        "export_info torn": (exported, "export_info.json", _halve, ("cannot read export_info.json", "not valid JSON")),
        "export_info of another format": (exported, "export_info.json",
                                          lambda p: p.write_text(json.dumps({**info, "format": "tensorrt"})),
                                          ("export_info.json names the format 'tensorrt', not onnx or openvino",)),
    }
    for case, (source, name, damage, words) in cases.items():
        model = tmp_path / case.replace(" ", "_")
        shutil.copytree(source, model)
        damage(model / name)
        before = _snapshot(model)
        out = tmp_path / f"{model.name}_out"
        _refused(capsys, "predict", "--model", model, images, "--output-dir", out, *QUIET,
                 named=(f"--model {model}", *words))
        assert _snapshot(model) == before and not out.exists(), case


def test_hostile_dataset_results_and_manifest_files(tiny_model_dir, dataset_dir, images, tmp_path, capsys):
    """A parquet file truncated or of random bytes as `--dataset`; `predictions.csv` replaced by bytes that are not
    UTF-8 before `--resume`; the run manifest torn or of another JSON type. Each: one line naming the file, exit 2,
    every file byte-equal; a run manifest that cannot be read refuses `--resume` and a fresh run, and
    `--overwrite` replaces only what vip2clip writes there (the user's file stays)."""
    from datasets import load_from_disk

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    load_from_disk(str(dataset_dir)).to_parquet(str(parquet / "test.parquet"))
    data = (parquet / "test.parquet").read_bytes()
    for case, damaged in (("truncated", data[: len(data) // 2]), ("random", np.random.default_rng(1).bytes(3000))):
        folder = tmp_path / f"parquet_{case}"
        folder.mkdir()
        (folder / "test.parquet").write_bytes(damaged)
        before = _snapshot(folder)
        _refused(capsys, "calibrate", "--model", tiny_model_dir, "--dataset", folder, "--out", tmp_path / "cal", *QUIET,
                 named=(f"--dataset {folder}", "cannot be opened as a dataset", "not a parquet file"))
        assert _snapshot(folder) == before and not (tmp_path / "cal").exists()

    out = tmp_path / "predictions"
    argv = ["predict", "--model", tiny_model_dir, images, "--output-dir", out, *QUIET, "--no-overlays"]
    assert _in_process(capsys, *argv)[0] == 0
    (out / "notes.txt").write_text("the user's own file")
    csv_path = out / "predictions.csv"
    rows = csv_path.read_bytes()
    csv_path.write_bytes("path,score\n\xe9t\xe9.png,0.5\n".encode("latin-1"))  # another tool's Latin-1 export
    before = _snapshot(out)
    _refused(capsys, *argv, "--resume", named=(f"cannot read the results of an earlier run ({csv_path})", "not valid UTF-8 text"))
    assert _snapshot(out) == before
    csv_path.write_bytes(rows)
    for text in ('{"written_by": "vip2clip pre', "[1, 2]"):  # torn mid-write by hand, another JSON type
        (out / MANIFEST_FILE).write_text(text)
        before = _snapshot(out)
        _refused(capsys, *argv, "--resume", named=(f"{MANIFEST_FILE} cannot be read", "--resume refused"))
        _refused(capsys, *argv, named=("exists and is not empty", "pass --overwrite"))
        assert _snapshot(out) == before
    assert _in_process(capsys, *argv, "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "the user's own file" and json.loads((out / MANIFEST_FILE).read_text())


def test_the_feature_cache_meets_a_full_disk_when_allocated(small_disk):
    """`train --cache-features` memory-maps its arrays; a sparse file on a disk that fills up later would kill the
    run with SIGBUS at the first page written through the map. The files are reserved when created: the full disk
    is an ENOSPC naming the file there, which the boundary turns into the disk-full line."""
    from modeling_vip2clip.engine.feature_cache import FeatureCache

    disk = small_disk(64)
    cache = FeatureCache(disk / "feature_cache")
    with pytest.raises(OSError) as caught:  # 2000 masks of 32×32 bytes alone are 2 MB
        cache.create({"dtype": "float16"}, num_samples=2000, embed_dim=32, patch_shape=(2, 16, 32), image_size=32)
    assert caught.value.errno == errno.ENOSPC and str(disk / "feature_cache") in caught.value.filename
    assert explain(caught.value) is not None and "no space left" in str(explain(caught.value))
