"""`vip2clip predict --references`: few-shot scoring from a folder of normal images or a saved bank."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from modeling_vip2clip.cli.main import main as cli_main


def _scores(out) -> dict[str, float]:
    with open(out / "predictions.csv", newline="") as handle:
        return {row["path"].rsplit("/", 1)[-1]: float(row["score"]) for row in csv.DictReader(handle)}


def test_predict_with_references_folder_and_saved_bank(tiny_model_dir, tmp_path, capsys):
    """An image that is its own only reference has a few-shot map of 0, so WinCLIP+'s fusion halves its zero-shot
    score exactly (docs/few_shot.md); a saved bank of the same image gives the same scores as the folder."""
    import torch

    from modeling_vip2clip.engine.references import load_reference_bank
    from modeling_vip2clip.weights.loader import load_model_and_processor

    images, references = tmp_path / "images", tmp_path / "refs"
    images.mkdir(), references.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / name)
    (references / "a.png").write_bytes((images / "a.png").read_bytes())
    common = ["--num-workers", "0", "--no-progress", "--no-overlays"]
    assert cli_main(["predict", "--model", str(tiny_model_dir), str(images), "--output-dir", str(tmp_path / "zero"),
                     *common]) == 0
    assert cli_main(["predict", "--model", str(tiny_model_dir), str(images), "--output-dir", str(tmp_path / "few"),
                     "--references", str(references), *common]) == 0
    zero, few = _scores(tmp_path / "zero"), _scores(tmp_path / "few")
    assert few["a.png"] == pytest.approx(zero["a.png"] / 2, abs=2e-6)
    assert few["b.png"] > zero["b.png"] / 2  # b is not in the bank: its few-shot part is positive

    model, processor = load_model_and_processor(str(tiny_model_dir))
    bank_file = tmp_path / "bank.safetensors"
    with torch.no_grad():
        load_reference_bank(model, processor, str(references)).save(bank_file)
    assert cli_main(["predict", "--model", str(tiny_model_dir), str(images), "--output-dir", str(tmp_path / "bank"),
                     "--references", str(bank_file), *common]) == 0
    assert _scores(tmp_path / "bank") == pytest.approx(few, abs=1e-6)

    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert cli_main(["predict", "--model", str(tiny_model_dir), str(images), "--output-dir", str(tmp_path / "x"),
                     "--references", str(tmp_path / "empty"), *common]) == 2
    assert "--references" in capsys.readouterr().err
