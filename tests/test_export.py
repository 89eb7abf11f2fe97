"""`vip2clip export` (ONNX / OpenVINO / INT8) and the torch-free inferencer of exported folders, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from modeling_vip2clip.testing_utils import save_tiny_vip2clip

from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor
from modeling_vip2clip.deploy.export import INT8_IGNORED_PATTERNS, UsageError, export
from modeling_vip2clip.deploy.exported_runtime import (
    INFO_FILE,
    ONNX_DATA_FILE,
    RUNTIME_FILE,
    ExportedViP2CLIP,
    is_exported_folder,
)

REPO = Path(__file__).resolve().parents[1]


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random RGB images of varied sizes (each resized differently by the processor)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        size = (40 + 7 * index, 36 + 3 * index)
        smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-30, 30, size=smooth.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy))
    return images


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
    return save_tiny_vip2clip(tmp_path_factory.mktemp("tiny_torch"))


@pytest.fixture(scope="module")
def model_and_processor(torch_folder):
    model = ViP2CLIPModel.from_pretrained(torch_folder, dtype=torch.float32).eval()
    return model, ViP2CLIPProcessor.from_pretrained(torch_folder)


@pytest.fixture(scope="module")
def onnx_folder(model_and_processor, tmp_path_factory):
    model, processor = model_and_processor
    return export(model, processor=processor, out_dir=tmp_path_factory.mktemp("export") / "onnx", format="onnx",
                        source="tiny", progress=False)


@pytest.fixture(scope="module")
def openvino_folder(model_and_processor, tmp_path_factory):
    model, processor = model_and_processor
    return export(model, processor=processor, out_dir=tmp_path_factory.mktemp("export") / "ov", format="openvino",
                        source="tiny", progress=False)


def _torch_outputs(model, pixel_values: np.ndarray):
    with torch.no_grad():
        output = model(pixel_values=torch.from_numpy(pixel_values))
    return output.anomaly_score.numpy(), output.anomaly_map.numpy()


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_torch(onnx_folder, model_and_processor, batch):
    model, processor = model_and_processor
    exported = ExportedViP2CLIP.from_folder(onnx_folder)
    pixel_values = processor(images=_images(batch, seed=batch))["pixel_values"].numpy()
    scores, maps = _torch_outputs(model, pixel_values)
    output = exported(pixel_values)
    assert output.anomaly_score.shape == (batch,) and output.anomaly_map.shape == (batch, 32, 32)
    np.testing.assert_allclose(output.anomaly_score, scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(output.anomaly_map, maps, rtol=0, atol=1e-5)
    assert maps.std() > 1e-3  # the maps carry signal, so the comparison means something


@pytest.mark.parametrize("batch", [1, 3])
def test_openvino_f32_equals_torch(openvino_folder, model_and_processor, batch):
    model, processor = model_and_processor
    exported = ExportedViP2CLIP.from_folder(openvino_folder)
    assert "f32" in exported.backend_name  # never OpenVINO's bf16 default on CPUs that have bf16
    pixel_values = processor(images=_images(batch, seed=10 + batch))["pixel_values"].numpy()
    scores, maps = _torch_outputs(model, pixel_values)
    output = exported(pixel_values)
    np.testing.assert_allclose(output.anomaly_score, scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(output.anomaly_map, maps, rtol=0, atol=1e-4)


def test_exported_folder_is_self_describing(onnx_folder, openvino_folder, model_and_processor, torch_folder):
    model, processor = model_and_processor
    for folder, model_file in ((onnx_folder, "model.onnx"), (openvino_folder, "openvino_model.xml")):
        assert is_exported_folder(folder)
        for name in (model_file, "config.json", "preprocessor_config.json", INFO_FILE, "README.md", RUNTIME_FILE):
            assert (folder / name).is_file(), name
        info = json.loads((folder / INFO_FILE).read_text())
        assert info["precision"] == "fp32" and info["image_size"] == 32 and info["source"] == "tiny"
        assert info["opset"] == 17 and info["input"]["name"] == "pixel_values"
        config = json.loads((folder / "config.json").read_text())
        assert config["feature_layers"] == model.config.feature_layers and config["top_k"] == model.config.top_k
        assert ViP2CLIPProcessor.from_pretrained(folder).to_dict() == processor.to_dict()
        assert (folder / RUNTIME_FILE).read_bytes() == (REPO / "modeling_vip2clip" / "deploy" / "exported_runtime.py").read_bytes()
        assert "pixel_values" in (folder / "README.md").read_text()
    exported = ExportedViP2CLIP.from_folder(openvino_folder)
    assert exported.image_size == 32 and exported.config["top_k"] == model.config.top_k
    assert not is_exported_folder(torch_folder) and not is_exported_folder(onnx_folder / "missing")
    with pytest.raises(ValueError, match="not an exported ViP2-CLIP folder"):
        ExportedViP2CLIP.from_folder(torch_folder)


def test_preprocess_equals_processor(onnx_folder, model_and_processor):
    _, processor = model_and_processor
    exported = ExportedViP2CLIP.from_folder(onnx_folder)
    rgb = _images(2)
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 65536, size=(30, 41), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° on display
    rgb[1].save(onnx_folder.parent / "rotated.png", exif=exif)
    rotated = Image.open(onnx_folder.parent / "rotated.png")
    assert ImageOps.exif_transpose(rotated).size == rotated.size[::-1]  # the orientation is really there
    inputs = [
        *rgb,
        rgb[0].convert("L"),
        rgb[1].convert("RGBA"),
        rgb[0].convert("P"),
        Image.fromarray(wide),  # 16-bit grey (I;16)
        wide,  # a uint16 array
        np.asarray(rgb[1]).transpose(2, 0, 1),  # (3, H, W)
        np.asarray(rgb[0], dtype=np.float32) / 255.0,  # float in [0, 1]
        rotated,
    ]
    expected = processor(images=inputs)["pixel_values"].numpy()
    actual = exported.preprocess(inputs)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    assert exported.preprocess(rgb[0]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="smaller than the minimum side"):
        exported.preprocess(Image.new("RGB", (3, 40)))


def test_wrong_input_size_names_the_expected_size(onnx_folder, openvino_folder):
    for folder in (onnx_folder, openvino_folder):
        exported = ExportedViP2CLIP.from_folder(folder)
        with pytest.raises(ValueError, match=r"takes 32x32.*preprocess"):
            exported(np.zeros((1, 3, 48, 48), dtype=np.float32))
        with pytest.raises(ValueError, match=r"must be \(B, 3, 32, 32\)"):
            exported(np.zeros((3, 32, 32), dtype=np.float32))


def test_external_data_for_large_weights(model_and_processor, tmp_path):
    """Weights over 2 GB go to model.onnx_data (forced here on the tiny model); the folder still runs."""
    model, processor = model_and_processor
    folder = export(model, processor=processor, out_dir=tmp_path / "ext", format="onnx", external_data=True, progress=False)
    assert (folder / ONNX_DATA_FILE).stat().st_size > (folder / "model.onnx").stat().st_size
    assert json.loads((folder / INFO_FILE).read_text())["external_data"] is True
    pixel_values = processor(images=_images(2))["pixel_values"].numpy()
    scores, maps = _torch_outputs(model, pixel_values)
    output = ExportedViP2CLIP.from_folder(folder)(pixel_values)
    np.testing.assert_allclose(output.anomaly_map, maps, rtol=0, atol=1e-5)


def test_export_refuses_bad_requests(model_and_processor, tmp_path, onnx_folder):
    model, processor = model_and_processor
    with pytest.raises(UsageError, match="--int8 needs --format openvino"):
        export(model, processor=processor, out_dir=tmp_path / "a", format="onnx", int8=True, calibration_images=_images(2))
    with pytest.raises(UsageError, match="needs calibration images"):
        export(model, processor=processor, out_dir=tmp_path / "b", format="openvino", int8=True)
    with pytest.raises(UsageError, match="exists and is not empty"):
        export(model, processor=processor, out_dir=onnx_folder, format="onnx")


def test_int8_export_records_its_accuracy(model_and_processor, tmp_path):
    """INT8 (NNCF) runs and records its accuracy against f32 on held-out images; random tiny weights make no
    quality bar meaningful, so only the bookkeeping and that the vision blocks really are quantised are checked."""
    pytest.importorskip("nncf")
    model, processor = model_and_processor
    folder = export(model, processor=processor, out_dir=tmp_path / "int8", format="openvino", int8=True,
                          calibration_images=_images(7), calibration_size=4, accuracy_images=3, progress=False)
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["precision"] == "int8" and info["inference_precision"] == "f32"
    assert info["int8"]["calibration_images"] == 4 and info["int8"]["accuracy_on"] == "held-out images"
    assert info["int8"]["ignored_patterns"] == list(INT8_IGNORED_PATTERNS)
    accuracy = info["int8"]["accuracy_vs_fp32"]
    assert accuracy["images"] == 3 and -1 <= accuracy["map_pearson_min"] <= 1 and accuracy["score_abs_diff_max"] >= 0
    assert "INT8 accuracy" in (folder / "README.md").read_text()
    xml = (folder / "openvino_model.xml").read_text()
    assert 'type="FakeQuantize"' in xml or 'element_type="i8"' in xml or 'element_type="u8"' in xml
    exported = ExportedViP2CLIP.from_folder(folder)
    pixel_values = processor(images=_images(3, seed=5))["pixel_values"].numpy()
    output = exported(pixel_values)
    scores, maps = _torch_outputs(model, pixel_values)
    assert np.isfinite(output.anomaly_map).all() and output.anomaly_map.shape == maps.shape
    assert not np.array_equal(output.anomaly_map, maps)  # it is a different (quantised) computation


def _export_command(capsys, *argv) -> tuple[int, str, str]:
    """`python -m modeling_vip2clip.cli.export ARGV`'s entry point, in this process (no second torch import):
    (exit status, stdout, stderr)."""
    from modeling_vip2clip.cli.export import main

    capsys.readouterr()
    code = main([str(value) for value in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exports_a_folder(torch_folder, tmp_path, capsys):
    out = tmp_path / "cli-onnx"
    code, stdout, stderr = _export_command(capsys, "--model", torch_folder, "--format", "onnx", "--out", out)
    assert code == 0, stderr[-3000:]
    assert f"to {out}" in stdout and "onnx, fp32" in stdout
    assert is_exported_folder(out)
    assert {"model.onnx", "config.json", "preprocessor_config.json", INFO_FILE, "README.md", RUNTIME_FILE} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / INFO_FILE).read_text())["source"] == str(torch_folder)


def test_cli_usage_error_is_one_line(torch_folder, tmp_path, capsys):
    code, _, stderr = _export_command(capsys, "--model", torch_folder, "--format", "onnx", "--out", tmp_path / "x",
                                      "--int8")
    assert code == 2
    assert stderr.strip() == "error: --int8 needs --format openvino (the quantised graph is OpenVINO's)"
    assert not (tmp_path / "x").exists()


_NO_TORCH = """
import json, os, runpy, shutil, sys
sys.modules["torch"] = None          # any `import torch` now raises ImportError
sys.modules["transformers"] = None
folder, image, cut, missing = sys.argv[1:5]
sys.path.insert(0, folder)
from vip2clip_runtime import ExportedViP2CLIP, main
from PIL import Image
model = ExportedViP2CLIP.from_folder(folder)
output = model(model.preprocess([Image.open(image)]))
print(json.dumps({"score": float(output.anomaly_score[0]), "map_sum": float(output.anomaly_map.sum()),
                  "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None}))
damaged = shutil.copytree(folder, "damaged")  # its model file cut short
for name in ("model.onnx", "openvino_model.bin"):
    if os.path.exists(os.path.join(damaged, name)):
        os.truncate(os.path.join(damaged, name), 2000)
print(json.dumps({"exit_without_a_readable_image": main([folder, cut, missing]),
                  "exit_for_a_folder_that_is_no_export": main([".", image]),
                  "exit_for_a_truncated_model_file": main([damaged, image])}), flush=True)
sys.argv = [folder + "/vip2clip_runtime.py", folder, cut, image, missing]
runpy.run_path(sys.argv[0], run_name="__main__")   # the file's own command line
"""


@pytest.mark.parametrize("which", ["onnx", "openvino"])
def test_inferencer_runs_without_torch(which, onnx_folder, openvino_folder, model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = onnx_folder if which == "onnx" else openvino_folder
    image_path = tmp_path / "part.png"
    _images(1, seed=7)[0].save(image_path)
    cut, missing = tmp_path / "cut.png", tmp_path / "missing.png"  # a truncated image and no file at all
    cut.write_bytes(image_path.read_bytes()[:200])
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, (folder, image_path, cut, missing))],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env={
                                k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    # the bad images are reported and skipped, the good one scored; exit 0 as `vip2clip predict`
    assert result.returncode == 0, result.stderr[-3000:]
    first, only_bad, second = [json.loads(line) for line in result.stdout.splitlines()]
    with Image.open(image_path) as image:
        scores, maps = _torch_outputs(model, processor(images=[image])["pixel_values"].numpy())
    assert first["torch_loaded"] is False
    assert abs(first["score"] - float(scores[0])) < 1e-4 and abs(first["map_sum"] - float(maps.sum())) < 1e-2
    assert only_bad == {"exit_without_a_readable_image": 1, "exit_for_a_folder_that_is_no_export": 2,
                        "exit_for_a_truncated_model_file": 2}
    assert "error: . is not an exported ViP2-CLIP folder" in result.stderr
    # was a 15-line onnxruntime / OpenVINO traceback
    assert "error: cannot load the exported model (damaged): the model file is damaged or truncated" in result.stderr
    assert second["path"] == str(image_path) and second["score"] == first["score"]
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    for bad in (cut, missing):  # one line each per run, then both runs' lists at the end
        assert sum(line.startswith(f"skipped {bad}: ") for line in lines) == 2, result.stderr
    assert f"skipped {missing}: no such file or directory" in lines, result.stderr
    assert f"scored 0 of 2 images; skipped 2 that could not be read: {cut}, {missing}" in lines
    assert lines[-1] == f"scored 1 of 3 images; skipped 2 that could not be read: {cut}, {missing}"


def test_calibration_images_from_a_benchmark_folder_a_saved_dataset_and_a_glob(tmp_path):
    """Calibration images come from the benchmark's images, never its masks; the draw is seeded."""
    from modeling_vip2clip.data import generate_synthetic_benchmark, load_anomaly_dataset
    from modeling_vip2clip.deploy.export import load_calibration_images

    root = tmp_path / "bench"
    records = generate_synthetic_benchmark(root, categories=["fabric"], n_train_good=2, n_test_good=2,
                                           n_test_bad=3, image_size=32, seed=0)
    raw = load_calibration_images(root, count=4)
    assert len(raw) == 4 and all(image.mode == "RGB" and image.size == (32, 32) for image in raw)
    masks = {np.asarray(Image.open(root / r["mask_path"]).convert("RGB")).tobytes() for r in records if r["mask_path"]}
    assert not masks & {np.asarray(image).tobytes() for image in load_calibration_images(root, count=100)}
    assert len(load_calibration_images(root, count=100)) == len(records)
    assert [np.asarray(i).tobytes() for i in raw] == [np.asarray(i).tobytes() for i in load_calibration_images(root, 4)]
    saved = tmp_path / "saved"
    load_anomaly_dataset(root, split="all", progress=False).save_to_disk(str(saved))
    assert len(load_calibration_images(saved, count=3)) == 3
    assert len(load_calibration_images(str(root / "fabric" / "test" / "good" / "*.png"), count=10)) == 2
    with pytest.raises(UsageError, match="no such folder or pattern"):
        load_calibration_images(tmp_path / "nowhere", count=3)


# ---------------------------------------------------------------------------------------------- torch-side adapter
def test_predict_on_an_exported_folder_equals_the_torch_folder(torch_folder, onnx_folder, openvino_folder, tmp_path):
    """`predict --model EXPORTED_FOLDER` (the package's one loader recognises the folder and serves the adapter of
    modeling_vip2clip/exported_model.py): same CSV scores (1e-4) and overlays as the torch folder."""
    import csv

    from modeling_vip2clip.engine.prediction import predict
    from modeling_vip2clip.deploy.exported_model import ExportedViP2CLIPModel, load_exported
    from modeling_vip2clip.weights.loader import load_model_and_processor

    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(_images(4, seed=20)):
        image.save(images / f"part{index}.png")

    def scores(model_source, loaded=None):
        out = tmp_path / f"out-{Path(model_source).name}"
        model, processor = loaded or (str(model_source), None)
        predict(model, [str(images)], out, processor=processor, batch_size=3,
                plain_overlays=True)  # the maps, no drawn score
        with open(out / "predictions.csv", newline="") as handle:
            rows = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
        overlays = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in (out / "overlays").iterdir()}
        return rows, overlays

    expected, expected_overlays = scores(torch_folder)
    for folder in (onnx_folder, openvino_folder):
        model, processor = load_exported(folder)
        assert isinstance(model, ExportedViP2CLIPModel) and model.config.image_size == 32
        assert isinstance(load_model_and_processor(str(folder))[0], ExportedViP2CLIPModel)
        actual, overlays = scores(folder)  # through `--model`, as a user runs it
        assert actual.keys() == expected.keys()
        assert max(abs(actual[k] - expected[k]) for k in expected) <= 1e-4
        assert overlays.keys() == expected_overlays.keys()
        assert max(int(np.abs(overlays[k] - expected_overlays[k]).max()) for k in overlays) <= 1  # rounding only
    with pytest.raises(ValueError, match="only scores images"):
        model(pixel_values=torch.zeros(1, 3, 32, 32), labels=torch.zeros(1))
    with pytest.raises(ValueError, match="not an exported"):
        load_exported(torch_folder)
