"""Shared pieces of the inference benchmarks (bench_inference.py, reference_baseline.py).

* a random-weight ViP²-CLIP at the real geometry (ViT-L/14@336 at 518 px), saved once with `save_pretrained`;
* deterministic, realistic inputs: smooth random images with a few blob "defects", through `ViP2CLIPProcessor`;
* the analytic FLOP count of one image (vision tower, text encoder, heads);
* the measured large-matmul rate, machine description, peak-memory helpers.

Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

# The package under test: this checkout, or another copy (e.g. a scratch tree with a proposed patch) named by
# the environment variable VIP2CLIP_PACKAGE_ROOT (bench_inference.py --package-root sets it for its workers).
ROOT = Path(os.environ.get("VIP2CLIP_PACKAGE_ROOT") or Path(__file__).resolve().parents[1]).resolve()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if "HF_MODULES_CACHE" not in os.environ:
    # trust_remote_code copies the model code into a modules cache keyed by the folder name: use a private one,
    # so runs of different code (or other users' folders of the same name) never share it. Workers inherit it.
    import atexit
    import shutil
    import tempfile

    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="vip2clip_hf_modules_")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

GIB = 1024**3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "amx")))
    except OSError:
        pass
    return []


def cpu_description() -> dict:
    """/proc/cpuinfo's identity of this CPU: model name, vendor, family/model/stepping, the ISA flags that decide
    kernel choices (AVX2 / AVX-512 / VNNI / BF16 / AMX), and for AMD the Zen generation they imply. Machines of
    this project change between sessions (Zen 3, 4 and 5 seen), so every benchmark line carries it."""
    fields: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" not in line:
                if fields:
                    break  # the first processor's block is enough
                continue
            key, value = (part.strip() for part in line.split(":", 1))
            fields.setdefault(key, value)
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8")
    description = {
        "model_name": fields.get("model name", platform.processor() or platform.machine()),
        "vendor": fields.get("vendor_id"),
        "family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "stepping": int(fields["stepping"]) if fields.get("stepping", "").isdigit() else None,
        "flags": [flag for flag in wanted if flag in flags],
    }
    description["generation"] = _amd_generation(description) if description["vendor"] == "AuthenticAMD" else None
    return description


def _amd_generation(description: dict) -> str | None:
    """Zen generation from AMD's family/model numbers (family 25 = 19h: Zen 3 at models 0x00-0x0f, 0x20-0x5f,
    Zen 4 at 0x10-0x1f, 0x60-0x7f, 0xa0-0xaf; family 26 = 1Ah: Zen 5)."""
    family, model = description["family"], description["model"]
    if family == 23:
        return "zen1/zen2"
    if family == 25 and model is not None:
        return "zen4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF) else "zen3"
    if family == 26:
        return "zen5"
    return None


def machine_info(device: str) -> dict:
    import transformers

    info = {
        "cpu": cpu_model(),
        "cpu_isa": cpu_flags(),
        "cpu_id": cpu_description(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_gib(field: str) -> float | None:
    """A memory line of /proc/self/status (kB) in GiB, or None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def current_peak_rss_gib() -> float | None:
    """VmHWM: the peak RSS since the process started or since the last `reset_peak_rss()`."""
    return _proc_status_gib("VmHWM")


def current_rss_gib() -> float | None:
    return _proc_status_gib("VmRSS")


def lifetime_peak_rss_gib() -> float:
    """getrusage max RSS of this (fresh) process, loading included; never reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# ---------------------------------------------------------------------------------------------- model
def real_geometry_config(image_size: int = 518, **overrides):
    """`ViP2CLIPConfig()` (ViT-L/14@336 geometry) at `image_size`, with state-word ids set (no tokenizer)."""
    from modeling_vip2clip import ViP2CLIPConfig

    kwargs = dict(normal_state_token_id=1, abnormal_state_token_id=2)
    kwargs.update(overrides)
    config = ViP2CLIPConfig(**kwargs)
    if image_size != config.image_size:
        clip = config.clip_config.to_dict()
        clip["vision_config"]["image_size"] = image_size
        config = ViP2CLIPConfig(clip_config=clip, **kwargs)
    return config


def save_random_model(directory: str | Path, image_size: int = 518, seed: int = 0) -> Path:
    """Build the fp32 random model of the real geometry and `save_pretrained` it (once per benchmark run)."""
    from modeling_vip2clip import ViP2CLIPModel

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    model = ViP2CLIPModel(real_geometry_config(image_size)).eval()
    # Random ICA/FGP at their init are nearly input-independent; make the heads "trained-like" (visibly
    # image-dependent), as tests/test_reference_parity.py does, so maps and scores carry signal.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in (model.ica.normal_context, model.ica.abnormal_context, model.ica.class_context):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        for linear in (model.fgp.q_proj, model.fgp.k_proj, model.fgp.v_proj, model.fgp.out_proj):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.3)
    model.save_pretrained(directory)
    return directory


# The files that travel to the Hub with a saved model (hub/publish.py ships the same, plus the pipeline).
HUB_CODE_FILES = ("configuration_vip2clip.py", "modeling_vip2clip.py", "processing_vip2clip.py",
                  "cpu_fast_path_vip2clip.py", "reference_bank_vip2clip.py")


def sync_model_code(directory: str | Path) -> None:
    """Copy the package's model code into a saved model folder, so `trust_remote_code` runs the code under test
    (save_pretrained copies it once; a reused folder could otherwise hold an older copy)."""
    import shutil

    for name in HUB_CODE_FILES:
        shutil.copyfile(ROOT / "modeling_vip2clip" / name, Path(directory) / name)


def fast_path_in_use(model, device: str) -> bool | None:
    """Whether `model` (package or remote-code class) runs its vision tower on the CPU oneDNN fast path; None for
    model code without one."""
    import importlib

    if not hasattr(model, "cpu_onednn_vision"):
        return None
    if hasattr(model, "uses_cpu_fast_path"):  # the decision includes the per-CPU choice
        return bool(model.uses_cpu_fast_path(device))
    package = type(model).__module__.rsplit(".", 1)[0]
    fast_path = importlib.import_module(f"{package}.cpu_fast_path_vip2clip")
    return bool(model.cpu_onednn_vision) and fast_path.cpu_fast_path_available(model.clip.vision_model, device)


def smooth_images(count: int, seed: int = 0, height: int = 480, width: int = 640) -> list:
    """Deterministic 'realistic' RGB images: a smooth random background, soft texture and 0–3 blob defects."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(count):
        coarse = rng.uniform(40, 215, size=(6, 8, 3)).astype(np.float32)
        background = np.asarray(
            Image.fromarray(coarse.astype(np.uint8), "RGB").resize((width, height), Image.Resampling.BICUBIC),
            dtype=np.float32,
        )
        texture = rng.normal(0, 1, size=(height // 8, width // 8, 3)).astype(np.float32)
        texture = np.asarray(
            Image.fromarray(np.clip(texture * 40 + 128, 0, 255).astype(np.uint8), "RGB").resize(
                (width, height), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        ) - 128
        canvas = background + 0.35 * texture
        for _ in range(int(rng.integers(0, 4))):
            cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
            radius = rng.uniform(10, 60)
            blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)))[..., None]
            canvas = canvas * (1 - 0.8 * blob) + 0.8 * blob * rng.uniform(0, 255, size=3)
        images.append(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB"))
    return images


def make_pixel_values(count: int, image_size: int = 518, seed: int = 0) -> torch.Tensor:
    from modeling_vip2clip import ViP2CLIPProcessor

    processor = ViP2CLIPProcessor(image_size=image_size)
    return processor(images=smooth_images(count, seed))["pixel_values"]


# ---------------------------------------------------------------------------------------------- FLOPs
def _transformer_flops(tokens: int, width: int, ffn: int, layers: int) -> int:
    """Multiply-adds ×2 of `layers` pre-LN blocks on one sequence: q/k/v/o + MLP linears, QKᵀ and AV."""
    linear = 2 * tokens * width * (4 * width + 2 * ffn)
    attention = 4 * tokens * tokens * width
    return layers * (linear + attention)


def model_flops_per_image(config, text_tokens: int | None = None, projected_tokens_per_layer: int | None = None,
                          fgp_unfolded: bool = False) -> dict:
    """Analytic FLOPs (2 × multiply-adds) of one image through ViP²-CLIP, by part.

    Default = the model's required work, used for every MFU (so an implementation's extra work counts as lost
    utilisation): vision = patch embedding (conv as a matmul) + the blocks on 1 + L tokens (q/k/v/o and MLP
    linears, QKᵀ and AV) + post-LN/projection of the feature layers' L patch tokens + the CLS projection;
    text = the two prompts (normal, abnormal) cut after EOS (n_ctx + n_cls + 3 tokens) + EOS projection;
    heads = the ICA MLPs, FGP with its key/value projections folded into the two queries (q and out projections,
    folding, logits and attention-pooling over the L patches), UTPA similarities and the separable blur.
    LayerNorm, softmax, GELU, the bilinear upsampling and other element-wise work are not counted.

    `text_tokens`, `projected_tokens_per_layer`, `fgp_unfolded=True` count what another implementation executes
    instead (the authors' code: 77 tokens, all 1 + L tokens projected, k/v projections of every patch).
    """
    vision = config.clip_config.vision_config
    text = config.clip_config.text_config
    patches, dim, n_layers = config.num_patches, config.projection_dim, len(config.feature_layers)
    width, patch = int(vision.hidden_size), int(vision.patch_size)
    projected = patches if projected_tokens_per_layer is None else projected_tokens_per_layer
    flops_vision = (
        2 * patches * 3 * patch * patch * width
        + _transformer_flops(patches + 1, width, int(vision.intermediate_size), int(vision.num_hidden_layers))
        + 2 * n_layers * projected * width * dim
        + 2 * width * dim
    )
    tokens = config.prompt_length if text_tokens is None else text_tokens
    text_width = int(text.hidden_size)
    flops_text = 2 * (
        _transformer_flops(tokens, text_width, int(text.intermediate_size), int(text.num_hidden_layers))
        + 2 * text_width * dim
    )
    ica = config.n_cls * 2 * (dim * config.adapter_hidden_size + config.adapter_hidden_size * text_width)
    heads = config.fgp_num_heads
    if fgp_unfolded:  # q/out projections of the 2 states, k/v projections of every patch, logits, attention·V
        fgp = n_layers * (2 * 2 * 2 * dim * dim + 2 * 2 * patches * dim * dim + 2 * 2 * 2 * patches * dim)
    else:  # q/out projections, W_kᵀq and W_v·pooled per state, logits and pooling of 2·H rows over L patches
        fgp = n_layers * (4 * 2 * 2 * dim * dim + 2 * 2 * 2 * heads * patches * dim)
    utpa = n_layers * 2 * patches * 2 * dim
    radius = int(config.blur_truncate * config.blur_sigma + 0.5)
    blur = 2 * 2 * (2 * radius + 1) * config.image_size**2 if config.blur_sigma > 0 else 0
    flops_heads = ica + fgp + utpa + blur
    return {
        "vision": flops_vision,
        "text": flops_text,
        "heads": flops_heads,
        "total": flops_vision + flops_text + flops_heads,
        "text_tokens": tokens,
    }


# ---------------------------------------------------------------------------------------------- matmul rate
def matmul_rate_gflops(dtype: torch.dtype, device: str = "cpu", size: int | None = None, repeats: int = 3,
                       backend: str = "torch.matmul") -> float:
    """Best-of-`repeats` rate of a square `size`³ matmul (4096 on CPU, 8192 on GPU) in GFLOP/s.

    `backend="onednn"` runs it as a oneDNN linear (`torch.ops.mkldnn._linear_pointwise`, CPU only): for fp32 on
    CPU, ATen's matmul goes to MKL's sgemm, which on AMD Zen runs AVX2 kernels at about half of oneDNN's
    AVX-512 rate, so the two are both reported and utilisation is taken against the faster.
    `backend="onednn_prepacked"`: the same with the weight reordered once into oneDNN's blocked layout
    (`torch.ops.mkldnn._reorder_linear_weight`), as the model's bf16 fast path does — the machine's best rate.
    """
    size = size or (8192 if device.startswith("cuda") else 4096)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    if backend in ("onednn", "onednn_prepacked"):
        if backend == "onednn_prepacked":
            b = torch.ops.mkldnn._reorder_linear_weight(b, size)

        def run():
            return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    else:
        out = torch.empty(size, size, device=device, dtype=dtype)

        def run():
            return torch.matmul(a, b, out=out)
    run()
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def matmul_rates(dtype: torch.dtype, device: str = "cpu") -> dict:
    """The large-matmul rates of this dtype: torch.matmul, and on CPU also the oneDNN linear; `best` = max."""
    rates = {"torch_matmul": round(matmul_rate_gflops(dtype, device), 1)}
    if device == "cpu" and torch.backends.mkldnn.is_available():
        try:
            rates["onednn_linear"] = round(matmul_rate_gflops(dtype, device, backend="onednn"), 1)
            if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
                rates["onednn_prepacked"] = round(matmul_rate_gflops(dtype, device, backend="onednn_prepacked"), 1)
        except RuntimeError:  # oneDNN has no kernel for this dtype on this CPU (bf16 without AVX-512/AMX)
            rates["onednn_unsupported"] = True
    rates["best"] = max(value for value in rates.values() if not isinstance(value, bool))
    rates["shape"] = "4096x4096x4096" if device == "cpu" else "8192x8192x8192"
    return rates


# ---------------------------------------------------------------------------------------------- statistics
def pearson_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each (H, W) map pair, in float64: `(B, H, W)` × 2 → `(B,)`."""
    a = a.double().flatten(1)
    b = b.double().flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def run_worker(script: Path, spec: dict, timeout: float | None = None) -> dict:
    """Run `script --_worker JSON` in a fresh interpreter (so peaks don't mix); return its last JSON line."""
    command = [sys.executable, str(script), "--_worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {spec} failed (rc={result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return json.loads(lines[-1])
