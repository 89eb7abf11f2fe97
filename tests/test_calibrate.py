"""Calibrated thresholds (issue 13): the F1-max threshold functions of `modeling_vip2clip.post_processing.metrics` against an
independent computation (scikit-learn's `precision_recall_curve`), the config fields that carry them, and
`vip2clip calibrate` end to end on a tiny model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from modeling_vip2clip.post_processing.metrics import (
    MetricUndefinedWarning,
    f1_max,
    f1_max_threshold,
    pixel_f1_max,
    pixel_f1_max_threshold,
)


def sklearn_f1_max_threshold(labels, scores) -> tuple[float, float]:
    """F1-max and its threshold from scikit-learn: the first maximum over its ascending thresholds (the lowest
    threshold reaching the best F1 of "anomalous when score >= threshold")."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1])
    best = int(np.nanargmax(np.where(np.isfinite(f1), f1, np.nan)))
    return float(f1[best]), float(thresholds[best])


@pytest.mark.parametrize("seed", range(12))
def test_image_f1_max_threshold_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 80))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Ties (coarse grid) on even seeds, float32 on odd ones.
    scores = rng.integers(0, 6, n) / 5.0 if seed % 2 == 0 else rng.random(n).astype(np.float32)
    f1, threshold = f1_max_threshold(labels, scores)
    expected_f1, expected_threshold = sklearn_f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(expected_f1, abs=1e-12) and threshold == expected_threshold
    assert f1 == pytest.approx(f1_max(labels, scores), abs=1e-12)
    # The threshold is a decision rule: applying it reproduces the F1.
    predicted = np.asarray(scores) >= threshold
    tp = int((predicted & (labels == 1)).sum())
    assert 2 * tp / (predicted.sum() + (labels == 1).sum()) == pytest.approx(f1, abs=1e-12)


def test_f1_max_threshold_prefers_the_lowest_threshold_on_ties():
    # Thresholds 0.9 and 0.2 both give F1 = 2/3 (one TP; or two TPs and two FPs): the lower one wins, as in sklearn.
    labels = [1, 0, 1, 0, 0]
    scores = [0.9, 0.5, 0.2, 0.2, 0.1]
    assert f1_max_threshold(labels, scores) == sklearn_f1_max_threshold(labels, scores)


@pytest.mark.parametrize("seed", range(6))
def test_pixel_f1_max_threshold_equals_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    masks = np.zeros((4, 24, 24), dtype=np.uint8)
    for image in range(1, 4):  # rectangles of defect on three of the four maps
        y, x = rng.integers(0, 16, 2)
        masks[image, y:y + 6, x:x + 5] = 255
    maps = np.clip(rng.normal(0.3, 0.15, masks.shape) + 0.3 * (masks > 0), 0, 1).astype(np.float32)
    if seed % 2:
        maps = np.round(maps * 20) / 20  # many tied pixels
    f1, threshold = pixel_f1_max_threshold(masks, maps)
    expected_f1, expected_threshold = sklearn_f1_max_threshold(masks > 127, maps)
    assert f1 == pytest.approx(expected_f1, abs=1e-12) and threshold == expected_threshold
    assert f1 == pytest.approx(pixel_f1_max(masks, maps), abs=1e-12)


def test_thresholds_undefined_with_one_class():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = f1_max_threshold([0, 0, 0], [0.1, 0.2, 0.3])
        pixel = pixel_f1_max_threshold(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4))
    assert all(math.isnan(v) for v in (*image, *pixel))
    assert sum(issubclass(w.category, MetricUndefinedWarning) for w in caught) == 2


# ---------------------------------------------------------------------------------------------------- config


def test_config_threshold_fields_are_optional_typed_and_validated(tiny_config):
    from modeling_vip2clip import ViP2CLIPConfig

    assert tiny_config.image_threshold is None and tiny_config.pixel_threshold is None
    assert tiny_config.calibration is None
    calibrated = ViP2CLIPConfig(**{**tiny_config.to_dict(), "image_threshold": 0.42, "pixel_threshold": 0.6,
                                   "calibration": {"dataset": "d", "num_images": 3}})
    again = ViP2CLIPConfig.from_dict(calibrated.to_dict())
    assert (again.image_threshold, again.pixel_threshold, again.calibration["dataset"]) == (0.42, 0.6, "d")
    for bad in ({"image_threshold": 1.5}, {"pixel_threshold": -0.1}, {"image_threshold": float("nan")}):
        with pytest.raises(Exception, match="outside \\[0, 1\\]"):
            ViP2CLIPConfig(**{**tiny_config.to_dict(), **bad})
    with pytest.raises(Exception):
        ViP2CLIPConfig(**{**tiny_config.to_dict(), "image_threshold": "high"})


# ---------------------------------------------------------------------------------------------------- calibrate


def _png(array: np.ndarray) -> dict:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def labelled_parquet(tmp_path_factory):
    """A labelled set in the `BrachioLab/visa` layout (parquet; image / mask / label; `<class>.test` splits):
    per class 4 normal images (no mask) and 4 anomalous ones with a bright patch and its mask; one anomalous
    image of pcb1 has no mask (image threshold only)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    root = tmp_path_factory.mktemp("labelled")
    (root / "data").mkdir()
    features = Features({"image": ImageFeature(), "mask": ImageFeature(), "label": Value("int64")})
    rng = np.random.default_rng(0)
    for number, name in enumerate(("candle", "pcb1")):
        images, masks, labels = [], [], []
        for index in range(8):
            image = np.clip(rng.normal(110 + 20 * number, 25, (32, 40, 3)), 0, 255).astype(np.uint8)
            mask = None
            if index >= 4:
                y, x = rng.integers(2, 18, 2)
                mask = np.zeros((32, 40), np.uint8)
                mask[y:y + 10, x:x + 12] = 255
                image[mask > 0] = rng.integers(200, 255, 3)
                mask = None if (name == "pcb1" and index == 7) else _png(mask)
            images.append(_png(image))
            masks.append(mask)
            labels.append(int(index >= 4))
        Dataset.from_dict({"image": images, "mask": masks, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"{name}.test-00000-of-00001.parquet"))
        Dataset.from_dict({"image": images[:2], "mask": [None, None], "label": [0, 0]}, features=features).to_parquet(
            str(root / "data" / f"{name}.train-00000-of-00001.parquet"))
    return root


def _independent_outputs(model_dir, parquet_root, splits):
    """Labels, image scores, and the (mask, map) pairs of the pixel threshold — by hand: parquet read with
    `datasets`, the processor and the model called directly."""
    import torch
    from datasets import load_dataset

    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPImageProcessor

    model = ViP2CLIPModel.from_pretrained(model_dir).eval()
    processor = ViP2CLIPImageProcessor.from_pretrained(model_dir)
    labels, scores, masks, maps = [], [], [], []
    for split in splits:
        rows = load_dataset(str(parquet_root), split=split)
        features = processor(images=list(rows["image"]), masks=list(rows["mask"]))
        with torch.no_grad():  # one image per forward, as `calibrate --batch-size 1`: the same float rounding
            outputs = [model(pixel_values=pixels[None]) for pixels in features["pixel_values"]]
        for label, mask_given, output, mask in zip(rows["label"], rows["mask"], outputs, features["masks"]):
            score, anomaly_map = output.anomaly_score[0], output.anomaly_map[0]
            labels.append(label)
            scores.append(float(score))
            if label == 0 or mask_given is not None:
                masks.append(mask.numpy())
                maps.append(anomaly_map.numpy())
    return np.array(labels), np.array(scores, dtype=np.float32), np.stack(masks), np.stack(maps)


def test_calibrate_writes_the_f1_max_thresholds_into_a_copy_of_the_model(tiny_model_dir, labelled_parquet, tmp_path,
                                                                          capsys):
    import json

    from modeling_vip2clip import ViP2CLIPConfig
    from modeling_vip2clip.cli.main import main as cli_main

    out = tmp_path / "calibrated"
    assert cli_main(["calibrate", "--model", str(tiny_model_dir), "--dataset", str(labelled_parquet), "--out", str(out),
                     "--batch-size", "1", "--num-workers", "2", "--no-progress"]) == 0
    config = ViP2CLIPConfig.from_pretrained(out)
    labels, scores, masks, maps = _independent_outputs(tiny_model_dir, labelled_parquet, ["candle.test", "pcb1.test"])
    image_f1, image_threshold = sklearn_f1_max_threshold(labels, scores)
    pixel_f1, pixel_threshold = sklearn_f1_max_threshold(masks > 0.5, maps)
    assert (config.image_threshold, config.pixel_threshold) == (image_threshold, pixel_threshold)
    info = config.calibration
    assert info["image_f1_max"] == pytest.approx(image_f1, abs=1e-12)
    assert info["pixel_f1_max"] == pytest.approx(pixel_f1, abs=1e-12)
    assert (info["num_images"], info["num_normal"], info["num_anomalous"], info["num_anomalous_with_mask"]) == (16, 8, 8, 7)
    assert info["splits"] == ["candle.test", "pcb1.test"] and info["categories"] == ["candle", "pcb1"]
    assert info["dataset"] == labelled_parquet.name and info["num_skipped"] == 0
    # The weights are M's, byte for byte; the processor's settings are M's; the config changed only in the thresholds
    # and in what the model-folder writer adds to every folder (auto_map, custom_pipelines).
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    writer_keys = ("auto_map", "custom_pipelines")
    original = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    rewritten = json.loads((out / "preprocessor_config.json").read_text())
    assert {k: v for k, v in rewritten.items() if k not in writer_keys} == {
        k: v for k, v in original.items() if k not in writer_keys}
    calibrated = ("image_threshold", "pixel_threshold", "calibration")
    original = json.loads((tiny_model_dir / "config.json").read_text())
    rewritten = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in rewritten.items() if k not in calibrated + writer_keys} == {
        k: v for k, v in original.items() if k not in calibrated + writer_keys}
    assert rewritten["custom_pipelines"]["anomaly-detection"]["impl"] == "pipeline_vip2clip.ViP2CLIPAnomalyDetectionPipeline"
    assert "image_threshold" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*"))  # no staging folder left beside --out

    # The thresholds travel: the pipeline's defaults are the calibrated ones.
    from PIL import Image

    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPImageProcessor
    from modeling_vip2clip.pipeline_vip2clip import ViP2CLIPAnomalyDetectionPipeline

    detector = ViP2CLIPAnomalyDetectionPipeline(model=ViP2CLIPModel.from_pretrained(out).eval(),
                                                image_processor=ViP2CLIPImageProcessor.from_pretrained(out))
    image = Image.fromarray(np.full((32, 40, 3), 120, np.uint8))
    result = detector(image)
    assert result["is_anomalous"] == (result["score"] >= config.image_threshold)
    np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, result["anomaly_map"] >= config.pixel_threshold)
    forced = detector(image, threshold=0.0, score_threshold=0.0)
    assert forced["is_anomalous"] and np.asarray(forced["mask"]).min() == 255


def test_two_cpu_processes_write_the_thresholds_of_one_process(tiny_model_dir, labelled_parquet, tmp_path):
    """`accelerate launch` with 2 CPU processes (Accelerate's PartialState, as predict): the images are sharded over
    the processes and their scores gathered; the same thresholds and counts as one process, one folder, one
    summary."""
    from launch import launch_two_cpu_processes

    from modeling_vip2clip import ViP2CLIPConfig
    from modeling_vip2clip.cli.main import main as cli_main

    argv = ["--model", str(tiny_model_dir), "--dataset", str(labelled_parquet), "--batch-size", "1",
            "--num-workers", "0", "--no-progress"]
    assert cli_main(["calibrate", *argv, "--out", str(tmp_path / "single")]) == 0
    completed = launch_two_cpu_processes("modeling_vip2clip.cli.calibrate", *argv, "--out", str(tmp_path / "double"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    one = ViP2CLIPConfig.from_pretrained(tmp_path / "single")
    two = ViP2CLIPConfig.from_pretrained(tmp_path / "double")
    assert two.image_threshold == pytest.approx(one.image_threshold, abs=1e-6)
    assert two.pixel_threshold == pytest.approx(one.pixel_threshold, abs=1e-6)
    counts = ("num_images", "num_normal", "num_anomalous", "num_anomalous_with_mask", "num_skipped", "splits",
              "categories")
    assert {key: two.calibration[key] for key in counts} == {key: one.calibration[key] for key in counts}
    assert two.calibration["num_images"] == 16
    assert completed.stdout.count("calibrated on") == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_calibrate_one_category_of_a_canonical_dataset(tiny_model_dir, tmp_path):
    from modeling_vip2clip import ViP2CLIPConfig
    from modeling_vip2clip.cli.main import main as cli_main
    from modeling_vip2clip.data import convert, generate_synthetic_benchmark

    raw = tmp_path / "raw"
    generate_synthetic_benchmark(raw, categories=("fabric", "tile"), n_train_good=0, n_test_good=3, n_test_bad=3,
                                 image_size=32, layout="meta_json")
    dataset, _ = convert(raw, split="test")
    dataset.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "calibrated"
    assert cli_main(["calibrate", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "ds"), "--categories",
                     "tile", "--out", str(out), "--num-workers", "0", "--no-progress", "--dataset-name", "synthetic"]) == 0
    config = ViP2CLIPConfig.from_pretrained(out)
    tile = dataset.filter(lambda c: c == "tile", input_columns="category")
    import torch

    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPImageProcessor

    model = ViP2CLIPModel.from_pretrained(tiny_model_dir).eval()
    processor = ViP2CLIPImageProcessor.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        scores = model(pixel_values=processor(images=list(tile["image"]))["pixel_values"]).anomaly_score.numpy()
    assert config.image_threshold == pytest.approx(sklearn_f1_max_threshold(tile["label"], scores)[1], abs=1e-6)
    assert config.calibration["dataset"] == "synthetic" and config.calibration["num_images"] == len(tile) == 6
    assert config.calibration["categories"] == ["tile"]


@pytest.mark.parametrize("extra, named", [
    (["--label-column", "target"], "--label-column target"),
    (["--image-column", "picture"], "--image-column picture"),
])
def test_calibrate_usage_errors(tiny_model_dir, labelled_parquet, tmp_path, extra, named, run_cli):
    completed = run_cli("calibrate", "--model", tiny_model_dir, "--dataset", labelled_parquet, "--out",
                        tmp_path / "out", "--num-workers", "0", "--no-progress", *extra)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert named in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "out").exists()


def test_calibrate_refuses_to_overwrite(tiny_model_dir, labelled_parquet, tmp_path, capsys):
    from modeling_vip2clip.cli.main import main as cli_main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["calibrate", "--model", str(tiny_model_dir), "--dataset", str(labelled_parquet), "--out", str(out),
            "--num-workers", "0", "--no-progress"]
    assert cli_main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli_main(["calibrate", "--model", str(tiny_model_dir), "--dataset", str(labelled_parquet), "--out",
                     str(tiny_model_dir), "--overwrite", "--no-progress"]) == 2
    assert cli_main([*argv, "--overwrite"]) == 0
    # --overwrite replaces only what vip2clip writes (docs/reliability.md): the user's own file stays.
    assert (out / "keep.txt").read_text() == "mine" and (out / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------- normal-only


@pytest.mark.parametrize("seed", range(10))
def test_false_alarm_threshold_equals_numpys_quantile(seed):
    from modeling_vip2clip.post_processing.thresholds import false_alarm_threshold

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    scores = rng.beta(2, 5, n) if seed % 2 else np.round(rng.random(n) * 10) / 10  # ties on even seeds
    for rate in (0.001, 0.01, 0.05, 0.3):
        threshold = false_alarm_threshold(scores, rate)
        assert threshold == pytest.approx(float(np.quantile(scores, 1 - rate)), abs=1e-12)
        if seed % 2 and n >= 100:  # no ties: about `rate` of the normal scores are at or above it
            assert abs(float((scores >= threshold).mean()) - rate) <= 1.0 / n + 1e-12


def test_false_alarm_threshold_rejects_bad_input():
    from modeling_vip2clip.post_processing.thresholds import false_alarm_threshold, min_images_for_rate

    for rate in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            false_alarm_threshold([0.1, 0.2], rate)
    with pytest.raises(ValueError, match="no normal scores"):
        false_alarm_threshold([], 0.01)
    assert (min_images_for_rate(0.01), min_images_for_rate(0.05), min_images_for_rate(0.001)) == (1000, 200, 10000)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_quantile_is_within_a_bin_of_numpys_quantile(seed):
    from modeling_vip2clip.post_processing.thresholds import PixelQuantile

    rng = np.random.default_rng(seed)
    maps = rng.beta(2, 6, (7, 40, 40)).astype(np.float32)
    quantile = PixelQuantile()
    for anomaly_map in maps:
        quantile.add(anomaly_map)
    assert quantile.count == maps.size
    for rate in (0.001, 0.01, 0.2):
        assert abs(quantile.threshold(rate) - float(np.quantile(maps, 1 - rate))) <= 0.5 / quantile.bins + 1e-9


def _good_parts(root, count):
    from PIL import Image

    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.clip(rng.normal(120, 20, (32 + index % 3, 36, 3)), 0, 255).astype(np.uint8)).save(
            root / f"good_{index:02d}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_calibrate_from_normal_images_sets_the_false_alarm_quantiles(tiny_model_dir, tmp_path, capsys, caplog):
    """--normal-images: the thresholds equal numpy's quantiles of the model's own scores and maps (computed here
    by hand), the provenance names the method, rate and count, and too few images for the rate warn."""
    import torch

    from modeling_vip2clip import ViP2CLIPConfig, ViP2CLIPModel, ViP2CLIPProcessor
    from modeling_vip2clip.cli.main import main as cli_main

    good = _good_parts(tmp_path / "good", 12)
    out = tmp_path / "calibrated"
    with caplog.at_level("WARNING"):
        assert cli_main(["calibrate", "--model", str(tiny_model_dir), "--normal-images", str(good), "--out", str(out),
                         "--false-alarm-rate", "0.1", "--batch-size", "1", "--num-workers", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "12 normal images" in captured.out
    config = ViP2CLIPConfig.from_pretrained(out)

    from PIL import Image

    model = ViP2CLIPModel.from_pretrained(tiny_model_dir).eval()
    processor = ViP2CLIPProcessor.from_pretrained(tiny_model_dir)
    scores, maps = [], []
    for path in sorted(good.glob("good_*.png")):
        with torch.no_grad():
            output = model(pixel_values=processor(images=[Image.open(path).convert("RGB")])["pixel_values"])
        scores.append(float(output.anomaly_score[0]))
        maps.append(output.anomaly_map[0].numpy())
    assert config.image_threshold == pytest.approx(float(np.quantile(scores, 0.9)), abs=1e-6)
    assert abs(config.pixel_threshold - float(np.quantile(np.stack(maps), 0.9))) <= 0.5 / 65536 + 1e-6
    info = config.calibration
    assert info["method"].startswith("normal-only quantile") and info["false_alarm_rate"] == 0.1
    assert (info["num_images"], info["num_skipped"], info["min_images_for_rate"]) == (12, 1, 100)
    assert "only 12 normal images" in info["warning"] and "only 12 normal images" in caplog.text


def test_calibrate_a_dataset_of_normal_rows_uses_the_normal_only_route(tiny_model_dir, labelled_parquet, tmp_path):
    """The .train splits hold normal images only: no F1-max is possible, the false-alarm quantile is used."""
    from modeling_vip2clip import ViP2CLIPConfig
    from modeling_vip2clip.cli.main import main as cli_main

    out = tmp_path / "calibrated"
    assert cli_main(["calibrate", "--model", str(tiny_model_dir), "--dataset", str(labelled_parquet), "--split",
                     "train", "--out", str(out), "--num-workers", "0", "--no-progress"]) == 0
    info = ViP2CLIPConfig.from_pretrained(out).calibration
    assert info["method"].startswith("normal-only quantile") and info["false_alarm_rate"] == 0.01
    assert info["num_images"] == 4 and info["splits"] == ["candle.train", "pcb1.train"]


@pytest.mark.parametrize("extra, named", [
    (["--normal-images", "no/such/folder"], "--normal-images no/such/folder: no image files found"),
    (["--normal-images", "x", "--false-alarm-rate", "1.5"], "--false-alarm-rate"),
])
def test_normal_only_usage_errors(tiny_model_dir, tmp_path, extra, named, capsys):
    from modeling_vip2clip.cli.main import main as cli_main

    try:
        code = cli_main(["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--no-progress",
                         *extra])
    except SystemExit as exit_:  # argparse's own check of the option's type
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
