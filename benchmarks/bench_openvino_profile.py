"""Where an exported OpenVINO folder spends its time: OpenVINO's per-node performance counters over one forward,
summed by the kernel that ran (`exec_type`, e.g. brgemm_avx512_amx_I8, jit_avx2_FP32) and by node type, plus
round-robin timing of the folder against torch fp32 (and bf16 at batch 1 where wanted), one process.

    python benchmarks/bench_openvino_profile.py --folder /tmp/vip2clip_export/int8_2g_c16 --batch-sizes 1 8

One JSON line. It shows whether the quantised MatMuls really run INT8 kernels on this CPU and what the float
ops left cost — the limit of the INT8 speed-up here.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def _counters(compiled, inputs: dict) -> dict:
    request = compiled.create_infer_request()
    request.infer(inputs)
    by_kernel, by_type = collections.Counter(), collections.Counter()
    for info in request.profiling_info:
        seconds = info.real_time.total_seconds()
        by_kernel[info.exec_type] += seconds
        by_type[info.node_type] += seconds
    total = sum(by_kernel.values())
    top = lambda counter: {key: round(value, 3) for key, value in counter.most_common(10)}  # noqa: E731
    return {"total_s": round(total, 3), "by_kernel_s": top(by_kernel), "by_node_type_s": top(by_type)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="an exported folder (two graphs or one)")
    parser.add_argument("--model-dir", default="/tmp/vip2clip_real", help="the saved random torch model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-bf16-once", action="store_true", help="time torch bf16 once at batch 1 too")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import openvino

    from modeling_vip2clip import ViP2CLIPModel
    from modeling_vip2clip.deploy.exported_runtime import HEADS_INPUT_NAMES, INFO_FILE, ExportedViP2CLIP

    folder = Path(args.folder)
    info = json.loads((folder / INFO_FILE).read_text())
    pixel_values = common.make_pixel_values(max(args.batch_sizes), info["image_size"]).numpy()
    core = openvino.Core()
    profile = {}
    exported = ExportedViP2CLIP.from_folder(folder)
    if "graphs" in info:
        precision = exported._backend.name.split("tower ")[1].split(" ")[0]
        tower = core.compile_model(core.read_model(str(folder / info["graphs"]["tower"])), "CPU",
                                   {"INFERENCE_PRECISION_HINT": precision, "PERF_COUNT": True})
        heads = core.compile_model(core.read_model(str(folder / info["graphs"]["heads"])), "CPU",
                                   {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
        profile["tower"] = _counters(tower, {"pixel_values": pixel_values[:1]})
        features = tower.create_infer_request().infer({"pixel_values": pixel_values[:1]})
        profile["heads"] = _counters(heads, {name: features[tower.output(name)] for name in HEADS_INPUT_NAMES})
        del tower, heads

    fp32 = ViP2CLIPModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()

    def torch_run(model):
        def run(x):
            with torch.inference_mode():
                return model(pixel_values=torch.from_numpy(x).to(model.dtype))
        return run

    runners = {"exported": exported, "torch_fp32": torch_run(fp32)}
    for runner in runners.values():
        runner(pixel_values[:1])
    times = {name: {batch: [] for batch in args.batch_sizes} for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            for batch in args.batch_sizes:
                start = time.perf_counter()
                runner(pixel_values[:batch])
                times[name][batch].append((time.perf_counter() - start) / batch)
    result = {
        "benchmark": "vip2clip_openvino_profile", "machine": common.machine_info("cpu"), "folder": str(folder),
        "backend": exported.backend_name, "int8_accuracy": info.get("int8", {}).get("accuracy_vs_fp32"),
        "profile_batch1": profile,
        "s_per_image_min": {name: {str(b): round(min(v), 3) for b, v in per.items()} for name, per in times.items()},
        "s_per_image_all": {name: {str(b): [round(x, 3) for x in v] for b, v in per.items()}
                            for name, per in times.items()},
    }
    if args.torch_bf16_once:
        bf16 = ViP2CLIPModel.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
        start = time.perf_counter()
        torch_run(bf16)(pixel_values[:1])
        result["torch_bf16_s_per_image_once"] = round(time.perf_counter() - start, 2)
    result["speedup_vs_torch_fp32"] = {b: round(result["s_per_image_min"]["torch_fp32"][b] /
                                                result["s_per_image_min"]["exported"][b], 3)
                                       for b in result["s_per_image_min"]["exported"]}
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
