"""ViP2CLIPModel: shapes, each formula of docs/method.md against an independent computation, quirks, gradients, round trips."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from modeling_vip2clip import ViP2CLIPConfig, ViP2CLIPModel, ViP2CLIPProcessor
from modeling_vip2clip.modeling_vip2clip import ViP2CLIPDiceLoss, ViP2CLIPFocalLoss, ViP2CLIPGaussianBlur
from modeling_vip2clip.testing_utils import tiny_vip2clip_config

S = 32


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, S, S)


def _scaled_heads(model, scale=0.5, seed=3):
    """Random heads well away from init so every term of the formulas matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in list(model.ica.parameters()) + list(model.fgp.parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def test_output_shapes_and_ranges(tiny_model, images):
    with torch.no_grad():
        out = tiny_model(pixel_values=images)
    n, g, d = len(tiny_model.config.feature_layers), S // 8, tiny_model.config.projection_dim
    assert out.anomaly_score.shape == (3,)
    assert out.anomaly_map.shape == (3, S, S)
    assert out.layer_anomaly_maps.shape == (3, n, S, S)
    assert out.layer_probabilities.shape == (3, n, 2, S, S)
    assert out.image_logits.shape == (3, 2)
    assert out.image_embeds.shape == (3, d) and out.text_embeds.shape == (3, 2, d)
    assert out.layer_text_embeds.shape == (3, n, 2, d)
    assert out.loss is None
    assert ((out.anomaly_score >= 0) & (out.anomaly_score <= 1)).all()
    assert out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1
    torch.testing.assert_close(out.layer_probabilities.sum(dim=2), torch.ones(3, n, S, S))
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.layer_text_embeds.norm(dim=-1), torch.ones(3, n, 2))
    assert g * g >= tiny_model.config.top_k


def test_ica_prompt_assembly_matches_spec(tiny_model):
    model = _scaled_heads(tiny_model)
    config = model.config
    torch.manual_seed(2)
    v = F.normalize(torch.randn(2, config.projection_dim), dim=-1)
    prompts = model.ica(v, model.fixed_prompt_embeds())  # (B, 2, P, Dt)
    token = model.clip.text_model.embeddings.token_embedding.weight
    ica = model.ica
    assert prompts.shape == (2, 2, config.n_ctx + config.n_cls + 3, config.text_hidden_size)
    for b in range(2):
        z = [ica.class_context[j] + ica.class_token_mlps[j].fc2(torch.relu(ica.class_token_mlps[j].fc1(v[b] + ica.image_bias[0])))
             for j in range(config.n_cls)]
        for state, context in ((0, ica.normal_context), (1, ica.abnormal_context)):
            # official-compat: both states carry the abnormal word's embedding (docs/method.md §3, §8.2)
            expected = [token[config.prompt_start_token_id], *context, token[config.abnormal_state_token_id], *z, token[config.prompt_end_token_id]]
            torch.testing.assert_close(prompts[b, state], torch.stack(expected))


def test_fgp_is_unscaled_multihead_cross_attention(tiny_model):
    fgp = _scaled_heads(tiny_model).fgp
    torch.manual_seed(4)
    text = F.normalize(torch.randn(2, 2, 32), dim=-1)
    patches = F.normalize(torch.randn(2, 16, 32), dim=-1)
    out = fgp(text, patches)
    heads, hd = fgp.num_heads, 32 // fgp.num_heads
    for b in range(2):
        q, k, v = fgp.q_proj(text[b]), fgp.k_proj(patches[b]), fgp.v_proj(patches[b])
        per_head = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            weights = torch.softmax(q[:, sl] @ k[:, sl].T, dim=-1)  # no 1/sqrt(d) (docs/method.md §4)
            per_head.append(weights @ v[:, sl])
        o = fgp.out_proj(torch.cat(per_head, dim=-1))
        torch.testing.assert_close(out[b], o / o.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_utpa_maps_score_and_blur_match_independent_computation(tiny_model, images):
    model = _scaled_heads(tiny_model)
    config = model.config
    with torch.no_grad():
        out = model(pixel_values=images)
        v, patches = model.encode_image(images)
    g, T, k = config.grid_size, config.temperature, config.top_k
    for b in range(images.shape[0]):
        evidence, layer_maps = [], []
        for layer in range(len(config.feature_layers)):
            s = patches[b, layer] @ out.layer_text_embeds[b, layer].T  # (L, 2)
            p = torch.softmax(s / T, dim=-1)
            up = F.interpolate(p.T.reshape(1, 2, g, g), size=(S, S), mode="bilinear", align_corners=False)[0]
            layer_maps.append((up[1] + 1 - up[0]) / 2)
            order = torch.argsort(p[:, 1], descending=True)[:k]
            evidence.append(s[order])
        torch.testing.assert_close(out.layer_anomaly_maps[b], torch.stack(layer_maps), atol=1e-6, rtol=0)
        mean_row = torch.cat(evidence).mean(dim=0)
        torch.testing.assert_close(out.anomaly_score[b], torch.softmax(mean_row / T, dim=-1)[1], atol=1e-6, rtol=0)
        blurred = gaussian_filter(torch.stack(layer_maps).mean(0).numpy(), sigma=config.blur_sigma, axes=(0, 1))
        np.testing.assert_allclose(out.anomaly_map[b].numpy(), blurred, atol=1e-6)


@pytest.mark.parametrize("size,sigma", [(32, 2.0), (32, 8.0), (7, 3.0), (518, 8.0), (40, 0.7)])
def test_tensor_blur_equals_scipy(size, sigma):
    maps = torch.rand(2, size, size, generator=torch.Generator().manual_seed(size))
    ours = ViP2CLIPGaussianBlur(sigma)(maps)
    for i in range(2):
        np.testing.assert_allclose(ours[i].numpy(), gaussian_filter(maps[i].numpy(), sigma=sigma, axes=(0, 1)), atol=1e-6)


def test_focal_and_dice_match_straightforward_loops():
    generator = torch.Generator().manual_seed(5)
    p1 = torch.rand(2, 5, 6, generator=generator)
    probabilities = torch.stack([1 - p1, p1], dim=1)
    target = (torch.rand(2, 5, 6, generator=generator) > 0.6).float()
    total = 0.0
    for b, i, j in np.ndindex(2, 5, 6):
        t = int(target[b, i, j])
        onehot = [1e-5, 1 - 1e-5] if t == 1 else [1 - 1e-5, 1e-5]
        pt = onehot[0] * float(probabilities[b, 0, i, j]) + onehot[1] * float(probabilities[b, 1, i, j]) + 1e-5
        total += -((1 - pt) ** 2) * math.log(pt)
    assert ViP2CLIPFocalLoss()(probabilities, target).item() == pytest.approx(total / 60, rel=1e-5)
    dice = np.mean([(2 * float((p1[b] * target[b]).sum()) + 1) / (float(p1[b].sum()) + float(target[b].sum()) + 1) for b in range(2)])
    assert ViP2CLIPDiceLoss()(p1, target).item() == pytest.approx(1 - dice, rel=1e-6)


def test_loss_is_sum_of_layer_pixel_losses_and_image_ce(tiny_model, images):
    model = _scaled_heads(tiny_model)
    masks = torch.zeros(3, S, S)
    masks[1, 4:20, 8:30] = 1
    labels = torch.tensor([0, 1, 0])
    with torch.no_grad():
        out = model(pixel_values=images, labels=labels, masks=masks)
    expected_pixel = sum(
        ViP2CLIPFocalLoss()(out.layer_probabilities[:, l], masks)
        + ViP2CLIPDiceLoss()(out.layer_probabilities[:, l, 1], masks)
        + ViP2CLIPDiceLoss()(out.layer_probabilities[:, l, 0], 1 - masks)
        for l in range(2)
    )
    torch.testing.assert_close(out.pixel_loss, expected_pixel)
    torch.testing.assert_close(out.image_loss, F.cross_entropy(out.image_logits, labels))
    torch.testing.assert_close(out.loss, out.pixel_loss + out.image_loss)


def test_only_heads_get_gradients_and_a_step_lowers_the_loss(tiny_model, images):
    model = tiny_model.train()
    assert not model.clip.training and model.ica.training
    masks = torch.zeros(3, S, S)
    masks[0, 2:14, 2:14] = 1
    labels = torch.tensor([1, 0, 0])
    groups = model.trainable_parameter_groups()
    optimizer = torch.optim.Adam([{"params": groups["ica"], "lr": 1e-2}, {"params": groups["fgp"], "lr": 1e-3}])
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    loss0 = model(pixel_values=images, labels=labels, masks=masks).loss
    loss0.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(name.startswith(("ica.", "fgp.")) for name in with_grad)
    assert all(not p.requires_grad for p in model.clip.parameters())
    optimizer.step()
    optimizer.zero_grad()
    loss1 = model(pixel_values=images, labels=labels, masks=masks).loss
    assert loss1.item() < loss0.item()
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, clip_before[key]), key


def test_prompt_cut_after_eos_is_exact(tiny_model):
    model = _scaled_heads(tiny_model)
    v = F.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(6)), dim=-1)
    with torch.no_grad():
        cut = model.encode_text(v)
        padded = model.encode_text(v, pad_to_length=model.config.clip_config.text_config.max_position_embeddings)
    torch.testing.assert_close(cut, padded, atol=1e-5, rtol=0)


def test_batch_of_n_equals_n_batches_of_one(tiny_model, images):
    model = _scaled_heads(tiny_model)
    with torch.no_grad():
        batched = model(pixel_values=images)
        singles = [model(pixel_values=images[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(batched.anomaly_score, torch.cat([o.anomaly_score for o in singles]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.anomaly_map, torch.cat([o.anomaly_map for o in singles]), atol=1e-5, rtol=0)


def test_official_compat_quirks_on_and_off(images, tiny_clip_dir):
    torch.manual_seed(0)
    compat = _scaled_heads(ViP2CLIPModel(tiny_vip2clip_config()).eval())
    paper = ViP2CLIPModel(tiny_vip2clip_config(official_compat=False)).eval()
    paper.load_state_dict(compat.state_dict())
    with torch.no_grad():
        # 1. global feature: compat skips the vision post-LayerNorm, the paper's mode applies it
        cls = compat.clip.vision_model(pixel_values=images).last_hidden_state[:, 0]
        v_compat, _ = compat.encode_image(images)
        v_paper, _ = paper.encode_image(images)
        proj, post_ln = compat.clip.visual_projection, compat.clip.vision_model.post_layernorm
        torch.testing.assert_close(v_compat, F.normalize(proj(cls), dim=-1))
        torch.testing.assert_close(v_paper, F.normalize(proj(post_ln(cls)), dim=-1))
        assert (v_compat - v_paper).abs().max() > 1e-3
        # 2. the normal prompt's state word: e("damaged") in compat mode, e("good") otherwise
        position = 1 + compat.config.n_ctx
        token = compat.clip.text_model.embeddings.token_embedding.weight
        normal_compat = compat.ica(v_compat, compat.fixed_prompt_embeds())[:, 0, position]
        normal_paper = paper.ica(v_compat, paper.fixed_prompt_embeds())[:, 0, position]
        torch.testing.assert_close(normal_compat[0], token[compat.config.abnormal_state_token_id])
        torch.testing.assert_close(normal_paper[0], token[compat.config.normal_state_token_id])
        t_compat, t_paper = compat.encode_text(v_compat), paper.encode_text(v_compat)
        torch.testing.assert_close(t_compat[:, 1], t_paper[:, 1])  # abnormal prompt identical
        assert (t_compat[:, 0] - t_paper[:, 0]).abs().max() > 1e-4
    # 3. position table: bilinear (compat) vs bicubic (paper / transformers) when built from a CLIP
    kwargs = dict(image_size=32, feature_layers=[1, 2], n_ctx=3, n_cls=2, top_k=5, adapter_hidden_size=16)
    table_compat = ViP2CLIPModel.from_clip(tiny_clip_dir, **kwargs).clip.vision_model.embeddings.position_embedding.weight
    table_paper = ViP2CLIPModel.from_clip(tiny_clip_dir, official_compat=False, **kwargs).clip.vision_model.embeddings.position_embedding.weight
    from transformers import CLIPModel

    native = CLIPModel.from_pretrained(tiny_clip_dir).vision_model.embeddings.position_embedding.weight.detach()
    grid = native[1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    bicubic = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)[0]
    torch.testing.assert_close(table_paper[1:].detach(), bicubic)
    torch.testing.assert_close(table_paper[0].detach(), native[0])
    assert (table_compat - table_paper).abs().max() > 1e-3


def test_from_clip_reads_token_ids_from_the_tokenizer(tiny_clip_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    model = ViP2CLIPModel.from_clip(tiny_clip_dir, image_size=32, feature_layers=[1, 2], n_ctx=3, n_cls=2, top_k=5)
    assert model.config.abnormal_state_token_id == tokenizer.convert_tokens_to_ids("damaged</w>")
    assert model.config.normal_state_token_id == tokenizer.convert_tokens_to_ids("good</w>")
    assert model.config.prompt_start_token_id == tokenizer.bos_token_id
    assert model.config.prompt_end_token_id == tokenizer.eos_token_id
    flawless = ViP2CLIPModel.from_clip(tiny_clip_dir, image_size=32, feature_layers=[1, 2], n_ctx=3, n_cls=2, top_k=5,
                                       normal_state_word="flaw")
    assert flawless.config.normal_state_token_id == tokenizer.convert_tokens_to_ids("flaw</w>")


def test_clear_errors(tiny_clip_dir, tiny_model):
    with pytest.raises(Exception, match="exceed the backbone depth"):
        tiny_vip2clip_config(feature_layers=[1, 5])
    with pytest.raises(Exception, match="top_k"):
        tiny_vip2clip_config(top_k=17)
    with pytest.raises(ValueError, match="single BPE token"):
        ViP2CLIPModel.from_clip(tiny_clip_dir, image_size=32, feature_layers=[1, 2], n_ctx=3, n_cls=2, top_k=5,
                                abnormal_state_word="scratched")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ViP2CLIPModel.from_clip(tiny_clip_dir, image_size=30, feature_layers=[1, 2], top_k=5)
    with pytest.raises(ValueError, match="this model takes 32x32"):
        tiny_model(pixel_values=torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"masks must be \(B, 32, 32\)"):
        tiny_model(pixel_values=torch.randn(1, 3, 32, 32), masks=torch.zeros(1, 16, 16))
    no_ids = ViP2CLIPModel(tiny_vip2clip_config(normal_state_token_id=None))
    with pytest.raises(ValueError, match="from_clip"):
        no_ids(pixel_values=torch.randn(1, 3, 32, 32))


def test_default_config_is_the_paper_geometry():
    config = ViP2CLIPConfig()
    assert (config.image_size, config.patch_size, config.grid_size) == (518, 14, 37)
    assert config.feature_layers == [6, 12, 18, 24] and config.n_ctx == 7 and config.n_cls == 3
    assert config.projection_dim == 768 and config.text_hidden_size == 768 and config.top_k == 50
    assert config.temperature == 0.07 and config.blur_sigma == 8 and config.official_compat


def test_save_and_load_in_a_fresh_process(tiny_model, tmp_path, images):
    model = _scaled_heads(tiny_model)
    model.save_pretrained(tmp_path / "model")
    ViP2CLIPProcessor(image_size=S, min_image_size=8).save_pretrained(tmp_path / "model")
    saved = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_vip2clip.py",
            "configuration_vip2clip.py", "processing_vip2clip.py", "cpu_fast_path_vip2clip.py",
            "reference_bank_vip2clip.py"} <= set(saved)
    assert not any(name.endswith((".bin", ".pth", ".pt")) for name in saved)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_vip2clip.ViP2CLIPConfig", "AutoModel": "modeling_vip2clip.ViP2CLIPModel"}
    rng = np.random.default_rng(0)
    pil_images = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    np.save(tmp_path / "images.npy", np.stack(pil_images))
    processor = ViP2CLIPProcessor(image_size=S, min_image_size=8)
    inputs = processor(images=list(pil_images))
    with torch.no_grad():
        expected = model(pixel_values=inputs["pixel_values"])
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        import sys
        package = type(model).__module__.rsplit(".", 1)[0]
        for sibling in ("cpu_fast_path_vip2clip", "reference_bank_vip2clip"):
            assert package + "." + sibling in sys.modules, sibling + ": the sibling Hub file did not come along"
        images = [Image.fromarray(a) for a in np.load({str(tmp_path / 'images.npy')!r})]
        inputs = processor(images=images)
        with torch.no_grad():
            out = model(pixel_values=inputs["pixel_values"])
        maps = processor.post_process_anomaly_maps(out, target_sizes=[im.size[::-1] for im in images])
        np.savez({str(tmp_path / 'out.npz')!r}, score=out.anomaly_score.numpy(), map=out.anomaly_map.numpy(),
                 pixels=inputs["pixel_values"].numpy(), resized=maps[0].numpy())
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(got["pixels"], inputs["pixel_values"].numpy())
    np.testing.assert_array_equal(got["score"], expected.anomaly_score.numpy())
    np.testing.assert_array_equal(got["map"], expected.anomaly_map.numpy())
    assert got["resized"].shape == (40, 56)
