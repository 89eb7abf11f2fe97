"""modeling_vip2clip.weights.authors_release / download_authors: the authors' release fetched over real HTTP from a
server on 127.0.0.1 (a checkpoint this test writes in the authors' layout), verified by git blob id, converted,
cached under HF_HOME; interrupted, wrong, truncated and concurrent downloads; the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from launch import free_port, load_script
from loopback_server import FILE_PATH, FileServer, blob_id, write_authors_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# the tiny CLIP's geometry (tests/tiny_clip.py): conversion options of every call here
OPTIONS = dict(image_size=32, feature_layers=[1, 2], top_k=5)
CLI_OPTIONS = ["--image-size", "32", "--feature-layers", "1", "2", "--top-k", "5"]
CHUNK = 1024


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def authors_pth(tiny_clip_dir, tmp_path_factory) -> Path:
    return write_authors_checkpoint(tiny_clip_dir, tmp_path_factory.mktemp("authors") / "mvtec_train_epoch_10.pth")


@pytest.fixture(scope="module")
def plain_converted(authors_pth, tiny_clip_dir, tmp_path_factory) -> Path:
    """The same file through hub/authors_checkpoint_to_folder.py (the plain converter), its command's entry point
    in this process."""
    out = tmp_path_factory.mktemp("plain") / "converted"
    converter = load_script("vip2clip_authors_checkpoint_to_folder", ROOT / "hub" / "authors_checkpoint_to_folder.py")
    assert converter.main(["--checkpoint", str(authors_pth), "--clip", str(tiny_clip_dir), "--out", str(out),
                           *CLI_OPTIONS]) == 0
    return out


@pytest.fixture
def server(authors_pth):
    served = FileServer({FILE_PATH: authors_pth.read_bytes()})
    yield served
    served.stop()


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A fresh HF_HOME (huggingface_hub reads it at import: patch the constant too), network allowed for loopback."""
    import huggingface_hub.constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1
    return home


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MB): at 1 KiB a cut in this
    40 KB file falls after some written chunks, as a cut in a real, larger file would."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)


def cache_files(hf_home: Path) -> list[str]:
    """Every file under the vip2clip cache except the (empty) lock files."""
    root = hf_home / "vip2clip" / "authors"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "locks")


def assert_same_folder(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- the table
def test_release_table_is_pinned():
    from modeling_vip2clip.weights.authors_release import AUTHORS_COMMIT, RELEASES

    assert AUTHORS_COMMIT == "4b5884f6c6bd42001fe47ccaeef32e4f1a8f5a93"
    assert RELEASES["mvtec"].url == (
        "https://github.com/kim0806/ViP2-CLIP/raw/4b5884f6c6bd42001fe47ccaeef32e4f1a8f5a93/models/mvtec_train_epoch_10.pth")
    assert RELEASES["visa"].url.endswith(f"/raw/{AUTHORS_COMMIT}/models/visa_train_epoch_10.pth")
    assert RELEASES["mvtec"].git_blob_sha1 == "2988d3d425552fde7ed8c33433dea402c43103c5"
    assert RELEASES["visa"].git_blob_sha1 == "5d95c734a7a4b52b41704d322f4c046b8c1fcbcf"
    # which to use on what, said where a user picks one
    assert "not MVTec AD" in RELEASES["mvtec"].use_on and RELEASES["visa"].use_on == "MVTec AD"
    assert "non-commercial" in RELEASES["mvtec"].terms


def test_git_blob_id(tmp_path, authors_pth):
    from modeling_vip2clip.weights.authors_release import compute_git_blob_sha1

    data = authors_pth.read_bytes()
    assert compute_git_blob_sha1(authors_pth) == blob_id(data)
    assert compute_git_blob_sha1(authors_pth, chunk_size=7) == blob_id(data)  # streamed: chunking changes nothing
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert compute_git_blob_sha1(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's well-known empty blob
    if shutil.which("git"):
        git = subprocess.run(["git", "hash-object", str(authors_pth)], capture_output=True, text=True, check=True)
        assert git.stdout.strip() == blob_id(data)


# ---------------------------------------------------------------------------------------------- download → model
def test_download_verify_convert_load_then_cached(server, authors_pth, plain_converted, tiny_clip_dir, hf_home):
    from modeling_vip2clip import (
        ViP2CLIPModel,
        download_authors_checkpoint,
        load_authors_model,
    )
    from modeling_vip2clip.weights.authors_release import compute_git_blob_sha1

    blob = blob_id(authors_pth.read_bytes())
    kwargs = dict(clip=str(tiny_clip_dir), url=server.url(), git_blob_sha1=blob, **OPTIONS)
    model_dir = download_authors_checkpoint("mvtec", **kwargs)
    # in the HF home, the checkpoint content-addressed, the model keyed by the options
    root = hf_home / "vip2clip" / "authors"
    assert model_dir.parent == root / "models" and model_dir.name.startswith("mvtec-")
    checkpoint = root / "checkpoints" / blob / "mvtec_train_epoch_10.pth"
    assert compute_git_blob_sha1(checkpoint) == blob
    assert_same_folder(model_dir, plain_converted)  # identical to the plain converter's folder
    assert server.state.gets() == [None]  # one plain GET

    model, processor = load_authors_model("mvtec", **kwargs)
    reference = ViP2CLIPModel.from_pretrained(plain_converted).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, expected = model(pixel_values=pixel_values), reference(pixel_values=pixel_values)
    assert expected.anomaly_score.std() > 1e-3  # non-degenerate heads
    torch.testing.assert_close(got.anomaly_score, expected.anomaly_score, atol=0, rtol=0)
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
    assert processor.image_size == 32 and not model.training

    # the second call: server gone and offline mode on → the cache, no request
    server.stop()
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # restored by the hf_home fixture's monkeypatch
    again = ViP2CLIPModel.from_authors_checkpoint("mvtec", **kwargs)
    assert download_authors_checkpoint("mvtec", **kwargs) == model_dir
    assert torch.equal(again.fgp.q_proj.weight, model.fgp.q_proj.weight)
    assert len(server.state.requests) == 2  # the HEAD and GET of the first call only
    # other options → another cached model from the same verified file, still without network
    other = download_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=server.url(), git_blob_sha1=blob,
                                        image_size=48, feature_layers=[2], top_k=3)
    assert other != model_dir and ViP2CLIPModel.from_pretrained(other).config.image_size == 48
    assert cache_files(hf_home) == sorted(
        [f"checkpoints/{blob}/mvtec_train_epoch_10.pth"]
        + [f"models/{d.name}/{f.name}" for d in (model_dir, other) for f in d.iterdir()]
    )


def test_wrong_blob_id_is_refused_and_deleted(server, tiny_clip_dir, hf_home):
    from modeling_vip2clip.weights.authors_release import (
        AuthorsChecksumError,
        download_authors_checkpoint,
    )

    wrong = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(AuthorsChecksumError) as caught:
        download_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=server.url(), git_blob_sha1=wrong, **OPTIONS)
    message = str(caught.value)
    assert "\n" not in message and wrong in message and "deleted" in message and "nothing was converted" in message
    assert blob_id(server.state.files[FILE_PATH]) in message  # what the file really is
    assert cache_files(hf_home) == []


def test_truncated_file_is_refused(server, authors_pth, tiny_clip_dir, hf_home):
    """A mirror serving a cut copy (its headers consistent with the cut): the pinned id catches it."""
    from modeling_vip2clip.weights.authors_release import (
        AuthorsChecksumError,
        download_authors_checkpoint,
    )

    data = authors_pth.read_bytes()
    server.state.files[FILE_PATH] = data[: len(data) // 2]
    with pytest.raises(AuthorsChecksumError, match=f"{len(data) // 2:,} bytes"):
        download_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=server.url(), git_blob_sha1=blob_id(data),
                                    **OPTIONS)
    assert cache_files(hf_home) == []


def test_dropped_connection_is_resumed_with_range(server, authors_pth, tiny_clip_dir, hf_home, small_chunks):
    """The connection is cut half-way: the same call resumes with a Range request and verifies the whole file."""
    from modeling_vip2clip.weights.authors_release import download_authors_checkpoint

    data = authors_pth.read_bytes()
    half = len(data) // 2 + 100
    written = half - half % CHUNK  # the whole chunks received before the cut
    server.state.drop_after = half
    model_dir = download_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=server.url(),
                                            git_blob_sha1=blob_id(data), **OPTIONS)
    assert server.state.gets() == [None, f"bytes={written}-"]
    assert server.state.body_bytes == half + len(data) - written  # only the unwritten tail was fetched again
    assert (model_dir / "config.json").is_file()


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "server-ignores-range"])
def test_server_error_midway_then_next_call_resumes(server, authors_pth, tiny_clip_dir, hf_home, small_chunks,
                                                    honour_range):
    """Cut half-way, then HTTP 500: the call fails with one line and keeps only the partial file; the next call
    asks for the rest with Range (a server that ignores Range sends everything again: restarted, still verified)."""
    from modeling_vip2clip.weights.authors_release import (
        AuthorsDownloadError,
        download_authors_checkpoint,
    )

    data = authors_pth.read_bytes()
    blob, cut = blob_id(data), len(data) // 2 + 100
    half = cut - cut % CHUNK  # what was written before the cut
    server.state.drop_after, server.state.fail_after_drop = cut, 500
    kwargs = dict(clip=str(tiny_clip_dir), url=server.url(), git_blob_sha1=blob, **OPTIONS)
    with pytest.raises(AuthorsDownloadError, match="the server answered HTTP 500") as caught:
        download_authors_checkpoint("mvtec", **kwargs)
    assert "\n" not in str(caught.value) and "run the command again" in str(caught.value)
    assert cache_files(hf_home) == [f"checkpoints/{blob}/mvtec_train_epoch_10.pth.incomplete"]
    partial = hf_home / "vip2clip" / "authors" / cache_files(hf_home)[0]
    assert partial.read_bytes() == data[:half]

    server.state.fail_status, server.state.honour_range, server.state.body_bytes = None, honour_range, 0
    model_dir = download_authors_checkpoint("mvtec", **kwargs)
    assert server.state.gets()[-1] == f"bytes={half}-"  # the next call asked for the rest
    assert server.state.body_bytes == (len(data) - half if honour_range else len(data))
    assert (model_dir / "model.safetensors").is_file()
    assert not partial.exists() and f"checkpoints/{blob}/mvtec_train_epoch_10.pth" in cache_files(hf_home)


def test_no_network_and_http_errors_give_one_line(tiny_clip_dir, hf_home, server):
    import huggingface_hub.constants

    from modeling_vip2clip.weights.authors_release import (
        AuthorsDownloadError,
        download_authors_checkpoint,
    )

    nowhere = f"http://127.0.0.1:{free_port()}/models/mvtec_train_epoch_10.pth"  # nothing listens there
    with pytest.raises(AuthorsDownloadError, match=r"cannot download the authors' mvtec checkpoint from .*ConnectError"):
        download_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=nowhere, **OPTIONS)
    with pytest.raises(AuthorsDownloadError, match="HTTP 404; check --url"):
        download_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=server.url("/no/such/file.pth"), **OPTIONS)
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # restored by the fixture
    with pytest.raises(AuthorsDownloadError, match="HF_HUB_OFFLINE=1 is set and it is not cached") as caught:
        download_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=server.url(), **OPTIONS)
    assert "\n" not in str(caught.value)
    assert cache_files(hf_home) == [] and server.state.gets() == []


def test_offline_from_python_is_one_typed_sentence_and_from_the_cli_one_line(tiny_clip_dir, hf_home, capsys):
    """`ViP2CLIPModel.from_authors_checkpoint("mvtec")` offline / unreachable: a typed error whose traceback is the
    caller's frames and the sentence, without huggingface_hub's and httpx's chain (was 74 lines)."""
    import traceback

    import huggingface_hub.constants

    from modeling_vip2clip import ViP2CLIPModel
    from modeling_vip2clip.cli.main import main as cli_main
    from modeling_vip2clip.errors import UsageError

    nowhere = f"http://127.0.0.1:{free_port()}/models/mvtec_train_epoch_10.pth"
    for offline, url, words in ((False, nowhere, "ConnectError"), (True, None, "HF_HUB_OFFLINE=1 is set")):
        huggingface_hub.constants.HF_HUB_OFFLINE = offline  # restored by the fixture
        with pytest.raises(UsageError, match=words) as caught:
            ViP2CLIPModel.from_authors_checkpoint("mvtec", clip=str(tiny_clip_dir), url=url, **OPTIONS)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        shown = "".join(traceback.format_exception(caught.value))
        assert "The above exception" not in shown and "During handling" not in shown, shown
        assert "httpx" not in shown and "huggingface_hub" not in shown, shown
    code = cli_main(["download-authors", "mvtec", "--out", str(hf_home.parent / "out"), "--clip", str(tiny_clip_dir),
                     *CLI_OPTIONS])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "HF_HUB_OFFLINE=1 is set" in lines[0], err
    assert "Traceback" not in err and not (hf_home.parent / "out").exists()


def test_bad_names_and_ids(tiny_clip_dir, hf_home):
    from modeling_vip2clip.weights.authors_release import (
        AuthorsCheckpointError,
        download_authors_checkpoint,
    )

    with pytest.raises(AuthorsCheckpointError, match="unknown authors' checkpoint 'mvtech'; choose mvtec .*visa"):
        download_authors_checkpoint("mvtech")
    with pytest.raises(AuthorsCheckpointError, match="not a 40-digit hex git blob id"):
        download_authors_checkpoint("visa", git_blob_sha1="xyz")


def test_clip_that_does_not_fit_is_reported_and_nothing_is_cached(server, authors_pth, tmp_path, hf_home):
    from modeling_vip2clip.weights.authors_release import (
        AuthorsConversionError,
        download_authors_checkpoint,
    )

    blob = blob_id(authors_pth.read_bytes())
    empty = tmp_path / "not-a-clip"
    empty.mkdir()
    with pytest.raises(AuthorsConversionError, match="cannot build the model from mvtec_train_epoch_10.pth and the CLIP"):
        download_authors_checkpoint("mvtec", clip=str(empty), url=server.url(), git_blob_sha1=blob,
                                    **OPTIONS)
    # the verified download is kept (reused next time); no half-built model folder
    assert cache_files(hf_home) == [f"checkpoints/{blob}/mvtec_train_epoch_10.pth"]
    assert list((hf_home / "vip2clip" / "authors" / "models").glob("*")) == []


_CONCURRENT_CHILD = textwrap.dedent(
    r"""
    import logging, sys, time
    from pathlib import Path

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from modeling_vip2clip import download_authors_checkpoint

    index, barrier, url, blob, clip = sys.argv[1:6]
    barrier = Path(barrier)
    (barrier / f"ready{index}").touch()
    deadline = time.monotonic() + 240
    while len(list(barrier.glob("ready*"))) < 2 and time.monotonic() < deadline:  # both imported: go together
        time.sleep(0.02)
    folder = download_authors_checkpoint("mvtec", clip=clip, url=url, git_blob_sha1=blob, image_size=32,
                                         feature_layers=[1, 2], top_k=5)
    print("MODEL", folder)
    """
)


@pytest.mark.slow
def test_two_processes_share_one_download(server, authors_pth, tiny_clip_dir, tmp_path):
    """Two real processes start together on an empty cache: both succeed with the same folder, after one GET."""
    home = tmp_path / "shared_hf_home"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    server.state.body_delay = 1.5  # the first download is still running when the second process arrives
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}
    blob = blob_id(authors_pth.read_bytes())
    children = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_CHILD, str(i), str(barrier), server.url(), blob,
                          str(tiny_clip_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr[-3000:]
    folders = {line.split(" ", 1)[1] for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("MODEL")}
    assert len(folders) == 1 and Path(folders.pop()).parent == home / "vip2clip" / "authors" / "models"
    assert server.state.gets() == [None]  # one download
    assert sum("Waiting for another process" in stderr for _, stderr in outputs) == 1  # they really overlapped
    files = cache_files(home)
    assert f"checkpoints/{blob}/mvtec_train_epoch_10.pth" in files
    assert not [name for name in files if name.endswith(".incomplete") or ".partial" in name]


# ---------------------------------------------------------------------------------------------- the command
def _cli(*argv, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "modeling_vip2clip.cli.download_authors", *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _cli_in_process(capsys, *argv, home: Path) -> subprocess.CompletedProcess:
    """The same command's entry point in this process (no second torch import), with the same HF home and network
    setting as `_cli`'s process: huggingface_hub read both at import, so its constants are patched too."""
    import huggingface_hub.constants

    from modeling_vip2clip.cli.download_authors import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.mark.slow
def test_command_writes_the_plain_converters_folder(server, authors_pth, plain_converted, tiny_clip_dir, tmp_path,
                                                    capsys):
    home, out = tmp_path / "hf_home", tmp_path / "vip2clip-mvtec"
    blob = blob_id(authors_pth.read_bytes())
    run = _cli("mvtec", "--out", str(out), "--clip", str(tiny_clip_dir), "--url", server.url(), "--git-blob-sha1",
               blob, *CLI_OPTIONS, home=home)
    assert run.returncode == 0, run.stderr
    assert_same_folder(out, plain_converted)
    assert f"saved {out}: the authors' mvtec_train_epoch_10.pth (trained on MVTec AD: use it on anything that is not MVTec AD" in run.stdout
    assert "Downloading the authors' mvtec_train_epoch_10.pth" in run.stderr and "Verified" in run.stderr
    assert not list(tmp_path.glob(".vip2clip-mvtec*"))  # no staging folder left beside --out
    # again into another folder: from the cache, no request (the first run, in its own process, was the user's
    # view; these two call the same entry point in this one)
    requests = len(server.state.requests)
    again = _cli_in_process(capsys, "mvtec", "--out", str(tmp_path / "second"), "--clip", str(tiny_clip_dir), "--url",
                            server.url(), "--git-blob-sha1", blob, *CLI_OPTIONS, home=home)
    assert again.returncode == 0 and len(server.state.requests) == requests
    assert_same_folder(tmp_path / "second", plain_converted)
    # an existing non-empty --out is refused before anything is downloaded
    refused = _cli_in_process(capsys, "mvtec", "--out", str(out), "--clip", str(tiny_clip_dir), home=home)
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: --out {out} exists and is not an empty folder")


@pytest.mark.slow
def test_command_wrong_id_exits_with_one_line_and_leaves_nothing(server, tiny_clip_dir, tmp_path):
    home, out = tmp_path / "hf_home", tmp_path / "vip2clip-mvtec"
    run = _cli("mvtec", "--out", str(out), "--clip", str(tiny_clip_dir), "--url", server.url(), "--git-blob-sha1",
               "f" * 40, *CLI_OPTIONS, home=home)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "git blob id" in errors[0] and "f" * 40 in errors[0] and "deleted" in errors[0]
    assert run.stderr.rstrip().endswith(errors[0])  # the last line, nothing after it
    assert not out.exists() and not list(tmp_path.glob(".vip2clip-mvtec*"))
    assert cache_files(home) == []
