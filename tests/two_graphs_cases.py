"""The two-graph OpenVINO export (export_two_graphs.py): tower and heads compiled with their own precision hints.

Never timings. The pair in f32 computes the one-graph function (torch fp32 to 1e-5); the INT8 tower records its
accuracy against torch fp32, the heads graph stays f32 whatever the tower's hint, and the exported runtime runs
the pair without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_export import _NO_TORCH, _images, _torch_outputs  # noqa: F401  (fixtures below reuse the tiny model)
from modeling_vip2clip.testing_utils import save_tiny_vip2clip

from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor
from modeling_vip2clip.deploy.exported_runtime import INFO_FILE, RUNTIME_FILE, ExportedViP2CLIP, is_exported_folder

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    folder = save_tiny_vip2clip(tmp_path_factory.mktemp("tiny_torch"))
    model = ViP2CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    return model, ViP2CLIPProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def f32_pair(model_and_processor, tmp_path_factory):
    from modeling_vip2clip.deploy.export_two_graphs import export_openvino_two_graphs

    model, processor = model_and_processor
    return export_openvino_two_graphs(model, processor, tmp_path_factory.mktemp("pair") / "f32", _images(4),
                                      calibration_size=2, accuracy_images=2, int8=False, tower_precision="f32",
                                      source="tiny", progress=False)


@pytest.fixture(scope="module")
def int8_pair(model_and_processor, tmp_path_factory):
    pytest.importorskip("nncf")
    from modeling_vip2clip.deploy.export_two_graphs import export_openvino_two_graphs

    model, processor = model_and_processor
    return export_openvino_two_graphs(model, processor, tmp_path_factory.mktemp("pair") / "int8", _images(7),
                                      calibration_size=4, accuracy_images=3, source="tiny", progress=False)


@pytest.mark.parametrize("batch", [1, 3])
def test_f32_pair_equals_torch(f32_pair, model_and_processor, batch):
    model, processor = model_and_processor
    exported = ExportedViP2CLIP.from_folder(f32_pair)
    assert "tower f32 + heads f32" in exported.backend_name
    pixel_values = processor(images=_images(batch, seed=20 + batch))["pixel_values"].numpy()
    scores, maps = _torch_outputs(model, pixel_values)
    output = exported(pixel_values)
    assert output.anomaly_map.shape == (batch, 32, 32)
    np.testing.assert_allclose(output.anomaly_score, scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(output.anomaly_map, maps, rtol=0, atol=1e-5)
    assert maps.std() > 1e-3


def test_int8_pair_is_self_describing_and_keeps_the_heads_f32(int8_pair, model_and_processor):
    model, processor = model_and_processor
    assert is_exported_folder(int8_pair)
    info = json.loads((int8_pair / INFO_FILE).read_text())
    assert info["precision"] == "int8" and info["graphs"] == {"tower": "openvino_tower.xml",
                                                              "heads": "openvino_heads.xml"}
    assert info["tower_inference_precision"] == "auto" and info["inference_precision"] == "f32"
    accuracy = info["int8"]["accuracy_vs_fp32"]
    assert info["int8"]["accuracy_reference"] == "torch fp32" and accuracy["images"] == 3
    assert info["int8"]["accuracy_tower_precision"] in ("bf16", "f32")
    tower_xml = (int8_pair / "openvino_tower.xml").read_text()
    heads_xml = (int8_pair / "openvino_heads.xml").read_text()
    assert 'type="FakeQuantize"' in tower_xml or 'element_type="i8"' in tower_xml
    assert 'type="FakeQuantize"' not in heads_xml  # the heads are never quantised
    assert (int8_pair / RUNTIME_FILE).is_file() and "openvino_tower.xml" in (int8_pair / "README.md").read_text()

    pixel_values = processor(images=_images(3, seed=5))["pixel_values"].numpy()
    scores, maps = _torch_outputs(model, pixel_values)
    for precision in (None, "f32", "bf16"):  # whatever the tower's hint, the heads are compiled f32
        exported = ExportedViP2CLIP.from_folder(int8_pair, inference_precision=precision)
        assert exported.backend_name.endswith("+ heads f32)")
        output = exported(pixel_values)
        assert np.isfinite(output.anomaly_map).all() and output.anomaly_map.shape == maps.shape
        assert np.abs(output.anomaly_score - scores).max() < 0.1  # tiny random weights: a sanity bound only


def test_pair_runs_without_torch(f32_pair, model_and_processor, tmp_path):
    model, processor = model_and_processor
    image_path = tmp_path / "part.png"
    _images(1, seed=7)[0].save(image_path)
    cut, missing = tmp_path / "cut.png", tmp_path / "missing.png"  # a truncated image and no file at all
    cut.write_bytes(image_path.read_bytes()[:200])
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, (f32_pair, image_path, cut, missing))],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]  # the bad images skipped, the good one scored
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # the in-process check, the runtime's own lines (the "damaged" copy is whole here: a pair has other file
    # names), the exit codes, then the file's own command line
    first, only_bad, second = lines[0], next(line for line in lines if "exit_without_a_readable_image" in line), lines[-1]
    assert only_bad["exit_without_a_readable_image"] == 1 and only_bad["exit_for_a_folder_that_is_no_export"] == 2
    from PIL import Image

    with Image.open(image_path) as image:
        scores, maps = _torch_outputs(model, processor(images=[image])["pixel_values"].numpy())
    assert first["torch_loaded"] is False
    assert abs(first["score"] - float(scores[0])) < 1e-4 and abs(first["map_sum"] - float(maps.sum())) < 1e-2
    assert second["score"] == first["score"]


def test_cli_two_graphs_needs_int8(tmp_path, model_and_processor):
    from modeling_vip2clip.cli.export import main

    folder = save_tiny_vip2clip(tmp_path / "m")
    assert main(["--model", str(folder), "--format", "openvino", "--out", str(tmp_path / "x"), "--two-graphs"]) == 2
