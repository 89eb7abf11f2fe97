"""Few-shot mode (docs/few_shot.md): `model.build_reference_bank(...)`, `model(..., reference_bank=bank)`.

Tiny random models throughout (tests/tiny_clip.py): the bank's exactness (an image of the bank scores 0, the
chunked search equals a brute-force loop, batching changes nothing), its file round trip and geometry checks,
the WinCLIP+ fusion, the untouched zero-shot path, and on the synthetic benchmark what random features can show.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from modeling_vip2clip import ViP2CLIPModel, ViP2CLIPProcessor
from modeling_vip2clip import reference_bank_vip2clip
from modeling_vip2clip.modeling_vip2clip import ViP2CLIPReferenceBank
from modeling_vip2clip.testing_utils import tiny_vip2clip_config

S = 32


def _images(count: int, seed: int, size: int = S) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return smooth + 0.3 * torch.randn(count, 3, size, size, generator=generator)


def _tiny_model(image_size: int = S, seed: int = 0, **overrides) -> ViP2CLIPModel:
    clip = tiny_vip2clip_config().clip_config.to_dict()
    clip["vision_config"]["image_size"] = image_size
    torch.manual_seed(seed)
    return ViP2CLIPModel(tiny_vip2clip_config(clip_config=clip, **overrides)).eval()


def _brute_force_patch_scores(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """The definition, loop by loop in float64: queries (B, n, L, D), references (k, n, L, D) → (B, L) =
    mean over layers of min over every reference patch of that layer of ½·(1 − cos)."""
    batch, num_layers, num_patches, _ = queries.shape
    scores = torch.zeros(batch, num_patches, dtype=torch.float64)
    for b in range(batch):
        for i in range(num_patches):
            total = 0.0
            for layer in range(num_layers):
                query = queries[b, layer, i].double()
                best = float("inf")
                for image in references:
                    for reference in image[layer].double():
                        cos = float(query @ reference / (query.norm() * reference.norm()))
                        best = min(best, (1.0 - cos) / 2)
                total += best
            scores[b, i] = total / num_layers
    return scores


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("fast", [True, False], ids=["cpu_fast_path", "plain_layers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_image_in_the_bank_scores_zero_everywhere(fast, dtype):
    model = _tiny_model()
    model.clip.to(dtype)  # the tower in the load dtype, the heads in fp32, as from_pretrained(dtype=...) gives
    model.cpu_onednn_vision = fast
    references, other = _images(3, seed=1).to(dtype), _images(1, seed=2).to(dtype)
    with torch.inference_mode():
        bank = model.build_reference_bank(references, batch_size=2)
        output = model(pixel_values=torch.cat([references, other]), reference_bank=bank)
    assert bank.num_images == 3 and bank.patch_embeds.shape == (2, 3 * 16, 32)
    assert output.few_shot_map.shape == (4, S, S)
    assert output.few_shot_map[:3].abs().max() <= 1e-5  # upsampling and blur keep the zeros
    assert output.few_shot_map[:3].min() >= 0
    assert output.few_shot_map[3].max() > 1e-2  # an image not in the bank does not: the check is not vacuous


@pytest.mark.parametrize("product", ["default", "aten"], ids=["default_product", "aten_product"])
@pytest.mark.parametrize("block_rows", [None, 5], ids=["default_blocks", "5_row_blocks"])
def test_patch_scores_equal_a_brute_force_double_loop(tiny_model, monkeypatch, block_rows, product):
    references, queries = _images(2, seed=3), _images(2, seed=4)
    with torch.inference_mode():
        reference_patches = tiny_model.encode_image(references)[1]  # (2, n, L, D)
        query_patches = tiny_model.encode_image(queries)[1]
        bank = tiny_model.build_reference_bank(references)
        if block_rows is not None:  # blocks that do not divide the B·L = 32 query rows
            monkeypatch.setattr(reference_bank_vip2clip, "_BLOCK_ELEMENTS", block_rows * bank.patch_embeds.shape[1])
        if product == "aten":  # the GPU / non-oneDNN branch: ATen's matmul instead of oneDNN's GEMM on the CPU
            monkeypatch.setattr(reference_bank_vip2clip, "onednn_linear_available", lambda: False)
        scores = bank.patch_scores(query_patches)
    expected = _brute_force_patch_scores(query_patches, reference_patches)
    assert expected.min() > 1e-3  # other images: every patch is some distance away
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=0)


def test_batched_equals_one_by_one(tiny_model):
    references, queries = _images(3, seed=5), _images(4, seed=6)
    with torch.inference_mode():
        bank = tiny_model.build_reference_bank(references)
        bank_one_by_one = tiny_model.build_reference_bank(references, batch_size=1)
        batched = tiny_model(pixel_values=queries, reference_bank=bank)
        single = [tiny_model(pixel_values=image[None], reference_bank=bank) for image in queries]
    torch.testing.assert_close(bank_one_by_one.patch_embeds, bank.patch_embeds, atol=1e-6, rtol=0)
    for name in ("few_shot_map", "few_shot_score", "anomaly_map", "anomaly_score"):
        alone = torch.cat([getattr(output, name) for output in single])
        torch.testing.assert_close(getattr(batched, name), alone, atol=1e-6, rtol=0, msg=name)


def test_fusion_is_winclip_plus_and_stays_in_unit_range(tiny_model):
    references, queries = _images(2, seed=7), _images(3, seed=8)
    with torch.inference_mode():
        bank = tiny_model.build_reference_bank(references)
        output = tiny_model(pixel_values=queries, reference_bank=bank)
    assert torch.equal(output.few_shot_score, output.few_shot_map.flatten(1).amax(dim=1))
    assert torch.equal(output.anomaly_map, (output.zero_shot_anomaly_map + output.few_shot_map) / 2)
    assert torch.equal(output.anomaly_score, (output.zero_shot_anomaly_score + output.few_shot_score) / 2)
    for name in ("few_shot_map", "anomaly_map", "anomaly_score"):
        values = getattr(output, name)
        assert values.min() >= 0 and values.max() <= 1, name


def test_without_a_bank_every_output_is_the_zero_shot_one(tiny_model):
    queries = _images(3, seed=9)
    with torch.inference_mode():
        plain = tiny_model(pixel_values=queries)
        bank = tiny_model.build_reference_bank(_images(2, seed=10))
        with_bank = tiny_model(pixel_values=queries, reference_bank=bank)
        again = tiny_model(pixel_values=queries)  # building and using a bank leaves no state behind
        as_tuple = tiny_model(pixel_values=queries, return_dict=False)
    assert plain.few_shot_map is None and plain.few_shot_score is None and plain.zero_shot_anomaly_map is None
    assert len(as_tuple) == len(plain.to_tuple()) == 8  # the tuple form has no new entries
    for name, value in plain.items():
        assert torch.equal(getattr(again, name), value), name
    for name in ("layer_anomaly_maps", "layer_probabilities", "image_logits", "image_embeds", "text_embeds",
                 "layer_text_embeds"):
        assert torch.equal(getattr(with_bank, name), getattr(plain, name)), name
    assert torch.equal(with_bank.zero_shot_anomaly_map, plain.anomaly_map)
    assert torch.equal(with_bank.zero_shot_anomaly_score, plain.anomaly_score)
    assert not torch.equal(with_bank.anomaly_map, plain.anomaly_map)  # the bank does change the fused map


# ---------------------------------------------------------------------------------------------- files and geometry
def test_save_and_load_round_trip(tiny_model, tmp_path):
    references, queries = _images(2, seed=11), _images(2, seed=12)
    path = tmp_path / "bank.safetensors"
    with torch.inference_mode():
        bank = tiny_model.build_reference_bank(references)
        bank.save(path)
        loaded = ViP2CLIPReferenceBank.load(path, model=tiny_model)
        expected = tiny_model(pixel_values=queries, reference_bank=bank)
        got = tiny_model(pixel_values=queries, reference_bank=type(bank).load(path))
    assert torch.equal(loaded.patch_embeds, bank.patch_embeds)
    assert torch.equal(loaded.backbone_fingerprint, bank.backbone_fingerprint)
    assert loaded.geometry == bank.geometry and loaded.num_images == 2
    for name in ("few_shot_map", "anomaly_map", "anomaly_score"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert path.stat().st_size >= bank.nbytes  # the patches are stored in full (fp32), not summarised


def test_a_file_that_is_not_a_bank_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a ViP²-CLIP reference bank"):
        ViP2CLIPReferenceBank.load(path)


@pytest.mark.parametrize(
    "other, this_geometry, other_geometry",
    [
        (dict(image_size=48), r"image_size 32 \(patch 8, 4x4 patches\)", r"image_size 48 \(patch 8, 6x6 patches\)"),
        (dict(feature_layers=[2]), r"feature_layers \[1, 2\]", r"feature_layers \[2\]"),
    ],
    ids=["image_size", "feature_layers"],
)
def test_a_bank_of_another_geometry_is_refused_naming_both(tiny_model, tmp_path, other, this_geometry, other_geometry):
    other = dict(other)
    image_size = other.pop("image_size", S)
    other_model = _tiny_model(image_size=image_size, **other)
    path = tmp_path / "bank.safetensors"
    with torch.inference_mode():
        tiny_model.build_reference_bank(_images(1, seed=13)).save(path)
    bank = ViP2CLIPReferenceBank.load(path)
    message = rf"built for .*{this_geometry}.*but the model has .*{other_geometry}"
    with pytest.raises(ValueError, match=message):
        other_model(pixel_values=_images(1, seed=14, size=image_size), reference_bank=bank)
    with pytest.raises(ValueError, match=message):
        ViP2CLIPReferenceBank.load(path, model=other_model)


def test_a_bank_of_another_backbone_is_refused_but_another_dtype_is_not(tiny_model):
    with torch.inference_mode():
        bank = tiny_model.build_reference_bank(_images(1, seed=15))
    other_weights = _tiny_model(seed=1)  # same geometry, other random CLIP
    with pytest.raises(ValueError, match="built by another CLIP backbone"):
        other_weights(pixel_values=_images(1, seed=16), reference_bank=bank)
    tiny_model.clip.to(torch.bfloat16)  # the same weights rounded to bf16: still this backbone
    with torch.inference_mode():
        output = tiny_model(pixel_values=_images(1, seed=16).bfloat16(), reference_bank=bank)
    assert output.few_shot_map.shape == (1, S, S)


# ---------------------------------------------------------------------------------------------- synthetic benchmark
def test_pasted_defects_score_higher_than_the_rest_of_their_image(tmp_path):
    """On the synthetic benchmark (MVTec layout), with 4 normal `train` references of the same category, the
    defect pixels of the anomalous `test` images get a higher mean few-shot score than their defect-free pixels.

    What random tiny weights can show: the bank works as a nearest-neighbour novelty detector. A random patch
    embedding followed by two random transformer layers keeps much of a patch's pixel content (a random
    projection keeps distances), so a patch whose content appears in no reference (a hole, a discoloured blob,
    a pasted texture, a scratch) lies farther from the bank than a patch of the same stationary texture.
    What they cannot show: anything semantic (that CLIP features make a defect far and an unseen but normal
    variation near), accuracy figures, or that the fusion improves the zero-shot metrics — that needs the real
    weights and datasets. Hence the assertions: per category, pooled over its anomalous images (true for every
    model and data seed tried), and per image for at least three quarters of them (thin scratches at 64 px
    can be lost in the patch grid and the blur)."""
    from modeling_vip2clip.data.synthetic import generate_synthetic_benchmark

    size = 64  # an 8×8 patch grid, so that a defect covers whole patches
    records = generate_synthetic_benchmark(tmp_path, n_train_good=4, n_test_good=0, n_test_bad=4, image_size=128)
    model = _tiny_model(image_size=size)
    processor = ViP2CLIPProcessor(image_size=size, min_image_size=8)
    per_image = []
    for category in sorted({record["category"] for record in records}):
        references = [r for r in records if r["category"] == category and r["split"] == "train"]
        anomalous = [r for r in records if r["category"] == category and r["label"] == 1]
        assert len(references) == 4 and len(anomalous) == 4
        assert all(r["label"] == 0 for r in references)
        inputs = processor(
            images=[Image.open(tmp_path / r["image_path"]) for r in anomalous],
            masks=[Image.open(tmp_path / r["mask_path"]) for r in anomalous],
        )
        with torch.inference_mode():
            bank = model.build_reference_bank(
                processor(images=[Image.open(tmp_path / r["image_path"]) for r in references])["pixel_values"]
            )
            few_shot = model(pixel_values=inputs["pixel_values"], reference_bank=bank).few_shot_map  # (4, S, S)
        defect = inputs["masks"].bool()  # (4, S, S)
        assert defect.any(dim=(1, 2)).all() and (~defect).any(dim=(1, 2)).all()
        inside, outside = few_shot[defect].mean(), few_shot[~defect].mean()
        assert inside > outside, f"{category}: defect pixels {inside:.4f} vs defect-free {outside:.4f}"
        per_image += [bool(few_shot[i][defect[i]].mean() > few_shot[i][~defect[i]].mean()) for i in range(4)]
    assert sum(per_image) >= 0.75 * len(per_image), per_image


# ---------------------------------------------------------------------------------------------- remote code
def test_few_shot_through_remote_code_in_a_fresh_process(tiny_model, tmp_path):
    """A saved folder carries reference_bank_vip2clip.py: `AutoModel(..., trust_remote_code=True)` in a new
    interpreter without this repository builds a bank and scores with it; its bank file loads here and gives
    the same numbers."""
    import os
    import subprocess
    import sys
    import textwrap

    import numpy as np

    folder = tmp_path / f"model_{tmp_path.name}"  # a unique name: remote code is cached per folder name
    tiny_model.save_pretrained(folder)
    assert (folder / "reference_bank_vip2clip.py").is_file()
    references, queries = _images(2, seed=17), _images(2, seed=18)
    np.save(tmp_path / "references.npy", references.numpy())
    np.save(tmp_path / "queries.npy", queries.numpy())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "modeling_vip2clip" not in sys.modules  # this repository's package is not importable
        with torch.inference_mode():
            bank = model.build_reference_bank(torch.from_numpy(np.load({str(tmp_path / 'references.npy')!r})))
            out = model(pixel_values=torch.from_numpy(np.load({str(tmp_path / 'queries.npy')!r})), reference_bank=bank)
        assert type(bank).__module__.startswith("transformers_modules"), type(bank).__module__
        bank.save({str(tmp_path / 'bank.safetensors')!r})
        np.savez({str(tmp_path / 'out.npz')!r}, few_shot_map=out.few_shot_map.numpy(), score=out.anomaly_score.numpy())
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    with torch.inference_mode():
        expected = tiny_model(pixel_values=queries, reference_bank=tiny_model.build_reference_bank(references))
        from_file = tiny_model(pixel_values=queries, reference_bank=ViP2CLIPReferenceBank.load(tmp_path / "bank.safetensors"))
    np.testing.assert_array_equal(got["few_shot_map"], expected.few_shot_map.numpy())
    np.testing.assert_array_equal(got["score"], expected.anomaly_score.numpy())
    assert torch.equal(from_file.few_shot_map, expected.few_shot_map)
