"""Training loop (modeling_vip2clip.cli.train): learning, frozen backbone, exact resume, atomic checkpoints, feature
cache, NaN guard, the saved model, and a 2-process CPU DDP run. Tiny random CLIP, 32 px synthetic images."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modeling_vip2clip.data import generate_synthetic_benchmark, load_anomaly_dataset, to_torch_dataset
from modeling_vip2clip.engine.feature_cache import FeatureCache
from modeling_vip2clip.engine.checkpointing import find_latest_checkpoint
from modeling_vip2clip.cli.train import build_parser, job_arguments
from modeling_vip2clip.errors import UsageError
from modeling_vip2clip.engine.training import NonFiniteLossError, train

from launch import launch_two_cpu_processes

TINY = ["--image-size", "32", "--feature-layers", "1", "2", "--n-ctx", "3", "--n-cls", "2", "--top-k", "5"]


# Each run builds its own Accelerator: start every test from a clean singleton state.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _args(clip_dir, data_dir, out, *extra) -> dict:
    """The keyword arguments of `train` for these command-line flags (as `vip2clip train` passes them)."""
    return job_arguments(build_parser().parse_args(
        ["--clip", str(clip_dir), *TINY, "--dataset", str(data_dir), "--output-dir", str(out), "--num-workers", "0",
         "--report-to", "none", "--no-progress", *extra]
    ))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 test images in 2 categories (4 normal, 4 anomalous with masks)."""
    root = tmp_path_factory.mktemp("train_data")
    generate_synthetic_benchmark(root, categories=("fabric", "wood_like"), n_train_good=0, n_test_good=2,
                                 n_test_bad=2, image_size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def one_batch_dir(tmp_path_factory):
    """2 images (1 normal, 1 anomalous): with --batch-size 2 every epoch is the same single batch."""
    root = tmp_path_factory.mktemp("one_batch")
    generate_synthetic_benchmark(root, categories=("fabric",), n_train_good=0, n_test_good=1, n_test_bad=1,
                                 image_size=32, seed=1)
    return root


@pytest.fixture(scope="module")
def reference_run(tiny_clip_dir, data_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run, batch 3 (the last batch of each epoch is partial)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("reference_run")
    result = train(**_args(tiny_clip_dir, data_dir, out, "--epochs", "2", "--batch-size", "3"))
    weights = load_file(out / "model" / "model.safetensors")
    return {"out": out, "result": result, "weights": weights}


def test_training_lowers_loss_only_heads_change_and_logs(tiny_clip_dir, one_batch_dir, tmp_path):
    from accelerate.utils import set_seed

    from modeling_vip2clip import ViP2CLIPModel

    set_seed(111)  # what train does before building the model: the same initial heads
    initial = ViP2CLIPModel.from_clip(tiny_clip_dir, image_size=32, feature_layers=[1, 2], n_ctx=3, n_cls=2, top_k=5)
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}

    args = _args(tiny_clip_dir, one_batch_dir, tmp_path, "--epochs", "5", "--batch-size", "2", "--lr", "5e-3")
    args["report_to"] = "tensorboard"
    result = train(**args)
    losses = [record["loss"] for record in result["history"]]
    assert len(losses) == 5  # one optimiser step per epoch, always the same batch
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(set(record) >= {"loss", "pixel_loss", "image_loss", "epoch", "step"} for record in result["history"])

    trained = result["model"].state_dict()
    for key, before in initial_state.items():
        after = trained[key]
        if key.startswith("clip."):
            assert torch.equal(before, after), f"frozen CLIP weight {key} changed"
    changed = [k for k in initial_state if k.startswith(("ica.", "fgp.")) and not torch.equal(initial_state[k], trained[k])]
    heads = [k for k in initial_state if k.startswith(("ica.", "fgp.")) and not k.endswith("unused_temperature")]
    assert sorted(changed) == sorted(heads)
    assert all(p.requires_grad for p in result["model"].fgp.parameters())  # the unused one is unfrozen again
    assert not any(p.requires_grad for p in result["model"].clip.parameters())

    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"


def test_checkpoints_hold_only_heads_and_are_complete(reference_run):
    out = reference_run["out"]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["epoch_1", "epoch_2"]
    model = reference_run["result"]["model"]
    heads = {f"model.{k}" for k in model.state_dict() if not k.startswith("clip.")}
    for name in checkpoints:
        folder = out / "checkpoints" / name
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            keys = set(handle.keys())
        assert not any(".clip." in k or k.startswith("clip.") for k in keys)
        assert keys == heads
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["epoch"] == int(name.split("_")[1]) and state["global_step"] == 3 * state["epoch"]
        assert (folder / "optimizer.bin").is_file() and (folder / "random_states_0.pkl").is_file()
        # Small: the weights file is the heads' bytes plus a header, nothing of the backbone.
        head_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if not k.startswith("clip."))
        assert (folder / "model.safetensors").stat().st_size < head_bytes + 16_384
    assert find_latest_checkpoint(out / "checkpoints").name == "epoch_2"
    summary = json.loads((out / "train_summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]


def test_resume_after_epoch_1_matches_uninterrupted_run(reference_run, tiny_clip_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run["out"], out)
    # "Killed" after epoch 1, in the middle of saving epoch 2: the final folder and epoch_2 never became complete.
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "epoch_2")
    half_written = out / "checkpoints" / "epoch_2.tmp"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"\0" * 10)
    also_bad = out / "checkpoints" / "epoch_9"  # no trainer_state.json: incomplete, never picked
    also_bad.mkdir()
    assert find_latest_checkpoint(out / "checkpoints").name == "epoch_1"

    shutil.rmtree(also_bad)
    result = train(**_args(tiny_clip_dir, data_dir, out, "--epochs", "2", "--batch-size", "3", "--resume"))
    assert result["resumed_from"].endswith("epoch_1")
    assert [r["epoch"] for r in result["history"]] == [2, 2, 2]  # only epoch 2 ran again
    assert not half_written.exists()
    resumed = load_file(out / "model" / "model.safetensors")
    reference = reference_run["weights"]
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-7, msg=key)
    ref_history = [r["loss"] for r in reference_run["result"]["history"][3:]]
    assert [r["loss"] for r in result["history"]] == pytest.approx(ref_history, abs=1e-7)


def test_existing_checkpoints_need_resume_or_overwrite(reference_run, tiny_clip_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run["out"], out)
    with pytest.raises(UsageError, match=r"exists and is not empty \(it holds checkpoints, model, "
                       r"train_summary.json\); pass --resume .*pass --overwrite-output-dir"):
        train(**_args(tiny_clip_dir, data_dir, out, "--epochs", "2", "--batch-size", "3"))


def test_output_dir_belongs_to_one_run(reference_run, tiny_clip_dir, data_dir, one_batch_dir, tmp_path):
    """OUTPUT_DIR is claimed (run_folder.py): a held folder is refused, a resume with other data names it, the
    output may not be the CLIP or the dataset folder, and --overwrite-output-dir replaces only what vip2clip
    wrote (the user's file and the feature cache stay)."""
    import fcntl

    from modeling_vip2clip.errors import FolderInUseError, OutputFolderError
    from modeling_vip2clip.run_folder import LOCK_FILE, MANIFEST_FILE

    out = tmp_path / "run"
    shutil.copytree(reference_run["out"], out)
    (out / "notes.txt").write_text("mine")
    (out / "feature_cache").mkdir()
    (out / "feature_cache" / "index.json").write_text("{}")
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    again = ["--epochs", "1", "--batch-size", "8"]
    with open(out / LOCK_FILE, "a+") as held:  # another run holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FolderInUseError, match="another vip2clip run is writing to it"):
            train(**_args(tiny_clip_dir, data_dir, out, *again, "--overwrite-output-dir"))
    with pytest.raises(OutputFolderError, match=r"--resume refused: .*other inputs"):
        train(**_args(tiny_clip_dir, one_batch_dir, out, *again, "--resume"))
    for inside, relation in ((data_dir / "run", "lies inside the input"), (tiny_clip_dir, "is the model folder")):
        with pytest.raises(OutputFolderError, match=relation):
            train(**_args(tiny_clip_dir, data_dir, inside, *again, "--overwrite-output-dir"))
    assert not (data_dir / "run").exists()
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before

    result = train(**_args(tiny_clip_dir, data_dir, out, *again, "--overwrite-output-dir"))
    assert result["global_step"] == 1 and result["resumed_from"] is None  # a fresh run, not epoch 3 of the old one
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "feature_cache" / "index.json").read_text() == "{}"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["written_by"] == "vip2clip train" and "finished" in manifest
    assert {"checkpoints", "model", "train_summary.json"} <= set(manifest["writes"])
    # a cache named by --cache-features inside the output folder is a cache, not an earlier run's results
    fresh = tmp_path / "fresh"
    (fresh / "my_cache").mkdir(parents=True)
    (fresh / "my_cache" / "stale.bin").write_bytes(b"old")
    train(**_args(tiny_clip_dir, data_dir, fresh, *again, "--cache-features", str(fresh / "my_cache")))
    assert (fresh / "my_cache" / "index.json").is_file() and "my_cache" not in json.loads(
        (fresh / MANIFEST_FILE).read_text())["writes"]


def test_feature_cache_gives_the_same_losses(reference_run, tiny_clip_dir, data_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    args = _args(tiny_clip_dir, data_dir, tmp_path / "run", "--epochs", "2", "--batch-size", "3",
                 "--cache-features", str(cache_dir))
    result = train(**args)
    assert result["prepass_seconds"] > 0
    cached = [(r["loss"], r["pixel_loss"], r["image_loss"]) for r in result["history"]]
    plain = [(r["loss"], r["pixel_loss"], r["image_loss"]) for r in reference_run["result"]["history"]]
    assert len(cached) == len(plain) == 6
    assert torch.allclose(torch.tensor(cached), torch.tensor(plain), rtol=0, atol=1e-5)

    index = json.loads((cache_dir / "index.json").read_text())
    assert index["complete"] and index["num_ok"] == 8 and index["key"]["dtype"] == "float32"
    assert set(index["key"]) >= {"backbone", "dataset", "processor", "dtype"}
    cache = FeatureCache(cache_dir).open()
    assert cache["patch_embeds"].shape == (8, 2, 16, 32) and cache["masks"].shape == (8, 32, 32)

    # The same settings reuse it; a stale key (here: another dataset fingerprint) rebuilds it.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args["output_dir"] = str(tmp_path / "run2")
    assert train(**args)["prepass_seconds"] == 0
    index["key"]["dataset"] = "something else"
    (cache_dir / "index.json").write_text(json.dumps(index))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args["output_dir"] = str(tmp_path / "run3")
    again = train(**args)
    assert again["prepass_seconds"] > 0
    assert json.loads((cache_dir / "index.json").read_text())["key"]["dataset"] != "something else"
    assert [r["loss"] for r in again["history"]] == pytest.approx([c[0] for c in cached], abs=1e-6)


class _Poisoned(torch.utils.data.Dataset):
    """The training rows, with NaN pixel values for the rows in `bad`."""

    def __init__(self, inner, bad):
        self.inner, self.bad = inner, set(bad)

    def __len__(self):
        return len(self.inner)

    def __getitems__(self, indices):
        rows = self.inner.__getitems__(indices)
        for row in rows:
            if row["index"] in self.bad:
                row["pixel_values"] = torch.full_like(row["pixel_values"], float("nan"))
        return rows


def test_nan_loss_stops_with_epoch_step_and_images(tiny_clip_dir, one_batch_dir, tmp_path):
    from modeling_vip2clip import ViP2CLIPImageProcessor

    dataset = load_anomaly_dataset(one_batch_dir)
    poisoned = _Poisoned(to_torch_dataset(dataset, ViP2CLIPImageProcessor(image_size=32)), bad={1})
    args = _args(tiny_clip_dir, one_batch_dir, tmp_path, "--epochs", "3", "--batch-size", "2")
    with pytest.raises(NonFiniteLossError) as error:
        train(**args, train_dataset=poisoned)
    message = str(error.value)
    assert "epoch 1" in message and "step 1" in message
    assert dataset[1]["image_path"] in message and "index 1" in message
    assert not (tmp_path / "checkpoints" / "epoch_1").exists()  # stopped before any checkpoint


def test_final_model_loads_with_automodel_remote_code(reference_run):
    from transformers import AutoModel, AutoProcessor

    model_dir = reference_run["out"] / "model"
    loaded = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    assert type(loaded).__name__ == "ViP2CLIPModel" and processor.image_size == 32
    trained = reference_run["result"]["model"].eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(pixel_values), loaded(pixel_values)
    torch.testing.assert_close(got.anomaly_score, expected.anomaly_score)
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map)


def test_two_cpu_processes_ddp_match_one_process(tiny_clip_dir, data_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 2 = 1 process x batch 4 (same global batches)."""
    single = train(**_args(tiny_clip_dir, data_dir, tmp_path / "single", "--epochs", "1", "--batch-size", "4"))
    completed = launch_two_cpu_processes(
        "modeling_vip2clip.cli.train", "--clip", str(tiny_clip_dir), *TINY, "--dataset", str(data_dir),
        "--output-dir", str(tmp_path / "ddp"), "--epochs", "1", "--batch-size", "2", "--num-workers", "0",
        "--report-to", "tensorboard", "--no-progress",
    )
    # Exit 0 also proves the teardown: a process group alive at exit used to abort rank 1 (SIGABRT) after success,
    # and closing the trackers with `end_training` destroyed the group the final gather still needed.
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "terminate called" not in completed.stderr
    assert list((tmp_path / "ddp").rglob("events.out.tfevents.*")), "no tensorboard event file from the main process"
    assert (tmp_path / "ddp" / "checkpoints" / "epoch_1" / "random_states_1.pkl").is_file()  # really 2 processes
    ddp = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    reference = load_file(tmp_path / "single" / "model" / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(ddp[key], reference[key], rtol=0, atol=1e-4, msg=key)
    assert single["global_step"] == 2
