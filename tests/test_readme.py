"""The README's snippets run as a newcomer would run them: in a fresh process, offline.

* The "tiny model" block builds and saves a model folder; the quickstart block then runs on that folder in place of
  the `vip2clip download-authors` folder (the only substitution), on the image that ships in `demo/examples/`, and
  its outputs are checked.
* The "Try the whole CLI offline" block runs line by line in a shell, and what each command writes is checked.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
AUTHORS_FOLDER = "vip2clip-mvtec"


def _block_after(heading: str, language: str = "python") -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def _offline_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "HF_MODULES_CACHE": str(tmp_path / "modules")}


def test_readme_tiny_model_and_quickstart_run_offline(tmp_path):
    tiny = _block_after("### A tiny model to try everything offline")
    quickstart = _block_after("## Python quickstart")
    assert f'"{AUTHORS_FOLDER}"' in quickstart and '"tiny-vip2clip"' in tiny
    quickstart = quickstart.replace(AUTHORS_FOLDER, "tiny-vip2clip")
    shutil.copytree(ROOT / "demo" / "examples", tmp_path / "demo" / "examples")
    image = Image.open(tmp_path / "demo" / "examples" / "metal_scratch.png")
    height, width = image.size[::-1]
    checks = (
        "\nassert out.anomaly_score.shape == (1,) and 0.0 <= float(out.anomaly_score[0]) <= 1.0"
        "\nassert out.anomaly_map.shape == (1, 32, 32)"
        f"\nassert tuple(maps[0].shape) == ({height}, {width}) and tuple(masks[0].shape) == ({height}, {width})"
        "\nassert type(model).__module__.startswith('transformers_modules.')  # the saved remote code ran"
        "\nprint('QUICKSTART-OK')\n"
    )
    for code in (tiny, quickstart + checks):
        completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_offline_env(tmp_path),
                                   capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert "QUICKSTART-OK" in completed.stdout
    score = re.search(r"anomaly score (\d\.\d{3}), map \(32, 32\)", completed.stdout)
    assert score and 0.0 <= float(score.group(1)) <= 1.0, completed.stdout
    heatmap = Image.open(tmp_path / "metal_scratch_heatmap.png")
    assert heatmap.size == image.size
    assert np.abs(np.asarray(heatmap.convert("RGB"), float) - np.asarray(image.convert("RGB"), float)).mean() > 1.0


def test_readme_cli_tour_runs_offline(tmp_path):
    """Every line of the tour, in order, in a shell, offline: each exits 0 and leaves what the next one reads."""
    lines = [line.split("#")[0].strip() for line in _block_after("## Try the whole CLI offline", "bash").splitlines()]
    lines = [line for line in lines if line]
    assert [line.split()[0:2] for line in lines][-4:] == [["vip2clip", "convert"], ["vip2clip", "train"],
                                                          ["vip2clip", "evaluate"], ["vip2clip", "predict"]]
    bin_dir = Path(sys.executable).parent
    env = {**_offline_env(tmp_path), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
    tour = tmp_path / "tour"
    assert (tour / "run" / "model" / "model.safetensors").is_file()
    results = json.loads((tour / "results" / "results.json").read_text())
    assert results["num_evaluated"] == 4 and set(results["per_category"]) == {"fabric"}
    with open(tour / "predictions" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(0.0 <= float(row["score"]) <= 1.0 for row in rows)
    # The README's overlay names and reports (section "Scoring at scale", "Reports").
    assert all(row["overlay"].startswith("overlays/") and row["overlay"].endswith(".overlay.png") for row in rows)
    assert all((tour / "predictions" / row["overlay"]).is_file() for row in rows)
    assert (tour / "predictions" / "report.html").is_file() and (tour / "results" / "report.html").is_file()
    assert (tour / "results" / "results.md").read_text().startswith("# ")
