"""ViP²-CLIP: Visual-Perception Prompting with Unified Alignment for zero-shot anomaly detection.

A frozen HF `CLIPModel` plus the two learnable ViP-Prompt heads and the UTPA scoring of docs/method.md:

* `ViP2CLIPImageConditionedAdapter` (ICA, docs/method.md §3): builds the normal/abnormal prompt sequences from
  learnable context tokens and image-conditioned class tokens.
* `ViP2CLIPFineGrainedPerception` (FGP, docs/method.md §4): one cross-attention shared by all feature layers that
  lets the two state embeddings look at a layer's patches.
* `ViP2CLIPUnifiedAlignment` (UTPA, docs/method.md §5): patch-text similarities → per-layer pixel maps and the
  top-k image score.
* `ViP2CLIPGaussianBlur`: scipy's `gaussian_filter` (reflect padding, truncate 4σ) as a separable convolution on
  the tensor, for the whole batch at once.
* `ViP2CLIPFocalLoss`, `ViP2CLIPDiceLoss` (docs/method.md §6) and `ViP2CLIPModel`, the `PreTrainedModel` tying it
  together.

The CPU fast path of the vision tower lives in cpu_fast_path_vip2clip.py. This file travels to the Hub
(`trust_remote_code`): it imports only torch, transformers and its single-dot siblings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from .configuration_vip2clip import ViP2CLIPConfig
from .cpu_fast_path_vip2clip import (
    clip_layer_onednn,
    cpu_fast_path_available,
    fp32_fast_path_wins,
    onednn_linear,
    prepacked_weights_wanted,
)
from .reference_bank_vip2clip import ViP2CLIPReferenceBank

__all__ = [
    "ViP2CLIPOutput",
    "ViP2CLIPImageConditionedAdapter",
    "ViP2CLIPFineGrainedPerception",
    "ViP2CLIPUnifiedAlignment",
    "ViP2CLIPGaussianBlur",
    "ViP2CLIPFocalLoss",
    "ViP2CLIPDiceLoss",
    "ViP2CLIPPreTrainedModel",
    "ViP2CLIPModel",
    "ViP2CLIPReferenceBank",
    "resize_position_embeddings",
]


@dataclass
class ViP2CLIPOutput(ModelOutput):
    r"""Output of [`ViP2CLIPModel`]. B images, n feature layers, S input size, g = S / patch, L = g², D embed dim.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): total training loss (docs/method.md §6), when
            `labels` and/or `masks` are given: Σ_layers (focal + 2 dice) + image cross-entropy.
        pixel_loss (`torch.FloatTensor` of shape `()`, *optional*): the pixel part of `loss` (needs `masks`).
        image_loss (`torch.FloatTensor` of shape `()`, *optional*): the image part of `loss` (needs `labels`).
        anomaly_score (`torch.FloatTensor` of shape `(B,)`): image anomaly score in [0, 1]. Zero-shot: the
            abnormal softmax entry of `image_logits`. With a `reference_bank` (few-shot, WinCLIP+'s fusion,
            docs/few_shot.md): ½·(zero-shot score + `few_shot_score`).
        anomaly_map (`torch.FloatTensor` of shape `(B, S, S)`): pixel anomaly map in [0, 1]. Zero-shot: the mean of
            the layer maps, Gaussian-blurred (σ = `config.blur_sigma`). With a `reference_bank`: ½·(zero-shot map +
            `few_shot_map`).
        layer_anomaly_maps (`torch.FloatTensor` of shape `(B, n, S, S)`): per-layer maps M_l before the blur.
        layer_probabilities (`torch.FloatTensor` of shape `(B, n, 2, S, S)`): per-layer upsampled state
            probabilities (normal, abnormal), what the pixel losses are computed on.
        image_logits (`torch.FloatTensor` of shape `(B, 2)`): mean top-k similarities over temperature, the
            logits behind `anomaly_score` and the image loss.
        image_embeds (`torch.FloatTensor` of shape `(B, D)`): L2-normalised global image feature v.
        text_embeds (`torch.FloatTensor` of shape `(B, 2, D)`): L2-normalised state embeddings T (normal, abnormal).
        layer_text_embeds (`torch.FloatTensor` of shape `(B, n, 2, D)`): FGP-refined state embeddings T'_l.
        few_shot_map (`torch.FloatTensor` of shape `(B, S, S)`, *optional*, only with a `reference_bank`): each
            patch's ½·(1 − max cos) to the bank's patches of the same layer, mean over the layers, upsampled
            (bilinear) and blurred as the zero-shot map; in [0, 1], 0 on a patch that is in the bank.
        few_shot_score (`torch.FloatTensor` of shape `(B,)`, *optional*): the maximum of `few_shot_map`.
        zero_shot_anomaly_map (`torch.FloatTensor` of shape `(B, S, S)`, *optional*): with a `reference_bank`,
            the zero-shot `anomaly_map` before the fusion.
        zero_shot_anomaly_score (`torch.FloatTensor` of shape `(B,)`, *optional*): likewise for the score.
    """

    loss: torch.FloatTensor | None = None
    pixel_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    anomaly_score: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    layer_anomaly_maps: torch.FloatTensor | None = None
    layer_probabilities: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    layer_text_embeds: torch.FloatTensor | None = None
    few_shot_map: torch.FloatTensor | None = None
    few_shot_score: torch.FloatTensor | None = None
    zero_shot_anomaly_map: torch.FloatTensor | None = None
    zero_shot_anomaly_score: torch.FloatTensor | None = None


def _plain_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' own `CLIPEncoderLayer` (no attention mask): the vision tower off the CPU fast path."""
    return layer(hidden_states, None)


def resize_position_embeddings(table: torch.Tensor, new_grid: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a ViT position table `(1 + g0², C)` to `(1 + new_grid², C)`, keeping the CLS position
    (docs/method.md §2).

    The reference resizes bilinearly (align_corners=False, no antialias) once; transformers'
    `interpolate_pos_encoding` uses bicubic (docs/method.md §8 quirk 3).
    """
    old_grid = math.isqrt(table.shape[0] - 1)
    if old_grid**2 != table.shape[0] - 1:
        raise ValueError(f"Position table of {table.shape[0]} rows is not 1 + a square number of patches.")
    if old_grid == new_grid:
        return table.clone()
    channels = table.shape[1]
    grid_table = table[1:].float().reshape(1, old_grid, old_grid, channels).permute(0, 3, 1, 2)  # (1, C, g0, g0)
    grid_table = F.interpolate(grid_table, size=(new_grid, new_grid), mode=mode, align_corners=False)
    grid_table = grid_table.reshape(channels, new_grid * new_grid).transpose(0, 1)  # (g², C)
    return torch.cat([table[:1].float(), grid_table], dim=0).to(table.dtype)


class ViP2CLIPAdapterMLP(nn.Module):
    """f_j: D → hidden → Dt (Linear, ReLU, Linear), one per class token (docs/method.md §3)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(hidden_states)))


class ViP2CLIPImageConditionedAdapter(nn.Module):
    """ICA (docs/method.md §3): normal/abnormal prompt token sequences conditioned on the global image feature.

    Sequence per state, cut right after EOS (causal attention makes the tail irrelevant, docs/method.md §3):
    `[SOS] C_1..C_n_ctx e(w) z_1(v)..z_n_cls(v) [EOS]` with z_j(v) = Z_j + f_j(v + b).
    """

    def __init__(self, config: ViP2CLIPConfig):
        super().__init__()
        text_dim, embed_dim = config.text_hidden_size, config.projection_dim
        self.normal_context = nn.Parameter(torch.empty(config.n_ctx, text_dim))  # C⁺
        self.abnormal_context = nn.Parameter(torch.empty(config.n_ctx, text_dim))  # C⁻
        self.class_context = nn.Parameter(torch.empty(config.n_cls, text_dim))  # Z
        self.image_bias = nn.Parameter(torch.empty(1, embed_dim))  # b
        self.class_token_mlps = nn.ModuleList(
            [ViP2CLIPAdapterMLP(embed_dim, config.adapter_hidden_size, text_dim) for _ in range(config.n_cls)]
        )

    def class_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """z_j(v) = Z_j + f_j(v + b): `(B, D)` → `(B, n_cls, Dt)`."""
        conditioned = image_embeds.to(self.image_bias.dtype) + self.image_bias  # (B, D)
        offsets = torch.stack([mlp(conditioned) for mlp in self.class_token_mlps], dim=1)  # (B, n_cls, Dt)
        return self.class_context.unsqueeze(0) + offsets

    def forward(self, image_embeds: torch.Tensor, fixed_embeds: torch.Tensor) -> torch.Tensor:
        """Assemble the prompt embeddings.

        Args:
            image_embeds: `(B, D)` normalised global image feature v.
            fixed_embeds: `(4, Dt)` frozen token embeddings of [SOS], w⁺, w⁻, [EOS].
        Returns:
            `(B, 2, P, Dt)` prompt embeddings, state 0 normal and 1 abnormal, P = n_ctx + n_cls + 3.
        """
        batch = image_embeds.shape[0]
        class_tokens = self.class_tokens(image_embeds)  # (B, n_cls, Dt)
        fixed_embeds = fixed_embeds.to(class_tokens.dtype)
        sos, normal_word, abnormal_word, eos = fixed_embeds[:, None].unbind(0)  # each (1, Dt)
        contexts = torch.stack([self.normal_context, self.abnormal_context], dim=0)  # (2, n_ctx, Dt)
        words = torch.stack([normal_word, abnormal_word], dim=0)  # (2, 1, Dt)
        head = torch.cat([sos.expand(2, 1, -1), contexts, words], dim=1)  # (2, 1 + n_ctx + 1, Dt)
        head = head.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, 2, 1 + n_ctx + 1, Dt)
        tail = class_tokens.unsqueeze(1).expand(-1, 2, -1, -1)  # (B, 2, n_cls, Dt): shared by both states
        end = eos.expand(batch, 2, 1, -1)  # (B, 2, 1, Dt)
        return torch.cat([head, tail, end], dim=2)  # (B, 2, P, Dt)


class ViP2CLIPFineGrainedPerception(nn.Module):
    """FGP (docs/method.md §4): the state embeddings attend to a layer's patches; the output replaces T for that layer.

    Logits are q·k with **no** 1/√d scaling (reference behaviour); the output is L2-normalised.
    """

    def __init__(self, config: ViP2CLIPConfig):
        super().__init__()
        dim = config.projection_dim
        self.num_heads = config.fgp_num_heads
        self.head_dim = dim // self.num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # The reference module owns a temperature it never uses (docs/method.md §4); kept so checkpoints convert 1:1.
        self.unused_temperature = nn.Parameter(torch.empty(()))

    def forward(self, text_embeds: torch.Tensor, patch_embeds: torch.Tensor) -> torch.Tensor:
        """`text_embeds` (N, 2, D), `patch_embeds` (N, L, D) normalised, N = B × layers → `(N, 2, D)`.

        The key and value projections are folded into the two queries instead of being applied to all L
        patches (same result up to rounding; 4·L·D² → 8·H·L·D FLOPs, D / 2H = 48× fewer at D = 768, H = 8; no
        (N, L, D) k / v tensors):
        q_h·k_h(p) = (W_k,hᵀ q_h)·p + q_h·b_k,h and Σ_p a_p v_h(p) = W_v,h (Σ_p a_p p) + b_v,h, since each
        attention row sums to 1.
        """
        dtype = self.q_proj.weight.dtype
        text_embeds, patch_embeds = text_embeds.to(dtype), patch_embeds.to(dtype)
        batch, num_states, dim = text_embeds.shape
        heads, head_dim = self.num_heads, self.head_dim
        queries = self.q_proj(text_embeds).view(batch, num_states, heads, head_dim)  # (N, 2, H, d)
        key_weight = self.k_proj.weight.view(heads, head_dim, dim)  # (H, d, D)
        folded = torch.einsum("nshc,hcd->nhsd", queries, key_weight).reshape(batch, heads * num_states, dim)
        key_bias = torch.einsum("nshc,hc->nhs", queries, self.k_proj.bias.view(heads, head_dim))  # (N, H, 2)
        # (N, H·2, L): unscaled logits, softmax over the patches, in fp32 for stability under bf16. The key-bias
        # term is kept (it only shifts each row) so that training sees the same parameters as the plain form.
        logits = torch.baddbmm(key_bias.reshape(batch, heads * num_states, 1), folded, patch_embeds.transpose(1, 2))
        attention = logits.float().softmax(dim=-1).to(dtype)
        pooled = torch.bmm(attention, patch_embeds).view(batch, heads, num_states, dim)  # (N, H, 2, D)
        value_weight = self.v_proj.weight.view(heads, head_dim, dim)  # (H, d, D)
        attended = torch.einsum("nhsd,hcd->nshc", pooled, value_weight) + self.v_proj.bias.view(heads, head_dim)
        attended = self.out_proj(attended.reshape(batch, num_states, dim))  # (N, 2, D)
        return attended / attended.norm(dim=-1, keepdim=True)


class ViP2CLIPUnifiedAlignment(nn.Module):
    """UTPA (docs/method.md §5): per-layer pixel maps and the image score from patch-text cosine similarities."""

    def __init__(self, config: ViP2CLIPConfig):
        super().__init__()
        self.temperature = config.temperature
        self.top_k = config.top_k
        self.grid_size = config.grid_size
        self.image_size = config.image_size

    def forward(self, patch_embeds: torch.Tensor, layer_text_embeds: torch.Tensor):
        """Score one batch.

        Args:
            patch_embeds: `(B, n, L, D)` L2-normalised patch features P̂_l (no CLS).
            layer_text_embeds: `(B, n, 2, D)` FGP outputs T'_l.
        Returns:
            layer_probabilities `(B, n, 2, S, S)`, layer_anomaly_maps `(B, n, S, S)`, image_logits `(B, 2)`.
        """
        batch, num_layers = patch_embeds.shape[:2]
        # s_l in fp32: the softmax at temperature 0.07 amplifies rounding (docs/method.md §5).
        similarity = torch.matmul(patch_embeds.float(), layer_text_embeds.float().transpose(-1, -2))  # (B, n, L, 2)
        probabilities = (similarity / self.temperature).softmax(dim=-1)  # (B, n, L, 2)

        grid = probabilities.reshape(batch * num_layers, self.grid_size, self.grid_size, 2).permute(0, 3, 1, 2)
        upsampled = F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        upsampled = upsampled.reshape(batch, num_layers, 2, self.image_size, self.image_size)  # (B, n, 2, S, S)
        # M_l = (p_abn + 1 - p_norm) / 2
        layer_maps = (upsampled[:, :, 1] + 1 - upsampled[:, :, 0]) / 2  # (B, n, S, S)

        # Image evidence: the top-k patches of each layer by p_abn, their similarity rows pooled over layers.
        top_indices = probabilities[..., 1].topk(self.top_k, dim=-1, sorted=False).indices  # (B, n, k)
        top_similarity = similarity.gather(2, top_indices.unsqueeze(-1).expand(-1, -1, -1, 2))  # (B, n, k, 2)
        image_logits = top_similarity.mean(dim=(1, 2)) / self.temperature  # (B, 2)
        return upsampled, layer_maps, image_logits


class ViP2CLIPGaussianBlur(nn.Module):
    """scipy.ndimage.gaussian_filter(map, sigma, truncate) on a batch of maps, as two 1-D convolutions.

    Same kernel (radius int(truncate·σ + 0.5), normalised) and the same 'reflect' boundary (d c b a | a b c d);
    exact for any map size, including maps smaller than the radius, where the reflection repeats.
    """

    def __init__(self, sigma: float, truncate: float = 4.0):
        super().__init__()
        self.sigma = float(sigma)
        self.truncate = float(truncate)

    def kernel(self, device: torch.device) -> torch.Tensor:
        radius = int(self.truncate * self.sigma + 0.5)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        weights = torch.exp(-0.5 * (offsets / self.sigma) ** 2)
        return (weights / weights.sum()).to(device=device, dtype=torch.float32)

    @staticmethod
    def _reflect_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
        # scipy 'reflect' = half-sample symmetric: period 2·size, mirrored in the second half.
        positions = torch.arange(-radius, size + radius, device=device) % (2 * size)
        return torch.where(positions >= size, 2 * size - 1 - positions, positions)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """`(B, H, W)` → `(B, H, W)` float32."""
        if self.sigma <= 0:
            return maps.float()
        maps = maps.float()
        kernel = self.kernel(maps.device)
        radius = (kernel.numel() - 1) // 2
        height, width = maps.shape[-2:]
        padded = maps.index_select(1, self._reflect_indices(height, radius, maps.device))  # (B, H + 2r, W)
        blurred = F.conv2d(padded.unsqueeze(1), kernel.view(1, 1, -1, 1))  # (B, 1, H, W): along axis 0 first
        padded = blurred.index_select(3, self._reflect_indices(width, radius, maps.device))  # (B, 1, H, W + 2r)
        return F.conv2d(padded, kernel.view(1, 1, 1, -1)).squeeze(1)  # (B, H, W)


class ViP2CLIPFocalLoss(nn.Module):
    """Focal loss in the reference's form (docs/method.md §6): γ, α = 1, one-hot smoothed/clamped to [ε, 1 − ε],
    pt = Σ onehot · p + ε, loss = −(1 − pt)^γ log pt averaged over all pixels."""

    def __init__(self, gamma: float = 2.0, smooth: float = 1e-5):
        super().__init__()
        self.gamma = gamma
        self.smooth = smooth

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`probabilities` (B, 2, H, W) over (normal, abnormal); `target` (B, H, W) in {0, 1}."""
        one_hot = torch.stack([1 - target, target], dim=1).clamp(self.smooth, 1.0 - self.smooth)  # (B, 2, H, W)
        pt = (one_hot * probabilities).sum(dim=1) + self.smooth  # (B, H, W)
        return (-torch.pow(1 - pt, self.gamma) * pt.log()).mean()


class ViP2CLIPDiceLoss(nn.Module):
    """Binary Dice loss (docs/method.md §6): 1 − mean_b (2 Σ x·y + s) / (Σ x + Σ y + s)."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`prediction`, `target`: (B, H, W)."""
        prediction, target = prediction.flatten(1), target.flatten(1)  # (B, H·W)
        dice = (2 * (prediction * target).sum(1) + self.smooth) / (prediction.sum(1) + target.sum(1) + self.smooth)
        return 1 - dice.mean()


class ViP2CLIPPreTrainedModel(PreTrainedModel):
    config: ViP2CLIPConfig
    config_class = ViP2CLIPConfig
    base_model_prefix = "vip2clip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = ["CLIPEncoderLayer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings"]
    # The heads are tiny: keep them fp32 under a half-precision load so the unscaled FGP logits stay accurate.
    _keep_in_fp32_modules_strict = ["ica", "fgp"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but strict, and with the fp32-kept heads in their own memory.

        Strict: a weights file that lacks a weight or holds one of the wrong shape is refused with the weights
        named (transformers alone would re-initialise them at random and only log it, giving a model that silently
        scores nonsense). Memory: see `_own_fp32_head_storage`.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.get("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True  # collect the mismatches, then decide below
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        problems = []
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            problems.append(f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        mismatched = sorted(str(item[0] if isinstance(item, (tuple, list)) else item) for item in info.get("mismatched_keys") or [])
        if mismatched and not allow_mismatch:
            problems.append(f"weights of the wrong shape {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}")
        if problems:
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} (model.safetensors) do not fit its config.json: "
                + "; ".join(problems)
                + ". The folder is incomplete or mixes two models: re-save or re-convert it."
            )
        model._own_fp32_head_storage()
        return (model, info) if output_loading_info else model

    def _own_fp32_head_storage(self) -> None:
        """Give the fp32-kept heads (`_keep_in_fp32_modules_strict`) their own memory under a half-precision load.

        `from_pretrained(..., dtype=torch.bfloat16)` converts CLIP but keeps the heads in fp32; those kept tensors
        are zero-copy views of the memory-mapped checkpoint, so a few MB of heads would pin the whole fp32 file
        (all of it resident after the conversion read it). Copying them lets the mapping go. Nothing to do for an
        all-fp32 load (the mapping *is* the weights). The heads are a few MB, so the copy costs nothing.
        """
        if all(parameter.dtype == torch.float32 for parameter in self.parameters()):
            return
        with torch.no_grad():
            for name in self._keep_in_fp32_modules_strict:
                for parameter in getattr(self, name).parameters():
                    if parameter.device.type == "cpu":
                        parameter.data = parameter.data.clone()

    def _init_weights(self, module):
        # CLIP's own modules are dispatched to CLIPModel._init_weights by transformers (composite models).
        if isinstance(module, nn.Linear):
            # torch's default Linear init, as the reference's heads (nn.Linear / kernel-1 Conv1d) get.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, ViP2CLIPImageConditionedAdapter):
            std = self.config.init_std
            for parameter in (module.normal_context, module.abnormal_context, module.class_context, module.image_bias):
                init.normal_(parameter, mean=0.0, std=std)
        elif isinstance(module, ViP2CLIPFineGrainedPerception):
            init.constant_(module.unused_temperature, math.log(1 / self.config.temperature))


class ViP2CLIPModel(ViP2CLIPPreTrainedModel):
    """ViP²-CLIP: `model(pixel_values)` → anomaly score `(B,)` and anomaly map `(B, S, S)`
    (docs/method.md §2–§6).

    The CLIP backbone is frozen (eval mode, no gradients); only `ica` and `fgp` are trainable.

    Attributes (runtime switches, not saved with the model):
        cpu_onednn_vision (`bool` or `None`, defaults to `None`): run the frozen vision tower on the CPU fast path
            of cpu_fast_path_vip2clip.py where it applies (CPU, fp32 or natively supported bf16, `sdpa`
            attention). `None` = where it is the faster on this CPU (`fp32_fast_path_wins` for fp32), `True` =
            wherever it applies, `False` keeps transformers' layers. Scores agree to fp32 rounding
            (tests/test_fast_path.py).
        cpu_prepacked_weights (`bool` or `None`, defaults to `None`): on that fast path, reorder the tower's
            linear weights once into oneDNN's blocked layout (bit-identical results, a second copy of those
            weights in memory). `None` = on for a bf16 tower, off for fp32; `True` / `False` force it.
    """

    def __init__(self, config: ViP2CLIPConfig):
        super().__init__(config)
        self.clip = CLIPModel._from_config(config.clip_config)
        self.ica = ViP2CLIPImageConditionedAdapter(config)
        self.fgp = ViP2CLIPFineGrainedPerception(config)
        self.utpa = ViP2CLIPUnifiedAlignment(config)
        self.blur = ViP2CLIPGaussianBlur(config.blur_sigma, config.blur_truncate)
        self.focal_loss = ViP2CLIPFocalLoss(config.focal_gamma, config.loss_smooth)
        self.dice_loss = ViP2CLIPDiceLoss(config.dice_smooth)
        self.clip.requires_grad_(False)
        self.cpu_onednn_vision: bool | None = None
        self.cpu_prepacked_weights: bool | None = None
        self.post_init()

    # ------------------------------------------------------------------ freezing
    def train(self, mode: bool = True):
        """Only the heads ever train: the frozen CLIP stays in eval mode (docs/method.md §6)."""
        super().train(mode)
        self.clip.eval()
        return self

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimiser groups of docs/method.md §6: `{"ica": [...], "fgp": [...]}` (CLIP excluded)."""
        return {"ica": list(self.ica.parameters()), "fgp": list(self.fgp.parameters())}

    # ------------------------------------------------------------------ encoders
    def _state_token_ids(self) -> tuple[int, int]:
        config = self.config
        if config.normal_state_token_id is None or config.abnormal_state_token_id is None:
            raise ValueError(
                "The config has no state-word token ids. Build the model with ViP2CLIPModel.from_clip(...), which "
                "reads them from the CLIP tokenizer, or set normal_state_token_id / abnormal_state_token_id."
            )
        normal_id, abnormal_id = config.normal_state_token_id, config.abnormal_state_token_id
        if config.official_compat:
            # Reference quirk (docs/method.md §8.2): the normal prompt is embedded from the abnormal token ids.
            normal_id = abnormal_id
        return normal_id, abnormal_id

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen vision tower (docs/method.md §2), on the CPU fast path (cpu_fast_path_vip2clip.py) where it
        applies and `cpu_onednn_vision` is on, else transformers' layers.

        Returns:
            image_embeds `(B, D)` L2-normalised global feature, patch_embeds `(B, n, L, D)` L2-normalised patch
            features of the feature layers (CLS removed).
        """
        vision = self.clip.vision_model
        feature_layers = set(self.config.feature_layers)
        fast = self.uses_cpu_fast_path(pixel_values.device)
        if fast and pixel_values.shape[0] > 1:
            # On the fast path one image at a time keeps each layer's activations in cache: the same numbers (bit
            # for bit), faster and with less activation memory (benchmarks/README.md).
            image_embeds, patch_embeds = zip(*(self.encode_image(image[None]) for image in pixel_values))
            return torch.cat(image_embeds), torch.cat(patch_embeds)
        if fast:  # the projection on oneDNN too: MKL's M = 1 gemv rounds differently with the weight's alignment
            packed = prepacked_weights_wanted(vision, self.cpu_prepacked_weights)
            layer_forward = partial(clip_layer_onednn, packed=packed)
            project = partial(onednn_linear, linear=self.clip.visual_projection)
        else:
            layer_forward, project = _plain_layer, self.clip.visual_projection
        with torch.no_grad():
            hidden_states = vision.pre_layrnorm(vision.embeddings(pixel_values))  # (B, 1 + L, Dv)
            taps = []
            for depth, layer in enumerate(vision.encoder.layers, start=1):
                hidden_states = layer_forward(layer, hidden_states)
                if depth in feature_layers:
                    taps.append(hidden_states)
            # Residual streams after the chosen blocks → post-LN → projection, patches only.
            layer_tokens = torch.stack([taps[i] for i in self._tap_order()], dim=1)[:, :, 1:]  # (B, n, L, Dv)
            patch_embeds = project(vision.post_layernorm(layer_tokens))  # (B, n, L, D)
            cls_token = hidden_states[:, 0]  # (B, Dv), after the last block
            if not self.config.official_compat:
                cls_token = vision.post_layernorm(cls_token)
            # Reference quirk (docs/method.md §8.1): in compat mode the global feature skips the post-LayerNorm.
            image_embeds = project(cls_token)  # (B, D)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        patch_embeds = patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)
        return image_embeds, patch_embeds

    def uses_cpu_fast_path(self, device: torch.device | str) -> bool:
        """Whether `encode_image` runs the vision tower on the CPU fast path for inputs on `device` (the
        `cpu_onednn_vision` switch, the tower's dtype and this CPU)."""
        vision = self.clip.vision_model
        if self.cpu_onednn_vision is False or not cpu_fast_path_available(vision, device):
            return False
        fp32 = vision.embeddings.patch_embedding.weight.dtype == torch.float32
        return bool(self.cpu_onednn_vision) or not fp32 or fp32_fast_path_wins()

    def _tap_order(self) -> list[int]:
        # `taps` is in depth order; return positions in config.feature_layers order.
        ordered = sorted(self.config.feature_layers)
        return [ordered.index(layer) for layer in self.config.feature_layers]

    def fixed_prompt_embeds(self) -> torch.Tensor:
        """Frozen token embeddings of [SOS], w⁺, w⁻, [EOS] from the CLIP vocabulary: `(4, Dt)`."""
        normal_id, abnormal_id = self._state_token_ids()
        token_ids = torch.tensor(
            [self.config.prompt_start_token_id, normal_id, abnormal_id, self.config.prompt_end_token_id],
            device=self.clip.text_model.embeddings.token_embedding.weight.device,
        )
        return self.clip.text_model.embeddings.token_embedding(token_ids)

    def encode_text(self, image_embeds: torch.Tensor, pad_to_length: int | None = None) -> torch.Tensor:
        """ICA prompts through the frozen text encoder (docs/method.md §3): `(B, D)` → T `(B, 2, D)` L2-normalised.

        `pad_to_length` appends the reference's padding tokens (id 0) up to that length; causal attention makes
        the EOS output identical, so it is only there to prove that cutting after EOS is exact.
        """
        text_model = self.clip.text_model
        prompt_embeds = self.ica(image_embeds, self.fixed_prompt_embeds())  # (B, 2, P, Dt)
        batch, num_states, prompt_length, width = prompt_embeds.shape
        prompt_embeds = prompt_embeds.reshape(batch * num_states, prompt_length, width)  # (2B, P, Dt)
        eos_position = prompt_length - 1
        if pad_to_length is not None and pad_to_length > prompt_length:
            pad_ids = torch.zeros(pad_to_length - prompt_length, dtype=torch.long, device=prompt_embeds.device)
            pad_embeds = text_model.embeddings.token_embedding(pad_ids).to(prompt_embeds.dtype)
            prompt_embeds = torch.cat([prompt_embeds, pad_embeds.expand(batch * num_states, -1, -1)], dim=1)
        prompt_embeds = prompt_embeds.to(text_model.embeddings.token_embedding.weight.dtype)
        hidden_states = text_model.embeddings(inputs_embeds=prompt_embeds)  # + absolute positions
        causal_mask = create_causal_mask(
            config=text_model.config, inputs_embeds=hidden_states, attention_mask=None, cache=None
        )
        hidden_states = text_model.encoder(
            inputs_embeds=hidden_states, attention_mask=causal_mask, is_causal=True
        ).last_hidden_state
        eos_states = text_model.final_layer_norm(hidden_states[:, eos_position])  # (2B, Dt)
        text_embeds = self.clip.text_projection(eos_states).reshape(batch, num_states, -1)  # (B, 2, D)
        return text_embeds / text_embeds.norm(dim=-1, keepdim=True)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool | None = None,
        reference_bank: ViP2CLIPReferenceBank | None = None,
        **kwargs,
    ) -> ViP2CLIPOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): images preprocessed by
                [`ViP2CLIPProcessor`] (docs/method.md §7).
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): 0 normal, 1 anomalous → image loss.
            masks (`torch.FloatTensor` of shape `(B, S, S)` or `(B, 1, S, S)`, *optional*): ground-truth defect masks
                (binarised at `config.mask_threshold`) → pixel losses.
            reference_bank ([`ViP2CLIPReferenceBank`], *optional*): normal reference patches from
                [`build_reference_bank`] → few-shot mode: `few_shot_map` and the fused `anomaly_map` /
                `anomaly_score` (docs/few_shot.md). Without it every output is the zero-shot one.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)
        image_embeds, patch_embeds = self.encode_image(pixel_values)  # (B, D), (B, n, L, D)
        output = self.score_features(
            image_embeds, patch_embeds, labels=labels, masks=masks, reference_bank=reference_bank
        )
        return output if return_dict else output.to_tuple()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be (B, 3, S, S), got {tuple(pixel_values.shape)}; use ViP2CLIPProcessor."
            )
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} but this model takes {size}x{size}; "
                f"preprocess with ViP2CLIPProcessor(image_size={size})."
            )

    def score_features(
        self,
        image_embeds: torch.Tensor,
        patch_embeds: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        reference_bank: ViP2CLIPReferenceBank | None = None,
    ) -> ViP2CLIPOutput:
        """Everything after the frozen vision tower: ICA → text encoder → FGP → UTPA → blur (→ losses), and with a
        `reference_bank` the few-shot map and the fusion (docs/few_shot.md).

        Takes the outputs of [`encode_image`] (`image_embeds` (B, D) and `patch_embeds` (B, n, L, D), both
        L2-normalised), so a training run can cache the backbone's features and skip it (same numbers).
        """
        text_embeds = self.encode_text(image_embeds)  # (B, 2, D)

        batch, num_layers, num_patches, dim = patch_embeds.shape
        # One FGP call for all layers: T is shared, each (image, layer) pair attends to its own patches.
        layer_text_embeds = self.fgp(
            text_embeds.unsqueeze(1).expand(-1, num_layers, -1, -1).reshape(batch * num_layers, 2, dim),
            patch_embeds.reshape(batch * num_layers, num_patches, dim),
        ).reshape(batch, num_layers, 2, dim)  # (B, n, 2, D)

        layer_probabilities, layer_maps, image_logits = self.utpa(patch_embeds, layer_text_embeds)
        anomaly_score = image_logits.softmax(dim=-1)[:, 1]  # (B,)
        anomaly_map = self.blur(layer_maps.mean(dim=1))  # (B, S, S)

        pixel_loss = image_loss = loss = None
        if masks is not None:
            pixel_loss = self.pixel_loss(layer_probabilities, masks)
        if labels is not None:
            image_loss = F.cross_entropy(image_logits, labels.to(image_logits.device).long())
        if pixel_loss is not None or image_loss is not None:
            loss = sum(part for part in (pixel_loss, image_loss) if part is not None)

        few_shot = {}
        if reference_bank is not None:
            few_shot_map = self.few_shot_map(patch_embeds, reference_bank)  # (B, S, S)
            few_shot_score = few_shot_map.flatten(1).amax(dim=1)  # (B,)
            few_shot = dict(
                few_shot_map=few_shot_map,
                few_shot_score=few_shot_score,
                zero_shot_anomaly_map=anomaly_map,
                zero_shot_anomaly_score=anomaly_score,
            )
            # WinCLIP+'s fusion of the language-guided and the reference-based predictions (docs/few_shot.md)
            anomaly_map = (anomaly_map + few_shot_map) / 2
            anomaly_score = (anomaly_score + few_shot_score) / 2

        return ViP2CLIPOutput(
            loss=loss,
            pixel_loss=pixel_loss,
            image_loss=image_loss,
            anomaly_score=anomaly_score,
            anomaly_map=anomaly_map,
            layer_anomaly_maps=layer_maps,
            layer_probabilities=layer_probabilities,
            image_logits=image_logits,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            layer_text_embeds=layer_text_embeds,
            **few_shot,
        )

    # ------------------------------------------------------------------ few-shot
    def build_reference_bank(self, pixel_values: torch.Tensor, batch_size: int = 8) -> ViP2CLIPReferenceBank:
        """The patch memory of k normal reference images (docs/few_shot.md): `(k, 3, S, S)` preprocessed as for
        `forward` → [`ViP2CLIPReferenceBank`], through the same frozen tower as `encode_image` (fast path and
        dtype included), `batch_size` images at a time."""
        self._check_pixel_values(pixel_values)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        starts = range(0, len(pixel_values), batch_size)
        patch_embeds = torch.cat([self.encode_image(pixel_values[i : i + batch_size])[1] for i in starts])  # (k, n, L, D)
        return ViP2CLIPReferenceBank.from_patch_embeds(patch_embeds, self)

    def few_shot_map(self, patch_embeds: torch.Tensor, reference_bank: ViP2CLIPReferenceBank) -> torch.Tensor:
        """`(B, n, L, D)` patch features → `(B, S, S)` few-shot map: the bank's patch scores on the g×g grid,
        upsampled (bilinear, align_corners=False) and blurred as the zero-shot map. Both steps average with
        non-negative weights summing to 1, so a map whose patches all score 0 stays 0."""
        reference_bank.check_compatible(self)
        grid, size = self.config.grid_size, self.config.image_size
        scores = reference_bank.patch_scores(patch_embeds)  # (B, L)
        scores = scores.view(-1, 1, grid, grid)
        upsampled = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)  # (B, 1, S, S)
        return self.blur(upsampled[:, 0])

    def pixel_loss(self, layer_probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Σ_layers Focal(p_l, mask) + Dice(p_l[abn], mask) + Dice(p_l[norm], 1 − mask) (docs/method.md §6)."""
        if masks.dim() == 4:
            masks = masks.squeeze(1)
        size = self.config.image_size
        if tuple(masks.shape[-2:]) != (size, size) or masks.shape[0] != layer_probabilities.shape[0]:
            raise ValueError(
                f"masks must be (B, {size}, {size}) matching pixel_values, got {tuple(masks.shape)}; "
                "preprocess them with the processor (processor(images=..., masks=...))."
            )
        target = (masks.to(layer_probabilities.device).float() > self.config.mask_threshold).float()  # (B, S, S)
        total = layer_probabilities.new_zeros(())
        for layer in range(layer_probabilities.shape[1]):
            probabilities = layer_probabilities[:, layer]  # (B, 2, S, S)
            total = total + self.focal_loss(probabilities, target)
            total = total + self.dice_loss(probabilities[:, 1], target)
            total = total + self.dice_loss(probabilities[:, 0], 1 - target)
        return total

    # ------------------------------------------------------------------ construction from CLIP
    @classmethod
    def from_clip(
        cls,
        clip_name_or_path: str | PathLike,
        image_size: int = 518,
        **config_kwargs,
    ) -> "ViP2CLIPModel":
        """Build an (untrained-head) ViP²-CLIP from any transformers CLIP checkpoint (Hub id or directory).

        The position table is resized once to `image_size` (bilinearly in `official_compat` mode, docs/method.md
        §2/§8) and the checkpoint's tokenizer fixes the prompt's special and state-word token ids, so no tokenizer
        is needed afterwards. Extra keyword arguments go to [`ViP2CLIPConfig`] (e.g. `feature_layers`, `n_ctx`,
        `top_k`).
        """
        from transformers import AutoTokenizer

        clip = CLIPModel.from_pretrained(clip_name_or_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(clip_name_or_path)
        token_ids = {
            "prompt_start_token_id": tokenizer.bos_token_id,
            "prompt_end_token_id": tokenizer.eos_token_id,
        }
        for role in ("normal", "abnormal"):
            word = config_kwargs.get(f"{role}_state_word", ViP2CLIPConfig.__dataclass_fields__[f"{role}_state_word"].default)
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f"The {role} state word {word!r} is {len(ids)} tokens ({ids}) for this tokenizer; the prompt "
                    "template needs a single BPE token. Pick another word (e.g. 'damaged', 'good', 'flawless')."
                )
            token_ids[f"{role}_state_token_id"] = ids[0]
        for key in ("prompt_start_token_id", "prompt_end_token_id"):
            if token_ids[key] is None:
                raise ValueError(f"The tokenizer of {clip_name_or_path} has no {key.split('_')[1]} token.")

        clip_config = clip.config.to_dict()
        patch = clip.config.vision_config.patch_size
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}.")
        clip_config["vision_config"]["image_size"] = image_size
        config = ViP2CLIPConfig(clip_config=clip_config, **token_ids, **config_kwargs)
        model = cls(config)

        state = clip.state_dict()
        key = "vision_model.embeddings.position_embedding.weight"
        mode = "bilinear" if config.official_compat else "bicubic"
        state[key] = resize_position_embeddings(state[key], image_size // patch, mode=mode)
        state.pop("vision_model.embeddings.position_ids", None)
        state.pop("text_model.embeddings.position_ids", None)
        model.clip.load_state_dict(state, strict=False)
        missing = {k for k, _ in model.clip.named_parameters()} - set(state)
        if missing:
            raise ValueError(f"The CLIP checkpoint lacks weights: {sorted(missing)[:5]}")
        return model


ViP2CLIPModel.register_for_auto_class("AutoModel")
