"""hub/publish.py and hub/model_card.py: the Hub folder a tiny random model becomes, loaded back in a fresh offline
process through AutoModel / AutoProcessor / pipeline (trust_remote_code), its model card, and the parity guard.

`ModelCard.validate()` posts the card to the Hub's /api/validate-yaml endpoint (network), so it is not called
here; the YAML is parsed with `ModelCard.load` and PyYAML and its fields are checked instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from launch import load_script
from modeling_vip2clip.testing_utils import save_tiny_vip2clip

ROOT = Path(__file__).resolve().parents[1]
PUBLISH = ROOT / "hub" / "publish.py"
REPO_ID = "vip2clip/vip2clip-vit-l14-336-mvtec"
EVAL = {
    "dataset": "visa",
    "per_category": {
        "candle": {"image_auroc": 0.9123, "image_ap": 0.93, "image_f1_max": 0.85, "pixel_auroc": 0.981,
                   "pixel_aupro": 0.94, "pixel_f1_max": 0.31, "pixel_ap": 0.22},
        "pcb1": {"image_auroc": 0.8577, "image_ap": 0.878, "image_f1_max": 0.846, "pixel_auroc": 0.927,
                 "pixel_aupro": 0.904, "pixel_f1_max": 0.362, "pixel_ap": 0.25},
    },
    "mean": {"image_auroc": 0.885, "image_ap": 0.904, "image_f1_max": 0.848, "pixel_auroc": 0.954,
             "pixel_aupro": 0.922, "pixel_f1_max": 0.336, "pixel_ap": 0.235},
}


@pytest.fixture(scope="module")
def publish():
    return load_script("vip2clip_publish", PUBLISH)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A tiny random ViP²-CLIP with non-degenerate heads, saved with its processor (the 'trained' folder)."""
    return save_tiny_vip2clip(tmp_path_factory.mktemp("trained") / "vip2clip-tiny")


@pytest.fixture(scope="module")
def built(source_dir, publish, tmp_path_factory):
    """`publish.py --dry-run`'s command entry point, in this process (it builds, then parity-checks in its own fresh
    process: that one is the point, a second torch import around it is not)."""
    work = tmp_path_factory.mktemp("publish")
    eval_json = work / "results_visa.json"
    eval_json.write_text(json.dumps(EVAL))
    out = work / "hub.folder-with.dots"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = publish.main(["--model", str(source_dir), "--repo-id", REPO_ID, "--eval-json", str(eval_json),
                             "--out", str(out), "--dry-run"])
    assert code == 0, stdout.getvalue() + stderr.getvalue()
    return out, stdout.getvalue()


def _source_outputs(source_dir, pixel_values):
    from modeling_vip2clip import ViP2CLIPModel

    model = ViP2CLIPModel.from_pretrained(source_dir).eval()
    with torch.inference_mode():
        return model(pixel_values=pixel_values)


# ---------------------------------------------------------------------------------------------- the folder
@pytest.mark.slow
def test_dry_run_builds_complete_folder(built):
    out, stdout = built
    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "eval_results.json",
            "configuration_vip2clip.py", "modeling_vip2clip.py", "processing_vip2clip.py",
            "cpu_fast_path_vip2clip.py", "reference_bank_vip2clip.py", "pipeline_vip2clip.py"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pth", ".pt", ".pkl"))]  # safetensors only
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_vip2clip.ViP2CLIPConfig",
                                  "AutoModel": "modeling_vip2clip.ViP2CLIPModel",
                                  "AutoImageProcessor": "processing_vip2clip.ViP2CLIPImageProcessor",
                                  "AutoProcessor": "processing_vip2clip.ViP2CLIPImageProcessor"}
    assert config["custom_pipelines"]["anomaly-detection"]["impl"] == "pipeline_vip2clip.ViP2CLIPAnomalyDetectionPipeline"
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == {"AutoImageProcessor": "processing_vip2clip.ViP2CLIPImageProcessor",
                                        "AutoProcessor": "processing_vip2clip.ViP2CLIPImageProcessor"}
    assert preprocessor["image_processor_type"] == "ViP2CLIPImageProcessor"
    assert preprocessor["image_size"] == 32
    # the shipped code files import nothing from the repository's package
    for name in ("configuration_vip2clip.py", "modeling_vip2clip.py", "processing_vip2clip.py", "cpu_fast_path_vip2clip.py",
                 "reference_bank_vip2clip.py", "pipeline_vip2clip.py"):
        code = (out / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+(modeling_vip2clip|hub)\b", code, re.M), name
    assert "parity OK" in stdout and "nothing uploaded" in stdout


_FRESH_CHILD = textwrap.dedent(
    r"""
    import json, os, sys
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor, pipeline

    folder, work = sys.argv[1], Path(sys.argv[2])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # 1. the model card's usage snippet, verbatim except for the repo id and the image file
    snippet = (work / "snippet.py").read_text()
    namespace = {}
    exec(compile(snippet, "snippet", "exec"), namespace)
    # 2. outputs on the test's inputs
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    pixel_values = torch.from_numpy(np.load(work / "pixel_values.npy"))
    with torch.inference_mode():
        out = model(pixel_values=pixel_values)
    image = Image.open(work / "image.png")
    detector = pipeline(model=folder, trust_remote_code=True, device="cpu")
    result = detector(str(work / "image.png"), threshold=0.5)
    save_file({
        "anomaly_score": out.anomaly_score.contiguous(), "anomaly_map": out.anomaly_map.contiguous(),
        "processed": processor(images=[image])["pixel_values"].contiguous(),
        "pipeline_map": torch.from_numpy(np.ascontiguousarray(result["anomaly_map"])),
        "pipeline_mask": torch.from_numpy(np.array(result["mask"])).contiguous(),
        "snippet_map": namespace["anomaly_map"].contiguous(),
    }, str(work / "outputs.safetensors"))
    (work / "info.json").write_text(json.dumps({
        "model_module": type(model).__module__, "processor_module": type(processor).__module__,
        "pipeline_class": type(detector).__name__, "pipeline_score": result["score"],
        "pipeline_is_anomalous": result["is_anomalous"], "snippet_score": namespace["score"],
        "package_imported": "modeling_vip2clip" in sys.modules,
    }))
    """
)


def _card_snippet(card_text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card_text, re.S)
    snippet = next(block for block in blocks if "AutoModel.from_pretrained" in block)
    assert f'repo_id = "{REPO_ID}"' in snippet
    return snippet


@pytest.mark.slow
def test_folder_reproduces_source_in_fresh_offline_process(built, source_dir, tmp_path):
    """AutoModel / AutoProcessor / pipeline from the folder, in a new interpreter with an empty remote-code cache
    and the repository off sys.path, give the source model's outputs; the card's usage snippet runs as written."""
    from PIL import Image

    from modeling_vip2clip import ViP2CLIPImageProcessor

    out, _ = built
    generator = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(3, 3, 32, 32, generator=generator)
    np.save(tmp_path / "pixel_values.npy", pixel_values.numpy())
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    card_text = (out / "README.md").read_text()
    (tmp_path / "snippet.py").write_text(
        _card_snippet(card_text).replace(REPO_ID, str(out)).replace('"image.png"', repr(str(tmp_path / "image.png")))
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", _FRESH_CHILD, str(out), str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    got = load_file(str(tmp_path / "outputs.safetensors"))
    assert info["model_module"].startswith("transformers_modules.") and info["processor_module"].startswith("transformers_modules.")
    assert info["pipeline_class"] == "ViP2CLIPAnomalyDetectionPipeline"
    # the code really came through the fresh cache
    for name in ("modeling_vip2clip.py", "cpu_fast_path_vip2clip.py", "reference_bank_vip2clip.py"):
        assert any((tmp_path / "modules").rglob(name)), name

    expected = _source_outputs(source_dir, pixel_values)
    assert expected.anomaly_score.std() > 1e-3  # non-degenerate, so the comparison means something
    torch.testing.assert_close(got["anomaly_score"], expected.anomaly_score, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["anomaly_map"], expected.anomaly_map, atol=1e-6, rtol=0)

    processor = ViP2CLIPImageProcessor.from_pretrained(source_dir)
    inputs = processor(images=[image])
    torch.testing.assert_close(got["processed"], inputs["pixel_values"], atol=0, rtol=0)
    single = _source_outputs(source_dir, inputs["pixel_values"])
    reference_map = processor.post_process_anomaly_maps(single, target_sizes=[(45, 70)])[0]
    assert info["pipeline_score"] == pytest.approx(float(single.anomaly_score[0]), abs=1e-6)
    assert info["snippet_score"] == pytest.approx(float(single.anomaly_score[0]), abs=1e-6)
    assert info["pipeline_is_anomalous"] == (info["pipeline_score"] >= 0.5)
    torch.testing.assert_close(got["pipeline_map"], reference_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["snippet_map"], reference_map, atol=1e-6, rtol=0)
    assert got["pipeline_map"].shape == (45, 70)
    assert torch.equal(got["pipeline_mask"] > 0, reference_map >= 0.5)


# ---------------------------------------------------------------------------------------------- the card
@pytest.mark.slow
def test_model_card_metadata_and_model_index(built):
    out, _ = built
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-segmentation"
    assert set(data.tags) >= {"anomaly-detection", "zero-shot", "clip", "vip2clip", "industrial-inspection", "medical-imaging"}
    assert data.license == "cc-by-nc-sa-4.0"
    assert data.base_model == "openai/clip-vit-large-patch14-336"
    assert data.datasets == ["mvtec-ad"]
    # the raw YAML front matter parses on its own and carries the model-index
    front = yaml.safe_load(card.content.split("---")[1])
    assert front["model-index"][0]["name"] == "vip2clip-vit-l14-336-mvtec"
    results = {(r.task_type, r.metric_name): r for r in data.eval_results}
    assert len(results) == 7
    image_auroc = results[("image-classification", "Image AUROC (%)")]
    assert image_auroc.metric_value == pytest.approx(88.5) and image_auroc.dataset_name == "VisA"
    assert image_auroc.dataset_split == "test" and image_auroc.metric_type == "roc_auc"
    assert results[("image-segmentation", "Pixel AUPRO@0.3 (%)")].metric_value == pytest.approx(92.2)
    assert results[("image-segmentation", "Pixel F1-max (%)")].metric_value == pytest.approx(33.6)
    text = card.text
    assert "non-commercial" in text and "CC BY-NC-SA 4.0" in text  # the inherited licence term
    assert "2505.17692" in text and "Visual-Perception Prompting with Unified Alignment" in text  # citation
    assert "@article{" in text and "test split of MVTec AD" in text  # BibTeX and the training protocol
    assert "| candle |" in text and "91.2" in text and "**88.5**" in text  # per-category table + mean
    assert "post_process_anomaly_maps" in text and "trust_remote_code=True" in text


def test_card_license_follows_training_set(tiny_config):
    sys.path.insert(0, str(ROOT / "hub"))
    from model_card import build_model_card

    visa = build_model_card(tiny_config, train_dataset="visa")
    assert visa.data.license == "cc-by-4.0" and visa.data.datasets == ["visa"]
    assert "non-commercial" not in visa.text and visa.data.eval_results is None
    with pytest.raises(ValueError, match="non-commercial"):
        build_model_card(tiny_config, train_dataset="mvtec", license="apache-2.0")
    # an evaluation on the training set itself is flagged as not zero-shot
    same = build_model_card(tiny_config, train_dataset="mvtec", eval_results={**EVAL, "dataset": "mvtec"})
    assert "Not zero-shot" in same.text


def test_card_says_where_the_weights_come_from(tiny_config):
    """Own weights are not passed off as the authors'; the authors' converted release is named with its source and
    terms (no licence file at the pinned commit, not redistributed by this project)."""
    sys.path.insert(0, str(ROOT / "hub"))
    from model_card import build_model_card

    own = build_model_card(tiny_config, train_dataset="mvtec").text
    assert "Trained by the owner of this repository" in own and "not a release of the paper's authors" in own
    authors = build_model_card(tiny_config, train_dataset="mvtec", authors_release="mvtec").text
    assert "`mvtec_train_epoch_10.pth`" in authors and "4b5884f6c6bd42001fe47ccaeef32e4f1a8f5a93" in authors
    assert "2988d3d425552fde7ed8c33433dea402c43103c5" in authors and "no licence file" in authors
    assert "use it on anything that is not MVTec AD" in authors and "non-commercial" in authors
    with pytest.raises(ValueError, match="trained on VisA: pass train_dataset='visa'"):
        build_model_card(tiny_config, train_dataset="mvtec", authors_release="visa")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**EVAL, "mean": {"image_auroc": 91.2}}, "outside \\[0, 1\\]"),
        ({**EVAL, "mean": {"image_accuracy": 0.9}}, "unknown metric"),
        ({"per_category": {}, "mean": {"image_auroc": 0.9}}, "'dataset'"),
        ({**EVAL, "mean": {"image_auroc": float("nan")}}, "finite"),
    ],
)
def test_eval_json_is_checked(bad, message):
    sys.path.insert(0, str(ROOT / "hub"))
    from model_card import load_eval_results

    with pytest.raises(ValueError, match=message):
        load_eval_results(bad)


# ---------------------------------------------------------------------------------------------- the guard
@pytest.mark.slow
def test_parity_check_refuses_tampered_folder(built, source_dir, publish, tmp_path):
    out, _ = built
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    weights = load_file(str(tampered / "model.safetensors"))
    weights["fgp.q_proj.weight"] = -weights["fgp.q_proj.weight"]  # flip one head weight
    save_file(weights, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(publish.ParityError, match="does NOT reproduce"):
        publish.check_parity(source_dir, tampered)


def test_cli_refuses_bad_arguments(source_dir, tmp_path, publish, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    # a non-empty folder that is not an earlier build is never cleared
    assert publish.main(["--model", str(source_dir), "--out", str(out), "--dry-run", "--overwrite"]) == 2
    assert (out / "keep.txt").exists() and "refusing" in capsys.readouterr().err
    assert publish.main(["--model", str(source_dir), "--repo-id", "no-slash", "--dry-run"]) == 2
    assert publish.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--dry-run"]) == 2
    assert publish.main(["--model", str(source_dir), "--out", str(tmp_path / "o3"), "--skip-parity",
                         "--repo-id", "me/model"]) == 2
    assert "--skip-parity is only allowed with --dry-run" in capsys.readouterr().err
    # uploading needs the user's own repo id: no default namespace is assumed
    assert publish.main(["--model", str(source_dir), "--out", str(tmp_path / "o4")]) == 2
    assert "--repo-id is needed to upload" in capsys.readouterr().err
