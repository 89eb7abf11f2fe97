"""Numbers kept by the speed work of issue 21 (never timings): the numpy overlay and map resize used in predict's
writer threads, the default DataLoader worker count, and the GPU suite's CPU fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_vip2clip.processing_vip2clip import ViP2CLIPProcessor, jet_colormap, resize_map_bilinear

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", [(480, 640), (40, 56), (518, 518), (1000, 300), (7, 900)])
def test_numpy_map_resize_equals_torch_bilinear(size):
    anomaly_map = torch.rand(518, 518, generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(anomaly_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(resize_map_bilinear(anomaly_map.numpy(), *size), expected.numpy(), rtol=0, atol=5e-5)


def test_lookup_table_overlay_is_the_float_formula_within_one_level():
    """The LUT overlay against the formula it replaced (torch resize, float64 jet and blend)."""
    processor = ViP2CLIPProcessor(image_size=64)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    anomaly_map = torch.rand(64, 64, generator=torch.Generator().manual_seed(2))
    for alpha, value_range in ((0.5, (0.0, 1.0)), (0.3, None), (1.0, (0.2, 0.8))):
        resized = F.interpolate(anomaly_map[None, None], size=(48, 80), mode="bilinear", align_corners=False)[0, 0]
        values = resized.numpy().astype(np.float64)
        low, high = value_range or (values.min(), values.max())
        heat = jet_colormap((values - low) / (high - low)).astype(np.float64)
        expected = np.clip((1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * heat + 0.5, 0, 255)
        got = np.asarray(processor.overlay(image, anomaly_map, alpha=alpha, value_range=value_range))
        assert np.abs(got.astype(int) - expected.astype(np.uint8).astype(int)).max() <= 1


def test_default_workers_follow_the_device_and_cores():
    from modeling_vip2clip.cli.predict import build_parser
    from modeling_vip2clip.engine.prediction import default_num_workers

    assert build_parser().parse_args(["--model", "m", "x.png"]).num_workers is None  # auto unless given
    assert build_parser().parse_args(["--model", "m", "x.png", "--num-workers", "3"]).num_workers == 3
    assert default_num_workers(torch.device("cpu"), cores=2) == 1
    assert default_num_workers(torch.device("cpu"), cores=64) == 1
    assert default_num_workers(torch.device("cuda"), cores=16) == 8
    assert default_num_workers(torch.device("cuda"), cores=4) == 3
    assert default_num_workers(torch.device("cuda"), cores=1) == 1


def test_gpu_suite_cpu_fallback_prints_every_figure(tmp_path):
    """`benchmarks/gpu_suite.py --tiny` on the CPU: every part runs and prints its JSON line (no errors)."""
    out = tmp_path / "suite.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--tiny", "--device", "cpu", "--repeats", "2",
         "--batch-sizes", "1", "4", "--dtypes", "bf16", "--workers", "1", "--work-dir", str(tmp_path / "work"),
         "--parts", "forward", "predict", "onnxruntime", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    figures = [line["figure"] for line in lines]
    assert figures[0] == "machine" and figures[-1] == "done" and lines[-1]["errors"] == 0, lines
    assert "cpu_id" in lines[0] and lines[0]["cpu_id"]["model_name"]
    forward = [line for line in lines if line["figure"] == "forward"]
    assert [line["batch"] for line in forward] == [1, 4]
    assert all(line["images_per_s"] > 0 and 0 < line["mfu_vs_measured_matmul"] for line in forward)
    predict = [line for line in lines if line["figure"] == "predict"]
    assert [line["overlays"] for line in predict] == [True, False] and all(line["e2e_images_per_s"] > 0 for line in predict)
    assert any(line["figure"] == "onnxruntime_cuda" for line in lines)
