"""Exactness of the fast inference paths (never timings): the standard bf16 load and the attention backends.

* bf16: `AutoModel.from_pretrained(dir, trust_remote_code=True, dtype=torch.bfloat16)` keeps the learnable heads
  (`ica`, `fgp`) in fp32 (`_keep_in_fp32_modules_strict`) and the CLIP towers in bf16; its scores stay within 0.01
  of fp32 and its anomaly maps correlate ≥ 0.999 with fp32's per image — the targets of benchmarks/README.md.
* fp32: `attn_implementation="eager"` and `"sdpa"` give the same scores, maps and embeddings to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from modeling_vip2clip.testing_utils import tiny_vip2clip_config

SCORE_TOL, PEARSON_MIN, FP32_TOL = 0.01, 0.999, 1e-5


def _fast_path_module(model):
    """The cpu_fast_path_vip2clip module next to the (remote-code) module that defines this model's class: the
    one whose decision functions and packed-weight cache the model really uses."""
    import importlib

    return importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".cpu_fast_path_vip2clip")


def _uses_fast_path(model) -> bool:
    """The fast path's kernels run here; they are then forced on (`cpu_onednn_vision = True`) so that they are
    tested on every CPU, including those where the per-CPU default (`None`) keeps transformers' layers."""
    vision = model.clip.vision_model
    if model.cpu_onednn_vision is False or not _fast_path_module(model).cpu_fast_path_available(vision, torch.device("cpu")):
        return False
    model.cpu_onednn_vision = True
    return True


def _pearson_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double().flatten(1), b.double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny fp32 model with 'trained-like' heads (visibly image-dependent maps and scores), saved once."""
    from modeling_vip2clip import ViP2CLIPModel

    torch.manual_seed(0)
    model = ViP2CLIPModel(tiny_vip2clip_config()).eval()
    with torch.no_grad():
        for parameter in (model.ica.normal_context, model.ica.abnormal_context, model.ica.class_context):
            parameter.normal_(0, 0.5)
        for linear in (model.fgp.q_proj, model.fgp.k_proj, model.fgp.v_proj, model.fgp.out_proj):
            linear.weight.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("fast_path") / "model"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images():
    # smooth, image-like inputs (low-frequency fields at the CLIP-normalised scale), not white noise
    generator = torch.Generator().manual_seed(3)
    coarse = torch.randn(6, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)
    return smooth + 0.1 * torch.randn(6, 3, 32, 32, generator=generator)


@pytest.fixture(scope="module")
def fp32_output(saved_dir, images):
    model = AutoModel.from_pretrained(saved_dir, trust_remote_code=True).eval()
    with torch.inference_mode():
        return model(pixel_values=images)


def test_bf16_load_keeps_heads_fp32(saved_dir):
    model = AutoModel.from_pretrained(saved_dir, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.ica.parameters()} == {torch.float32}
    assert {p.dtype for p in model.fgp.parameters()} == {torch.float32}
    vision, text = model.clip.vision_model, model.clip.text_model
    assert {p.dtype for p in vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in text.parameters()} == {torch.bfloat16}


def test_bf16_matches_fp32(saved_dir, images, fp32_output):
    model = AutoModel.from_pretrained(saved_dir, trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        output = model(pixel_values=images)
    assert output.anomaly_score.dtype == torch.float32 and output.anomaly_map.dtype == torch.float32
    # the comparison must not be vacuous: scores spread and maps carry structure
    assert fp32_output.anomaly_score.std() > 1e-2
    assert fp32_output.anomaly_map.flatten(1).std(1).min() > 1e-3
    score_diff = (output.anomaly_score - fp32_output.anomaly_score).abs().max().item()
    pearson = _pearson_per_image(output.anomaly_map, fp32_output.anomaly_map)
    assert score_diff <= SCORE_TOL, f"bf16 scores differ from fp32 by {score_diff}"
    assert pearson.min().item() >= PEARSON_MIN, f"bf16 maps correlate {pearson.tolist()} with fp32"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_backends_agree_fp32(saved_dir, images, fp32_output, attn):
    model = AutoModel.from_pretrained(saved_dir, trust_remote_code=True, attn_implementation=attn).eval()
    assert model.clip.vision_model.config._attn_implementation == attn
    assert model.clip.text_model.config._attn_implementation == attn
    with torch.inference_mode():
        output = model(pixel_values=images)
    for name in ("anomaly_score", "anomaly_map", "layer_anomaly_maps", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(output, name), getattr(fp32_output, name), atol=FP32_TOL, rtol=0,
                                   msg=lambda m, name=name: f"{attn} vs default on {name}: {m}")


def test_cpu_fast_path_matches_plain_layers_fp32(saved_dir, images):
    """The CPU fast path of the vision tower (oneDNN linears, chunked attention, one image at a time; proposed in
    cpu_fast_path_vip2clip.py) against the plain transformers layers of the same model, fp32."""
    model = AutoModel.from_pretrained(saved_dir, trust_remote_code=True).eval()
    if not _uses_fast_path(model):
        pytest.skip("no oneDNN in this torch build")
    with torch.inference_mode():
        fast = model(pixel_values=images)
        batch_features = model.encode_image(images)
        single_features = model.encode_image(images[:1])
        model.cpu_onednn_vision = False
        plain = model(pixel_values=images)
    for name in ("anomaly_score", "anomaly_map", "layer_anomaly_maps", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), atol=FP32_TOL, rtol=0)
    # the tower runs image by image inside a batch: the batch-of-one features, bit for bit
    for in_batch, alone in zip(batch_features, single_features):
        assert torch.equal(in_batch[:1], alone)


def test_default_kernel_choice_follows_the_cpu(saved_dir, images):
    """`cpu_onednn_vision = None` (the default) picks per CPU at run time: fp32 takes the fast path only where
    it wins (`fp32_fast_path_wins`, AVX-512), and the choice changes no number beyond fp32 rounding."""
    model = AutoModel.from_pretrained(saved_dir, trust_remote_code=True).eval()
    module = _fast_path_module(model)
    assert model.cpu_onednn_vision is None
    available = module.cpu_fast_path_available(model.clip.vision_model, torch.device("cpu"))
    assert model.uses_cpu_fast_path("cpu") == (available and module.fp32_fast_path_wins())
    with torch.inference_mode():
        default = model(pixel_values=images)
        model.cpu_onednn_vision = True
        forced = model(pixel_values=images)
        assert model.uses_cpu_fast_path("cpu") == available
        model.cpu_onednn_vision = False
        assert not model.uses_cpu_fast_path("cpu")
    for name in ("anomaly_score", "anomaly_map"):
        torch.testing.assert_close(getattr(default, name), getattr(forced, name), atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_onednn_layer_matches_transformers_layer(dtype, activation):
    """One CLIP encoder layer on the CPU fast path vs transformers' own layer, both against float64.

    1100 tokens: more than two attention blocks of query rows. fp32 must agree with float64 to fp32 rounding;
    bf16 (oneDNN-layout softmax, swish-fused quick_gelu with the slope moved into the LayerNorm affine and
    biases) must be no less accurate than transformers' bf16 layer, on every output and on average."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from modeling_vip2clip.cpu_fast_path_vip2clip import clip_layer_onednn, onednn_bf16_supported

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("no oneDNN in this torch build")
    if dtype == torch.bfloat16 and not onednn_bf16_supported():
        pytest.skip("no native bf16 in oneDNN on this CPU")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, hidden_act=activation)
    config._attn_implementation = "sdpa"
    layer = CLIPEncoderLayer(config).eval()
    with torch.no_grad():
        for norm in (layer.layer_norm1, layer.layer_norm2):  # a non-trivial affine: the slope is folded into it
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.2)
    hidden = torch.randn(2, 1100, 64)
    with torch.inference_mode():
        exact = CLIPEncoderLayer(config).double().eval()
        exact.load_state_dict(layer.state_dict())
        expected = exact(hidden.double(), None)
        expected = expected[0] if isinstance(expected, tuple) else expected
        layer = layer.to(dtype)
        fast = clip_layer_onednn(layer, hidden.to(dtype)).double()
        plain = layer(hidden.to(dtype), None)
        plain = (plain[0] if isinstance(plain, tuple) else plain).double()
    assert fast.shape == expected.shape
    fast_error, plain_error = (fast - expected).abs(), (plain - expected).abs()
    if dtype == torch.float32:
        torch.testing.assert_close(fast, expected, atol=2e-5, rtol=2e-5)
    else:
        assert plain_error.max() > 1e-3  # bf16 rounding is visible: the comparison is not vacuous
        assert fast_error.mean() <= 1.25 * plain_error.mean(), (fast_error.mean(), plain_error.mean())
        assert fast_error.max() <= 1.5 * plain_error.max(), (fast_error.max(), plain_error.max())


def _fast_path_model(saved_dir, **kwargs):
    model = AutoModel.from_pretrained(saved_dir, trust_remote_code=True, **kwargs).eval()
    if not _uses_fast_path(model):
        pytest.skip("no oneDNN fast path here")
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_change_no_number(saved_dir, images, dtype):
    """oneDNN's prepacked weight layout runs the same GEMM kernel: bit-identical features, either dtype."""
    model = _fast_path_model(saved_dir, dtype=dtype)
    assert model.cpu_prepacked_weights is None  # the declared default
    wanted = _fast_path_module(model).prepacked_weights_wanted(model.clip.vision_model, model.cpu_prepacked_weights)
    assert wanted == (dtype == torch.bfloat16)  # the default: bf16 only
    with torch.inference_mode():
        model.cpu_prepacked_weights = False
        plain = model.encode_image(images.to(dtype))
        model.cpu_prepacked_weights = True
        packed = model.encode_image(images.to(dtype))
    for a, b in zip(plain, packed):
        assert torch.equal(a, b)


def test_prepacked_weights_follow_weight_updates_and_are_freed(saved_dir, images):
    import gc

    model = _fast_path_model(saved_dir)
    model.cpu_prepacked_weights = True
    cache = _fast_path_module(model)._PACKED_WEIGHTS
    assert _fast_path_module(model).__name__.startswith("transformers_modules.")  # the remote-code copy's cache
    before = len(cache)
    with torch.inference_mode():
        model.encode_image(images[:1])
    linears = [m for m in model.clip.vision_model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(cache) == before + len(linears)  # one packed copy per linear of the tower, nothing else

    # an in-place update (load_state_dict, an optimiser step) must not leave a stale packed copy in use
    other = _fast_path_model(saved_dir)
    with torch.no_grad():
        for parameter in other.clip.vision_model.encoder.parameters():
            parameter.mul_(0.9)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        updated = model.encode_image(images[:1])
        other.cpu_prepacked_weights = False
        expected = other.encode_image(images[:1])
    for a, b in zip(updated, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    del model, linears
    gc.collect()
    assert len(cache) == before  # freed with the model's weights
