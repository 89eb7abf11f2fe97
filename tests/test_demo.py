"""demo/app.py: the handlers on real images and bad inputs, the authors' weights as the default (served from a
loopback HTTP server), the labelled offline fallback, a `--model` that cannot load, the real server queried with
gradio_client, the Space metadata, and a headless Chromium session (screenshot in artifacts/demo_screenshot.png)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import CHROMIUM, chromium_context, free_port
from loopback_server import FILE_PATH, FileServer, blob_id, write_authors_checkpoint
from modeling_vip2clip.testing_utils import save_tiny_vip2clip, tiny_vip2clip_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
APP = DEMO / "app.py"
EXAMPLE = DEMO / "examples" / "fabric_hole.png"
# gradio_client stages each download in <tempdir>/<40 hex>/: keep those inside the test's tmp_path.
pytestmark = pytest.mark.usefixtures("contained_tempdir")



@pytest.fixture(scope="module")
def app_module():
    spec = importlib.util.spec_from_file_location("vip2clip_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model folder with non-degenerate heads (what `--model DIR` gets in these tests)."""
    return save_tiny_vip2clip(tmp_path_factory.mktemp("demo_model") / "tiny")


@pytest.fixture(scope="module")
def authors_pth(tiny_clip_dir, tmp_path_factory):
    """A checkpoint in the authors' layout for the tiny CLIP (what the loopback server serves)."""
    return write_authors_checkpoint(tiny_clip_dir, tmp_path_factory.mktemp("authors") / "mvtec_train_epoch_10.pth")


# the conversion options that fit the tiny CLIP (tests/tiny_clip.py)
TINY_OPTIONS = dict(image_size=32, feature_layers=[1, 2], top_k=5)
TINY_ARGS = ["--image-size", "32", "--feature-layers", "1", "2", "--top-k", "5"]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF home for this test (huggingface_hub read HF_HOME at import: patch its constant too)."""
    import huggingface_hub.constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def demo(app_module, model_dir):
    loaded = app_module.load_model(str(model_dir))
    assert loaded.trained and loaded.model is not None
    return app_module.AnomalyDemo(loaded)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    good = EXAMPLE.read_bytes()
    (folder / "corrupt.png").write_bytes(good[:60] + b"\x00garbage" * 50 + good[-400:])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file renamed to .png\n")
    ramp = (np.linspace(0, 65535, 120 * 90).reshape(90, 120)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen_bit.tif")
    Image.new("1", (10_000, 10_000)).save(folder / "huge.png")  # 10⁸ pixels, small file
    return folder


# ---------------------------------------------------------------------------------------------- handlers
def _first_score(summary: str) -> float:
    line = next(line for line in summary.splitlines() if line.startswith("### "))
    return float(line.split("anomaly score ")[1].split()[0])


def test_analyze_example(demo):
    summary, overlay, annotated, gallery, state = demo.analyze(str(EXAMPLE), None, 0.5, 0.5)
    results, problems = state
    assert not problems and len(results) == 1 and len(gallery) == 1
    score = results[0].score
    assert 0.0 <= score <= 1.0 and f"{score:.3f}" in summary
    assert overlay.size == Image.open(EXAMPLE).size == (256, 256) and overlay.mode == "RGB"
    base, [(mask, label)] = annotated
    assert base.size == (256, 256) and mask.shape == (256, 256) and "defect" in label
    assert set(np.unique(mask)) <= {0.0, 1.0}
    # the overlay really is the heat-map: it differs from the photo
    assert np.abs(np.asarray(overlay, float) - np.asarray(base, float)).mean() > 10


def test_reference_images_give_labelled_few_shot_maps(demo, tmp_path):
    """Few-shot on the page: with the scored image itself as the only reference its few-shot map is 0, so the
    WinCLIP+ fusion (docs/few_shot.md) gives exactly half the zero-shot map and score; the summary says 1-shot,
    and the bank is not rebuilt for the same reference files."""
    zero_summary, *_, (zero, _) = demo.analyze(str(EXAMPLE), None, 0.5, 0.5)
    few_summary, *_, (few, problems) = demo.analyze(str(EXAMPLE), None, 0.5, 0.5, [str(EXAMPLE)])
    assert not problems and "**zero-shot**" in zero_summary and "**1-shot**" in few_summary
    assert zero[0].k_shot == 0 and few[0].k_shot == 1
    assert few[0].score == pytest.approx(zero[0].score / 2, abs=1e-5)
    np.testing.assert_allclose(few[0].anomaly_map, zero[0].anomaly_map / 2, atol=1e-5)
    bank = demo._bank
    demo.analyze(str(EXAMPLE), None, 0.5, 0.5, [str(EXAMPLE)])
    assert demo._bank is bank  # same files: the cached bank
    (tmp_path / "bad.png").write_bytes(b"not an image")
    summary, *_, (results, problems) = demo.analyze(str(EXAMPLE), None, 0.5, 0.5, [str(tmp_path / "bad.png")])
    assert results[0].k_shot == 0 and any("scored zero-shot instead" in p for p in problems)


def test_bf16_option_keeps_heads_fp32_and_scores_close(app_module, demo, model_dir):
    """`--dtype bf16` is the standard `from_pretrained(dtype=torch.bfloat16)`: towers bf16, heads fp32, the page
    says which, and the example's score and map stay close to the fp32 app's."""
    loaded = app_module.load_model(str(model_dir), "bf16")
    assert loaded.trained and loaded.dtype == "bf16"
    assert {p.dtype for p in loaded.model.clip.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.model.ica.parameters()} | {p.dtype for p in loaded.model.fgp.parameters()} == {
        torch.float32}
    bf16_app = app_module.AnomalyDemo(loaded)
    assert "bf16" in bf16_app.status_markdown() and "fp32" in demo.status_markdown()
    fp32_result = demo.analyze(str(EXAMPLE), None, 0.5, 0.5)[4][0][0]
    bf16_result = bf16_app.analyze(str(EXAMPLE), None, 0.5, 0.5)[4][0][0]
    assert bf16_result.score == pytest.approx(fp32_result.score, abs=0.01)
    # (the 0.999 target of benchmarks/README.md is tested on the real-like model of test_fast_path; this tiny one
    # has heads drawn at 0.5 std, far sharper than trained ones, and lands at ~0.999)
    assert np.corrcoef(bf16_result.anomaly_map.ravel(), fp32_result.anomaly_map.ravel())[0, 1] >= 0.995
    with pytest.raises(ValueError, match="--dtype must be auto, fp32 or bf16"):
        app_module.resolve_dtype("fp16")
    assert app_module.resolve_dtype("auto") in ("fp32", "bf16")


def test_verdict_and_mask_follow_thresholds(demo):
    _, _, _, _, state = demo.analyze(str(EXAMPLE), None, 0.5, 0.5)
    result = state[0][0]
    score, anomaly_map = result.score, result.anomaly_map
    assert anomaly_map.max() - anomaly_map.min() > 1e-4
    below = demo.rethreshold(state, max(score - 0.01, 0.0), 0.5)[0]
    above = demo.rethreshold(state, min(score + 0.01, 1.0), 0.5)[0]
    assert "ANOMALOUS" in below.splitlines()[0] and "normal" in above.splitlines()[0]
    median = float(np.median(anomaly_map))
    _, _, (_, [(mask, _)]), _, _ = demo.rethreshold(state, 0.5, median)
    assert 0 < mask.mean() < 1 and set(np.unique(mask)) == {0.0, 1.0}
    assert np.array_equal(mask.astype(bool), anomaly_map >= median)
    _, _, (_, [(higher, _)]), _, _ = demo.rethreshold(state, 0.5, float(np.quantile(anomaly_map, 0.9)))
    assert higher.sum() < mask.sum()
    # thresholds only re-render: the score is the same as a fresh run
    assert _first_score(demo.analyze(str(EXAMPLE), None, 0.2, 0.5)[0]) == pytest.approx(score, abs=1e-3)


def test_non_square_and_exif_orientation(demo, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    image.save(tmp_path / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    _, overlay, _, gallery, (results, _) = demo.analyze(str(tmp_path / "wide.png"), [str(tmp_path / "rotated.jpg")], 0.5, 0.5)
    assert overlay.size == (300, 200)
    assert [r.image.size for r in results] == [(300, 200), (200, 300)] and gallery[1][0].size == (200, 300)


def test_bad_inputs_get_readable_messages(demo, bad_files):
    names = ["corrupt.png", "empty.png", "notes.png", "sixteen_bit.tif", "huge.png"]
    files = [str(bad_files / name) for name in names]
    start = time.perf_counter()
    with pytest.warns(UserWarning) as warned:  # gr.Warning outside a running app
        summary, overlay, _, gallery, (results, problems) = demo.analyze(str(EXAMPLE), files, 0.5, 0.5)
    assert time.perf_counter() - start < 10  # the 10⁸-pixel image is refused without decoding it
    assert [r.name for r in results] == ["fabric_hole.png", "sixteen_bit.tif"] and len(gallery) == 2
    by_file = {name: next(p for p in problems if p.startswith(name)) for name in ("corrupt.png", "empty.png", "notes.png", "huge.png")}
    assert "corrupt or truncated" in by_file["corrupt.png"] or "not an image" in by_file["corrupt.png"]
    assert "empty (0 bytes)" in by_file["empty.png"]
    assert "not an image file" in by_file["notes.png"]
    assert "10000×10000" in by_file["huge.png"] or "too many pixels" in by_file["huge.png"]
    messages = [str(w.message) for w in warned if str(w.message).startswith(tuple(by_file))]
    assert len(messages) == 4 and all("Traceback" not in message for message in messages)
    assert "Not scored" in summary and "Traceback" not in summary
    # the 16-bit TIFF is converted (÷257), not clipped to white
    tiff = results[1]
    pixels = np.asarray(tiff.image)
    assert tiff.image.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255 and 100 < pixels.mean() < 155
    assert 0.0 <= tiff.score <= 1.0


def test_no_input_and_other_failures_do_not_raise(demo, app_module, tmp_path):
    with pytest.warns(UserWarning, match="first"):
        summary, overlay, annotated, gallery, _ = demo.analyze(None, [], 0.5, 0.5)
    assert overlay is None and annotated is None and gallery == [] and "Upload" in summary
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (5, 5)).save(tiny)  # below the processor's minimum side
    with pytest.warns(UserWarning, match="smaller than the minimum"):
        summary = demo.analyze(str(tiny), None, 0.5, 0.5)[0]
    assert "tiny.png" in summary
    with pytest.raises(app_module.ImageInputError, match="missing"):
        app_module.open_image(tmp_path / "nope.png")


def test_untrained_fallback_model(app_module, capsys, monkeypatch, hf_home):
    """No --model, no network and nothing cached: the labelled untrained model, with the reason and the fix."""
    import huggingface_hub.constants

    # conftest sets HF_HUB_OFFLINE after huggingface_hub has read it; make this process really offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model_a, processor = app_module.build_untrained_model()
    model_b, _ = app_module.build_untrained_model()
    # the package's one tiny-model builder (testing_utils), not a second copy in the demo
    expected = tiny_vip2clip_config()
    assert (model_a.config.image_size, model_a.config.feature_layers, model_a.config.clip_config.vision_config.hidden_size) \
        == (expected.image_size, expected.feature_layers, expected.clip_config.vision_config.hidden_size) == (32, [1, 2], 32)
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    with torch.inference_mode():
        out = model_a(pixel_values=processor(images=[Image.open(EXAMPLE)])["pixel_values"])
    assert out.anomaly_map.shape == (1, 32, 32) and 0 <= float(out.anomaly_score[0]) <= 1
    loaded = app_module.load_authors_weights("mvtec")
    assert not loaded.trained and loaded.model is not None and "HF_HUB_OFFLINE=1 is set" in loaded.error
    printed = capsys.readouterr().out
    assert "the authors' mvtec_train_epoch_10.pth) are unavailable" in printed and "MEANINGLESS" in printed
    page = app_module.AnomalyDemo(loaded).status_markdown()
    assert "unavailable" in page and "MEANINGLESS" in page and "HF_HUB_OFFLINE" in page
    assert "vip2clip download-authors mvtec --out vip2clip-mvtec" in page  # the command that fixes it
    assert "python demo/app.py --model vip2clip-mvtec" in page
    assert "published" not in page
    # an explicit model is never replaced by the fallback
    with pytest.raises(app_module.ModelLoadError, match="--model some/nonexistent-id: no folder named .* HF_HUB_OFFLINE=1"):
        app_module.load_model("some/nonexistent-id")


def test_default_serves_the_authors_weights(app_module, authors_pth, tiny_clip_dir, hf_home, monkeypatch, capsys):
    """No --model and a reachable source: the authors' file is fetched, verified and converted, the page says
    which weights these are, and they are exactly the plain converter's."""
    import huggingface_hub.constants

    from modeling_vip2clip.weights.authors_checkpoint import model_from_authors_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = FileServer({FILE_PATH: authors_pth.read_bytes()})
    try:
        blob = blob_id(authors_pth.read_bytes())
        loaded = app_module.load_authors_weights(
            "mvtec", "fp32", clip=str(tiny_clip_dir), url=server.url(), git_blob_sha1=blob, **TINY_OPTIONS)
    finally:
        server.stop()
    assert loaded.trained and loaded.authors.name == "mvtec" and loaded.source == "mvtec_train_epoch_10.pth"
    assert "No --model given: serving the authors' mvtec_train_epoch_10.pth" in capsys.readouterr().out
    app = app_module.AnomalyDemo(loaded)
    page = app.status_markdown()
    assert "the authors' released ViP²-CLIP weights" in page and "trained on MVTec AD" in page
    assert server.url() in page and blob[:12] in page and "non-commercial" in page and "2505.17692" in page
    assert "UNTRAINED" not in page and "MEANINGLESS" not in app.analyze(str(EXAMPLE), None, 0.5, 0.5)[0]
    reference = model_from_authors_checkpoint(authors_pth, tiny_clip_dir, **TINY_OPTIONS)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(pixel_values=pixel_values).anomaly_score,
                                   reference(pixel_values=pixel_values).anomaly_score, atol=0, rtol=0)


def test_overlay_has_a_colour_scale(demo):
    """The legend is the serving processor's own colormap on the fixed 0 … 1 scale of the overlays (jet)."""
    from modeling_vip2clip.processing_vip2clip import jet_colormap

    legend = demo.colour_scale_html()
    for value in (0.0, 0.5, 1.0):
        r, g, b = jet_colormap(np.array([[value]]))[0, 0]
        assert f"rgb({r},{g},{b}) {round(100 * value)}%" in legend
    assert "<span>0</span>" in legend and "<span>1</span>" in legend and "0 = normal" in legend


def test_bad_model_argument_exits_fast(tmp_path):
    """`--model` naming an empty folder or a missing path: exit 2 with one line, before gradio and torch load."""
    empty = tmp_path / "empty-model"
    empty.mkdir()
    for model, message in ((str(empty), "not a model folder (no config.json in it)"),
                           ("./no-such-model", "no such file or folder")):
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(APP), "--model", model, "--port", str(free_port())],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        elapsed = time.perf_counter() - start
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith(f"error: --model {model}: {message}; ") and run.stderr.count("\n") == 1
        assert run.stdout == ""  # nothing was loaded, nothing served
        assert elapsed < 5, f"took {elapsed:.1f} s"  # the bound: refused within seconds


@pytest.mark.slow
def test_unloadable_hub_model_exits_with_the_reason(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    run = subprocess.run([sys.executable, str(APP), "--model", "some/nonexistent-id", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model some/nonexistent-id: no folder named") and "HF_HUB_OFFLINE=1" in last
    assert "UNTRAINED" not in run.stdout  # no silent fallback


# ---------------------------------------------------------------------------------------------- packaging
def test_space_metadata_requirements_and_examples(app_module, tmp_path, monkeypatch):
    import gradio
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(DEMO / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__ == "6.31.0"
    assert card.data.app_file == "app.py" and (DEMO / card.data.app_file).is_file()
    assert card.data.python_version == "3.11" and card.data.license
    assert card.data.models == [app_module.DEFAULT_CLIP] == ["openai/clip-vit-large-patch14-336"]  # what it downloads
    requirements = (DEMO / "requirements.txt").read_text()
    for package in ("torch", "transformers", "gradio==6.31.0", "pillow", "safetensors"):
        assert package in requirements
    examples = sorted((DEMO / "examples").glob("*.png"))
    assert len(examples) >= 4 and sum(p.stat().st_size for p in examples) < 500_000
    assert "CC0" in (DEMO / "examples" / "LICENSE").read_text()
    # the committed examples are exactly what the generator makes
    spec = importlib.util.spec_from_file_location("vip2clip_make_examples", DEMO / "make_examples.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    monkeypatch.setattr(maker, "EXAMPLES", tmp_path)
    for path in maker.main():
        assert path.read_bytes() == (DEMO / "examples" / path.name).read_bytes(), (
            f"{path.name} is stale: run python demo/make_examples.py")


_SPACE_CHILD = r"""
import importlib.abc, sys

class _NoPackage(importlib.abc.MetaPathFinder):  # a Space has no vip2clip package, only demo/'s files
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_vip2clip":
            raise ImportError("no vip2clip package on this Space")

sys.meta_path.insert(0, _NoPackage())
sys.path.insert(0, sys.argv[1])
import app

loaded = app.load_model(sys.argv[2])
assert loaded.trained and loaded.via == "remote code", loaded
assert type(loaded.model).__module__.startswith("transformers_modules.")
summary = app.AnomalyDemo(loaded).analyze(sys.argv[3], None, 0.5, 0.5)[0]
print("SCORED", summary.splitlines()[0])
missing = app.load_authors_weights()  # the default needs the package to fetch and convert: it says so
assert missing.model is None and "No fallback model could be built" in app.AnomalyDemo(missing).status_markdown()
assert "copy modeling_vip2clip/ next to app.py" in missing.fix
print("NO-FALLBACK-OK")
"""


@pytest.mark.slow
def test_runs_as_a_space_without_the_package(model_dir, tmp_path):
    """demo/ alone (as uploaded to a Space): a model folder comes through its remote code; the default (the
    authors' weights) needs the package, and without it the page says so instead of crashing."""
    space = tmp_path / "space"
    shutil.copytree(DEMO, space, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    run = subprocess.run(
        [sys.executable, "-c", _SPACE_CHILD, str(space), str(model_dir), str(space / "examples" / EXAMPLE.name)],
        cwd=space, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "SCORED ### fabric_hole.png: anomaly score" in run.stdout and "NO-FALLBACK-OK" in run.stdout
    assert "are unavailable" in run.stdout


# ---------------------------------------------------------------------------------------------- the server
class Server:
    """`python demo/app.py ARGS` in its own process and HF home (offline unless `env` says otherwise)."""

    def __init__(self, args: list[str], tmp: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tmp / f"server_{self.port}.log"
        env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "HF_HOME": str(tmp / f"hf_home_{self.port}"), **env}
        self.process = subprocess.Popen(
            [sys.executable, str(APP), *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )

    def wait(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited ({self.process.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not up after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def authors_server(authors_pth):
    """The authors' file on loopback; the first GET is cut half-way (the demo's download resumes it)."""
    served = FileServer({FILE_PATH: authors_pth.read_bytes()})
    served.state.drop_after = len(authors_pth.read_bytes()) // 2
    yield served
    served.stop()


@pytest.fixture(scope="module")
def servers(model_dir, authors_server, authors_pth, tiny_clip_dir, tmp_path_factory):
    """Started together (they boot in parallel): the app on the tiny model folder; the default (no --model) offline
    with nothing cached; the default with the authors' file on loopback."""
    tmp = tmp_path_factory.mktemp("servers")
    started = []
    try:
        started.append(Server(["--model", str(model_dir)], tmp))
        started.append(Server([], tmp))
        started.append(Server(
            ["--clip", str(tiny_clip_dir), *TINY_ARGS], tmp, HF_HUB_OFFLINE="0", VIP2CLIP_AUTHORS_URL=authors_server.url(),
            VIP2CLIP_AUTHORS_GIT_BLOB_SHA1=blob_id(authors_pth.read_bytes()),
        ))
        yield [server.wait() for server in started]
    finally:
        for server in started:
            server.stop()


def _repeated_lines(output: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(("Loading weights", "Writing"))]
    return sorted({line for line in lines if lines.count(line) > 1})


@pytest.mark.slow
def test_server_with_gradio_client(servers, bad_files):
    from gradio_client import Client, handle_file

    server = servers[0]
    client = Client(server.url, verbose=False)
    assert "/detect" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    summary, overlay, annotated, gallery = client.predict(handle_file(str(EXAMPLE)), None, 0.5, 0.5, api_name="/detect")
    score = _first_score(summary)
    assert 0.0 <= score <= 1.0
    assert Image.open(overlay).size == (256, 256)
    mask = np.asarray(Image.open(annotated["annotations"][0]["image"]))
    assert mask.shape[:2] == (256, 256)
    assert len(gallery) == 1 and "fabric_hole.png" in gallery[0]["caption"]
    # bad files through the real upload path: readable messages, then the server keeps serving
    summary, overlay, _, gallery = client.predict(
        None, [handle_file(str(bad_files / "notes.png")), handle_file(str(bad_files / "corrupt.png"))], 0.5, 0.5,
        api_name="/detect",
    )
    assert overlay is None and gallery == [] and "notes.png: not an image file" in summary and "corrupt.png" in summary
    again = client.predict(handle_file(str(EXAMPLE)), None, 0.5, 0.5, api_name="/detect")[0]
    assert _first_score(again) == pytest.approx(score, abs=1e-3)
    # files are served from the examples folder only
    assert server.status(f"/gradio_api/file={DEMO / 'examples' / 'pill_good.png'}") == 200
    assert server.status(f"/gradio_api/file={APP}") == 403
    assert server.status(f"/gradio_api/file={ROOT / 'pyproject.toml'}") == 403
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_offline_fallback_server(servers):
    from gradio_client import Client, handle_file

    server = servers[1]
    output = server.output()
    assert "the authors' mvtec_train_epoch_10.pth) are unavailable" in output and "UNTRAINED" in output
    assert "HF_HUB_OFFLINE=1 is set" in output and "vip2clip download-authors mvtec --out vip2clip-mvtec" in output
    assert _repeated_lines(output) == []
    with urllib.request.urlopen(server.url + "config", timeout=5) as response:
        page_config = response.read().decode()
    assert "are unavailable" in page_config and "MEANINGLESS" in page_config and "download-authors" in page_config
    summary = Client(server.url, verbose=False).predict(handle_file(str(EXAMPLE)), None, 0.5, 0.5, api_name="/detect")[0]
    assert "MEANINGLESS" in summary and 0.0 <= _first_score(summary) <= 1.0


@pytest.mark.slow
def test_default_server_serves_the_authors_weights(servers, authors_server, authors_pth, tiny_clip_dir, app_module,
                                                   tmp_path):
    """No --model, the source on loopback: downloaded (the cut resumed), verified, converted and served; the page
    names the weights; start-up output has no duplicated line (huggingface_hub's retry warning is printed once)."""
    from gradio_client import Client, handle_file

    from modeling_vip2clip.weights.authors_checkpoint import model_from_authors_checkpoint

    server = servers[2]
    output = server.output()
    assert "No --model given: serving the authors' mvtec_train_epoch_10.pth" in output
    assert "Downloading the authors' mvtec_train_epoch_10.pth" in output and "Verified" in output
    assert output.count("Trying to resume download") == 1 and _repeated_lines(output) == []
    assert "UNTRAINED" not in output and "Traceback" not in output
    assert authors_server.state.gets() == [None, None]  # cut, then fetched again
    with urllib.request.urlopen(server.url + "config", timeout=5) as response:
        page_config = response.read().decode()
    assert "the authors' released ViP²-CLIP weights" in page_config and "colour-scale" in page_config
    summary = Client(server.url, verbose=False).predict(handle_file(str(EXAMPLE)), None, 0.5, 0.5, api_name="/detect")[0]
    assert "MEANINGLESS" not in summary
    # the plain converter's model gives the same score on the same image
    plain = tmp_path / "plain"
    model_from_authors_checkpoint(authors_pth, tiny_clip_dir, plain, **TINY_OPTIONS)
    expected = app_module.AnomalyDemo(app_module.load_model(str(plain))).analyze(str(EXAMPLE), None, 0.5, 0.5)[4][0][0]
    assert _first_score(summary) == pytest.approx(expected.score, abs=1e-3)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_browser_upload_and_run(servers, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    server = servers[0]
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        context = chromium_context(p, tmp_path / "chromium-profile", 1400, 1000)
        try:
            page = context.new_page()
            page.goto(server.url, wait_until="domcontentloaded")
            page.wait_for_selector("#run-button", timeout=30_000)
            assert "ViP²-CLIP" in page.inner_text("h1")
            page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE))
            page.wait_for_selector("#input-image img", timeout=20_000)
            page.click("#run-button")
            page.wait_for_selector("#overlay img", timeout=30_000)
            page.wait_for_selector("#verdict h3", timeout=30_000)
            verdict = page.inner_text("#verdict")
            assert "fabric_hole.png" in verdict and "anomaly score" in verdict
            overlay_size = page.eval_on_selector("#overlay img", "img => [img.naturalWidth, img.naturalHeight]")
            assert overlay_size == [256, 256]
            assert page.locator("#gallery img").count() >= 1
            page.screenshot(path=str(artifacts / "demo_screenshot.png"), full_page=True)
        finally:
            context.close()
    assert (artifacts / "demo_screenshot.png").stat().st_size > 10_000
