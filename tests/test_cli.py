"""The `vip2clip` console script: complete --help for every subcommand, `convert` end to end (`predict`: test_predict.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from modeling_vip2clip.cli.main import build_parser, main as cli_main
from modeling_vip2clip.engine.training import model_options_from_args
from modeling_vip2clip.data import generate_synthetic_benchmark, load_anomaly_dataset

FLAGS = {
    "train": [
        "--clip", "--model", "--image-size", "--feature-layers", "--n-ctx", "--n-cls", "--top-k", "--dataset",
        "--split", "--categories", "--num-workers", "--epochs", "--batch-size", "--lr", "--fgp-lr-scale",
        "--gradient-accumulation-steps", "--mixed-precision", "--seed", "--output-dir", "--resume",
        "--overwrite-output-dir", "--cache-features", "--cache-dtype", "--report-to", "--no-progress", "--debug",
    ],
    "evaluate": [
        "--model", "--dataset", "--split", "--categories", "--dataset-name", "--batch-size", "--num-workers",
        "--output-dir", "--save-maps", "--no-report", "--pro-mode", "--mixed-precision", "--resume", "--max-batches", "--no-progress",
        "--debug",
    ],
    "predict": ["--model", "INPUT", "--dataset", "--split", "--categories", "--streaming", "--image-column",
                "--label-column", "--mask-column", "--category-column", "--output-dir", "--threshold",
                "--pixel-threshold", "--batch-size", "--num-workers", "--device", "--no-overlays", "--plain-overlays",
                "--no-report", "--save-maps",
                "--save-masks", "--resume", "--mixed-precision", "--no-progress", "--debug"],
    "calibrate": ["--model", "--dataset", "--normal-images", "--false-alarm-rate", "--out", "--overwrite", "--split", "--categories", "--dataset-name",
                  "--streaming", "--image-column", "--label-column", "--mask-column", "--category-column", "--device",
                  "--batch-size", "--num-workers", "--mixed-precision", "--no-progress", "--debug"],
    "convert": ["--layout", "--root", "--out", "--split", "--categories", "--missing-mask", "--license", "--overwrite"],
}


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_console_script_help_lists_every_subcommand():
    script = shutil.which("vip2clip")  # installed by `pip install -e .`; else the module behind it
    command = [script] if script else [sys.executable, "-m", "modeling_vip2clip.cli"]
    completed = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    for command in FLAGS:
        assert command in completed.stdout


@pytest.mark.parametrize("command", list(FLAGS))
def test_subcommand_help_mentions_every_flag(command, capsys):
    text = _help([command], capsys)
    for flag in FLAGS[command]:
        assert flag in text, f"{command} --help lacks {flag}"
    # ... and every option the parser really has (nothing undocumented), each with a help text.
    sub = build_parser(command)
    for action in sub._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, f"{command}: {action.dest} has no help"


def test_train_parser_defaults_are_the_papers():
    """The parsed defaults (not the help text): docs/method.md §6 optimisation and the paper's model geometry."""
    args = build_parser("train").parse_args(["--clip", "some/clip", "--dataset", "data"])
    assert (args.epochs, args.batch_size, args.lr, args.fgp_lr_scale, args.seed, args.split) == (
        10, 8, 1e-3, 0.01, 111, "test")
    assert args.lr * args.fgp_lr_scale == pytest.approx(1e-5)  # the FGP's learning rate
    assert model_options_from_args(args) == {"image_size": 518, "feature_layers": [6, 12, 18, 24], "n_ctx": 7,
                                             "n_cls": 3, "top_k": 50}
    given = build_parser("train").parse_args(["--clip", "c", "--dataset", "d", "--image-size", "224", "--n-ctx", "9"])
    assert model_options_from_args(given)["image_size"] == 224 and model_options_from_args(given)["n_ctx"] == 9


def test_convert_saves_a_loadable_dataset(tmp_path, capsys):
    raw = tmp_path / "raw"
    records = generate_synthetic_benchmark(raw, categories=("fabric",), n_train_good=1, n_test_good=2, n_test_bad=2,
                                           image_size=32, layout="meta_json")
    out = tmp_path / "converted"
    assert cli_main(["convert", "--layout", "meta_json", "--root", str(raw), "--out", str(out)]) == 0
    assert "saved 4 images (2 anomalous)" in capsys.readouterr().out
    dataset = load_anomaly_dataset(out)
    assert len(dataset) == sum(r["split"] == "test" for r in records) == 4
    assert cli_main(["convert", "--root", str(raw), "--out", str(out)]) == 2  # exists: needs --overwrite
    assert cli_main(["convert", "--root", str(raw), "--out", str(out), "--split", "all", "--overwrite"]) == 0
    assert len(load_anomaly_dataset(out, split="all")) == 5
