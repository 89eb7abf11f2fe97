"""Train the ViP²-CLIP heads (ICA + FGP) on an auxiliary anomaly dataset with 🤗 Accelerate: `vip2clip train`,
or `accelerate launch -m modeling_vip2clip.cli.train` for several GPUs / machines. The method and its defaults are in
docs/method.md §1 and §6; usage, outputs, resuming and distributed launches are in docs/training.md; the loop itself
is `modeling_vip2clip.engine.training.train` (`modeling_vip2clip.train` from Python)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..data.options import add_schema_arguments
from .options import add_common_arguments, job_keywords, positive_float, positive_int

__all__ = ["DESCRIPTION", "add_arguments", "build_parser", "job_arguments", "run", "main"]

DESCRIPTION = ("Train the ViP2-CLIP prompt heads (ICA, FGP) on an auxiliary anomaly dataset with Accelerate. Run it "
               "directly, or under `accelerate launch -m modeling_vip2clip.cli.train` for several GPUs / machines.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `train` options to `parser` (`vip2clip train` and `python -m modeling_vip2clip.cli.train`)."""
    source = parser.add_argument_group("model (one of --clip / --model)")
    start = source.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--clip", metavar="CLIP_ID_OR_DIR",
        help="start from this transformers CLIP checkpoint (Hub id or folder), e.g. "
        "openai/clip-vit-large-patch14-336; the heads are initialised at random (seeded by --seed).",
    )
    start.add_argument(
        "--model", metavar="DIR",
        help="fine-tune a saved ViP2CLIP model folder (save_pretrained output or Hub id); "
        "--image-size/--feature-layers/--n-ctx/--n-cls/--top-k are then read from it.",
    )
    source.add_argument("--image-size", type=positive_int, default=None, help="input side S with --clip (default: 518).")
    source.add_argument(
        "--feature-layers", type=positive_int, nargs="+", default=None, metavar="L",
        help="1-based vision blocks feeding the patch features, with --clip (default: 6 12 18 24).",
    )
    source.add_argument("--n-ctx", type=positive_int, default=None, help="learnable context tokens per state prompt, with --clip (default: 7).")
    source.add_argument("--n-cls", type=positive_int, default=None, help="image-conditioned class tokens, with --clip (default: 3).")
    source.add_argument("--top-k", type=positive_int, default=None, help="patches per layer behind the image score, with --clip (default: 50).")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", required=True, metavar="ID_OR_PATH",
        help="training data: a raw benchmark folder (MVTec tree, VisA split_csv, meta.json, your own normal/anomalous folders), a "
        "folder written by `vip2clip convert`/save_to_disk, parquet/arrow files, or a Hub dataset id (other column names: "
        "--image-column etc.).",
    )
    data.add_argument(
        "--split", default="test",
        help="split to train on (default: test — the paper trains on the auxiliary dataset's test split).",
    )
    data.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="train on these categories only (default: all).")

    optim = parser.add_argument_group("optimisation (docs/method.md §6)")
    optim.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default: 10).")
    optim.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate of the ICA (default: 1e-3).")
    optim.add_argument(
        "--fgp-lr-scale", type=positive_float, default=0.01,
        help="FGP learning rate = lr x this (default: 0.01, i.e. 1e-5).",
    )
    optim.add_argument(
        "--gradient-accumulation-steps", type=positive_int, default=1,
        help="micro-batches per optimiser step (default: 1).",
    )
    optim.add_argument("--seed", type=int, default=111, help="seed of the head init and of the sample order (default: 111).")

    add_schema_arguments(parser)
    add_common_arguments(parser, batch_size=8, output_dir="vip2clip-train",
                         output_help="where checkpoints, logs and the final model go",
                         mixed_precision_help="Accelerate's autocast of the training forward: no (default, fp32 like "
                         "the reference), bf16 or fp16; the weights stay fp32 (unlike predict / evaluate / calibrate, "
                         "where it is the frozen towers' weight precision: training needs fp32 master weights).")
    run = parser.add_argument_group("checkpoints and logs")
    run.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints (no value), or from the given "
        "checkpoint folder; starts from scratch, with a warning, when there is none.",
    )
    run.add_argument(
        "--overwrite-output-dir", action="store_true",
        help="start over in an OUTPUT_DIR that holds an earlier run: what vip2clip wrote there (checkpoints, logs, "
        "model, train_summary.json) is removed, your own files and the feature cache stay (default: refuse to start).",
    )
    run.add_argument(
        "--cache-features", nargs="?", const="auto", default=None, metavar="DIR",
        help="cache the frozen backbone's features on disk (default folder: OUTPUT_DIR/feature_cache) in a pre-pass "
        "and train every epoch from the cache, skipping the vision tower; a stale cache (other backbone, "
        "processor, dataset or dtype) is rebuilt. Off by default.",
    )
    run.add_argument(
        "--cache-dtype", choices=["float32", "float16"], default="float32",
        help="storage dtype of cached features (default: float32, identical losses; float16 halves the disk size).",
    )
    run.add_argument(
        "--report-to", default="tensorboard", choices=["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "all", "none"],
        help="experiment tracker for loss/pixel_loss/image_loss (default: tensorboard, in OUTPUT_DIR/logs; none disables).",
    )
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog or "vip2clip train", description=DESCRIPTION))


def job_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of `engine.training.train` from this command's namespace."""
    from ..engine.training import TrainOptions

    return job_keywords(args, TrainOptions)


def run(args: argparse.Namespace) -> int:
    """`vip2clip train` once the arguments are parsed: logging, training, teardown."""
    from ..errors import require_extra
    from ..resolve import resolve_source
    from .boundary import run_job

    for module in ("accelerate", "datasets", "tqdm"):
        require_extra(module, "train", "vip2clip train")
    # Fail fast on a wrong source, before torch, transformers and Accelerate are even imported.
    resolve_source(args.clip or args.model, "--clip" if args.clip else "--model")
    resolve_source(args.dataset, "--dataset", repo_type="dataset")
    from ..engine.training import train

    return run_job(lambda namespace: train(**job_arguments(namespace)), args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_vip2clip.cli.train` / `accelerate launch -m modeling_vip2clip.cli.train`."""
    from .boundary import entry_point_main

    return entry_point_main(run, build_parser(prog="modeling_vip2clip.cli.train"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
