"""The package against an independent re-implementation of the authors' code (tests/reference_vip2clip.py),
fed the same weights through the official-checkpoint converter: scores, maps and losses to 1e-5 (docs/method.md §2–§6).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, CLIPModel

from reference_vip2clip import RefCLIP, RefFGP, RefICA, reference_forward, reference_loss
from modeling_vip2clip.testing_utils import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE, FEATURES, TOP_K, N_CTX, N_CLS = 32, [1, 2], 5, 3, 2


def _load_converter():
    spec = importlib.util.spec_from_file_location("convert_cli", ROOT / "hub" / "authors_checkpoint_to_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tiny_clip_dir, tmp_path_factory):
    """Reference modules with random heads, saved as an authors'-layout .pth, converted with the hub command."""
    torch.manual_seed(123)
    hf_clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    ref_clip = RefCLIP(hf_clip).eval()
    ica = RefICA(ref_clip, tiny_tokenizer(), N_CTX, N_CLS, embed_dim=32, hidden=16).eval()
    fgp = RefFGP(32).eval()
    with torch.no_grad():  # larger-than-init heads so every term visibly matters
        for parameter in (ica.ctx_pos, ica.ctx_neg, ica.cls_ctx, ica.cls_prompter.bias):
            parameter.normal_(0, 0.5)
        for conv in (fgp.q_proj_pre, fgp.k_proj_pre_1, fgp.v_proj_pre_1, fgp.proj_post_t):
            conv.weight.normal_(0, 0.5)
    workdir = tmp_path_factory.mktemp("official")
    checkpoint = workdir / "mvtec_train_epoch_10.pth"
    torch.save({"prompt_learner": ica.state_dict(), "Zero_try": fgp.state_dict()}, checkpoint)
    out = workdir / "converted"
    code = _load_converter().main([
        "--checkpoint", str(checkpoint), "--clip", str(tiny_clip_dir), "--out", str(out),
        "--image-size", str(IMAGE_SIZE), "--feature-layers", *map(str, FEATURES), "--top-k", str(TOP_K),
    ])
    assert code == 0
    return ref_clip, ica, fgp, out


@pytest.mark.parametrize("sigma", [8.0, 2.0])
def test_converted_checkpoint_matches_reference(reference, sigma):
    ref_clip, ica, fgp, out = reference
    model = AutoModel.from_pretrained(out, trust_remote_code=True, blur_sigma=sigma).eval()
    assert model.config.n_ctx == N_CTX and model.config.n_cls == N_CLS and model.config.official_compat
    torch.manual_seed(7)
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref_scores, ref_maps, _, _ = reference_forward(ref_clip, ica, fgp, images, FEATURES, IMAGE_SIZE, TOP_K, sigma)
        output = model(pixel_values=images)
    # the heads must not be degenerate, or the comparison proves little
    assert ref_scores.std() > 1e-2 and np.ptp(ref_maps) > 1e-2
    torch.testing.assert_close(output.anomaly_score, ref_scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(output.anomaly_map.numpy(), ref_maps, atol=1e-5, rtol=0)


def test_training_loss_matches_reference(reference):
    ref_clip, ica, fgp, out = reference
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    torch.manual_seed(8)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    masks = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE)
    masks[1, 5:17, 9:20] = 1
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        _, _, two_channel, logits = reference_forward(ref_clip, ica, fgp, images, FEATURES, IMAGE_SIZE, TOP_K, 8.0)
        expected = reference_loss(two_channel, logits, masks, labels)
        output = model(pixel_values=images, masks=masks, labels=labels)
    torch.testing.assert_close(output.loss, expected, atol=1e-5, rtol=1e-6)


def test_position_table_resized_once_bilinearly(reference, tiny_clip_dir):
    _, _, _, out = reference
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    native = CLIPModel.from_pretrained(tiny_clip_dir).vision_model.embeddings.position_embedding.weight.detach()
    grid = native[1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    expected = torch.cat([native[:1], resized.flatten(2).transpose(1, 2)[0]])
    stored = model.clip.vision_model.embeddings.position_embedding.weight.detach()
    torch.testing.assert_close(stored, expected)
    # and it is stored, not recomputed: the saved config says 32 px and the table has 1 + 4² rows
    assert model.config.image_size == IMAGE_SIZE and stored.shape[0] == 17
