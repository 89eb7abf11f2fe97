"""The README's Python snippets run as a newcomer would run them: in a fresh process, offline.

The "tiny model" block builds and saves a model folder; the quickstart block then runs on that folder in place of
the published Hub id (the only substitution), on a generated image, and its outputs are checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "vip2clip/vip2clip-vit-l14-336-mvtec"


def _python_block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_tiny_model_and_quickstart_run_offline(tmp_path):
    tiny = _python_block_after("### A tiny model to try everything offline")
    quickstart = _python_block_after("## Python quickstart")
    assert HUB_ID in quickstart and '"tiny-vip2clip"' in tiny
    quickstart = quickstart.replace(HUB_ID, "tiny-vip2clip")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    image.save(tmp_path / "part.png")
    checks = (
        "\nassert out.anomaly_score.shape == (1,) and 0.0 <= float(out.anomaly_score[0]) <= 1.0"
        "\nassert out.anomaly_map.shape == (1, 32, 32)"
        "\nassert tuple(maps[0].shape) == (90, 120) and tuple(masks[0].shape) == (90, 120)"
        "\nassert type(model).__module__.startswith('transformers_modules.')  # the saved remote code ran"
        "\nprint('QUICKSTART-OK')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    for code in (tiny, quickstart + checks):
        completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                                   text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert "QUICKSTART-OK" in completed.stdout
    heatmap = Image.open(tmp_path / "part_heatmap.png")
    assert heatmap.size == image.size
    assert np.abs(np.asarray(heatmap.convert("RGB"), float) - np.asarray(image, float)).mean() > 1.0
