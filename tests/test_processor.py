"""ViP2CLIPImageProcessor: docs/method.md §7 preprocessing against an independent computation, input modes, masks, post-processing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_vip2clip import ViP2CLIPImageProcessor
from modeling_vip2clip.processing_vip2clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, jet_colormap

S = 32


@pytest.fixture
def processor():
    return ViP2CLIPImageProcessor(image_size=S, min_image_size=8)


def _rgb(height=40, width=56, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_pixel_values_match_spec_preprocessing(processor):
    image = _rgb()
    pixels = processor(images=[image])["pixel_values"]
    resized = np.asarray(image.resize((S, S), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = (resized - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    assert pixels.shape == (1, 3, S, S) and pixels.dtype == torch.float32
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_masks_resized_bilinear_and_binarised(processor):
    image = _rgb(40, 56)
    mask = np.zeros((40, 56), dtype=np.uint8)
    mask[10:30, 5:21] = 255
    out = processor(images=[image, image], masks=[Image.fromarray(mask), None])
    expected = np.asarray(Image.fromarray(mask).resize((S, S), Image.BILINEAR), dtype=np.float64) / 255 > 0.5
    np.testing.assert_array_equal(out["masks"][0].numpy(), expected.astype(np.float32))
    assert out["masks"][1].sum() == 0 and set(out["masks"].unique().tolist()) <= {0.0, 1.0}
    # an RGB mask: any non-zero pixel is a defect (grayscale conversion, as the reference)
    rgb_mask = np.zeros((40, 56, 3), dtype=np.uint8)
    rgb_mask[10:30, 5:21, 0] = 255
    torch.testing.assert_close(processor(images=image, masks=Image.fromarray(rgb_mask))["masks"][0], out["masks"][0])


def test_mask_problems_are_never_silent(processor):
    image = _rgb(40, 56)
    with pytest.raises(ValueError, match="mask 0 is 50x40 but its image is 56x40"):
        processor(images=[image], masks=[Image.fromarray(np.zeros((40, 50), dtype=np.uint8))])
    soft = np.linspace(0, 255, 40 * 56).reshape(40, 56).astype(np.uint8)
    with pytest.warns(UserWarning, match="distinct values"):
        processor(images=[image], masks=[soft])
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        processor(images=[image, image], masks=[None])


def test_input_modes_are_converted_as_documented(processor):
    base = np.random.default_rng(1).integers(0, 256, (40, 56), dtype=np.uint8)
    gray = processor(images=Image.fromarray(base))["pixel_values"]
    rgb = processor(images=Image.fromarray(np.stack([base] * 3, -1)))["pixel_values"]
    torch.testing.assert_close(gray, rgb)
    # 16-bit: full range ÷257, not clipped at 255
    wide = Image.fromarray(base.astype(np.uint16) * 257)
    assert wide.mode.startswith("I;16")
    torch.testing.assert_close(processor(images=wide)["pixel_values"], gray)
    # RGBA: alpha dropped; palette and CMYK converted
    color = _rgb(40, 56, seed=2)
    rgba = color.copy()
    rgba.putalpha(17)
    torch.testing.assert_close(processor(images=rgba)["pixel_values"], processor(images=color)["pixel_values"])
    assert processor(images=color.convert("P"))["pixel_values"].shape == (1, 3, S, S)
    assert processor(images=color.convert("CMYK"))["pixel_values"].shape == (1, 3, S, S)
    # float [0, 1] array and channels-first tensors
    as_float = np.asarray(color, dtype=np.float32) / 255
    torch.testing.assert_close(processor(images=as_float)["pixel_values"], processor(images=color)["pixel_values"])
    chw = torch.from_numpy(np.array(color)).permute(2, 0, 1)
    torch.testing.assert_close(processor(images=chw)["pixel_values"], processor(images=color)["pixel_values"])


def test_exif_orientation_is_honoured(processor):
    upright = _rgb(40, 56, seed=3)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes before tagging orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    out = processor(images=reopened)
    assert out["original_sizes"].tolist() == [[40, 56]]  # (height, width) after honouring EXIF


def test_tiny_huge_and_non_images_are_rejected_with_a_reason():
    processor = ViP2CLIPImageProcessor(image_size=S, min_image_size=14, max_image_pixels=100_000)
    with pytest.raises(ValueError, match=r"image 0 is 10x30 px, smaller than the minimum side of 14"):
        processor(images=[Image.new("RGB", (10, 30))])
    with pytest.raises(ValueError, match="over the limit of 100,000"):
        processor(images=[Image.new("RGB", (400, 300))])
    with pytest.raises(TypeError, match="Open files first"):
        processor(images=["/some/path.png"])
    with pytest.raises(ValueError, match="NaN"):
        processor(images=[np.full((20, 20, 3), np.nan, dtype=np.float32)])


def test_post_processing_back_to_each_image_size(processor):
    maps = torch.rand(2, S, S, generator=torch.Generator().manual_seed(0))
    resized = processor.post_process_anomaly_maps(maps, target_sizes=[(40, 56), (64, 20)])
    assert [tuple(m.shape) for m in resized] == [(40, 56), (64, 20)]
    torch.testing.assert_close(resized[0], F.interpolate(maps[:1, None], size=(40, 56), mode="bilinear", align_corners=False)[0, 0])
    masks = processor.post_process_masks(maps, threshold=0.5, target_sizes=[(40, 56), (64, 20)])
    assert masks[0].dtype == torch.bool and torch.equal(masks[1], resized[1] >= 0.5)


def test_overlay_is_the_image_blended_with_jet(processor):
    image = _rgb(40, 56, seed=4)
    anomaly_map = torch.zeros(S, S)
    overlay = processor.overlay(image, anomaly_map, alpha=0.5)
    assert overlay.size == image.size and overlay.mode == "RGB"
    cold = jet_colormap(np.zeros((1, 1)))[0, 0].astype(np.float64)
    expected = np.clip(0.5 * np.asarray(image, dtype=np.float64) + 0.5 * cold + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(overlay), expected)
    assert tuple(jet_colormap(np.array([[1.0]]))[0, 0]) == (128, 0, 0)  # dark red at the top of the scale
    assert tuple(jet_colormap(np.array([[0.0]]))[0, 0]) == (0, 0, 128)  # dark blue at the bottom


_MODES = st.sampled_from(["RGB", "L", "P", "RGBA", "CMYK", "I;16", "F", "LA"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(8, 90), height=st.integers(8, 90), mode=_MODES, seed=st.integers(0, 2**16))
def test_any_mode_and_size_gives_a_normalised_batch(processor, width, height, mode, seed):
    data = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(data)
    if mode == "I;16":
        image = Image.fromarray(data[..., 0].astype(np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(data[..., 0].astype(np.float32) / 255.0)
    elif mode != "RGB":
        image = image.convert(mode)
    out = processor(images=[image])
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, S, S) and torch.isfinite(pixels).all()
    low = (0 - max(OPENAI_CLIP_MEAN)) / min(OPENAI_CLIP_STD)
    high = (1 - min(OPENAI_CLIP_MEAN)) / min(OPENAI_CLIP_STD)
    assert pixels.min() >= low - 1e-4 and pixels.max() <= high + 1e-4
    assert out["original_sizes"].tolist() == [[height, width]]


# ---------------------------------------------------------------------------------------------------- annotated overlays


def _colour_bar_row(array: np.ndarray, top: int) -> tuple[int, np.ndarray] | None:
    """The first row at or below `top` holding the colour scale: from the first jet(0) pixel to the last jet(1)
    pixel, exactly `jet_colormap` of an even ramp."""
    from modeling_vip2clip.processing_vip2clip import jet_colormap

    low, high = jet_colormap(np.array([[0.0]]))[0, 0], jet_colormap(np.array([[1.0]]))[0, 0]
    for y in range(top, array.shape[0]):
        row = array[y]
        starts = np.flatnonzero((row == low).all(axis=1))
        ends = np.flatnonzero((row == high).all(axis=1))
        if starts.size and ends.size and ends[-1] > starts[0] + 20:
            left, right = int(starts[0]), int(ends[-1])
            expected = jet_colormap(np.linspace(0.0, 1.0, right - left + 1)[None])[0]
            if np.array_equal(row[left:right + 1], expected):
                return y, row[left:right + 1]
    return None


def test_annotated_overlay_keeps_the_image_and_draws_scale_and_score():
    from modeling_vip2clip.processing_vip2clip import ViP2CLIPProcessor, annotate_overlay

    processor = ViP2CLIPProcessor(image_size=32)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    anomaly_map = torch.from_numpy(rng.random((32, 32)).astype(np.float32))
    plain = processor.overlay(image, anomaly_map)
    drawn = annotate_overlay(plain, 0.8, threshold=0.5)
    array = np.asarray(drawn)
    assert drawn.width == 400 and drawn.height > 300 + 20
    np.testing.assert_array_equal(array[:300], np.asarray(plain))  # the image is not covered
    found = _colour_bar_row(array, 300)
    assert found is not None and found[1].shape[0] > 300  # the scale spans most of the strip
    # The score and verdict are drawn: another score (or verdict) changes the strip above the bar, not the bar.
    other = np.asarray(annotate_overlay(plain, 0.2, threshold=0.5))
    assert not np.array_equal(other[300:found[0]], array[300:found[0]])
    np.testing.assert_array_equal(other[found[0]], array[found[0]])
    # A narrow image gets a strip wide enough for the text; the image stays in the top-left corner.
    small = processor.overlay(Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)), anomaly_map)
    narrow = annotate_overlay(small, 0.1)
    assert narrow.width >= 200 and _colour_bar_row(np.asarray(narrow), 30) is not None
    np.testing.assert_array_equal(np.asarray(narrow)[:30, :40], np.asarray(small))
