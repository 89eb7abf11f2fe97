"""CPU fast path of the frozen CLIP vision tower (fp32 and bf16), used by `ViP2CLIPModel.encode_image`.

The same math as transformers' `CLIPEncoderLayer` (pre-LN, bidirectional attention), computed with oneDNN:
linears with the bias and residual adds fused into the GEMM, an attention that keeps each head's score block in
cache and in oneDNN's own layout, and optionally the linear weights prepacked once into oneDNN's blocked layout.
fp32 agrees with the plain layers to fp32 rounding (only the summation order differs); bf16 is no less accurate
than transformers' bf16 layer (tests/test_fast_path.py). Why it is faster, and by how much on which CPU:
benchmarks/README.md.

The model decides once per call (`cpu_fast_path_available`, `prepacked_weights_wanted`) and then runs either
`clip_layer_onednn` / `onednn_linear` or the plain transformers modules — one flag, one branch.

This file travels to the Hub with modeling_vip2clip.py (`trust_remote_code`): it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "onednn_linear_available",
    "cpu_fast_path_available",
    "prepacked_weights_wanted",
    "fp32_fast_path_wins",
    "onednn_bf16_supported",
    "onednn_linear",
    "clip_layer_onednn",
]

# Query rows per attention block: few enough that one head's (rows, N) score block stays in cache for the
# softmax and the product with v.
_ATTENTION_ROWS = 512
# quick_gelu's slope: x·σ(1.702x) (OpenAI CLIP; transformers' QuickGELUActivation).
_QUICK_GELU_SLOPE = 1.702

# oneDNN copies of frozen linear weights in its blocked GEMM layout (see `_onednn_weight`): weight → (its stamp,
# the copy), keyed by identity and weakly, so an entry is dropped with its weight; nothing here is saved, copied
# or pickled with the model.
_PACKED_WEIGHTS = WeakIdKeyDictionary()


# ---------------------------------------------------------------------------------------------- the decision
def onednn_bf16_supported() -> bool:
    """oneDNN runs bf16 natively on this CPU; elsewhere a bf16 model keeps transformers' layers."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return check is not None and bool(check())


def onednn_linear_available() -> bool:
    """oneDNN's fused linear is in this torch build (PyTorch ≥ 2.0, x86 builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_fast_path_available(vision_model: nn.Module, device: torch.device | str) -> bool:
    """Whether `clip_layer_onednn` can replace the layers of this CLIP vision tower for inputs on `device`.

    fp32: the linears move from ATen's BLAS to oneDNN — the same IEEE fp32 math in another summation order.
    bf16: the linears were oneDNN already; the gain is the fused adds and the oneDNN-layout attention. Only with
    the default `sdpa` attention: `attn_implementation="eager"` keeps the plain transformers layers (which is how
    the tests compare the two). The model's `cpu_onednn_vision` switch comes on top of this.
    """
    vision_dtype = vision_model.embeddings.patch_embedding.weight.dtype
    return (
        torch.device(device).type == "cpu"
        and vision_dtype in (torch.float32, torch.bfloat16)
        and onednn_linear_available()
        and hasattr(torch.ops.aten, "mkldnn_linear")  # the attention's products on oneDNN-layout tensors
        and (vision_dtype == torch.float32 or onednn_bf16_supported())
        and vision_model.config._attn_implementation == "sdpa"
    )


def fp32_fast_path_wins() -> bool:
    """Whether the fp32 fast path beats transformers' layers (ATen → MKL) on this CPU, decided at run time.

    Its edge is oneDNN's AVX-512 sgemm against MKL's AVX2 kernels on AMD (Zen 4, Zen 5). Where the CPU has only
    AVX2 (Zen 3 and older, many laptops) both libraries run AVX2 kernels, MKL's are the faster on the tower's
    shapes, and measured whole-model the fast path loses (benchmarks/README.md, "CPU kernels per machine"), so
    fp32 keeps transformers' layers there. bf16 needs oneDNN's native bf16 (`onednn_bf16_supported`) anyway.
    """
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX", "AVX2")


def prepacked_weights_wanted(vision_model: nn.Module, choice: bool | None) -> bool:
    """Prepack the tower's linear weights (`_onednn_weight`)? `choice` is the model's `cpu_prepacked_weights`:
    `None` = on for a bf16 tower, off for fp32 (where the second copy of the weights would lift peak memory above
    the plain path's); `True` / `False` force it."""
    if choice is None:
        choice = vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    return bool(choice) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# ---------------------------------------------------------------------------------------------- kernels
def _onednn_weight(weight: torch.Tensor, rows: int, packed: bool) -> torch.Tensor:
    """The weight to hand to oneDNN: as stored, or (`packed`) a copy reordered once into oneDNN's blocked layout.

    Given the plain weight, oneDNN reorders it inside every call; prepacked, the same GEMM kernel runs on the
    reordered copy (identical results) without that reorder. The cost is a second copy of the tower's linear
    weights, hence on by default for bf16 only (`prepacked_weights_wanted`). A copy is rebuilt when its weight
    changes (new storage or an in-place update such as `load_state_dict`).
    """
    if not packed:
        return weight
    stamp = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    entry = _PACKED_WEIGHTS.get(weight)
    if entry is None or entry[0] != stamp:
        entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
        _PACKED_WEIGHTS[weight] = entry
    return entry[1]


def onednn_linear(
    hidden_states: torch.Tensor, linear: nn.Linear, residual: torch.Tensor | None = None, packed: bool = False
) -> torch.Tensor:
    """`linear(hidden_states)` (`+ residual`) computed by oneDNN in the input's dtype, bias and residual add fused
    into the GEMM (in fp32 the sum is the same addition as `residual + linear(hidden_states)`, bit for bit)."""
    weight = _onednn_weight(linear.weight, hidden_states.numel() // hidden_states.shape[-1], packed)
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, linear.bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(hidden_states, residual, weight, linear.bias, "add")


def _chunked_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v for contiguous `(B, H, N, d)` inputs, one image, head and block of query rows at a
    time so that the score block stays in cache: the math of transformers' eager attention (softmax accumulated
    in fp32, rounded once to the input dtype).

    The score block never leaves oneDNN's own tensor layout (`to_mkldnn`): both products are oneDNN GEMMs and
    the softmax is oneDNN's JIT kernel; only the small `(rows, d)` query and output blocks are converted. That
    avoids ATen's bf16 softmax and the layout round trips; in fp32 it is no slower than oneDNN products around
    ATen's softmax, so both dtypes share this one path.
    """
    output = torch.empty_like(queries)
    heads, tokens = queries.shape[1], queries.shape[2]
    values_t = values.transpose(-1, -2).contiguous()  # (B, H, d, N): the "weight" of scores·v
    for index in range(queries.shape[0]):
        scaled = queries[index] * scale  # (H, N, d)
        for head in range(heads):
            for start in range(0, tokens, _ATTENTION_ROWS):
                rows = slice(start, start + _ATTENTION_ROWS)
                scores = torch.ops.aten.mkldnn_linear(scaled[head, rows].to_mkldnn(), keys[index, head], None)
                probabilities = torch.softmax(scores, dim=-1)  # (rows, N), oneDNN layout
                block = torch.ops.aten.mkldnn_linear(probabilities, values_t[index, head], None)  # (rows, d)
                output[index, head, rows] = block.to_dense()
    return output


def _clip_mlp_onednn(layer: nn.Module, hidden_states: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """`hidden_states + mlp(layer_norm2(hidden_states))` with oneDNN linears.

    fp32 (the exact path): transformers' activation on fc1's output, the residual add fused into fc2.
    bf16 with quick_gelu: the activation is fused into fc1 as oneDNN's swish post-op, x·σ(x), which has no slope
    parameter; the slope enters through the (tiny) LayerNorm affine and fc1 bias, y = 1.702·fc1(x), so that
    swish(y) = 1.702·quick_gelu(fc1(x)), and leaves again in the residual add: fc2 with its bias ×1.702 gives
    1.702·fc2(quick_gelu(·)), added with alpha 1/1.702. This replaces three bf16 passes over the (N, 4·D)
    activation by one over (N, D); the extra roundings are bf16's own.
    """
    mlp = layer.mlp
    activation = getattr(mlp.config, "hidden_act", None)
    norm = layer.layer_norm2
    affine = all(t is not None for t in (norm.weight, norm.bias, mlp.fc1.bias, mlp.fc2.bias))
    if hidden_states.dtype == torch.bfloat16 and activation == "quick_gelu" and affine:
        slope = _QUICK_GELU_SLOPE
        normed = F.layer_norm(hidden_states, norm.normalized_shape, norm.weight * slope, norm.bias * slope, norm.eps)
        rows = normed.numel() // normed.shape[-1]
        fc1_weight, fc2_weight = (_onednn_weight(linear.weight, rows, packed) for linear in (mlp.fc1, mlp.fc2))
        activated = torch.ops.mkldnn._linear_pointwise(normed, fc1_weight, mlp.fc1.bias * slope, "swish", [], "")
        scaled_output = torch.ops.mkldnn._linear_pointwise(activated, fc2_weight, mlp.fc2.bias * slope, "none", [], "")
        return torch.add(hidden_states, scaled_output, alpha=1.0 / slope)
    intermediate = onednn_linear(norm(hidden_states), mlp.fc1, packed=packed)
    if activation == "quick_gelu":  # x·σ(1.702x), as transformers', in place
        intermediate = intermediate.mul_(torch.mul(intermediate, _QUICK_GELU_SLOPE).sigmoid_())
    else:
        intermediate = mlp.activation_fn(intermediate)
    return onednn_linear(intermediate, mlp.fc2, residual=hidden_states, packed=packed)


def clip_layer_onednn(layer: nn.Module, hidden_states: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """`CLIPEncoderLayer.forward(hidden_states, None)` (pre-LN, bidirectional attention) with oneDNN linears,
    the residual adds fused into them and the chunked attention above; `packed`: prepacked weights
    (`_onednn_weight`)."""
    attention = layer.self_attn
    batch, tokens, width = hidden_states.shape
    shape = (batch, tokens, attention.num_heads, attention.head_dim)
    normed = layer.layer_norm1(hidden_states)
    # head-major contiguous copies (cheap) so that each block's products read dense memory
    queries = onednn_linear(normed, attention.q_proj, packed=packed).view(shape).transpose(1, 2).contiguous()
    keys = onednn_linear(normed, attention.k_proj, packed=packed).view(shape).transpose(1, 2).contiguous()
    values = onednn_linear(normed, attention.v_proj, packed=packed).view(shape).transpose(1, 2).contiguous()
    attended = _chunked_attention(queries, keys, values, attention.scale)
    attended = attended.transpose(1, 2).reshape(batch, tokens, width).contiguous()
    hidden_states = onednn_linear(attended, attention.out_proj, residual=hidden_states, packed=packed)
    return _clip_mlp_onednn(layer, hidden_states, packed=packed)
