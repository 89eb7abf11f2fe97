"""The command-line options every data-processing command shares, and argparse types checked at parse time."""

from __future__ import annotations

import argparse
from typing import Any, Callable

__all__ = ["positive_int", "non_negative_int", "probability", "open_fraction", "positive_float", "MIXED_PRECISION_HELP",
           "add_common_arguments", "add_debug_argument", "job_keywords"]

#: What `--mixed-precision` means in predict, evaluate and calibrate (`weights.loader.precision_dtype`): the CLIP
#: towers' weights, not autocast. `vip2clip train` keeps Accelerate's autocast (it needs fp32 master weights).
MIXED_PRECISION_HELP = (
    "no (default): fp32, like the reference; bf16 / fp16: the frozen CLIP towers are loaded in that precision "
    "(from_pretrained(dtype=...)) while the ICA/FGP heads and the scoring stay fp32, as the demo's --dtype does; "
    "bf16 is about 2x faster on CPUs with native bf16, scores within ~0.003 of fp32 (benchmarks/README.md)."
)


def _number_type(kind: type, name: str, check: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number_type(int, "an integer >= 0", lambda v: v >= 0)
probability = _number_type(float, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
open_fraction = _number_type(float, "a number strictly between 0 and 1", lambda v: 0.0 < v < 1.0)
positive_float = _number_type(float, "a number > 0", lambda v: v > 0 and v == v and v != float("inf"))


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int = 8,
    output_dir: str | None = None,
    output_help: str = "where the results go",
    num_workers: int | None = 2,
    mixed_precision: bool = True,
    mixed_precision_help: str = MIXED_PRECISION_HELP,
) -> argparse.ArgumentParser:
    """The options every data-processing entry point has: --batch-size, --num-workers, --output-dir,
    --mixed-precision, --no-progress and --debug, validated at parse time."""
    group = parser.add_argument_group("run")
    group.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help=f"images per batch and process (default: {batch_size}).")
    workers_default = num_workers if num_workers is not None else "by device and cores: 1 on a CPU, min(8, cores - 1) on a GPU"
    group.add_argument("--num-workers", type=non_negative_int, default=num_workers,
                       help=f"DataLoader worker processes that decode and preprocess (default: {workers_default}).")
    if output_dir is not None:
        group.add_argument("--output-dir", default=output_dir, help=f"{output_help} (default: {output_dir}).")
    if mixed_precision:
        group.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                           help=mixed_precision_help)
    group.add_argument("--no-progress", action="store_true", help="hide the progress bars.")
    add_debug_argument(group)
    return parser


def add_debug_argument(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also VIP2CLIP_DEBUG=1).")


def job_keywords(args: argparse.Namespace, options: type, **values) -> dict[str, Any]:
    """The keyword arguments of a job's Python entry point from a command's namespace: each field of the job's
    `options` dataclass that the namespace has, `progress` from `--no-progress`, then `values` (renamed or
    converted options)."""
    from dataclasses import fields

    keywords = {field.name: getattr(args, field.name) for field in fields(options) if hasattr(args, field.name)}
    if hasattr(args, "no_progress"):
        keywords["progress"] = not args.no_progress
    keywords.update(values)
    return keywords
