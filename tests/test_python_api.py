"""The jobs' Python entry points (`modeling_vip2clip.predict / evaluate / calibrate / train / export`), called with
keyword arguments and no argparse, write what their commands write: the same CSV, results.json, thresholds, model
and exported files. Tiny random model, 32 px synthetic images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import modeling_vip2clip
from modeling_vip2clip.cli.main import main as cli_main
from modeling_vip2clip.data import convert, generate_synthetic_benchmark

TINY = {"image_size": 32, "feature_layers": [1, 2], "n_ctx": 3, "n_cls": 2, "top_k": 5}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A raw benchmark folder: 2 categories x (2 normal + 2 anomalous with masks) test images."""
    root = tmp_path_factory.mktemp("api_bench")
    generate_synthetic_benchmark(root, categories=("fabric", "tile"), n_train_good=0, n_test_good=2, n_test_bad=2,
                                 image_size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def saved(bench, tmp_path_factory) -> Path:
    """The same benchmark converted and saved (what `vip2clip convert` writes)."""
    dataset, _ = convert(bench, split="test", progress=False)
    out = tmp_path_factory.mktemp("api_saved") / "ds"
    dataset.save_to_disk(str(out))
    return out


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_the_jobs_are_exported_by_the_package():
    from modeling_vip2clip.deploy.export import export
    from modeling_vip2clip.engine.calibration import calibrate
    from modeling_vip2clip.engine.evaluation import evaluate
    from modeling_vip2clip.engine.prediction import predict
    from modeling_vip2clip.engine.training import train

    assert (modeling_vip2clip.predict, modeling_vip2clip.evaluate, modeling_vip2clip.calibrate,
            modeling_vip2clip.train, modeling_vip2clip.export) == (predict, evaluate, calibrate, train, export)
    with pytest.raises(TypeError, match="no_such_option"):  # options are checked, not silently dropped
        predict("unused", ["x.png"], "out", no_such_option=1)


def test_predict_equals_the_command(tiny_model_dir, bench, tmp_path):
    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor

    images = bench / "fabric" / "test"
    assert cli_main(["predict", "--model", str(tiny_model_dir), str(images), "--output-dir", str(tmp_path / "cli"),
                     "--batch-size", "2", "--num-workers", "0", "--save-maps", "npy", "--threshold", "0.4",
                     "--no-progress"]) == 0
    result = modeling_vip2clip.predict(tiny_model_dir, [str(images)], tmp_path / "api", batch_size=2, num_workers=0,
                                       save_maps="npy", threshold=0.4, progress=False)
    expected = (tmp_path / "cli" / "predictions.csv").read_text()
    assert (tmp_path / "api" / "predictions.csv").read_text() == expected
    assert result["rows"] == 4 and (result["threshold"], result["threshold_source"]) == (0.4, "option")
    assert (result["pixel_threshold"], result["pixel_threshold_source"]) == (0.5, "default")
    maps = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli" / "maps").rglob("*.npy"))
    assert maps and maps == sorted(p.relative_to(tmp_path / "api") for p in (tmp_path / "api" / "maps").rglob("*.npy"))

    # A loaded model (and its processor) instead of a folder: the same rows.
    model = ViP2CLIPModel.from_pretrained(tiny_model_dir)
    modeling_vip2clip.predict(model, [str(images)], tmp_path / "loaded", processor=ViP2CLIPProcessor.from_pretrained(
        tiny_model_dir), batch_size=2, num_workers=0, save_maps="npy", threshold=0.4, progress=False)
    assert (tmp_path / "loaded" / "predictions.csv").read_text() == expected


def test_evaluate_equals_the_command(tiny_model_dir, bench, tmp_path):
    _reset_accelerate()
    assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--dataset", str(bench), "--output-dir",
                     str(tmp_path / "cli"), "--batch-size", "2", "--num-workers", "0", "--no-progress"]) == 0
    _reset_accelerate()
    results = modeling_vip2clip.evaluate(str(tiny_model_dir), str(bench), tmp_path / "api", batch_size=2,
                                         num_workers=0, progress=False)
    expected = json.loads((tmp_path / "cli" / "results.json").read_text())
    written = json.loads((tmp_path / "api" / "results.json").read_text())
    dates = (written.pop("date"), expected.pop("date"))  # the runs' own times: everything else is equal
    assert written == expected
    assert results["num_evaluated"] == expected["num_evaluated"] == 8

    def undated(path):
        return [line for line in path.read_text().splitlines() if not any(date in line for date in dates)]

    assert undated(tmp_path / "api" / "results.md") == undated(tmp_path / "cli" / "results.md")
    _reset_accelerate()


def test_calibrate_equals_the_command(tiny_model_dir, saved, tmp_path):
    assert cli_main(["calibrate", "--model", str(tiny_model_dir), "--dataset", str(saved), "--out",
                     str(tmp_path / "cli"), "--batch-size", "2", "--num-workers", "0", "--no-progress"]) == 0
    info = modeling_vip2clip.calibrate(tiny_model_dir, str(saved), tmp_path / "api", batch_size=2, num_workers=0,
                                       progress=False)
    expected = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert json.loads((tmp_path / "api" / "config.json").read_text()) == expected
    assert (info["image_threshold"], info["num_images"]) == (expected["image_threshold"], 8)
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()


def test_train_equals_the_command(tiny_clip_dir, bench, tmp_path):
    from safetensors.torch import load_file

    flags = ["--image-size", "32", "--feature-layers", "1", "2", "--n-ctx", "3", "--n-cls", "2", "--top-k", "5"]
    _reset_accelerate()
    assert cli_main(["train", "--clip", str(tiny_clip_dir), *flags, "--dataset", str(bench), "--output-dir",
                     str(tmp_path / "cli"), "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
                     "--report-to", "none", "--no-progress"]) == 0
    _reset_accelerate()
    result = modeling_vip2clip.train(str(bench), tmp_path / "api", clip=str(tiny_clip_dir), **TINY, epochs=1,
                                     batch_size=4, num_workers=0, report_to="none", progress=False)
    _reset_accelerate()
    expected = load_file(tmp_path / "cli" / "model" / "model.safetensors")
    got = load_file(tmp_path / "api" / "model" / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(bool((got[key] == expected[key]).all()) for key in expected)
    assert result["global_step"] == 2 and result["model_dir"] == str(tmp_path / "api" / "model")
    summary = json.loads((tmp_path / "api" / "train_summary.json").read_text())
    assert summary["epochs"][0]["loss"] == json.loads((tmp_path / "cli" / "train_summary.json").read_text())[
        "epochs"][0]["loss"]
    from modeling_vip2clip.errors import UsageError

    with pytest.raises(UsageError, match="clip= .* or model="):
        modeling_vip2clip.train(str(bench), tmp_path / "neither")


def test_export_equals_the_command(tiny_model_dir, tmp_path):
    pytest.importorskip("onnx")
    assert cli_main(["export", "--model", str(tiny_model_dir), "--format", "onnx", "--out", str(tmp_path / "cli")]) == 0
    folder = modeling_vip2clip.export(tiny_model_dir, tmp_path / "api", format="onnx")
    assert folder == tmp_path / "api"
    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in ("config.json", "preprocessor_config.json", "model.onnx"):
        assert (folder / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    volatile = ("exported_at", "export_seconds")
    info = {k: v for k, v in json.loads((folder / "export_info.json").read_text()).items() if k not in volatile}
    expected = json.loads((tmp_path / "cli" / "export_info.json").read_text())
    assert info == {k: v for k, v in expected.items() if k not in volatile}
    assert info["source"] == str(tiny_model_dir)
