"""An independent, straightforward re-implementation of the authors' ViP²-CLIP inference and loss, for the tests.

Written from the method (docs/method.md) and the structure of the authors' code (OpenAI-CLIP blocks with `nn.MultiheadAttention`, the
position table resized inside the forward, prompts tokenised to the full context length and pooled at the
argmax token, FGP as kernel-1 `Conv1d`s with `einsum`, a Python loop over layers, scipy's `gaussian_filter`
per image, the reference focal / dice losses). It shares no code with the package: the package must agree with
it to 1e-5 when fed the same weights. Parameter names of `RefICA` / `RefFGP` are the authors', so their
state dicts are checkpoints in the authors' layout.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

__all__ = ["RefCLIP", "RefICA", "RefFGP", "reference_forward", "reference_loss"]


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def load_hf(self, layer):
        attn = layer.self_attn
        hidden = attn.q_proj.weight.shape[0]
        inner = layer.mlp.fc1.weight.shape[0]
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(hidden, inner)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(inner, hidden))]))
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            self.attn.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            self.attn.out_proj.weight.copy_(attn.out_proj.weight)
            self.attn.out_proj.bias.copy_(attn.out_proj.bias)
            for ours, theirs in ((self.ln_1, layer.layer_norm1), (self.ln_2, layer.layer_norm2)):
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
            self.mlp.c_fc.weight.copy_(layer.mlp.fc1.weight)
            self.mlp.c_fc.bias.copy_(layer.mlp.fc1.bias)
            self.mlp.c_proj.weight.copy_(layer.mlp.fc2.weight)
            self.mlp.c_proj.bias.copy_(layer.mlp.fc2.bias)

    def forward(self, x):  # (L, N, D)
        mask = self.attn_mask.to(x.dtype) if self.attn_mask is not None else None
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefCLIP(nn.Module):
    """OpenAI-CLIP layout, loaded from a *native-resolution* HF `CLIPModel`."""

    def __init__(self, hf_clip):
        super().__init__()
        vision, text = hf_clip.vision_model, hf_clip.text_model
        vcfg, tcfg = hf_clip.config.vision_config, hf_clip.config.text_config
        self.conv1 = vision.embeddings.patch_embedding
        self.class_embedding = nn.Parameter(vision.embeddings.class_embedding.detach().clone())
        self.visual_positional_embedding = nn.Parameter(vision.embeddings.position_embedding.weight.detach().clone())
        self.ln_pre, self.ln_post = vision.pre_layrnorm, vision.post_layernorm
        self.visual_blocks = nn.ModuleList()
        for layer in vision.encoder.layers:
            block = RefBlock(vcfg.hidden_size, vcfg.num_attention_heads)
            block.load_hf(layer)
            self.visual_blocks.append(block)
        self.proj = hf_clip.visual_projection.weight.detach().t().clone()  # (Dv, D)
        self.context_length = tcfg.max_position_embeddings
        mask = torch.full((self.context_length, self.context_length), float("-inf")).triu_(1)
        self.text_blocks = nn.ModuleList()
        for layer in text.encoder.layers:
            block = RefBlock(tcfg.hidden_size, tcfg.num_attention_heads, attn_mask=mask)
            block.load_hf(layer)
            self.text_blocks.append(block)
        self.token_embedding = text.embeddings.token_embedding
        self.positional_embedding = text.embeddings.position_embedding.weight.detach().clone()
        self.ln_final = text.final_layer_norm
        self.text_projection = hf_clip.text_projection.weight.detach().t().clone()  # (Dt, D)

    @torch.no_grad()
    def encode_image(self, image, features_list):
        x = self.conv1(image)
        x = x.reshape(*x.shape[:2], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        side = int((self.visual_positional_embedding.shape[0] - 1) ** 0.5)
        new_side = int((x.shape[1] - 1) ** 0.5)
        if side != new_side:  # resized in the forward, bilinearly, as the authors do
            new_pos = self.visual_positional_embedding[1:].reshape(-1, side, side, x.shape[-1]).permute(0, 3, 1, 2)
            new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
            new_pos = new_pos.reshape(-1, x.shape[-1], new_side * new_side).transpose(1, 2)
            self.visual_positional_embedding.data = torch.cat([self.visual_positional_embedding[:1], new_pos[0]], 0)
        x = self.ln_pre(x + self.visual_positional_embedding)
        x = x.permute(1, 0, 2)
        tokens = []
        for index, block in enumerate(self.visual_blocks, start=1):
            x = block(x)
            if index in features_list:
                tokens.append(x)
        patch_tokens = [self.ln_post(t.permute(1, 0, 2)) @ self.proj for t in tokens]
        return x[0] @ self.proj, patch_tokens

    def encode_text_learn(self, prompts, tokenized_prompts):
        x = (prompts + self.positional_embedding).permute(1, 0, 2)
        for block in self.text_blocks:
            x = block(x)
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


def tokenize(tokenizer, text, context_length):
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    result = torch.zeros(1, context_length, dtype=torch.long)
    result[0, : len(ids)] = torch.tensor(ids)
    return result


class Linearlayer(nn.Module):
    def __init__(self, dim_in, dim_out, k, hidden_dim):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(1, dim_in).normal_(std=0.02))
        self.fc = nn.ModuleList([nn.Sequential(nn.Linear(dim_in, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim_out)) for _ in range(k)])

    def forward(self, tokens):
        tokens = tokens + self.bias
        return torch.cat([fc(tokens) for fc in self.fc], dim=1)


class RefICA(nn.Module):
    """Authors' ICA layout; `normal_word_quirk=True` embeds the normal prompt from the abnormal token ids."""

    def __init__(self, ref_clip, tokenizer, n_ctx, n_cls, embed_dim, hidden=16, normal_word_quirk=True):
        super().__init__()
        ctx_dim = ref_clip.ln_final.weight.shape[0]
        self.n_ctx, self.n_cls = n_ctx, n_cls
        self.cls_ctx = nn.Parameter(torch.empty(n_cls, ctx_dim).normal_(std=0.02))
        self.ctx_pos = nn.Parameter(torch.empty(n_ctx, ctx_dim).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(n_ctx, ctx_dim).normal_(std=0.02))
        self.cls_prompter = Linearlayer(embed_dim, ctx_dim, n_cls, hidden)
        ctx, cls = " ".join(["X"] * n_ctx), " ".join(["X"] * n_cls)
        pos_tokens = tokenize(tokenizer, f"{ctx} good {cls}", ref_clip.context_length)
        neg_tokens = tokenize(tokenizer, f"{ctx} damaged {cls}", ref_clip.context_length)
        with torch.no_grad():
            pos_emb = ref_clip.token_embedding(neg_tokens if normal_word_quirk else pos_tokens)
            neg_emb = ref_clip.token_embedding(neg_tokens)
        for name, emb in (("pos", pos_emb), ("neg", neg_emb)):
            self.register_buffer(f"token_prefix_{name}", emb[:, :1].clone())
            self.register_buffer(f"token_middle_{name}", emb[:, 1 + n_ctx : 2 + n_ctx].clone())
            self.register_buffer(f"token_suffix_{name}", emb[:, 2 + n_ctx + n_cls :].clone())
        self.register_buffer("tokenized_prompts_pos", pos_tokens)
        self.register_buffer("tokenized_prompts_neg", neg_tokens)

    def forward(self, img_features):
        n, d = img_features.shape
        ctx_cls = self.cls_ctx.unsqueeze(0) + self.cls_prompter(img_features.reshape(n, 1, d))
        parts = []
        for name, ctx in (("pos", self.ctx_pos), ("neg", self.ctx_neg)):
            parts.append(torch.cat([
                getattr(self, f"token_prefix_{name}").expand(n, -1, -1), ctx.unsqueeze(0).expand(n, -1, -1),
                getattr(self, f"token_middle_{name}").expand(n, -1, -1), ctx_cls,
                getattr(self, f"token_suffix_{name}").expand(n, -1, -1),
            ], dim=1))
        tokens = torch.cat([self.tokenized_prompts_pos.expand(n, -1), self.tokenized_prompts_neg.expand(n, -1)], 0)
        return torch.cat(parts, dim=0), tokens


class RefFGP(nn.Module):
    def __init__(self, dim, num_heads=8):
        super().__init__()
        self.num_heads, self.head_dim, self.dim_out = num_heads, dim // num_heads, dim
        self.q_proj_pre = nn.Conv1d(dim, dim, kernel_size=1)
        self.k_proj_pre_1 = nn.Conv1d(dim, dim, kernel_size=1)
        self.v_proj_pre_1 = nn.Conv1d(dim, dim, kernel_size=1)
        self.proj_post_t = nn.Conv1d(dim, dim, kernel_size=1)
        self.prompt_temp_l1 = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def forward(self, f_t, f_s):
        b, n1, _ = f_t.shape
        _, n2, _ = f_s.shape
        q = self.q_proj_pre(f_t.permute(0, 2, 1)).permute(0, 2, 1).reshape(b, n1, self.num_heads, self.head_dim)
        k = self.k_proj_pre_1(f_s.permute(0, 2, 1)).permute(0, 2, 1).reshape(b, n2, self.num_heads, self.head_dim)
        v = self.v_proj_pre_1(f_s.permute(0, 2, 1)).permute(0, 2, 1).reshape(b, n2, self.num_heads, self.head_dim)
        attn = torch.einsum("bnkc,bmkc->bknm", q, k).softmax(dim=-1)
        out = torch.einsum("bknm,bmkc->bnkc", attn, v).reshape(b, n1, self.dim_out)
        out = self.proj_post_t(out.permute(0, 2, 1)).permute(0, 2, 1)
        return out / out.norm(dim=-1, keepdim=True)


def reference_forward(ref_clip, ica, fgp, image, features_list, image_size, topk, sigma, global_post_ln=False):
    """The authors' test.py loop for one batch → (scores (B,), blurred maps (B,S,S) numpy, 2-ch maps per layer)."""
    image_features, patch_features = ref_clip.encode_image(image, features_list)
    if global_post_ln:
        raise NotImplementedError
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    prompts, tokenized = ica(image_features)
    text = ref_clip.encode_text_learn(prompts, tokenized).float()
    text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
    text = text / text.norm(dim=-1, keepdim=True)
    score_list, map_list, two_channel = [], [], []
    for patch in patch_features:
        patch = patch / patch.norm(dim=-1, keepdim=True)
        aux = fgp(text, patch[:, 1:, :])
        similarity = torch.matmul(patch[:, 1:, :], aux.transpose(1, 2))
        scores = similarity
        similarity = (similarity / 0.07).softmax(-1)
        side = int(similarity.shape[1] ** 0.5)
        sm = similarity.reshape(similarity.shape[0], side, side, -1).permute(0, 3, 1, 2)
        sm = F.interpolate(sm, image_size, mode="bilinear").permute(0, 2, 3, 1)
        two_channel.append(sm.permute(0, 3, 1, 2))
        map_list.append((sm[..., 1] + 1 - sm[..., 0]) / 2.0)
        idx = torch.topk(similarity[:, :, 1], k=topk, dim=-1, largest=True, sorted=False).indices
        rows = torch.arange(scores.size(0)).unsqueeze(1).expand(-1, topk)
        score_list.append(scores[rows, idx])
    mean_scores = torch.mean(torch.cat(score_list, dim=1), dim=1)
    logits = mean_scores / 0.07
    probs = logits.softmax(dim=-1)[:, 1]
    anomaly_map = torch.stack(map_list, 0).mean(0).detach()
    blurred = np.stack([gaussian_filter(m.numpy(), sigma=sigma, axes=(0, 1)) for m in anomaly_map])
    return probs, blurred, two_channel, logits


def reference_focal(logit, target, gamma=2, smooth=1e-5):
    num_class = logit.shape[1]
    logit = logit.reshape(logit.size(0), num_class, -1).permute(0, 2, 1).reshape(-1, num_class)
    target = target.reshape(-1, 1)
    one_hot = torch.zeros(target.size(0), num_class).scatter_(1, target.long(), 1)
    one_hot = torch.clamp(one_hot, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def reference_dice(prediction, target):
    n = target.size(0)
    p, t = prediction.reshape(n, -1), target.reshape(n, -1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return 1 - dice.sum() / n


def reference_loss(two_channel, logits, gt, labels):
    """The authors' train.py loss for a batch of B > 1 (gt (B,S,S) binary, labels (B,))."""
    loss = 0
    for sm in two_channel:
        loss = loss + reference_focal(sm, gt) + reference_dice(sm[:, 1], gt) + reference_dice(sm[:, 0], 1 - gt)
    return loss + F.cross_entropy(logits, labels.long())
