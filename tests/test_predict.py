"""`vip2clip predict` at scale (issue 13): real files, real `datasets` datasets, real subprocesses, tiny model.

* CSV columns, relative overlay paths that mirror the inputs' sub-paths (same-named files never collide), maps
  and masks matching the model's own output, unreadable inputs in skipped.csv, usage errors;
* the model's calibrated thresholds as defaults, `--threshold` overriding them;
* memory independent of the number of inputs (peak RSS of N vs 5N images, in subprocesses);
* SIGKILL mid-run (pinned from the test side, tests/paused_run.py) and a torn last CSV line, then `--resume`: every
  input once;
* 2 CPU processes (accelerate launch) equal to 1, also when killed and resumed;
* `--dataset` in the canonical schema and in the `BrachioLab/visa` parquet layout (`<class>.test` splits),
  also `--streaming`.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import launch_two_cpu_processes
from modeling_vip2clip.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
WAIT = 120.0


def _rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _scores(out: Path) -> dict[str, float]:
    rows = _rows(out)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "an input is in predictions.csv twice"
    return {row["path"]: float(row["score"]) for row in rows}


def _model_outputs(model_dir, images: list[Image.Image]):
    """Scores and maps of the model itself (processor + forward), the independent reference."""
    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor

    model = ViP2CLIPModel.from_pretrained(model_dir).eval()
    processor = ViP2CLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        output = model(pixel_values=processor(images=images)["pixel_values"])
    maps = processor.post_process_anomaly_maps(output, target_sizes=[image.size[::-1] for image in images])
    return output.anomaly_score.tolist(), [m.numpy() for m in maps]


def _report_counts(out: Path) -> tuple[int, int, int, int]:
    """report.html's (scored, anomalous, skipped, gallery items), read from its markup."""
    import re

    page = (out / "report.html").read_text(encoding="utf-8")
    counts = re.search(r'id="counts" data-scored="(\d+)" data-anomalous="(\d+)" data-skipped="(\d+)"', page)
    return (*map(int, counts.groups()), page.count('<figure class="item'))


def _smooth(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 images in a tree: same file names in two sub-folders, one unreadable file, one text file."""
    root = tmp_path_factory.mktemp("line3")
    for index in range(12):
        sub = root / ("cam_a" if index % 2 else "cam_b") / ("night" if index % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        _smooth((40 + index, 36), index).save(sub / f"img_{index // 2:02d}.png")
    (root / "cam_a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "cam_a" / "notes.txt").write_text("ignored: not an image extension")
    return root


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png") if p.name != "broken.png")


# ---------------------------------------------------------------------------------------------------- files


def test_predict_writes_csv_and_overlays_and_reports_corrupt_files(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    Image.new("L", (32, 32), 128).save(folder / "sub" / "gray.jpg")
    Image.new("L", (32, 32), 90).save(folder / "sub" / "gray.png")  # same stem: both keep their extension
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    extra = tmp_path / "more"
    extra.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(extra / "blue.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(extra / "red.png")  # same name as photos/red.png
    out = tmp_path / "predictions"

    code = cli_main(["predict", "--model", str(tiny_model_dir), str(folder), str(extra / "*.png"),
                     str(tmp_path / "missing.png"), "--output-dir", str(out), "--threshold", "0.5"])
    assert code == 0
    with open(out / "predictions.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["path", "score", "verdict", "overlay"]
    rows = _rows(out)
    paths = sorted(row["path"] for row in rows)
    assert len(paths) == 5 and not any("broken" in p or "notes" in p for p in paths)
    for row in rows:
        score = float(row["score"])
        assert 0.0 <= score <= 1.0
        assert row["verdict"] == ("anomalous" if score >= 0.5 else "normal")
    # Overlays keep the inputs' sub-paths (relative to the folder holding both inputs), named in the CSV.
    overlay_of = {Path(row["path"]).relative_to(tmp_path).as_posix(): row["overlay"] for row in rows}
    assert overlay_of == {"photos/red.png": "overlays/photos/red.overlay.png",
                          "photos/sub/gray.jpg": "overlays/photos/sub/gray.jpg.overlay.png",
                          "photos/sub/gray.png": "overlays/photos/sub/gray.png.overlay.png",
                          "more/blue.png": "overlays/more/blue.overlay.png", "more/red.png": "overlays/more/red.overlay.png"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(overlay_of.values())
    # The image on top (its own size), the strip of score and colour scale below it (at least 220 px wide).
    assert Image.open(out / overlay_of["photos/red.png"]).size[0] == 220
    assert Image.open(out / overlay_of["photos/red.png"]).size[1] > 30 + 20
    with open(out / "skipped.csv", newline="") as handle:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert any(p.endswith("broken.png") for p in skipped) and any(p.endswith("missing.png") for p in skipped)
    assert "no such file" in skipped[str(tmp_path / "missing.png")]
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "missing.png" in captured.err
    assert "scored 5 images" in captured.out and "skipped 2" in captured.out


def test_predict_without_readable_images_fails(tiny_model_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert cli_main(["predict", "--model", str(tiny_model_dir), str(tmp_path / "bad.png"), "--output-dir",
                     str(tmp_path / "out")]) == 1


def test_single_folder_mirrors_its_tree_and_list_files_work(tiny_model_dir, folder, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["predict", "--model", str(tiny_model_dir), str(folder), "--output-dir", str(out),
                     "--num-workers", "2", "--batch-size", "3", "--no-progress"]) == 0
    files = _image_files(folder)
    rows = _rows(out)
    assert sorted(row["path"] for row in rows) == sorted(map(str, files))
    for row in rows:  # the folder's own tree, file name kept whole
        assert row["overlay"] == f"overlays/{Path(row['path']).relative_to(folder).with_suffix('').as_posix()}.overlay.png"
        assert (out / row["overlay"]).is_file()
    assert len({row["overlay"] for row in rows}) == len(rows)

    # @LIST: one entry per line, relative to the list's folder; comments and blank lines skipped.
    lists = tmp_path / "lists"
    lists.mkdir()
    entries = [os.path.relpath(p, lists) for p in files[:3]] + ["", "# a comment", str(files[3])]
    (lists / "some.txt").write_text("\n".join(entries) + "\n")
    listed = tmp_path / "listed"
    assert cli_main(["predict", "--model", str(tiny_model_dir), f"@{lists / 'some.txt'}", "--output-dir", str(listed),
                     "--num-workers", "0", "--no-progress"]) == 0
    got = _scores(listed)
    assert sorted(os.path.abspath(p) for p in got) == sorted(map(str, files[:4]))
    full = {os.path.abspath(p): s for p, s in _scores(out).items()}
    assert all(full[os.path.abspath(p)] == s for p, s in got.items())  # same numbers, whatever the batching


def test_maps_and_masks_match_the_model(tiny_model_dir, folder, tmp_path):
    files = _image_files(folder)[:4]
    images = [Image.open(p).convert("RGB") for p in files]
    scores, maps = _model_outputs(tiny_model_dir, images)
    for kind in ("png", "npy"):
        out = tmp_path / kind
        assert cli_main(["predict", "--model", str(tiny_model_dir), *map(str, files), "--output-dir", str(out),
                         "--save-maps", kind, "--save-masks", "--pixel-threshold", "0.4", "--no-overlays",
                         "--num-workers", "0", "--no-progress"]) == 0
        with open(out / "predictions.csv", newline="") as handle:
            assert next(csv.reader(handle)) == ["path", "score", "verdict", "overlay", "map", "mask"]
        rows = {row["path"]: row for row in _rows(out)}
        for path, score, expected in zip(files, scores, maps):
            row = rows[str(path)]
            assert row["overlay"] == "" and float(row["score"]) == pytest.approx(score, abs=1e-6)
            assert row["map"] == f"maps/{path.stem}.map.{kind}" and row["mask"] == f"masks/{path.stem}.mask.png"
            if kind == "png":
                stored = np.asarray(Image.open(out / row["map"])).astype(np.float64) / 65535.0
                tolerance = 1 / 65535
            else:
                stored = np.load(out / row["map"]).astype(np.float64)
                assert np.load(out / row["map"]).dtype == np.float16
                tolerance = 1e-3
            assert stored.shape == expected.shape == images[files.index(path)].size[::-1]
            np.testing.assert_allclose(stored, expected, atol=tolerance)
            mask = np.asarray(Image.open(out / row["mask"]))
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask > 0, expected >= 0.4)


def test_thresholds_default_to_the_models_calibration(tiny_model_dir, folder, tmp_path):
    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor

    files = _image_files(folder)[:6]
    plain = tmp_path / "plain"
    assert cli_main(["predict", "--model", str(tiny_model_dir), *map(str, files), "--output-dir", str(plain),
                     "--num-workers", "0", "--no-progress"]) == 0
    scores = sorted(_scores(plain).values())
    cut = float((scores[2] + scores[3]) / 2)  # three images above, three below
    calibrated = tmp_path / "calibrated_model"
    model = ViP2CLIPModel.from_pretrained(tiny_model_dir)
    model.config.image_threshold = cut
    model.save_pretrained(calibrated)
    ViP2CLIPProcessor.from_pretrained(tiny_model_dir).save_pretrained(calibrated)

    out = tmp_path / "out"
    assert cli_main(["predict", "--model", str(calibrated), *map(str, files), "--output-dir", str(out),
                     "--num-workers", "0", "--no-progress"]) == 0
    verdicts = [row["verdict"] for row in sorted(_rows(out), key=lambda row: float(row["score"]))]
    assert verdicts == ["normal"] * 3 + ["anomalous"] * 3
    overridden = tmp_path / "overridden"
    assert cli_main(["predict", "--model", str(calibrated), *map(str, files), "--output-dir", str(overridden),
                     "--threshold", "1", "--num-workers", "0", "--no-progress"]) == 0
    assert {row["verdict"] for row in _rows(overridden)} == {"normal"}


@pytest.mark.parametrize("argv, named", [
    ([], "INPUT"),  # neither inputs nor --dataset
    (["--dataset", "./no/such/dataset"], "--dataset ./no/such/dataset"),
    (["IMG", "--threshold", "2"], "--threshold"),
    (["IMG", "--batch-size", "0"], "--batch-size"),
    (["IMG", "--save-maps", "tiff"], "--save-maps"),
])
def test_usage_errors_are_one_line(tiny_model_dir, folder, argv, named, run_cli):
    argv = [str(folder) if value == "IMG" else value for value in argv]
    completed = run_cli("predict", "--model", tiny_model_dir, *argv, "--output-dir", folder.parent / "unused")
    assert completed.returncode == 2, completed.stderr
    assert named in completed.stderr and "Traceback" not in completed.stderr


def test_resume_refuses_other_columns(tiny_model_dir, folder, tmp_path):
    out = tmp_path / "out"
    argv = ["predict", "--model", str(tiny_model_dir), str(folder), "--output-dir", str(out), "--num-workers", "0",
            "--no-progress", "--no-overlays"]
    assert cli_main(argv) == 0
    assert cli_main([*argv, "--resume", "--save-maps", "npy"]) == 2
    assert len(_rows(out)) == len(_image_files(folder))  # untouched


# ---------------------------------------------------------------------------------------------------- memory


RSS_SCRIPT = """
import resource, sys
from modeling_vip2clip.cli.predict import main
code = main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "EXIT", code)
"""


def _peak_rss_mb(model_dir, inputs: Path, out: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, "--model", str(model_dir), str(inputs), "--output-dir", str(out),
         "--num-workers", "0", "--batch-size", "4", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = [line for line in completed.stdout.splitlines() if line.startswith("MAXRSS_KB")][-1]
    assert line.endswith("EXIT 0")
    return int(line.split()[1]) / 1024


def test_memory_does_not_grow_with_the_number_of_images(tiny_model_dir, tmp_path):
    """Peak RSS over 5N images minus over N: the old predict kept every decoded image (640×640 RGB = 1.2 MB) in
    memory, +72 MB here; streaming keeps a batch or two, so the difference is allocator noise. The margin (25 MB)
    leaves room for that noise on a tiny model whose whole run is ~300 MB."""
    small, large = tmp_path / "n", tmp_path / "5n"
    small.mkdir()
    large.mkdir()
    encoded = []
    for seed in range(5):
        buffer = io.BytesIO()
        _smooth((640, 640), seed).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    n = 15
    for index in range(5 * n):
        (large / f"{index:03d}.png").write_bytes(encoded[index % 5])
        if index < n:
            (small / f"{index:03d}.png").write_bytes(encoded[index % 5])
    peak_small = _peak_rss_mb(tiny_model_dir, small, tmp_path / "out_n")
    peak_large = _peak_rss_mb(tiny_model_dir, large, tmp_path / "out_5n")
    assert len(_rows(tmp_path / "out_5n")) == 5 * n and len(_rows(tmp_path / "out_n")) == n
    assert peak_large - peak_small < 25.0, (peak_small, peak_large)


# ---------------------------------------------------------------------------------------------------- kills


# A fresh run writes the two CSVs' headers, then ends each batch with two CSV writes (its predictions, its skipped
# inputs): pausing after call 2 + 2N of this pauses right after batch N is on disk (tests/paused_run.py).
CSV_WRITE = "modeling_vip2clip.engine.results_csv:CsvLog.write"


def _pause_after_batch(batch: int) -> dict:
    return {"VIP2CLIP_TEST_PAUSE": f"{CSV_WRITE}@{2 + 2 * batch}:60"}


def _start(argv: list, log: Path, pause: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VIP2CLIP_TEST_PAUSE", None)
    env.update(pause or {})
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "paused_run.py"), "-m",
                                 "modeling_vip2clip.cli.predict", *map(str, argv)], stdout=handle,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def _kill_when_paused(proc: subprocess.Popen, log: Path, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT
    while log.read_text(errors="replace").count(f"of {CSV_WRITE}") < count:
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before the pause:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no pause within {WAIT} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _kill_stragglers(log.parent)


def _kill_stragglers(marker: Path) -> None:
    """SIGKILL every process whose command line names `marker` and wait until they are gone: `accelerate launch`
    starts its workers in sessions of their own, so killing the launcher's process group leaves them paused (and
    holding the output folder's lock) — a real kill of a whole run kills them too."""
    mine = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(marker).encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                mine.append(entry)
        except (OSError, ProcessLookupError):
            continue
    deadline = time.monotonic() + 30
    while any((entry / "cmdline").exists() and (entry / "cmdline").read_bytes() for entry in mine):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)


def test_sigkill_mid_run_then_resume_holds_every_image_once(tiny_model_dir, folder, tmp_path):
    reference = tmp_path / "reference"
    argv = ["--model", tiny_model_dir, folder, "--batch-size", "2", "--num-workers", "1", "--no-progress"]
    assert cli_main(["predict", *map(str, argv), "--output-dir", str(reference)]) == 0
    expected = _scores(reference)
    out = tmp_path / "out"

    log = tmp_path / "killed.log"
    proc = _start([*argv, "--output-dir", out], log, _pause_after_batch(2))
    _kill_when_paused(proc, log)
    with open(out / "skipped.csv", newline="") as handle:
        skipped = list(csv.DictReader(handle))
    done = len(_rows(out))
    assert done + len(skipped) == 4  # two batches of two (one holds broken.png), flushed before the kill
    # A write cut by the kill: the next input's row, half written, no newline.
    missing = sorted(set(expected) - set(_scores(out)))
    with open(out / "predictions.csv", "a", encoding="utf-8") as handle:
        handle.write(f"{missing[0]},0.12")

    log = tmp_path / "resumed.log"
    proc = _start([*argv, "--output-dir", out, "--resume"], log)
    assert proc.wait(timeout=WAIT) == 0, log.read_text()[-3000:]
    assert f"resuming: {done} inputs already in" in log.read_text()
    got = _scores(out)  # asserts no path twice
    assert got.keys() == expected.keys()
    assert all(got[path] == pytest.approx(expected[path], abs=1e-6) for path in expected)
    assert all((out / row["overlay"]).is_file() for row in _rows(out))
    assert not list(out.rglob("*.tmp")) and not list(out.glob("*.part-*"))
    # The report is built from the final CSV: the rows of both runs, once each.
    rows = _rows(out)
    assert _report_counts(out) == (len(rows), sum(r["verdict"] == "anomalous" for r in rows), 1, len(rows))


# ---------------------------------------------------------------------------------------------------- distributed


def test_two_processes_equal_one_process(tiny_model_dir, folder, tmp_path):
    single = tmp_path / "single"
    argv = ["--model", str(tiny_model_dir), str(folder), "--batch-size", "2", "--num-workers", "1", "--no-progress",
            "--save-maps", "npy"]
    assert cli_main(["predict", *argv, "--output-dir", str(single)]) == 0
    double = tmp_path / "double"
    completed = launch_two_cpu_processes("modeling_vip2clip.cli.predict", *argv, "--output-dir", str(double))
    assert completed.returncode == 0, completed.stderr[-4000:]
    expected, got = _scores(single), _scores(double)
    assert got.keys() == expected.keys()
    assert all(got[path] == pytest.approx(expected[path], abs=1e-6) for path in expected)
    assert {r["path"]: (r["overlay"], r["map"]) for r in _rows(double)} == {
        r["path"]: (r["overlay"], r["map"]) for r in _rows(single)}
    assert not list(double.glob("*.part-*"))
    with open(double / "skipped.csv", newline="") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == [str(folder / "cam_a" / "broken.png")]
    assert completed.stdout.count("scored ") == 1  # one summary, from the main process
    # One report, by the main process, of the merged CSV (the same counts as the one-process run's).
    rows = _rows(double)
    assert _report_counts(double) == _report_counts(single) == (
        len(rows), sum(r["verdict"] == "anomalous" for r in rows), 1, len(rows))


def test_two_processes_killed_then_resumed(tiny_model_dir, folder, tmp_path):
    argv = ["--model", str(tiny_model_dir), str(folder), "--batch-size", "2", "--num-workers", "0", "--no-progress",
            "--no-overlays"]
    single = tmp_path / "single"
    assert cli_main(["predict", *argv, "--output-dir", str(single)]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           **_pause_after_batch(1)}
    from launch import free_port

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(ROOT / "tests" / "paused_run.py"), "-m", "modeling_vip2clip.cli.predict", *argv,
               "--output-dir", str(out)]
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    _kill_when_paused(proc, log, count=2)  # both processes wrote their first batch
    parts = sorted(p.name for p in out.glob("predictions.part-*.csv"))
    assert parts == ["predictions.part-00000.csv", "predictions.part-00001.csv"]
    assert not (out / "predictions.csv").exists()

    completed = launch_two_cpu_processes("modeling_vip2clip.cli.predict", *argv, "--output-dir", str(out), "--resume")
    assert completed.returncode == 0, completed.stderr[-4000:]
    expected, got = _scores(single), _scores(out)
    assert got.keys() == expected.keys()
    assert all(got[path] == pytest.approx(expected[path], abs=1e-6) for path in expected)
    assert not list(out.glob("*.part-*"))


# ---------------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def canonical_dataset(tmp_path_factory) -> Path:
    """The package's schema, saved with save_to_disk (what `vip2clip convert` writes)."""
    from modeling_vip2clip.data import convert, generate_synthetic_benchmark

    raw = tmp_path_factory.mktemp("raw")
    generate_synthetic_benchmark(raw, categories=("fabric", "tile"), n_train_good=1, n_test_good=2, n_test_bad=2,
                                 image_size=32, layout="meta_json")
    dataset, _ = convert(raw, split="test")
    out = tmp_path_factory.mktemp("canonical") / "ds"
    dataset.save_to_disk(str(out))
    return out


def _png(color, size=(32, 32), mode="RGB") -> dict:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def visa_parquet(tmp_path_factory) -> Path:
    """The `BrachioLab/visa` layout: parquet files, columns image / mask / label, splits `<class>.train` and
    `<class>.test`; one test image of pcb1 does not decode."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    root = tmp_path_factory.mktemp("visa_parquet")
    (root / "data").mkdir()
    features = Features({"image": ImageFeature(), "mask": ImageFeature(), "label": Value("int64")})
    for number, name in enumerate(("candle", "pcb1")):
        for split, count in (("train", 2), ("test", 4)):
            images = [_png((40 * i + 10 * number, 80, 120 + 20 * i)) for i in range(count)]
            masks = [None] * (count // 2) + [_png(255, mode="L")] * (count - count // 2)
            if name == "pcb1" and split == "test":
                images[1] = {"bytes": b"not an image", "path": None}
            Dataset.from_dict({"image": images, "mask": masks, "label": [0] * (count // 2) + [1] * (count - count // 2)},
                              features=features).to_parquet(str(root / "data" / f"{name}.{split}-00000-of-00001.parquet"))
    return root


def test_dataset_in_the_canonical_schema(tiny_model_dir, canonical_dataset, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "out"
    assert cli_main(["predict", "--model", str(tiny_model_dir), "--dataset", str(canonical_dataset), "--output-dir",
                     str(out), "--num-workers", "2", "--batch-size", "3", "--no-progress"]) == 0
    dataset = load_from_disk(str(canonical_dataset))
    rows = _rows(out)
    assert len(rows) == len(dataset) == 8
    # Each row is named by its image_path, as evaluate reports it; the outputs mirror those paths.
    assert [row["path"] for row in rows] == dataset["image_path"]
    assert all(row["overlay"] == f"overlays/{row['path'][:-len('.png')]}.overlay.png" and (out / row["overlay"]).is_file()
               for row in rows)
    # The scores are the model's own on the decoded images.
    images = [image.convert("RGB") for image in dataset["image"]]
    scores, _ = _model_outputs(tiny_model_dir, images)
    assert [float(row["score"]) for row in rows] == pytest.approx(scores, abs=1e-6)

    only = tmp_path / "tile"
    assert cli_main(["predict", "--model", str(tiny_model_dir), "--dataset", str(canonical_dataset), "--categories",
                     "tile", "--output-dir", str(only), "--num-workers", "0", "--no-progress"]) == 0
    assert len(_rows(only)) == sum(c == "tile" for c in dataset["category"]) == 4


def test_dataset_in_the_visa_parquet_layout(tiny_model_dir, visa_parquet, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["predict", "--model", str(tiny_model_dir), "--dataset", str(visa_parquet), "--split", "test",
                     "--image-column", "image", "--output-dir", str(out), "--num-workers", "2", "--batch-size", "3",
                     "--no-progress"]) == 0
    rows = _rows(out)
    # Every <class>.test split (not the .train ones), one row each, the undecodable image skipped.
    assert [row["path"] for row in rows] == [f"candle.test/{i:06d}" for i in range(4)] + [
        f"pcb1.test/{i:06d}" for i in (0, 2, 3)]
    with open(out / "skipped.csv", newline="") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == ["pcb1.test/000001"]

    streamed = tmp_path / "streamed"
    assert cli_main(["predict", "--model", str(tiny_model_dir), "--dataset", str(visa_parquet), "--split", "test",
                     "--streaming", "--output-dir", str(streamed), "--num-workers", "2", "--batch-size", "2",
                     "--no-progress"]) == 0
    assert _scores(streamed) == _scores(out)
    # Resume a streamed run: the rows already in the CSV are skipped in the stream, the rest appended once.
    lines = (streamed / "predictions.csv").read_text().splitlines(keepends=True)
    (streamed / "predictions.csv").write_text("".join(lines[:-3]))
    assert cli_main(["predict", "--model", str(tiny_model_dir), "--dataset", str(visa_parquet), "--split", "test",
                     "--streaming", "--resume", "--output-dir", str(streamed), "--num-workers", "2", "--batch-size", "2",
                     "--no-progress"]) == 0
    assert _scores(streamed) == _scores(out)
    one = tmp_path / "one"
    assert cli_main(["predict", "--model", str(tiny_model_dir), "--dataset", str(visa_parquet), "--split",
                     "pcb1.train", "--output-dir", str(one), "--num-workers", "0", "--no-progress"]) == 0
    assert [row["path"] for row in _rows(one)] == ["pcb1.train/000000", "pcb1.train/000001"]


def test_dataset_errors_name_the_value(tiny_model_dir, visa_parquet, tmp_path, run_cli):
    base = ["predict", "--model", tiny_model_dir, "--dataset", visa_parquet, "--output-dir", tmp_path / "out"]
    completed = run_cli(*base, "--image-column", "picture")
    assert completed.returncode == 2 and "--image-column picture" in completed.stderr
    assert "image, mask, label" in completed.stderr and "Traceback" not in completed.stderr
    completed = run_cli(*base, "--split", "validation")
    assert completed.returncode == 2 and "--split validation" in completed.stderr and "candle.test" in completed.stderr
    completed = run_cli(*base, tmp_path)  # INPUT and --dataset
    assert completed.returncode == 2 and "not both" in completed.stderr


def test_plain_overlays_are_the_bare_blend_and_default_ones_add_the_scale(tiny_model_dir, folder, tmp_path):
    """`--plain-overlays` writes today's overlay (processor.overlay, the image's own size); the default one is the
    same picture on top with the strip of score and colour scale below (test_processor checks the strip)."""
    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor

    files = _image_files(folder)[:2]
    images = [Image.open(p).convert("RGB") for p in files]
    processor = ViP2CLIPProcessor.from_pretrained(tiny_model_dir)
    model = ViP2CLIPModel.from_pretrained(tiny_model_dir).eval()
    expected = {}
    for path, image in zip(files, images):  # one image per forward, as --batch-size 1
        with torch.no_grad():
            anomaly_map = model(pixel_values=processor(images=[image])["pixel_values"]).anomaly_map[0]
        expected[str(path)] = np.asarray(processor.overlay(image, anomaly_map))
    for plain in (True, False):
        out = tmp_path / f"plain_{plain}"
        assert cli_main(["predict", "--model", str(tiny_model_dir), *map(str, files), "--output-dir", str(out),
                         "--batch-size", "1", "--num-workers", "0", "--no-progress",
                         *(["--plain-overlays"] if plain else [])]) == 0
        rows = {row["path"]: row for row in _rows(out)}
        for path, image in zip(files, images):
            overlay = np.asarray(Image.open(out / rows[str(path)]["overlay"]))
            if plain:
                np.testing.assert_array_equal(overlay, expected[str(path)])
            else:
                assert overlay.shape[0] > image.height and overlay.shape[1] >= image.width
                np.testing.assert_array_equal(overlay[:image.height, :image.width], expected[str(path)])
                assert not (overlay[image.height:] == overlay[image.height, 0]).all()  # something is drawn
