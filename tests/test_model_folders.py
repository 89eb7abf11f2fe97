"""Every model folder the package writes is a complete Hub folder (issue 18): the authors'-checkpoint converter
(`hub/authors_checkpoint_to_folder.py`, `weights.authors_checkpoint`), `download-authors` over a loopback HTTP
server, `train` and `calibrate` — each loaded in a fresh Python process that cannot import this package, with
`pipeline("anomaly-detection", model=FOLDER, trust_remote_code=True)`, `AutoImageProcessor`, `AutoProcessor` and
`AutoModel`; the calibrated folder's verdict follows its calibrated threshold, not 0.5. A folder saved before the
processor became `ViP2CLIPImageProcessor` (its preprocessor_config.json names `ViP2CLIPProcessor`) still loads.

The folders are built once for the module and checked by one subprocess (the cost is one interpreter start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from modeling_vip2clip.run_folder import LOCK_FILE, MANIFEST_FILE
import torch
from PIL import Image

from launch import load_script
from loopback_server import FileServer, blob_id, write_authors_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--feature-layers", "1", "2", "--top-k", "5"]
HUB_FILES = {"configuration_vip2clip.py", "modeling_vip2clip.py", "processing_vip2clip.py", "pipeline_vip2clip.py",
             "cpu_fast_path_vip2clip.py", "reference_bank_vip2clip.py"}
AUTO_MAP = {
    "AutoConfig": "configuration_vip2clip.ViP2CLIPConfig",
    "AutoModel": "modeling_vip2clip.ViP2CLIPModel",
    "AutoImageProcessor": "processing_vip2clip.ViP2CLIPImageProcessor",
    "AutoProcessor": "processing_vip2clip.ViP2CLIPImageProcessor",
}
# What a folder saved before the rename carries (the package wrote exactly this until issue 18).
OLD_PREPROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_vip2clip.ViP2CLIPProcessor"},
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "ViP2CLIPProcessor",
    "image_size": 32,
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "mask_threshold": 0.5,
    "max_image_pixels": None,
    "min_image_size": 8,
}


def _png_bytes(image: Image.Image) -> dict:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _images(count: int, seed: int) -> list[Image.Image]:
    """Varied 40×36 RGB images: noise around different levels, some with a bright patch."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        array = np.clip(rng.normal(40 + 12 * index, 10 + 3 * index, (36, 40, 3)), 0, 255).astype(np.uint8)
        if index % 3 == 2:
            array[8:20, 10:24] = 250
        images.append(Image.fromarray(array))
    return images


def _scores(folder: Path, images: list[Image.Image]) -> np.ndarray:
    """Image scores by the package's model, one image per forward (as `calibrate --batch-size 1`)."""
    from modeling_vip2clip.weights.loader import load_model_and_processor

    model, processor = load_model_and_processor(str(folder))
    with torch.inference_mode():
        return np.array([float(model(pixel_values=processor(images=[image])["pixel_values"]).anomaly_score[0])
                         for image in images])


def _calibration_labels(scores: np.ndarray) -> tuple[list[int], int, float]:
    """Labels that make calibrate's F1-max threshold t one of the scores, and a probe image whose verdict at t
    differs from its verdict at 0.5 (so the test tells the calibrated threshold from the default).

    With "anomalous iff score >= t" as labels the separation is perfect and t is the lowest threshold reaching
    F1 = 1. Two scores on the same side of 0.5 give the pair: above it, probe = the lower one (anomalous at 0.5,
    normal at t); below it, t = the lower one and probe = the higher one (normal at 0.5, anomalous at t)."""
    order = np.argsort(scores)
    gap = 1e-4  # far above the 1e-7 differences that batching could make
    above = [i for i in order if scores[i] >= 0.5 + gap]
    below = [i for i in order if scores[i] < 0.5 - gap]
    for low, high in zip(above, above[1:]):
        if scores[high] - scores[low] > gap:
            threshold = scores[high]
            return [int(s >= threshold) for s in scores], int(low), float(threshold)
    for low, high in zip(below, below[1:]):
        if scores[high] - scores[low] > gap:
            threshold = scores[low]
            return [int(s >= threshold) for s in scores], int(high), float(threshold)
    raise AssertionError(f"no usable pair of scores among {scores}")


@pytest.fixture(scope="module")
def folders(tiny_clip_dir, tmp_path_factory):
    """Every kind of folder the package writes, plus an old-format one: {name: path}, and the calibration probe."""
    from accelerate.state import AcceleratorState, GradientState
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from modeling_vip2clip import ViP2CLIPImageProcessor, ViP2CLIPModel
    from modeling_vip2clip.cli.download_authors import main as download_authors_main
    from modeling_vip2clip.cli.main import main as cli_main
    from modeling_vip2clip.cli.train import build_parser, job_arguments
    from modeling_vip2clip.data import generate_synthetic_benchmark
    from modeling_vip2clip.engine.training import train
    from modeling_vip2clip.weights.authors_checkpoint import model_from_authors_checkpoint

    work = tmp_path_factory.mktemp("model_folders")
    pth = write_authors_checkpoint(tiny_clip_dir, work / "mvtec_train_epoch_10.pth")
    built: dict[str, Path] = {}

    # the authors' checkpoint: the hub script (a shell over weights.authors_checkpoint) and the function itself
    converter = load_script("vip2clip_authors_checkpoint_to_folder", ROOT / "hub" / "authors_checkpoint_to_folder.py")
    assert converter.main(["--checkpoint", str(pth), "--clip", str(tiny_clip_dir), "--out", str(work / "converted"),
                           *TINY]) == 0
    built["converted"] = work / "converted"
    model_from_authors_checkpoint(pth, tiny_clip_dir, work / "converted_api", image_size=32, feature_layers=[1, 2],
                                  top_k=5)
    built["converted_api"] = work / "converted_api"

    # download-authors over a real HTTP server on 127.0.0.1, into a fresh HF home
    server = FileServer({"/models/mvtec_train_epoch_10.pth": pth.read_bytes()})
    try:
        with pytest.MonkeyPatch.context() as patch:
            import huggingface_hub.constants

            patch.setattr(huggingface_hub.constants, "HF_HOME", str(work / "hf_home"))
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            assert download_authors_main(
                ["mvtec", "--out", str(work / "downloaded"), "--clip", str(tiny_clip_dir), "--url",
                 server.url("/models/mvtec_train_epoch_10.pth"), "--git-blob-sha1", blob_id(pth.read_bytes()), *TINY]
            ) == 0
    finally:
        server.stop()
    built["downloaded"] = work / "downloaded"

    # train: 1 epoch on 2 synthetic images
    data = work / "train_data"
    generate_synthetic_benchmark(data, categories=("fabric",), n_train_good=0, n_test_good=1, n_test_bad=1,
                                 image_size=32, seed=1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        train(**job_arguments(build_parser().parse_args(
            ["--clip", str(tiny_clip_dir), *TINY, "--n-ctx", "3", "--n-cls", "2", "--dataset", str(data),
             "--output-dir", str(work / "train"), "--epochs", "1", "--batch-size", "2", "--num-workers", "0",
             "--report-to", "none", "--no-progress"])))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    built["trained"] = work / "train" / "model"

    # an old-format folder: saved with save_pretrained alone, preprocessor_config.json naming ViP2CLIPProcessor
    old = work / "old_format"
    ViP2CLIPModel.from_pretrained(built["converted"]).save_pretrained(old)
    ViP2CLIPImageProcessor(image_size=32, min_image_size=8).save_pretrained(old)  # copies processing_vip2clip.py
    (old / "preprocessor_config.json").write_text(json.dumps(OLD_PREPROCESSOR_CONFIG, indent=2) + "\n")
    built["old_format"] = old

    # calibrate the old-format folder on a labelled set whose labels put the threshold where 0.5 would disagree
    images = _images(12, seed=7)
    labels, probe, threshold = _calibration_labels(_scores(old, images))
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    (work / "labelled" / "data").mkdir(parents=True)
    Dataset.from_dict({"image": [_png_bytes(image) for image in images], "label": labels}, features=features).to_parquet(
        str(work / "labelled" / "data" / "test-00000-of-00001.parquet"))
    assert cli_main(["calibrate", "--model", str(old), "--dataset", str(work / "labelled"), "--out",
                     str(work / "calibrated"), "--batch-size", "1", "--num-workers", "0", "--no-progress"]) == 0
    built["calibrated"] = work / "calibrated"
    images[probe].save(work / "probe.png")
    return {"folders": built, "work": work, "probe": work / "probe.png", "threshold": threshold}


_CHILD = textwrap.dedent(
    r"""
    import importlib.abc, json, sys
    from pathlib import Path

    class _Block(importlib.abc.MetaPathFinder):
        # the folders must be self-contained: this repository's package may not be imported
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_vip2clip":
                raise ImportError(f"{name} is not available to a model folder's code")
            return None

    sys.meta_path.insert(0, _Block())
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, pipeline

    folders, probe = json.loads(sys.argv[1]), Image.open(sys.argv[2]).convert("RGB")
    report = {}
    for name, folder in folders.items():
        row = {}
        row["config"] = type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__module__
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        row["model"] = f"{type(model).__module__}.{type(model).__name__}"
        for key, auto in (("image_processor", AutoImageProcessor), ("processor", AutoProcessor)):
            try:
                loaded = auto.from_pretrained(folder, trust_remote_code=True)
                row[key] = f"{type(loaded).__module__}.{type(loaded).__name__}"
                row[key + "_image_size"] = loaded.image_size
            except Exception as error:  # reported, then asserted on by the parent
                row[key] = f"error: {type(error).__name__}: {error}"
        try:
            detector = pipeline("anomaly-detection", model=folder, trust_remote_code=True, device="cpu")
        except Exception as error:  # a folder written before issue 18 has no custom_pipelines
            row["pipeline"] = f"error: {type(error).__name__}: {error}"
            report[name] = row
            continue
        row["pipeline"] = f"{type(detector).__module__}.{type(detector).__name__}"
        row["pipeline_processor"] = [detector.image_processor.image_size, detector.image_processor.min_image_size]
        result = detector(probe)
        row["score"], row["is_anomalous"] = result["score"], bool(result["is_anomalous"])
        row["map_shape"] = list(result["anomaly_map"].shape)
        inputs = detector.image_processor(images=[probe])
        with torch.inference_mode():
            row["auto_model_score"] = float(model(pixel_values=inputs["pixel_values"]).anomaly_score[0])
        report[name] = row
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def fresh_report(folders, tmp_path_factory):
    """One fresh interpreter, offline, without PYTHONPATH and with the package blocked, loads every folder."""
    work = tmp_path_factory.mktemp("fresh")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"),
               PYTHONDONTWRITEBYTECODE="1")
    paths = {name: str(path) for name, path in folders["folders"].items()}
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(paths), str(folders["probe"])], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


WRITTEN = ["converted", "converted_api", "downloaded", "trained", "calibrated"]


@pytest.mark.parametrize("name", WRITTEN)
def test_written_folder_is_complete(folders, name):
    folder = folders["folders"][name]
    names = {path.name for path in folder.iterdir()}
    assert HUB_FILES | {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    # hidden files: only an owned output folder's manifest and lock (run_folder.py), never a staging leftover
    assert not [n for n in names if n.startswith(".") and n not in (MANIFEST_FILE, LOCK_FILE)]
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]  # no staging left
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["custom_pipelines"] == {
        "anomaly-detection": {"impl": "pipeline_vip2clip.ViP2CLIPAnomalyDetectionPipeline", "pt": ["AutoModel"]}}
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "ViP2CLIPImageProcessor"
    assert preprocessor["auto_map"] == {key: AUTO_MAP[key] for key in ("AutoImageProcessor", "AutoProcessor")}
    for code in HUB_FILES:  # the code of the package that wrote it
        assert (folder / code).read_bytes() == (ROOT / "modeling_vip2clip" / code).read_bytes(), code


@pytest.mark.parametrize("name", WRITTEN)
def test_written_folder_loads_in_a_fresh_process_without_the_package(folders, fresh_report, name):
    from modeling_vip2clip.weights.loader import load_model_and_processor

    row = fresh_report[name]
    assert row["config"].startswith("transformers_modules.")
    assert row["model"].startswith("transformers_modules.") and row["model"].endswith(".ViP2CLIPModel")
    for key in ("image_processor", "processor"):
        assert row[key].startswith("transformers_modules.") and row[key].endswith(".ViP2CLIPImageProcessor"), row[key]
        assert row[key + "_image_size"] == 32
    assert row["pipeline"].endswith(".ViP2CLIPAnomalyDetectionPipeline")
    saved = json.loads((folders["folders"][name] / "preprocessor_config.json").read_text())
    assert row["pipeline_processor"] == [saved["image_size"], saved["min_image_size"]]  # the folder's, not a default
    assert row["map_shape"] == [36, 40]  # the probe's own size
    # the same numbers as the package's own model on the same folder
    model, processor = load_model_and_processor(str(folders["folders"][name]))
    with torch.inference_mode():
        pixel_values = processor(images=[Image.open(folders["probe"]).convert("RGB")])["pixel_values"]
        expected = float(model(pixel_values=pixel_values).anomaly_score[0])
    assert row["score"] == pytest.approx(expected, abs=1e-6)
    assert row["auto_model_score"] == pytest.approx(expected, abs=1e-6)
    threshold = model.config.image_threshold
    assert row["is_anomalous"] == (row["score"] >= (0.5 if threshold is None else threshold))


def test_calibrated_folder_verdict_uses_its_threshold(folders, fresh_report):
    from modeling_vip2clip import ViP2CLIPConfig

    config = ViP2CLIPConfig.from_pretrained(folders["folders"]["calibrated"])
    assert config.image_threshold == pytest.approx(folders["threshold"], abs=1e-6)
    row = fresh_report["calibrated"]
    # the probe lies between 0.5 and the calibrated threshold: the two rules disagree on it
    assert (row["score"] >= 0.5) != (row["score"] >= config.image_threshold)
    assert row["is_anomalous"] == (row["score"] >= config.image_threshold)
    # the weights are the source's, byte for byte
    source = folders["folders"]["old_format"]
    assert (folders["folders"]["calibrated"] / "model.safetensors").read_bytes() == (
        source / "model.safetensors").read_bytes()


def test_converter_download_and_api_write_the_same_folder(folders):
    built = folders["folders"]
    for other in ("converted_api", "downloaded"):
        names = sorted(path.name for path in built["converted"].iterdir())
        assert names == sorted(path.name for path in built[other].iterdir())
        for name in names:
            assert (built["converted"] / name).read_bytes() == (built[other] / name).read_bytes(), (other, name)


def test_old_format_folder_still_loads(folders, fresh_report):
    """A folder whose preprocessor_config.json names `ViP2CLIPProcessor` (written before the rename): the package
    and `AutoProcessor` (remote code, through the alias) load it with its settings."""
    from modeling_vip2clip import ViP2CLIPImageProcessor, ViP2CLIPProcessor
    from modeling_vip2clip.weights.loader import load_model_and_processor

    old = folders["folders"]["old_format"]
    assert ViP2CLIPProcessor is ViP2CLIPImageProcessor
    processor = ViP2CLIPProcessor.from_pretrained(old)
    assert isinstance(processor, ViP2CLIPImageProcessor) and (processor.image_size, processor.min_image_size) == (32, 8)
    _, loaded = load_model_and_processor(str(old))
    assert loaded.to_dict() == processor.to_dict()
    row = fresh_report["old_format"]
    assert row["processor"].startswith("transformers_modules.") and row["processor"].endswith(".ViP2CLIPImageProcessor")
    assert row["processor_image_size"] == 32
    assert row["model"].endswith(".ViP2CLIPModel")
