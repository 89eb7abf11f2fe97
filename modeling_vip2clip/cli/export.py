"""`vip2clip export --model M --format onnx|openvino --out DIR [--int8 --calibration-dataset D]`: the command
line of `deploy.export.export` (what the folder holds and why: that module's docstring)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

from ..data.options import add_schema_arguments, schema_options
from ..deploy.export import DEFAULT_OPSET, export
from ..deploy.exported_runtime import INFO_FILE
from .boundary import run_main

__all__ = ["DESCRIPTION", "add_arguments", "job_arguments", "run", "main"]

DESCRIPTION = "export a model to ONNX or OpenVINO (optionally INT8) for torch-free deployment"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, metavar="M", help="trained ViP2-CLIP model folder (or Hub id).")
    parser.add_argument("--format", required=True, choices=["onnx", "openvino"],
                        help="onnx (ONNX Runtime) or openvino (OpenVINO IR).")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the exported model to.")
    parser.add_argument("--int8", action="store_true",
                        help="OpenVINO only: INT8 post-training quantisation with NNCF (needs --calibration-dataset).")
    parser.add_argument("--two-graphs", action="store_true",
                        help="with --int8: the INT8 tower and the f32 heads as two OpenVINO graphs, the tower's float "
                        "ops in bf16 where the CPU has it (the fastest recipe that keeps the maps; docs/deployment.md).")
    parser.add_argument("--calibration-dataset", metavar="D", default=None,
                        help="calibration images for --int8: a saved dataset folder (vip2clip convert), an image "
                        "folder or a quoted glob.")
    parser.add_argument("--calibration-size", type=int, default=300, metavar="N",
                        help="calibration images drawn from --calibration-dataset (default: 300).")
    parser.add_argument("--calibration-split", default="all", metavar="SPLIT",
                        help="split of a --calibration-dataset dataset; also every split named <category>.<split> "
                        "(default: all).")
    add_schema_arguments(parser)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET}).")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors.")
    return parser


def job_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of `deploy.export.export` from this command's namespace."""
    return {"model": args.model, "out_dir": args.out, "format": args.format, "int8": args.int8,
            "calibration_images": args.calibration_dataset, "calibration_size": args.calibration_size,
            "calibration_options": {"split": args.calibration_split, **schema_options(args)},
            "opset": args.opset, "overwrite": args.overwrite, "two_graphs": args.two_graphs}


def run(args: argparse.Namespace) -> int:
    from ..run_folder import check_apart

    check_apart(args.out, [args.model], "--out")  # before loading: --out X --model X fails in a second
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export(**job_arguments(args))
    info = json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
    summary = f"exported {args.model} to {out} ({info['format']}, {info['precision']}, {info['export_seconds']} s)"
    if "int8" in info:
        accuracy = info["int8"]["accuracy_vs_fp32"]
        summary += (f"; INT8 vs f32 on {accuracy['images']} {info['int8']['accuracy_on']}: map Pearson min "
                    f"{accuracy['map_pearson_min']}, max |Δscore| {accuracy['score_abs_diff_max']}")
    print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vip2clip export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_main(run, add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
