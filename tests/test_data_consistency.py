"""One labelled dataset, three encodings, five commands: the same rows, labels, masks and counts everywhere.

The encodings: the package's canonical schema; a `ClassLabel(["defective", "good"])` label column (good = 1,
the order the issue found read backwards by calibrate and predict); a column of defect names (good / scratch /
crack) read with `--normal-label good`. Every command opens datasets through `data.load_anomaly_dataset`, so
`train` (its losses), `evaluate` (its metrics), `calibrate` (its thresholds), `predict --dataset` (its rows and
scores) and `export --calibration-dataset` (its images) must not tell the encodings apart; and a defect-name column
without `--normal-label` is the same one-line error (exit 2) in each of them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_vip2clip.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--feature-layers", "1", "2", "--n-ctx", "3", "--n-cls", "2", "--top-k", "5"]
COUNT = 12  # 6 normal, 6 anomalous with masks, one category, 32 px
DEFECTS = ["good", "scratch", "good", "crack"] * 3

# Each command builds its own Accelerator: start every test from a clean singleton state.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples() -> list[dict]:
    rng = np.random.default_rng(0)
    samples = []
    for index, defect in enumerate(DEFECTS):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        mask = None
        if defect != "good":
            mask = np.zeros((32, 32), np.uint8)
            top, left = 4 + index, 6 + index // 2
            mask[top:top + 10, left:left + 8] = 255
            image[mask > 0] = (250, 250, 250)
        samples.append({"image": {"bytes": _png(image), "path": f"img_{index:02d}.png"},
                        "mask": None if mask is None else {"bytes": _png(mask), "path": f"mask_{index:02d}.png"},
                        "defect": defect})
    return samples


def _save(folder: Path, columns: dict, features) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"test": Dataset.from_dict(columns, features=features)}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def encodings(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """name → (saved dataset folder, the flags that describe it)."""
    from datasets import ClassLabel, Features, Image as ImageFeature, Value

    from modeling_vip2clip.data import anomaly_features

    root = tmp_path_factory.mktemp("encodings")
    samples = _samples()
    images, masks = [s["image"] for s in samples], [s["mask"] for s in samples]
    normal = [s["defect"] == "good" for s in samples]
    plain = {"image": ImageFeature(), "mask": ImageFeature(), "category": Value("string")}
    canonical = _save(root / "canonical", {
        "image": images, "mask": masks, "label": [0 if n else 1 for n in normal], "category": ["widget"] * COUNT,
        "defect_type": [s["defect"] for s in samples], "split": ["test"] * COUNT,
        "image_path": [f"test/{s['image']['path']}" for s in samples]}, anomaly_features())
    class_label = _save(root / "class_label", {
        "image": images, "mask": masks, "label": [1 if n else 0 for n in normal], "category": ["widget"] * COUNT},
        Features({**plain, "label": ClassLabel(names=["defective", "good"])}))
    names = _save(root / "names", {
        "image": images, "mask": masks, "label": DEFECTS, "category": ["widget"] * COUNT},
        Features({**plain, "label": Value("string")}))
    return {"canonical": (canonical, []), "class_label": (class_label, []),
            "names": (names, ["--normal-label", "good"]), "names_without_flag": (names, [])}


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _commands(model_dir, clip_dir, dataset, flags, out: Path) -> dict[str, list[str]]:
    """The argv of each command on `dataset` (outputs under `out`)."""
    common = ["--dataset", str(dataset), *flags]
    return {
        "train": ["train", "--clip", str(clip_dir), *TINY, *common, "--output-dir", str(out / "train"), "--epochs",
                  "1", "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--no-progress"],
        "evaluate": ["evaluate", "--model", str(model_dir), *common, "--output-dir", str(out / "evaluate"),
                     "--batch-size", "4", "--num-workers", "0", "--no-progress"],
        "calibrate": ["calibrate", "--model", str(model_dir), *common, "--out", str(out / "calibrated"),
                      "--batch-size", "4", "--num-workers", "0", "--no-progress"],
        "predict": ["predict", "--model", str(model_dir), *common, "--output-dir", str(out / "predict"),
                    "--batch-size", "4", "--num-workers", "0", "--no-progress"],
        "export": ["export", "--model", str(model_dir), "--format", "openvino", "--int8", "--calibration-dataset",
                   str(dataset), "--calibration-split", "test", *flags, "--out", str(out / "export")],
    }


def _export_images(argv: list[str]) -> list[bytes]:
    """The images `export --int8` quantises on: its parser's options, passed as the command passes them."""
    from modeling_vip2clip.cli.export import add_arguments
    from modeling_vip2clip.data import schema_options
    from modeling_vip2clip.deploy.export import load_calibration_images
    import argparse

    args = add_arguments(argparse.ArgumentParser()).parse_args(argv[1:])
    images = load_calibration_images(args.calibration_dataset, 100, split=args.calibration_split,
                                     **schema_options(args))
    return [np.asarray(image.convert("RGB")).tobytes() for image in images]


def _observe(model_dir, clip_dir, dataset, flags, out: Path) -> dict:
    """What each command saw of the dataset, in numbers."""
    argv = _commands(model_dir, clip_dir, dataset, flags, out)
    seen = {}
    for name in ("train", "evaluate", "calibrate", "predict"):
        _reset_accelerate()
        assert cli_main(argv[name]) == 0, name
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    seen["train"] = [(e["loss"], e["pixel_loss"], e["image_loss"]) for e in summary["epochs"]]
    results = json.loads((out / "evaluate" / "results.json").read_text())
    seen["evaluate"] = (results["num_samples"], results["per_category"])
    config = json.loads((out / "calibrated" / "config.json").read_text())
    info = config["calibration"]
    seen["calibrate"] = (config["image_threshold"], config["pixel_threshold"],
                         {key: info[key] for key in ("num_images", "num_normal", "num_anomalous",
                                                     "num_anomalous_with_mask", "num_skipped", "categories")})
    lines = (out / "predict" / "predictions.csv").read_text().splitlines()
    seen["predict"] = [tuple(line.split(",")[:3]) for line in lines[1:]]
    seen["export"] = _export_images(argv["export"])
    return seen


def test_three_encodings_mean_the_same_in_every_command(encodings, tiny_model_dir, tiny_clip_dir, tmp_path):
    from modeling_vip2clip.data import load_anomaly_dataset, schema_options
    from modeling_vip2clip.cli.main import build_parser

    # Every command's parser turns the flags into the same loader keywords.
    for name in ("canonical", "class_label", "names"):
        dataset, flags = encodings[name]
        options = []
        for command, argv in _commands("M", "C", dataset, flags, tmp_path).items():
            options.append(schema_options(build_parser(command).parse_args(argv[1:])))
        assert all(option == options[0] for option in options)
        assert options[0]["normal_labels"] == (["good"] if flags else None)

    # The loader itself: the same rows, labels, masks, categories and defect names.
    loaded = {name: load_anomaly_dataset(encodings[name][0], "test", **schema_options(
        build_parser("calibrate").parse_args(_commands("M", "C", *encodings[name], tmp_path)["calibrate"][1:])))
        for name in ("canonical", "class_label", "names")}
    expected_labels = [0 if d == "good" else 1 for d in DEFECTS]
    for name, dataset in loaded.items():
        assert dataset["label"] == expected_labels, name
        assert dataset["image_path"] == [f"test/img_{i:02d}.png" for i in range(COUNT)], name
        assert [m is not None for m in dataset["mask"]] == [d != "good" for d in DEFECTS], name
        assert set(dataset["category"]) == {"widget"}
        assert [np.asarray(a).tobytes() for a in dataset["image"]] == [
            np.asarray(b).tobytes() for b in loaded["canonical"]["image"]]
    assert loaded["names"]["defect_type"] == loaded["canonical"]["defect_type"] == DEFECTS

    seen = {name: _observe(tiny_model_dir, tiny_clip_dir, *encodings[name], tmp_path / name)
            for name in ("canonical", "class_label", "names")}
    reference = seen["canonical"]
    # Counts: every command saw the 12 rows, 6 of them anomalous with a mask.
    assert reference["evaluate"][0] == COUNT and len(reference["predict"]) == COUNT
    assert reference["calibrate"][2] == {"num_images": COUNT, "num_normal": 6, "num_anomalous": 6,
                                         "num_anomalous_with_mask": 6, "num_skipped": 0, "categories": ["widget"]}
    assert reference["calibrate"][1] is not None  # masks reached calibrate: a pixel threshold was written
    assert [row[0] for row in reference["predict"]] == [f"test/img_{i:02d}.png" for i in range(COUNT)]
    assert len(reference["export"]) == COUNT and len(reference["train"]) == 1
    for name in ("class_label", "names"):
        for command in ("train", "evaluate", "calibrate", "predict", "export"):
            assert seen[name][command] == reference[command], (name, command)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_defect_names_without_normal_label_are_one_error_in_every_command(encodings, tiny_model_dir,
                                                                         tiny_clip_dir, tmp_path, capsys):
    dataset, flags = encodings["names_without_flag"]
    errors = {}
    for command, argv in _commands(tiny_model_dir, tiny_clip_dir, dataset, flags, tmp_path).items():
        _reset_accelerate()
        capsys.readouterr()
        assert cli_main(argv) == 2, command
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr, command
        errors[command] = _error_lines(stderr)
        assert len(errors[command]) == 1, (command, stderr)
    message = errors["calibrate"][0]
    assert all(lines == [message] for lines in errors.values()), errors
    assert "--label-column label" in message and "'scratch'" in message and "--normal-label" in message
    assert not (tmp_path / "calibrated").exists() and not (tmp_path / "predict" / "predictions.csv").exists()

    # The same, as a user sees it from a real process: that one line on stderr, exit 2.
    argv = _commands(tiny_model_dir, tiny_clip_dir, dataset, flags, tmp_path / "process")["predict"]
    completed = subprocess.run([sys.executable, "-m", "modeling_vip2clip.cli", *argv], capture_output=True,
                               text=True, cwd=ROOT, timeout=300,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert _error_lines(completed.stderr) == [message]
