"""Pre- and post-processing for ViP²-CLIP (docs/method.md §7).

One class, `ViP2CLIPImageProcessor` (a transformers `BaseImageProcessor`), saved as `preprocessor_config.json` and
loadable with `AutoImageProcessor.from_pretrained(..., trust_remote_code=True)` or `AutoProcessor` (the same class);
`ViP2CLIPProcessor` is its former name, kept as an alias so that older code and folders whose
`preprocessor_config.json` names it still load:

* images → `pixel_values` `(B, 3, S, S)`: RGB, bicubic resize to S×S (PIL), OpenAI CLIP mean/std;
* masks → `masks` `(B, S, S)` in {0, 1}: any non-zero pixel is a defect, bilinear resize, binarised at 0.5
  (the reference's mask transform);
* anomaly maps → each image's own size, binary masks at a threshold, and a heat-map overlay.

This file travels to the Hub (`trust_remote_code`): it imports only numpy, PIL, torch and transformers, and it
never opens files — callers pass decoded images.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

__all__ = ["ViP2CLIPImageProcessor", "ViP2CLIPProcessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "jet_colormap",
           "colour_scale", "annotate_overlay"]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# PIL modes whose pixels are wider than 8 bits and need explicit scaling (convert("RGB") would clip them).
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' as piecewise-linear RGB, for values in [0, 1]: `(H, W)` → `(H, W, 3)` uint8."""
    values = np.clip(values, 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * values - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * values - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * values - 1.0), 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


# jet as a lookup table: the overlay colours a map with one gather instead of float64 piecewise arithmetic. 1024
# + 1 levels: jet changes by at most 4·255/1024 < 1 colour level between neighbouring entries, and the quarters
# (0, 0.25, 0.5, …) fall exactly on entries.
_JET_LEVELS = 1025
_JET_TABLE = None


def _jet_table() -> np.ndarray:
    global _JET_TABLE
    if _JET_TABLE is None:
        _JET_TABLE = jet_colormap(np.linspace(0.0, 1.0, _JET_LEVELS)[None])[0].astype(np.float32)  # (levels, 3)
    return _JET_TABLE


def _bilinear_axis(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (or columns) and weights of a bilinear resize `source` → `target` with align_corners=False, as
    torch's `F.interpolate(mode="bilinear")` computes them (no antialiasing)."""
    # float32 throughout, like torch's kernel, so that the weights round as its do
    position = np.arange(target, dtype=np.float32) + np.float32(0.5)
    position = np.maximum(position * np.float32(source / target) - np.float32(0.5), np.float32(0.0))
    low = np.minimum(position.astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, position - low.astype(np.float32)


def resize_map_bilinear(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """`(S, S)` float map → `(height, width)` float32, the numbers of `F.interpolate(..., "bilinear",
    align_corners=False)` to float32 rounding, in numpy: output-writer threads use it, because a torch op there
    starts an OpenMP team of its own that competes with the model's threads."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.shape == (height, width):
        return anomaly_map.copy()
    top, bottom, row_weight = _bilinear_axis(anomaly_map.shape[0], height)
    left, right, column_weight = _bilinear_axis(anomaly_map.shape[1], width)
    # torch's order of operations: along the width first, then (1 - λ)·upper + λ·lower
    columns = anomaly_map[:, left] * (1 - column_weight) + anomaly_map[:, right] * column_weight
    return columns[top] * (1 - row_weight)[:, None] + columns[bottom] * row_weight[:, None]


def colour_scale(width: int) -> np.ndarray:
    """The overlays' colour scale as `width` RGB colours `(width, 3)` uint8, map value 0 (left) … 1 (right): what
    `annotate_overlay` draws under each overlay and the demo shows beside it — one scale, one definition."""
    return jet_colormap(np.linspace(0.0, 1.0, int(width))[None, :])[0]


@functools.lru_cache(maxsize=16)
def _legend_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, AttributeError, OSError):  # older Pillow / no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def annotate_overlay(overlay: Image.Image, score: float | None = None, threshold: float | None = None,
                     label: str | None = None) -> Image.Image:
    """`overlay` (from `ViP2CLIPProcessor.overlay`) with a strip below it that explains it: the image score (and
    the verdict at `threshold`, or a free `label`) and the colour scale of the map, 0 … 1, with ticks — the fixed
    range `overlay` uses, so one colour means one map value in every image. The image itself is not covered.

    Cheap on purpose (a few milliseconds at 1024²): a new canvas, one paste, a bar of a few hundred pixels."""
    from PIL import ImageDraw

    overlay = overlay if overlay.mode == "RGB" else overlay.convert("RGB")
    width = max(overlay.width, 220)  # narrow images get a wider strip so that the text stays legible
    font_size = int(min(28, max(11, round(width / 30))))
    pad = max(3, font_size // 3)
    bar_height = max(6, font_size // 2)
    strip = pad + font_size + pad + bar_height + 2 + font_size + pad
    canvas = Image.new("RGB", (width, overlay.height + strip), (28, 28, 28))
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font, small = _legend_font(font_size), _legend_font(max(9, font_size * 4 // 5))
    top = overlay.height + pad
    text, colour = "", (235, 235, 235)
    if score is not None:
        text = f"score {float(score):.3f}"
        if threshold is not None:
            anomalous = float(score) >= float(threshold)
            text += f" {'≥' if anomalous else '<'} {float(threshold):.3g}: {'ANOMALOUS' if anomalous else 'normal'}"
            colour = (255, 110, 100) if anomalous else (140, 230, 140)
    if label:
        text = f"{text}  {label}" if text else label
    try:
        draw.text((pad, top), text, fill=colour, font=font)
    except UnicodeEncodeError:  # the bitmap fallback font has no '≥'
        draw.text((pad, top), text.replace("≥", ">="), fill=colour, font=font)
    left, right = pad, width - pad
    bar_top = top + font_size + pad
    ramp = np.repeat(colour_scale(right - left)[None], bar_height, axis=0)
    canvas.paste(Image.fromarray(ramp, mode="RGB"), (left, bar_top))
    tick_top = bar_top + bar_height + 2
    for value, anchor in ((0.0, "la"), (0.25, "ma"), (0.5, "ma"), (0.75, "ma"), (1.0, "ra")):
        x = left + value * (right - left - 1)
        draw.line([(x, bar_top + bar_height), (x, tick_top)], fill=(235, 235, 235))
        name = "map 0" if value == 0 else ("1" if value == 1 else f"{value:g}")
        try:
            draw.text((x, tick_top), name, fill=(235, 235, 235), font=small, anchor=anchor)
        except ValueError:  # anchors need a FreeType font
            draw.text((x, tick_top), name, fill=(235, 235, 235), font=small)
    return canvas


def _wide_array_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """16-bit / 32-bit / float pixels → uint8 without clipping (documented in `ViP2CLIPImageProcessor`)."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite pixel values; fix or drop the file.")
    if array.dtype == np.uint16:
        # Full-range 16-bit: 65535 ↦ 255 (÷257 is exact for 8-bit data stored in 16 bits).
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            return np.round(array * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.round(array).astype(np.uint8)
        span = high - low if high > low else 1.0
        return np.round((array - low) / span * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        if low >= 0 and high <= 65535:
            return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
        raise ValueError(f"{what} has integer pixel values in [{low}, {high}], outside 0..65535; rescale it first.")
    raise ValueError(f"{what} has unsupported pixel dtype {array.dtype}.")


class ViP2CLIPImageProcessorKwargs(TypedDict, total=False):
    """The processor's saved settings (transformers reads `valid_kwargs` when loading an image processor)."""

    image_size: int
    image_mean: list[float]
    image_std: list[float]
    mask_threshold: float
    min_image_size: int
    max_image_pixels: int | None


class ViP2CLIPImageProcessor(BaseImageProcessor):
    r"""Image and mask processor of ViP²-CLIP.

    Accepted images: `PIL.Image.Image` (any mode), `np.ndarray` / `torch.Tensor` of shape (H, W), (H, W, C) or
    (C, H, W) with C in {1, 3, 4}. Conversions (documented, never silent failures):

    * EXIF orientation is honoured (`ImageOps.exif_transpose`).
    * Grayscale, palette, CMYK, YCbCr, LAB, HSV → RGB; RGBA / LA / PA → RGB with the alpha channel dropped
      (as the reference's `convert('RGB')`).
    * 16-bit (I;16*, uint16 arrays) → 8-bit by ÷257; 32-bit integer ('I') the same when within 0..65535; float
      ('F', float arrays) × 255 when in [0, 1], as is when in [0, 255], else min–max scaled.
    * Images with a side smaller than `min_image_size` (default 14, one ViT-L/14 patch) or more than
      `max_image_pixels` pixels (default: no limit) are rejected with a `ValueError`.

    Masks: same input types; any non-zero pixel (after conversion to grayscale) is a defect; they must have the
    size of their image (else `ValueError`); `None` means "no defect" (all zeros). More than two distinct values
    (a soft or antialiased mask) triggers a warning, since everything above 0 becomes defect.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = ViP2CLIPImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 518,
        image_mean: Sequence[float] = tuple(OPENAI_CLIP_MEAN),
        image_std: Sequence[float] = tuple(OPENAI_CLIP_STD),
        mask_threshold: float = 0.5,
        min_image_size: int = 14,
        max_image_pixels: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.mask_threshold = float(mask_threshold)
        self.min_image_size = int(min_image_size)
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        if self.image_size < 1 or len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_size must be positive and image_mean / image_std must have 3 values.")

    @classmethod
    def for_model(cls, config, **kwargs) -> "ViP2CLIPImageProcessor":
        """The processor a model folder without `preprocessor_config.json` gets: the method's pre-processing
        (docs/method.md §7) at the model's input size, refusing images smaller than one patch."""
        return cls(image_size=config.image_size, min_image_size=config.patch_size, **kwargs)

    # ------------------------------------------------------------------ input conversion
    def to_pil(self, image: Any, what: str = "image") -> Image.Image:
        """Any accepted input → an RGB `PIL.Image` at its original size (see the class docstring)."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            array = image
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = np.moveaxis(array, 0, -1)  # (C, H, W) → (H, W, C)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
                raise ValueError(f"{what}: array of shape {array.shape} is not an image (H, W), (H, W, 3|4) or (3, H, W).")
            array = _wide_array_to_uint8(array, what)
            image = Image.fromarray(np.ascontiguousarray(array))
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"{what}: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}. "
                "Open files first, e.g. PIL.Image.open(path)."
            )
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block must not cost the image; orientation is then left as stored
            pass
        width, height = image.size
        if min(width, height) < self.min_image_size:
            raise ValueError(
                f"{what} is {width}x{height} px, smaller than the minimum side of {self.min_image_size} px "
                "(one ViT patch); it carries no usable detail — use the original, larger image."
            )
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            raise ValueError(
                f"{what} is {width}x{height} = {width * height:,} px, over the limit of {self.max_image_pixels:,} "
                "pixels; downscale it first (the model sees it at "
                f"{self.image_size}x{self.image_size} anyway)."
            )
        if image.mode in _WIDE_MODES:
            image = Image.fromarray(_wide_array_to_uint8(np.asarray(image), what))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def mask_to_array(self, mask: Any, image_size: tuple[int, int] | None = None, what: str = "mask") -> np.ndarray:
        """A mask → `(H, W)` uint8 in {0, 255} at its own size; checks it against its image's (W, H)."""
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        if isinstance(mask, np.ndarray):
            array = np.squeeze(mask)
            if array.ndim == 3:
                if array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
                    array = np.moveaxis(array, 0, -1)
                array = array.max(axis=-1)  # any channel set → defect
            if array.ndim != 2:
                raise ValueError(f"{what}: array of shape {mask.shape} is not a 2-D mask.")
            if not np.isfinite(array.astype(np.float64)).all():
                raise ValueError(f"{what} contains NaN or infinite values.")
            values = array
            size = (array.shape[1], array.shape[0])
        elif isinstance(mask, Image.Image):
            size = mask.size
            values = np.asarray(mask.convert("L") if mask.mode not in ("L", "1", "I;16", "I", "F") else mask)
        else:
            raise TypeError(f"{what}: expected a PIL image, numpy array or torch tensor, got {type(mask).__name__}.")
        if image_size is not None and tuple(size) != tuple(image_size):
            raise ValueError(
                f"{what} is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}; a mask must have "
                "its image's size (check that the mask belongs to this image)."
            )
        distinct = np.unique(values)
        if distinct.size > 2:
            warnings.warn(
                f"{what} has {distinct.size} distinct values (not a 0/255 mask); every pixel above 0 counts as "
                "defect, as in the reference.",
                stacklevel=3,
            )
        return (values > 0).astype(np.uint8) * 255

    # ------------------------------------------------------------------ docs/method.md §7 transforms
    def _image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        resized = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        pixels = pixels.float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return pixels.sub(mean).div(std)

    def _mask_to_tensor(self, mask_array: np.ndarray) -> torch.Tensor:
        # Reference target transform: bilinear PIL resize of the 0/255 mask, /255, binarise (docs/method.md §7).
        resized = Image.fromarray(mask_array, mode="L").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        values = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).float().div(255)
        return (values > self.mask_threshold).float()

    def __call__(
        self,
        images: Any,
        masks: Any | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Preprocess images (and optionally their masks).

        Args:
            images: one image or a list of images (see the class docstring for accepted types).
            masks: `None`, or one mask / `None` per image (`None` = normal image, all-zero mask).
            return_tensors: only `"pt"` (or `None`, which also gives tensors) is supported.

        Returns:
            `BatchFeature` with `pixel_values` `(B, 3, S, S)`, `original_sizes` `(B, 2)` as (height, width), and
            `masks` `(B, S, S)` in {0, 1} when masks are given.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'.")
        if images is None:
            raise ValueError("No images given: pass images=[PIL.Image, ...].")
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        if not image_list:
            raise ValueError("images is an empty list.")
        if masks is not None:
            mask_list = [masks] if (single or not isinstance(masks, (list, tuple))) else list(masks)
            if len(mask_list) != len(image_list):
                raise ValueError(f"Got {len(image_list)} images but {len(mask_list)} masks; give one mask (or None) per image.")
        pil_images = [self.to_pil(image, what=f"image {index}") for index, image in enumerate(image_list)]
        data = {
            "pixel_values": torch.stack([self._image_to_tensor(image) for image in pil_images]),  # (B, 3, S, S)
            "original_sizes": torch.tensor([[image.height, image.width] for image in pil_images]),  # (B, 2)
        }
        if masks is not None:
            mask_tensors = []
            for index, (mask, image) in enumerate(zip(mask_list, pil_images)):
                if mask is None:
                    mask_tensors.append(torch.zeros(self.image_size, self.image_size))
                else:
                    mask_array = self.mask_to_array(mask, image_size=image.size, what=f"mask {index}")
                    mask_tensors.append(self._mask_to_tensor(mask_array))
            data["masks"] = torch.stack(mask_tensors)  # (B, S, S)
        return BatchFeature(data=data, tensor_type=None)

    preprocess = __call__

    # ------------------------------------------------------------------ post-processing
    @staticmethod
    def _maps_of(outputs: Any) -> torch.Tensor:
        maps = getattr(outputs, "anomaly_map", outputs)
        if not isinstance(maps, torch.Tensor):
            maps = torch.as_tensor(np.asarray(maps))
        if maps.dim() == 2:
            maps = maps.unsqueeze(0)
        if maps.dim() != 3:
            raise ValueError(f"anomaly maps must be (B, S, S), got {tuple(maps.shape)}.")
        return maps.detach().float()

    def post_process_anomaly_maps(
        self, outputs: Any, target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Anomaly maps back to each image's own size.

        Args:
            outputs: a `ViP2CLIPOutput` (its `anomaly_map` is used) or a `(B, S, S)` tensor.
            target_sizes: one (height, width) per image, e.g. `[img.size[::-1] for img in images]` or the
                processor's `original_sizes`; `None` keeps S×S.
        Returns:
            a list of B float tensors `(height, width)`, bilinearly resized (align_corners=False).
        """
        maps = self._maps_of(outputs)
        if target_sizes is None:
            return list(maps.unbind(0))
        target_sizes = [tuple(int(v) for v in size) for size in (target_sizes.tolist() if isinstance(target_sizes, torch.Tensor) else target_sizes)]
        if len(target_sizes) != maps.shape[0]:
            raise ValueError(f"{maps.shape[0]} maps but {len(target_sizes)} target sizes.")
        resized = []
        for anomaly_map, (height, width) in zip(maps, target_sizes):
            resized.append(
                F.interpolate(anomaly_map[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
            )
        return resized

    def post_process_masks(
        self, outputs: Any, threshold: float = 0.5, target_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[torch.Tensor]:
        """Binary defect masks (`bool`, each image's size): map ≥ threshold."""
        return [anomaly_map >= threshold for anomaly_map in self.post_process_anomaly_maps(outputs, target_sizes)]

    def overlay(
        self,
        image: Any,
        anomaly_map: Any,
        alpha: float = 0.5,
        value_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> Image.Image:
        """Heat-map (jet) of `anomaly_map` blended over `image`, at the image's own size.

        `value_range` fixes the colour scale (default [0, 1], so a normal image stays cool); `None` stretches
        each map min–max (the authors' visualisation, which makes every image look anomalous somewhere).
        """
        # numpy only (no torch op): predict draws overlays in writer threads next to the running model.
        image = self.to_pil(image)
        values = resize_map_bilinear(self._maps_of(anomaly_map)[0].numpy(), image.height, image.width)
        if value_range is None:
            low, high = float(values.min()), float(values.max())
        else:
            low, high = value_range
        if high > low:
            levels = np.clip((values - np.float32(low)) * np.float32((_JET_LEVELS - 1) / (high - low)) + 0.5,
                             0, _JET_LEVELS - 1).astype(np.intp)
        else:
            levels = np.zeros(values.shape, dtype=np.intp)
        heat = _jet_table()[levels]  # (H, W, 3) float32
        blended = np.asarray(image, dtype=np.float32) * np.float32(1.0 - alpha) + heat * np.float32(alpha)
        return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")


# The former name: older code imports it, and folders saved before the rename name it in preprocessor_config.json
# (`auto_map["AutoProcessor"] = "processing_vip2clip.ViP2CLIPProcessor"`), which remote code resolves by attribute.
ViP2CLIPProcessor = ViP2CLIPImageProcessor

ViP2CLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
