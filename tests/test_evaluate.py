"""`vip2clip evaluate`: the per-category table and JSON, NaN categories, bad samples, overlays, interrupted runs
resumed without double counting. Tiny random ViP2CLIP, 32 px synthetic benchmark."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from modeling_vip2clip.cli.main import main as cli_main
from modeling_vip2clip.data import generate_synthetic_benchmark
from modeling_vip2clip.engine.results_store import PartialResults
from modeling_vip2clip.post_processing.metrics import METRIC_KEYS

from launch import launch_two_cpu_processes


# Each run builds its own Accelerator: start every test from a clean singleton state.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """fabric + wood_like: 3 normal, 3 anomalous each; pill_like: normal images only (undefined metrics);
    one corrupt file (dropped by the converter) and one 8x8 image (rejected by the processor)."""
    root = tmp_path_factory.mktemp("eval_bench")
    generate_synthetic_benchmark(root, categories=("fabric", "wood_like"), n_train_good=0, n_test_good=3,
                                 n_test_bad=3, image_size=32, seed=0)
    generate_synthetic_benchmark(root, categories=("pill_like",), n_train_good=0, n_test_good=2, n_test_bad=0,
                                 image_size=32, seed=0)
    (root / "fabric" / "test" / "good" / "099.png").write_bytes(b"this is not a png")
    Image.new("RGB", (8, 8), (120, 30, 200)).save(root / "wood_like" / "test" / "good" / "098.png")
    return root


def _evaluate(tiny_model_dir, bench_dir, out, *extra):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(bench_dir), "--output-dir", str(out),
            "--batch-size", "4", "--num-workers", "0", "--no-progress", *extra]
    assert cli_main(argv) == 0


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, bench_dir, tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("eval_full")
    _evaluate(tiny_model_dir, bench_dir, out, "--save-maps")
    return out, json.loads((out / "results.json").read_text())


def test_table_and_json_are_complete(full_run, bench_dir):
    out, results = full_run
    assert results["dataset"] == bench_dir.name and results["split"] == "test" and results["pro_mode"] == "exact"
    assert set(results["per_category"]) == {"fabric", "pill_like", "wood_like"}
    for category in ("fabric", "wood_like"):
        metrics = results["per_category"][category]
        assert list(metrics) == list(METRIC_KEYS)
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert all(0.0 <= results["mean"][k] <= 1.0 for k in METRIC_KEYS)
    # A category without anomalous images: every metric undefined -> null in the JSON, nan in the table.
    assert all(v is None for v in results["per_category"]["pill_like"].values())
    table = (out / "results.md").read_text()
    heading, table = table.split("| objects", 1)
    table = "| objects" + table
    header = table.splitlines()[0]
    assert all(key in header for key in METRIC_KEYS)
    # The heading says what, how, when, by which version and in which unit; the table holds results.json's numbers.
    assert heading.startswith(f"# {bench_dir.name} (test): vip2clip evaluate")
    for fact in (f"- model: {results['model']}", "split test", "14 of 15 images evaluated", "k-shot: zero-shot",
                 f"- date: {results['date']}; vip2clip {results['package_version']}", "unit: fractions in [0, 1]"):
        assert fact in heading, fact
    assert results["unit"] == "fraction" and results["date"].endswith("Z")
    fabric_row = next(line for line in table.splitlines() if line.startswith("| fabric"))
    assert fabric_row.split("|")[2].strip() == f"{results['per_category']['fabric'][METRIC_KEYS[0]]:.3f}"
    pill_row = next(line for line in table.splitlines() if line.startswith("| pill_like"))
    assert pill_row.count("nan") == len(METRIC_KEYS)
    mean_row = next(line for line in table.splitlines() if line.startswith("| mean"))
    assert "nan" not in mean_row

    # Counts and bad samples: 16 files, 15 rows converted (the corrupt file is dropped by the converter), the 8x8
    # image is rejected by the processor; both are listed with their reasons, neither enters a metric.
    assert results["num_samples"] == 15
    assert results["num_evaluated"] == 14
    assert results["counts"] == {
        "fabric": {"normal": 3, "anomalous": 3, "with_mask": 3},
        "pill_like": {"normal": 2, "anomalous": 0, "with_mask": 0},
        "wood_like": {"normal": 3, "anomalous": 3, "with_mask": 3},
    }
    skipped = {item["image_path"]: item for item in results["skipped"]}
    assert len(skipped) == 2
    corrupt = next(item for path, item in skipped.items() if path.endswith("fabric/test/good/099.png"))
    assert corrupt["index"] is None and corrupt["reason"].startswith("conversion:")
    tiny = next(item for path, item in skipped.items() if path.endswith("wood_like/test/good/098.png"))
    assert isinstance(tiny["index"], int) and "smaller" in tiny["reason"]


# matplotlib's default colour cycle: the n-th category drawn gets the n-th colour.
_CYCLE = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]


def _pixels_of(image: np.ndarray, colour, tolerance: int = 40) -> np.ndarray:
    """(row, col) of the pixels within `tolerance` (per channel) of `colour`."""
    return np.argwhere((np.abs(image - np.array(colour)) <= tolerance).all(axis=-1))


def _distance_to_polyline(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Euclidean distance of each point (P, 2) to the polyline through `vertices` (V, 2)."""
    start, end = vertices[:-1], vertices[1:]
    segment = end - start
    t = ((points[:, None] - start) * segment).sum(-1) / np.maximum((segment**2).sum(-1), 1e-12)
    nearest = start + np.clip(t, 0, 1)[..., None] * segment
    return np.linalg.norm(points[:, None] - nearest, axis=-1).min(axis=1)


def test_save_maps_writes_overlays_and_roc(full_run, tmp_path):
    from sklearn.metrics import roc_curve

    from modeling_vip2clip.engine.report import plot_roc_curves

    out, results = full_run
    overlays = sorted((out / "maps").rglob("*.png"))
    assert len(overlays) == results["num_evaluated"] and all(p.name.endswith(".overlay.png") for p in overlays)
    assert Image.open(overlays[0]).width >= 32 and Image.open(overlays[0]).height > 32  # the strip below
    assert not (out / "partial").exists()  # removed once the results are written

    # The run's ROC picture: a 6.4 x 6.0 in figure at 120 dpi, not blank; one curve per category with both
    # classes (fabric, wood_like: the first two colours), none for pill_like (normal images only).
    with Image.open(out / "roc_curves.png") as png:
        assert png.format == "PNG" and png.size == (768, 720)
        picture = np.asarray(png.convert("RGB")).astype(int)
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50
    assert len(_pixels_of(picture, _CYCLE[0], 10)) > 100 and len(_pixels_of(picture, _CYCLE[1], 10)) > 100
    assert len(_pixels_of(picture, _CYCLE[2], 10)) == 0

    # What is drawn is sklearn's roc_curve: the same plotting code on known scores, the curve read back from
    # the pixels. The axes frame (black spines) maps pixels to (FPR, TPR); x spans [0, 1], y [0, 1.01].
    labels = [0, 1, 0, 1, 1, 0]
    scores = [0.1, 0.9, 0.4, 0.35, 0.8, 0.2]
    fpr, tpr, _ = roc_curve(labels, scores)  # (0, 0) (0, 2/3) (1/3, 2/3) (1/3, 1) (1, 1)
    plot_roc_curves({"known": (labels, scores)}, tmp_path / "roc.png")
    picture = np.asarray(Image.open(tmp_path / "roc.png").convert("RGB")).astype(int)
    black = picture.sum(axis=-1) == 0
    left, right = np.nonzero(black.sum(axis=0) > 0.4 * picture.shape[0])[0][[0, -1]]
    top, bottom = np.nonzero(black.sum(axis=1) > 0.4 * picture.shape[1])[0][[0, -1]]
    vertices = np.stack([left + fpr * (right - left), bottom - tpr / 1.01 * (bottom - top)], axis=1)  # (x, y) px

    def above_chance(points):  # the legend's sample line sits below the diagonal (lower right): left out
        return (bottom - points[:, 1]) / (bottom - top) * 1.01 > (points[:, 0] - left) / (right - left) + 0.05

    curve = _pixels_of(picture, _CYCLE[0])[:, ::-1].astype(float)  # (x, y) px
    curve = curve[above_chance(curve)]
    assert len(curve) > 300
    assert _distance_to_polyline(curve, vertices).max() <= 3.0  # every drawn pixel lies on sklearn's curve ...
    samples = np.concatenate([np.linspace(a, b, 40) for a, b in zip(vertices[:-1], vertices[1:])])
    samples = samples[above_chance(samples) & (samples[:, 0] > left + 4)]  # (the left spine covers x = 0)
    gaps = np.linalg.norm(samples[:, None] - curve[None], axis=-1).min(axis=1)
    assert gaps.max() <= 3.0  # ... and all of it is drawn
    # The dashed grey chance line is the diagonal (grey text outside the frame and in the legend left out).
    grey = _pixels_of(picture, (153, 153, 153), 8)[:, ::-1].astype(float)
    x, y = (grey[:, 0] - left) / (right - left), (bottom - grey[:, 1]) / (bottom - top) * 1.01
    chance = grey[(x > 0.01) & (x < 0.99) & (y > 0.01) & (y < 1.0) & (y > x - 0.2)]
    diagonal = np.array([[left, bottom], [right, bottom - (bottom - top) / 1.01]], dtype=float)
    assert len(chance) > 100 and _distance_to_polyline(chance, diagonal).max() <= 3.0


def test_interrupted_evaluation_resumes_without_double_counting(full_run, tiny_model_dir, bench_dir, tmp_path):
    _, reference = full_run
    out = tmp_path / "eval"
    _evaluate(tiny_model_dir, bench_dir, out, "--max-batches", "2")
    assert not (out / "results.json").exists()
    partial = PartialResults(out / "partial")
    assert len(partial.done_indices()) == 8  # 2 batches of 4 of the 15 rows

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    _evaluate(tiny_model_dir, bench_dir, out, "--resume")
    _assert_same_results(json.loads((out / "results.json").read_text()), reference, tolerance=1e-9)


def _assert_same_results(results: dict, reference: dict, tolerance: float) -> None:
    """Same samples counted and skipped, every metric within `tolerance` (undefined ones undefined in both)."""
    assert results["num_samples"] == reference["num_samples"] and results["num_evaluated"] == reference["num_evaluated"]
    assert results["counts"] == reference["counts"]
    assert sorted(map(json.dumps, results["skipped"])) == sorted(map(json.dumps, reference["skipped"]))
    for category, metrics in reference["per_category"].items():
        for key, value in metrics.items():
            got = results["per_category"][category][key]
            assert (got is None and value is None) or got == pytest.approx(value, abs=tolerance), (category, key)


def test_partial_results_deduplicate_by_index(tmp_path):
    partial = PartialResults(tmp_path / "partial")
    partial.start({"x": 1}, keep=False)

    def batch(indices, score):
        n = len(indices)
        arrays = {"index": np.array(indices), "score": np.full(n, score), "map": np.zeros((n, 4, 4), np.float32),
                  "mask": np.zeros((n, 4, 4), np.uint8), "label": np.zeros(n, np.int64),
                  "has_mask": np.zeros(n, bool), "bad": np.zeros(n, bool)}
        strings = {"category": ["a"] * n, "image_path": [f"{i}.png" for i in indices], "error": [""] * n}
        return arrays, strings

    partial.write("r001_b000001", *batch([0, 1, 2], 0.1))
    partial.write("r002_b000001", *batch([2, 3], 0.9))  # index 2 again, e.g. Accelerate's padding or a rerun
    (tmp_path / "partial" / "r003_b000001.tmp").mkdir()  # an interrupted write is ignored
    records = partial.records()
    assert list(records) == [0, 1, 2, 3]
    assert records[2]["score"] == pytest.approx(0.1)  # the first result of a sample wins
    assert partial.done_indices() == {0, 1, 2, 3}
    assert partial.meta_matches({"x": 1}) and not partial.meta_matches({"x": 2})


def test_resume_with_other_dataset_starts_over(full_run, tiny_model_dir, bench_dir, tmp_path):
    out = tmp_path / "eval"
    (out / "partial" / "r001_b000001").mkdir(parents=True)
    (out / "partial" / "meta.json").write_text(json.dumps({"model": "something else"}))
    _evaluate(tiny_model_dir, bench_dir, out, "--resume")
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == full_run[1]["counts"]
    assert not math.isnan(results["mean"]["image_auroc"])


def test_two_cpu_processes_match_one_process(full_run, tiny_model_dir, bench_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes: the shards are gathered without the samples Accelerate repeats to
    even out the last batch (15 rows over 2 x batch 4), so every count and metric equals the one-process run."""
    _, reference = full_run
    completed = launch_two_cpu_processes(
        "modeling_vip2clip.cli.evaluate", "--model", str(tiny_model_dir), "--dataset", str(bench_dir),
        "--output-dir", str(tmp_path / "ddp"), "--batch-size", "4", "--num-workers", "0", "--no-progress",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "terminate called" not in completed.stderr
    # Not bit-equal: each process runs other batch shapes on one thread, so maps differ at float rounding (~1e-7)
    # and near-tied pixels may swap ranks; a dropped or doubled sample moves a metric by > 1e-2.
    _assert_same_results(json.loads((tmp_path / "ddp" / "results.json").read_text()), reference, tolerance=1e-4)


def test_other_schema_parquet_with_renamed_columns(tiny_model_dir, tmp_path):
    """A Hub-style parquet dataset (BrachioLab/visa layout: one split per class, `<class>.test`) whose columns have
    other names: `--image-column/--label-column/--mask-column` map it, the category comes from the split name,
    and the metrics equal those computed here from the model's own outputs on the same images."""
    import datasets
    import torch

    from modeling_vip2clip.post_processing.metrics import compute_category_metrics
    from modeling_vip2clip.weights.loader import load_model_and_processor
    from test_data import _visa_like_parquet

    expected = _visa_like_parquet(tmp_path / "raw")
    root = tmp_path / "renamed"
    for path in (tmp_path / "raw" / "data").glob("*.parquet"):
        table = datasets.Dataset.from_parquet(str(path)).rename_columns({"image": "img", "mask": "gt", "label": "y"})
        (root / "data").mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(root / "data" / path.name))
    out = tmp_path / "eval"
    _evaluate(tiny_model_dir, root, out, "--image-column", "img", "--mask-column", "gt", "--label-column", "y")
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_category"]) == {"candle", "pcb1"}
    model, processor = load_model_and_processor(str(tiny_model_dir))
    for category in ("candle", "pcb1"):
        rows = [expected[(f"{category}.test", i)] for i in range(3)]
        assert results["counts"][category] == {"normal": 1, "anomalous": 2, "with_mask": 2}
        inputs = processor(images=[Image.fromarray(image) for _, image, _ in rows],
                           masks=[Image.fromarray(mask) for _, _, mask in rows])
        with torch.no_grad():
            output = model(pixel_values=inputs["pixel_values"])
        mine = compute_category_metrics(np.array([label for label, _, _ in rows]), output.anomaly_score.numpy(),
                                        (inputs["masks"].numpy() > 0.5).astype(np.uint8), output.anomaly_map.numpy())
        for key, value in mine.items():  # 1e-4: other batch shapes round the maps differently (near-tied pixels)
            assert results["per_category"][category][key] == pytest.approx(value, abs=1e-4), (category, key)


def test_k_shot_draws_references_from_the_reference_split_and_reports_them(tiny_model_dir, tmp_path, capsys):
    """`--k-shot 1 --shot-seeds 0 1`: per category one normal image drawn per seed from `--reference-split train`
    (never the evaluated test split), listed in results.json, reproducible from the seeds, and each seed's metrics
    equal a direct computation with a bank built here from the listed references."""
    import torch

    from modeling_vip2clip.data import load_anomaly_dataset
    from modeling_vip2clip.post_processing.metrics import compute_category_metrics
    from modeling_vip2clip.engine.references import bank_from_images, draw_references
    from modeling_vip2clip.weights.loader import load_model_and_processor

    raw = tmp_path / "raw"
    generate_synthetic_benchmark(raw, categories=("fabric", "wood_like"), n_train_good=3, n_test_good=2, n_test_bad=2,
                                 image_size=32, seed=1)
    out = tmp_path / "eval"
    _evaluate(tiny_model_dir, raw, out, "--k-shot", "1", "--shot-seeds", "0", "1")
    assert "±" in capsys.readouterr().out  # mean ± std over the two seeds
    results = json.loads((out / "results.json").read_text())
    assert results["k_shot"] == 1 and results["shot_seeds"] == [0, 1] and results["reference_split"] == "train"
    reference_set = load_anomaly_dataset(raw, split="train")
    model, processor = load_model_and_processor(str(tiny_model_dir))
    test_set = load_anomaly_dataset(raw, split="test")
    for seed in (0, 1):
        references = results["references"][str(seed)]
        drawn = draw_references(reference_set, 1, seed)
        assert references == {c: [reference_set[r]["image_path"] for r in rows] for c, rows in drawn.items()}
        for category, paths in references.items():
            assert len(paths) == 1 and "/train/good/" in paths[0]
            bank = bank_from_images(model, processor, [Image.open(raw / paths[0])])
            rows = [row for row in test_set if row["category"] == category]
            inputs = processor(images=[row["image"] for row in rows], masks=[row["mask"] for row in rows])
            with torch.no_grad():
                output = model(pixel_values=inputs["pixel_values"], reference_bank=bank)
            mine = compute_category_metrics(np.array([row["label"] for row in rows]), output.anomaly_score.numpy(),
                                            (inputs["masks"].numpy() > 0.5).astype(np.uint8), output.anomaly_map.numpy())
            for key, value in mine.items():
                assert results["per_seed"][str(seed)]["per_category"][category][key] == pytest.approx(value, abs=1e-4)
    for key, value in results["mean"].items():  # the headline numbers: the mean over the seeds
        seeds_mean = np.mean([results["per_seed"][s]["mean"][key] for s in ("0", "1")])
        assert value == pytest.approx(seeds_mean, abs=1e-12)


def test_k_shot_refuses_references_from_the_evaluated_split(tiny_model_dir, bench_dir, tmp_path, capsys):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(bench_dir), "--output-dir", str(tmp_path),
            "--k-shot", "1", "--reference-split", "test"]
    assert cli_main(argv) == 2
    assert "--reference-split test" in capsys.readouterr().err


def test_report_html_has_metrics_curves_and_worst_images(full_run):
    """report.html of the full run: the header, the metrics table, ROC and PR as inline SVG, per category the
    highest-scored normal and lowest-scored anomalous images (as many as there are, up to 6) with embedded maps,
    and the skipped inputs; nothing is fetched from elsewhere."""
    import re

    out, results = full_run
    page = (out / "report.html").read_text(encoding="utf-8")
    assert results["model"] in page and results["date"][:10] in page
    assert "<dt>vip2clip</dt><dd>" + results["package_version"] in page
    assert page.count("<svg") == 2 and 'id="roc"' in page and 'id="pr"' in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched: thumbnails embedded, links relative
    for category, counts in results["counts"].items():
        section = re.search(rf'<section class="category" data-category="{category}">(.*?)</section>', page, re.S)
        assert section, category
        blocks = section.group(1).split("<h3>")[1:]
        assert len(blocks) == 2
        for block, count in zip(blocks, (counts["normal"], counts["anomalous"])):
            scores = [float(v) for v in re.findall(r'data-score="([0-9.]+)"', block)]
            assert len(scores) == min(count, 6) and block.count("data:image/jpeg;base64,") == len(scores)
            # normal: highest first; anomalous: lowest first
            assert scores == sorted(scores, reverse="normal images" in block.split("</h3>")[0])
    for item in results["skipped"]:
        assert item["image_path"] in page
    for category, metrics in results["per_category"].items():
        value = metrics[METRIC_KEYS[0]]
        if value is not None:
            assert f"<td>{value:.3f}</td>" in page


def test_defect_folders_without_known_names_are_one_error_with_the_command_that_reads_them(tiny_model_dir, tmp_path,
                                                                                          capsys):
    """A user's folder good/ + scratch/ + dent/: the defect folders have no anomalous name, so only the normal
    images were read; evaluate says so in one line naming a command that exists (was: exit 0, a table of NaN,
    and `--layout folder` flags evaluate does not have, printed twice)."""
    import shlex

    root = tmp_path / "line3"
    for folder, count in (("good", 3), ("scratch", 2), ("dent", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.random.default_rng(len(folder) * 10 + i).integers(0, 256, (32, 32, 3), np.uint8)).save(
                root / folder / f"{i}.png")
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_model_dir), "--output-dir", str(out), "--num-workers", "0", "--no-progress"]
    # a fresh process: its stderr holds the converter's logged warning too (counted below)
    run = subprocess.run([sys.executable, "-m", "modeling_vip2clip.cli", "evaluate", "--dataset", str(root), *argv],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr[-3000:]
    err = run.stderr
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and lines[0] == err.splitlines()[-1], err
    assert lines[0].startswith(f"error: --dataset {root} ({root}): no anomalous image to evaluate against, only 3 "
                               "normal and 0 unlabelled ones"), lines[0]
    assert "sub-folders dent/, scratch/ are neither normal nor anomalous" in lines[0]
    assert "pass --layout folder" not in err and err.count("were not converted") == 1  # the warning, once
    assert not out.exists()
    command = lines[0].split("convert it naming them, ", 1)[1].split(", then run", 1)[0]
    converted = tmp_path / "converted"
    assert cli_main(shlex.split(command.replace("--out CONVERTED", f"--out {converted}"))[1:]) == 0
    assert cli_main(["evaluate", "--dataset", str(converted), *argv]) == 0
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["mean"]["image_auroc"])
