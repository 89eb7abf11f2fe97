"""Timing harness of the AUTHORS' inference path (GitHub kim0806/ViP2-CLIP, test.py) for comparison.

Their code is not part of this repository and is never copied into it: pass a local copy with
`--authors-repo PATH` (a checkout, or a bare git dir such as the mirror, which is extracted to a temp dir with
`git --git-dir=PATH archive HEAD | tar -x`, or file by file with `git show HEAD:path` for the .py / BPE files
when the mirror lacks its large checkpoint blobs). This script then:

* builds their model with their own `VIP2CLIP_lib.build_model.build_model` from a state dict in the OpenAI
  layout holding the SAME random weights as bench_inference.py's model (the fp32 random ViT-L/14@336 at 518 px
  saved by `_common.save_random_model`, converted HF → OpenAI names here), their `ICA` and `FGP` from
  `prompt_learner.py` with the converted head weights; nothing is downloaded;
* runs, per batch, the body of their test loop: `encode_image(image, [6, 12, 18, 24])`, normalise, `ICA`,
  `encode_text_learn` (77 tokens), per layer `FGP` + similarity + `get_similarity_map`-style bilinear upsampling +
  top-k, the score softmax, and scipy `gaussian_filter(σ=8)` per image on the CPU — under `torch.no_grad()` as
  they do;
* prints the same JSON fields as bench_inference.py.

Import shims (said so in the JSON, `import_shims`): the package `VIP2CLIP_lib` is registered as a bare namespace
so its `__init__` (→ `model_load`, which imports torchvision for the image transforms and the downloader) is NOT
executed — only `VIP2CLIP_lib.VIP2CLIP`, `.CLIP`, `.build_model` and `.simple_tokenizer` are imported;
`prompt_learner.py` imports `pkg_resources.packaging` (removed from recent setuptools), shimmed with the
`packaging` package; `simple_tokenizer.py` imports `ftfy` (not installed) for `fix_text`, shimmed with the
identity (their prompts are plain ASCII "X X X ... damaged X X X", which `fix_text` leaves unchanged).
`utils.py` / `test.py` themselves are not imported (they import torchvision and the datasets).

Usage::

    python benchmarks/reference_baseline.py --authors-repo /work/.mirror/kim0806+ViP2-CLIP/repo \
        --batch-sizes 1 4 --repeats 2
    # also check that their outputs equal this package's on the same weights (batch 1, not timed):
    python benchmarks/reference_baseline.py --authors-repo ... --check-parity --batch-sizes 1 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

N_CTX, N_CLS, TOP_K, SIGMA, FEATURES = 7, 3, 50, 8, [6, 12, 18, 24]
SHIMS = [
    "VIP2CLIP_lib registered as a bare package (its __init__ -> model_load -> torchvision not run)",
    "pkg_resources.packaging -> packaging",
    "ftfy.fix_text -> identity (ASCII prompts)",
]


# ---------------------------------------------------------------------------------------------- authors' code
def extract_authors_repo(path: Path, destination: Path) -> Path:
    """A checkout is used as is; a bare git dir (the mirror) is extracted with `git archive HEAD`."""
    if (path / "VIP2CLIP_lib").is_dir():
        return path
    destination.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", str(path), "archive", "HEAD"], capture_output=True)
    if archive.returncode == 0:
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
    else:  # a partial mirror (its large checkpoint blobs absent): extract the code files one by one
        names = subprocess.run(["git", "--git-dir", str(path), "ls-tree", "-r", "--name-only", "HEAD"],
                               check=True, capture_output=True, text=True).stdout.split()
        for name in names:
            if name.endswith((".py", ".txt.gz")):
                blob = subprocess.run(["git", "--git-dir", str(path), "show", f"HEAD:{name}"], capture_output=True)
                if blob.returncode == 0:
                    (destination / name).parent.mkdir(parents=True, exist_ok=True)
                    (destination / name).write_bytes(blob.stdout)
    if not (destination / "VIP2CLIP_lib").is_dir():
        raise SystemExit(f"{path} does not look like the authors' repository (no VIP2CLIP_lib/).")
    return destination


def import_authors_code(repo: Path):
    """Import their build_model / ICA / FGP with the shims described in the module docstring."""
    import packaging
    import packaging.version  # noqa: F401  (pkg_resources.packaging.version.parse)

    if "pkg_resources" not in sys.modules:
        shim = types.ModuleType("pkg_resources")
        shim.packaging = packaging
        sys.modules["pkg_resources"] = shim
    if importlib.util.find_spec("ftfy") is None:
        shim = types.ModuleType("ftfy")
        shim.fix_text = lambda text: text
        sys.modules["ftfy"] = shim
    package = types.ModuleType("VIP2CLIP_lib")
    package.__path__ = [str(repo / "VIP2CLIP_lib")]
    sys.modules["VIP2CLIP_lib"] = package
    sys.path.insert(0, str(repo))
    build_model = importlib.import_module("VIP2CLIP_lib.build_model").build_model
    prompt_learner = importlib.import_module("prompt_learner")
    tokenizer = importlib.import_module("VIP2CLIP_lib.simple_tokenizer").SimpleTokenizer()
    return build_model, prompt_learner.ICA, prompt_learner.FGP, tokenizer


# ---------------------------------------------------------------------------------------------- weights
def _split_layers(state: dict, source: str, target: str, count: int) -> dict:
    out = {}
    for i in range(count):
        s, t = f"{source}.encoder.layers.{i}", f"{target}.resblocks.{i}"
        out[f"{t}.attn.in_proj_weight"] = torch.cat([state[f"{s}.self_attn.{p}_proj.weight"] for p in "qkv"])
        out[f"{t}.attn.in_proj_bias"] = torch.cat([state[f"{s}.self_attn.{p}_proj.bias"] for p in "qkv"])
        for kind in ("weight", "bias"):
            out[f"{t}.attn.out_proj.{kind}"] = state[f"{s}.self_attn.out_proj.{kind}"]
            out[f"{t}.ln_1.{kind}"] = state[f"{s}.layer_norm1.{kind}"]
            out[f"{t}.ln_2.{kind}"] = state[f"{s}.layer_norm2.{kind}"]
            out[f"{t}.mlp.c_fc.{kind}"] = state[f"{s}.mlp.fc1.{kind}"]
            out[f"{t}.mlp.c_proj.{kind}"] = state[f"{s}.mlp.fc2.{kind}"]
    return out


def openai_state_dict(state: dict, vision_layers: int, text_layers: int) -> dict:
    """This package's `clip.*` weights (HF CLIP names) → the OpenAI CLIP layout their build_model reads."""
    v, t = "clip.vision_model", "clip.text_model"
    out = {
        "visual.class_embedding": state[f"{v}.embeddings.class_embedding"],
        "visual.conv1.weight": state[f"{v}.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state[f"{v}.embeddings.position_embedding.weight"],
        "visual.proj": state["clip.visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": state[f"{t}.embeddings.token_embedding.weight"],
        "positional_embedding": state[f"{t}.embeddings.position_embedding.weight"],
        "text_projection": state["clip.text_projection.weight"].t().contiguous(),
        "logit_scale": state["clip.logit_scale"],
    }
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = state[f"{v}.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = state[f"{v}.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = state[f"{t}.final_layer_norm.{kind}"]
    out.update(_split_layers(state, v, "visual.transformer", vision_layers))
    out.update(_split_layers(state, t, "transformer", text_layers))
    return out


def head_state_dicts(state: dict) -> tuple[dict, dict]:
    """This package's `ica.*` / `fgp.*` → their ICA (`prompt_learner`) and FGP (`Zero_try`) parameter names."""
    ica = {
        "ctx_pos": state["ica.normal_context"], "ctx_neg": state["ica.abnormal_context"],
        "cls_ctx": state["ica.class_context"], "cls_prompter.bias": state["ica.image_bias"],
    }
    for j in range(N_CLS):
        for ours, theirs in (("fc1", "0"), ("fc2", "2")):
            for kind in ("weight", "bias"):
                ica[f"cls_prompter.fc.{j}.{theirs}.{kind}"] = state[f"ica.class_token_mlps.{j}.{ours}.{kind}"]
    names = {"q_proj": "q_proj_pre", "k_proj": "k_proj_pre_1", "v_proj": "v_proj_pre_1", "out_proj": "proj_post_t"}
    fgp = {"prompt_temp_l1": state["fgp.unused_temperature"].reshape(())}
    for ours, theirs in names.items():
        fgp[f"{theirs}.weight"] = state[f"fgp.{ours}.weight"][..., None]  # Linear → kernel-1 Conv1d
        fgp[f"{theirs}.bias"] = state[f"fgp.{ours}.bias"]
    return ica, fgp


def build_authors_model(repo: Path, model_dir: Path):
    from safetensors.torch import load_file

    build_model, ICA, FGP, tokenizer = import_authors_code(repo)
    config = json.loads((model_dir / "config.json").read_text())
    vision_layers = config["clip_config"]["vision_config"]["num_hidden_layers"]
    text_layers = config["clip_config"]["text_config"]["num_hidden_layers"]
    state = load_file(str(model_dir / "model.safetensors"))
    clip_state = openai_state_dict(state, vision_layers, text_layers)
    ica_state, fgp_state = head_state_dicts(state)
    del state
    # test.py: VIP2CLIP_lib.load("ViT-L/14@336px", device, design_details=None) = build_model(...).to(device), .float()
    model = build_model("ViT-L/14@336px", clip_state, design_details=None).float()
    del clip_state
    ica = ICA(["object"], model, {"Prompt_length": N_CTX, "Prompt_cls_length": N_CLS})
    ica.load_state_dict(ica_state, strict=False)  # token_* buffers come from their tokenizer + our embeddings
    fgp = FGP(dim_v=768, dim_t=768, dim_out=768)
    fgp.load_state_dict(fgp_state)
    damaged = tokenizer.encode("damaged")
    return model.eval(), ica.eval(), fgp.eval(), damaged


# ---------------------------------------------------------------------------------------------- their test loop
def authors_inference(model, ica, fgp, image: torch.Tensor, image_size: int, split: dict | None = None):
    """One batch through their test.py loop body (device CPU); returns (scores (B,), maps (B, S, S) numpy)."""
    from scipy.ndimage import gaussian_filter

    start = time.perf_counter()
    image_features, patch_features = model.encode_image(image, FEATURES)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    middle = time.perf_counter()
    prompts, tokenized_prompts = ica(image_features)
    text_embeddings = model.encode_text_learn(prompts, tokenized_prompts).float()
    text_embeddings = torch.stack(torch.chunk(text_embeddings, dim=0, chunks=2), dim=1)
    text_embeddings = text_embeddings / text_embeddings.norm(dim=-1, keepdim=True)
    text_end = time.perf_counter()
    scores_per_layer, maps_per_layer = [], []
    for patch_feature in patch_features:  # feature_map_layer defaults to [0, 1, 2, 3]: every layer
        patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
        state_embeddings = fgp(text_embeddings, patch_feature[:, 1:, :])
        similarity = torch.matmul(patch_feature[:, 1:, :], state_embeddings.transpose(1, 2))
        raw = similarity
        probabilities = (similarity / 0.07).softmax(-1)
        side = int(probabilities.shape[1] ** 0.5)  # utils.get_similarity_map
        grid = probabilities.reshape(probabilities.shape[0], side, side, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, (image_size, image_size), mode="bilinear").permute(0, 2, 3, 1)
        maps_per_layer.append((grid[..., 1] + 1 - grid[..., 0]) / 2.0)
        top = torch.topk(probabilities[:, :, 1], k=TOP_K, dim=-1, largest=True, sorted=False).indices
        rows = torch.arange(raw.size(0)).unsqueeze(1).expand(-1, TOP_K)
        scores_per_layer.append(raw[rows, top])
    mean_scores = torch.mean(torch.cat(scores_per_layer, dim=1), dim=1)
    scores = (mean_scores / 0.07).softmax(dim=-1)[:, 1]
    anomaly_map = torch.stack(maps_per_layer, dim=0).mean(dim=0)
    maps = np.stack([gaussian_filter(m, sigma=SIGMA, axes=(0, 1)) for m in anomaly_map.detach().cpu().numpy()])
    end = time.perf_counter()
    if split is not None:
        split.setdefault("vision", []).append(middle - start)
        split.setdefault("text", []).append(text_end - middle)
        split.setdefault("heads", []).append(end - text_end)
    return scores, maps


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    repo, model_dir, batch = Path(spec["repo"]), Path(spec["model_dir"]), spec["batch"]
    pixel_values = torch.load(spec["inputs"])[:batch]
    model, ica, fgp, damaged_ids = build_authors_model(repo, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    image_size = config["clip_config"]["vision_config"]["image_size"]
    rss_after_load = common.current_rss_gib()
    common.reset_peak_rss()

    times, split = [], {}
    with torch.no_grad():
        for step in range(spec["warmup"] + max(spec["repeats"], 1)):
            start = time.perf_counter()
            scores, maps = authors_inference(model, ica, fgp, pixel_values, image_size,
                                             split if step >= spec["warmup"] else None)
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - start)
    inference_peak = common.current_peak_rss_gib()
    del model, ica, fgp

    record_extra = {}
    if spec.get("check_parity"):
        record_extra["parity_vs_this_package"] = parity(model_dir, pixel_values, scores, maps, damaged_ids)
    rates = common.matmul_rates(torch.float32, "cpu")
    # MFU on the model's required FLOPs (as bench_inference.py); what their path executes is reported beside it
    # (77-token prompts, all 1 + L tokens projected per feature layer, FGP k/v projections of every patch).
    our_config = common.real_geometry_config(image_size)
    flops = common.model_flops_per_image(our_config)
    executed = common.model_flops_per_image(
        our_config, text_tokens=77, projected_tokens_per_layer=our_config.num_patches + 1, fgp_unfolded=True
    )
    median, best = statistics.median(times), min(times)
    achieved = flops["total"] * batch / best / 1e9
    return {
        "benchmark": "vip2clip_inference",
        "implementation": "authors' code (kim0806/ViP2-CLIP test.py path)",
        "machine": common.machine_info("cpu"),
        "settings": {
            "batch": batch, "dtype": "fp32", "device": "cpu", "attn": "nn.MultiheadAttention",
            "image_size": image_size, "feature_layers": FEATURES, "n_ctx": N_CTX, "n_cls": N_CLS, "top_k": TOP_K,
            "repeats": len(times), "warmup": spec["warmup"], "grad_mode": "torch.no_grad",
            "weights": "random (seed 0), same tensors as bench_inference.py", "import_shims": SHIMS,
        },
        "s_per_image": round(best / batch, 4),
        "images_per_s": round(batch / best, 4),
        "s_per_image_median": round(median / batch, 4),
        "s_per_batch_all": [round(t, 4) for t in times],
        "split_s_per_image": {k: round(min(v) / batch, 4) for k, v in split.items()},
        "inference_peak_rss_gib": round(inference_peak or float("nan"), 3),
        "peak_rss_gib": round(common.lifetime_peak_rss_gib(), 3),
        "rss_after_load_gib": round(rss_after_load or float("nan"), 3),
        "matmul_gflops": rates,
        "flops_per_image_g": {k: (round(v / 1e9, 3) if k != "text_tokens" else v) for k, v in flops.items()},
        "executed_flops_per_image_g": {k: (round(v / 1e9, 3) if k != "text_tokens" else v) for k, v in executed.items()},
        "achieved_gflops": round(achieved, 1),
        "mfu": round(achieved / rates["best"], 4),
        "mfu_vs_torch_matmul": round(achieved / rates["torch_matmul"], 4),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        **record_extra,
    }


def parity(model_dir: Path, pixel_values, scores, maps, damaged_ids) -> dict:
    """This package on the same weights and inputs, with the state-word id their tokenizer gives 'damaged'."""
    from transformers import AutoModel

    if len(damaged_ids) != 1:
        return {"skipped": f"'damaged' is {damaged_ids} for their tokenizer"}
    ours = AutoModel.from_pretrained(
        model_dir, trust_remote_code=True, normal_state_token_id=damaged_ids[0], abnormal_state_token_id=damaged_ids[0]
    ).eval()
    with torch.inference_mode():
        output = ours(pixel_values=pixel_values)
    map_diff = float(np.abs(output.anomaly_map.numpy() - maps).max())
    return {
        "scores_max_abs_diff": float((output.anomaly_score - scores).abs().max()),
        "maps_max_abs_diff": map_diff,
        "scores": [round(float(s), 6) for s in scores],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors-repo", required=False, default=None, help="checkout or bare git dir of kim0806/ViP2-CLIP")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model-dir", default=None, help="reuse bench_inference.py's saved random model")
    parser.add_argument("--check-parity", action="store_true", help="compare with this package (first batch size)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker is not None:
        print(json.dumps(worker(json.loads(args._worker))), flush=True)
        return 0
    if args.authors_repo is None:
        parser.error("--authors-repo is required (e.g. /work/.mirror/kim0806+ViP2-CLIP/repo)")

    with tempfile.TemporaryDirectory(prefix="vip2clip_ref_") as tmp:
        work = Path(tmp)
        repo = extract_authors_repo(Path(args.authors_repo), work / "authors")
        model_dir = Path(args.model_dir) if args.model_dir else work / "model"
        common.save_random_model(model_dir, args.image_size)
        inputs = work / "inputs.pt"
        torch.save(common.make_pixel_values(max(args.batch_sizes), args.image_size), inputs)
        for index, batch in enumerate(args.batch_sizes):
            spec = {
                "repo": str(repo), "model_dir": str(model_dir), "inputs": str(inputs), "batch": batch,
                "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
                "check_parity": args.check_parity and index == 0,
            }
            print(json.dumps(common.run_worker(Path(__file__), spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
