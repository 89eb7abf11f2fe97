"""The `vip2clip` command: a thin dispatcher to the subcommand modules.

    vip2clip convert --layout mvtec --root /data/mvtec_raw --out /data/mvtec --split test
    vip2clip train --clip openai/clip-vit-large-patch14-336 --dataset /data/mvtec --output-dir runs/mvtec
    vip2clip evaluate --model runs/mvtec/model --dataset /data/visa --output-dir results/visa
    vip2clip predict --model runs/mvtec/model photos/ 'line3/**/*.png' --threshold 0.5

Each subcommand lives in its own module, which exposes `DESCRIPTION`, `add_arguments(parser)` and `run(args)` and
imports nothing heavy at module level; only the chosen one is imported, so `vip2clip --help` and
`vip2clip COMMAND --help` never import torch. Errors follow `cli.boundary.run_main`: one `error: ...` line, exit 2.
For several GPUs or machines run a module under Accelerate: `accelerate launch -m modeling_vip2clip.cli.train ...`
(docs/training.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

# name → (module, one-line summary); the module's DESCRIPTION is the command's --help text.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("modeling_vip2clip.cli.train", "train the ICA/FGP heads on an auxiliary dataset (Accelerate loop)"),
    "evaluate": ("modeling_vip2clip.cli.evaluate", "per-category image/pixel metrics on a benchmark (table + JSON)"),
    "predict": ("modeling_vip2clip.cli.predict", "score image files/folders/globs: CSV + overlay PNGs"),
    "calibrate": ("modeling_vip2clip.cli.calibrate", "F1-max image/pixel thresholds from a labelled dataset, saved with the model"),
    "convert": ("modeling_vip2clip.cli.convert", "convert a raw benchmark folder to a saved datasets folder"),
    "export": ("modeling_vip2clip.cli.export", "export a model to ONNX / OpenVINO (optionally INT8) for deployment"),
    "download-authors": ("modeling_vip2clip.cli.download_authors",
                         "download the authors' released weights (mvtec or visa), verify them, save a model folder"),
}


def _top_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="vip2clip",
        description="ViP2-CLIP zero-shot anomaly detection: train the prompt heads, evaluate on benchmarks, score "
        "images, convert datasets.",
        epilog="Run `vip2clip COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"vip2clip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def build_parser(command: str) -> argparse.ArgumentParser:
    """The full parser of one subcommand (importing only its module)."""
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"vip2clip {command}", description=module.DESCRIPTION)
    module.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .boundary import guarded, run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # --help, --version, or argparse's error naming the valid commands
        return 2
    command = argv[0]
    # Importing the command's module is inside the boundary too (a missing extra there is one line, not a traceback).
    loaded: list = []
    status = guarded(lambda: loaded.append((build_parser(command), importlib.import_module(COMMANDS[command][0]).run)),
                     debug="--debug" in argv)
    if status:
        return status
    parser, run = loaded[0]
    return run_main(run, parser.parse_args(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
