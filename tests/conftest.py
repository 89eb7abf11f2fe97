"""Shared fixtures: tiny CLIP checkpoints and tiny ViP²-CLIP models built in temp dirs, never downloaded."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / transformers, which read these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_vip2clip.testing_utils import save_tiny_clip, tiny_vip2clip_config  # noqa: E402
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_cache(tmp_path_factory):
    """Remote-code modules and the Hub cache go to a temp dir, never the user's."""
    root = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_MODULES_CACHE"] = str(root / "modules")
    os.environ["HF_HOME"] = str(root)
    yield


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_clip_dir, tmp_path_factory):
    """`ViP2CLIPModel.from_clip` of the tiny CLIP (32 px, layers 1 and 2), saved with its processor: the folder
    the command-line tests pass as `--model` (read only)."""
    from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPImageProcessor

    torch.manual_seed(0)
    model = ViP2CLIPModel.from_clip(tiny_clip_dir, image_size=32, feature_layers=[1, 2], n_ctx=3, n_cls=2, top_k=5)
    out = tmp_path_factory.mktemp("tiny_model_dir")
    model.save_pretrained(out)
    ViP2CLIPImageProcessor(image_size=32).save_pretrained(out)
    return out


@pytest.fixture
def tiny_config():
    return tiny_vip2clip_config()


@pytest.fixture
def tiny_model(tiny_config):
    from modeling_vip2clip import ViP2CLIPModel

    torch.manual_seed(0)
    return ViP2CLIPModel(tiny_config).eval()


@pytest.fixture
def contained_tempdir(tmp_path, monkeypatch):
    """Stage library temp files in the test's tmp_path, not the system temp dir.

    gradio_client downloads every result through a fresh `<tempdir>/<40 hex>/` folder that it leaves behind
    (empty); a load test would otherwise leave hundreds of them in /tmp per run.
    """
    import tempfile

    scratch = tmp_path / "tempdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield scratch


@pytest.fixture
def fresh_accelerate_state():
    """Each training / evaluation run builds its own Accelerator; reset Accelerate's singletons around a test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def run_cli(capsys):
    """`vip2clip ARGV` in this process, through the same boundary as the console script (`cli.main.main`): a
    `CompletedProcess` (exit status, stdout, stderr) as `subprocess.run` would give, without a new interpreter
    re-importing torch (seconds per call). argparse's refusals raise SystemExit; their status is the exit status.
    Keep a real subprocess where a fresh process is the point (imports, signals, environment read at import)."""
    from modeling_vip2clip.cli.main import main

    def run(*argv) -> subprocess.CompletedProcess:
        argv = [str(value) for value in argv]
        capsys.readouterr()  # only this call's output
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["vip2clip", *argv], code, out, err)

    return run
