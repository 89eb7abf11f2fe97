"""Configuration of ViP²-CLIP (docs/method.md §2–§8).

This file travels to the Hub with the model (``trust_remote_code``): it imports only
torch-free transformers pieces and nothing from the rest of the package.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["ViP2CLIPConfig"]

# The paper's backbone (`openai/clip-vit-large-patch14-336`) at the paper's input size 518 (docs/method.md §2):
# `ViP2CLIPConfig()` alone gives the real geometry, e.g. for benchmarks with random weights.
_VIT_L14_AT_518 = {
    "projection_dim": 768,
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "image_size": 518,
        "projection_dim": 768,
    },
}


# Upper bounds far above any CLIP backbone (ViT-bigG: hidden 1664, 48 layers; inputs of a few thousand pixels).
_SIZE_LIMITS = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 256,
                "num_attention_heads": 512, "image_size": 8192, "patch_size": 1024, "max_position_embeddings": 65536,
                "vocab_size": 1048576, "projection_dim": 16384}

# The scalar fields by the JSON type they must have (`None` allowed where the field is optional): a hand-edited
# `"top_k": "fifty"` is named here, not met later as "'<' not supported between 'str' and 'int'".
_FIELD_TYPES = {
    "a whole number": ("n_ctx", "n_cls", "adapter_hidden_size", "fgp_num_heads", "top_k", "prompt_start_token_id",
                       "prompt_end_token_id", "normal_state_token_id", "abnormal_state_token_id"),
    "a number": ("temperature", "blur_sigma", "blur_truncate", "init_std", "focal_gamma", "loss_smooth",
                 "dice_smooth", "mask_threshold", "image_threshold", "pixel_threshold"),
    "a string": ("normal_state_word", "abnormal_state_word"),
    "true or false": ("official_compat",),
}


def _has_type(value: object, kind: str) -> bool:
    if kind == "true or false" or isinstance(value, bool):  # JSON's true is also a Python int: keep them apart
        return isinstance(value, bool) and kind == "true or false"
    return isinstance(value, {"a whole number": int, "a number": (int, float), "a string": str}[kind])


def _check_field_types(config: "ViP2CLIPConfig") -> None:
    for kind, names in _FIELD_TYPES.items():
        for name in names:
            value = getattr(config, name)
            if value is not None and not _has_type(value, kind):
                raise ValueError(f"{name}={value!r} is not {kind}.")


@strict
class ViP2CLIPConfig(PretrainedConfig):
    r"""Configuration of [`ViP2CLIPModel`]: a frozen CLIP plus the ViP-Prompt heads (ICA, FGP) and UTPA scoring.

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The frozen backbone's configuration, by default CLIP ViT-L/14 at 518 px (the paper's). Its `vision_config.image_size` is the model's input size S
            (the position table is resized to it once, by `ViP2CLIPModel.from_clip`).
        feature_layers (`list[int]`, defaults to `[6, 12, 18, 24]`):
            1-based vision blocks whose residual stream feeds the patch features (docs/method.md §2).
        n_ctx (`int`, defaults to 7): learnable context tokens per state prompt (docs/method.md §3, train.sh).
        n_cls (`int`, defaults to 3): image-conditioned class tokens (docs/method.md §3).
        adapter_hidden_size (`int`, defaults to 384): hidden width of each ICA MLP f_j.
        fgp_num_heads (`int`, defaults to 8): heads of the FGP cross-attention (docs/method.md §4).
        temperature (`float`, defaults to 0.07): softmax temperature of UTPA (docs/method.md §5).
        top_k (`int`, defaults to 50): patches per layer used for the image score (docs/method.md §5).
        blur_sigma (`float`, defaults to 8.0): σ of the Gaussian blur of the anomaly map, 0 disables it.
        blur_truncate (`float`, defaults to 4.0): kernel radius in σ (scipy's `truncate`).
        normal_state_word / abnormal_state_word (`str`): the state words w⁺ / w⁻ (single BPE tokens).
        prompt_start_token_id / prompt_end_token_id (`int`, defaults to 49406 / 49407): the CLIP tokenizer's
            start- and end-of-text ids ([SOS], [EOS]); `from_clip` reads them from the tokenizer (some CLIP
            configs carry legacy values).
        normal_state_token_id / abnormal_state_token_id (`int`, *optional*):
            their token ids, fixed by `from_clip` from the checkpoint's tokenizer so no tokenizer is needed at
            inference.
        official_compat (`bool`, defaults to `True`):
            reproduce the reference implementation's quirks (docs/method.md §8), on which the published checkpoints and
            numbers depend: (1) the global feature skips the vision post-LayerNorm, (2) the normal prompt carries
            the abnormal word's embedding, (3) position embeddings are resized bilinearly (not bicubically).
            Set to `False` for the paper's description.
        init_std (`float`, defaults to 0.02): std of the normal init of the learnable prompt tensors (docs/method.md §3).
        focal_gamma (`float`, defaults to 2.0), loss_smooth (`float`, defaults to 1e-5),
        dice_smooth (`float`, defaults to 1.0): constants of the training losses (docs/method.md §6).
        mask_threshold (`float`, defaults to 0.5): masks are binarised at this value (docs/method.md §6–7).
        image_threshold (`float`, *optional*): image score at or above which an image is called anomalous, as
            calibrated by `vip2clip calibrate` (the F1-max threshold on a labelled set); `None` (default) means
            uncalibrated, and `vip2clip predict` / the pipeline then use 0.5. In [0, 1].
        pixel_threshold (`float`, *optional*): anomaly-map value at or above which a pixel is called defective
            (the F1-max threshold of the pixel maps on the calibration set); `None` (default): 0.5. In [0, 1].
        calibration (`dict`, *optional*): where the thresholds came from (dataset, split, categories, image and
            mask counts, the F1 reached), written by `vip2clip calibrate`. Zero-shot means no *training* on the
            target; calibrating the thresholds on a few labelled target images is the user's explicit choice.
    """

    model_type = "vip2clip"
    sub_configs_defaults = {"clip_config": SubConfigSpec(config_class=CLIPConfig, init_kwargs=_VIT_L14_AT_518)}

    clip_config: dict | CLIPConfig | None = None
    feature_layers: list[int] | None = None
    n_ctx: int = 7
    n_cls: int = 3
    adapter_hidden_size: int = 384
    fgp_num_heads: int = 8
    temperature: float = 0.07
    top_k: int = 50
    blur_sigma: float = 8.0
    blur_truncate: float = 4.0
    normal_state_word: str = "good"
    abnormal_state_word: str = "damaged"
    prompt_start_token_id: int = 49406
    prompt_end_token_id: int = 49407
    normal_state_token_id: int | None = None
    abnormal_state_token_id: int | None = None
    official_compat: bool = True
    init_std: float = 0.02
    focal_gamma: float = 2.0
    loss_smooth: float = 1e-5
    dice_smooth: float = 1.0
    mask_threshold: float = 0.5
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    calibration: dict | None = None

    def __post_init__(self, **kwargs):
        if self.feature_layers is None:
            self.feature_layers = [6, 12, 18, 24]
        if not isinstance(self.feature_layers, (list, tuple)) or not all(
                isinstance(layer, int) and not isinstance(layer, bool) for layer in self.feature_layers):
            raise ValueError(f"feature_layers={self.feature_layers!r} is not a list of 1-based vision blocks, e.g. "
                             "[6, 12, 18, 24].")
        # JSON reloads lists; keep one type so save/load round trips compare equal.
        self.feature_layers = [int(layer) for layer in self.feature_layers]
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ derived geometry
    @property
    def image_size(self) -> int:
        """Input side S (docs/method.md notation)."""
        return int(self.clip_config.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.clip_config.vision_config.patch_size)

    @property
    def grid_size(self) -> int:
        """g = S / patch."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """L = g²."""
        return self.grid_size**2

    @property
    def projection_dim(self) -> int:
        """D, the joint embedding width."""
        return int(self.clip_config.projection_dim)

    @property
    def text_hidden_size(self) -> int:
        """Dt, the text transformer width."""
        return int(self.clip_config.text_config.hidden_size)

    @property
    def prompt_length(self) -> int:
        """[SOS] + n_ctx + state word + n_cls + [EOS]: the prompt cut right after EOS (docs/method.md §3)."""
        return self.n_ctx + self.n_cls + 3

    # ------------------------------------------------------------------ decision thresholds
    DEFAULT_THRESHOLD = 0.5

    def resolve_threshold(self, kind: str, option: float | None = None) -> tuple[float, str]:
        """The one threshold rule of every command, the pipeline and the demo: `(value, where it came from)`.

        `kind` is "image" (score at or above which an image is anomalous) or "pixel" (map value at or above which a
        pixel is defective). The value is `option` when given ("option"), else the model's calibrated
        `image_threshold` / `pixel_threshold` from `vip2clip calibrate` ("calibrated"), else 0.5 ("default").
        """
        if kind not in ("image", "pixel"):
            raise ValueError(f"kind must be 'image' or 'pixel', got {kind!r}.")
        if option is not None:
            return float(option), "option"
        calibrated = getattr(self, f"{kind}_threshold", None)
        if calibrated is not None:
            return float(calibrated), "calibrated"
        return self.DEFAULT_THRESHOLD, "default"

    # ------------------------------------------------------------------ validation
    def validate_architecture(self):
        """Called by transformers' strict dataclass machinery at construction and on every change."""
        super().validate_architecture()
        _check_field_types(self)
        vision = self.clip_config.vision_config
        text = self.clip_config.text_config
        depth = int(vision.num_hidden_layers)
        if not self.feature_layers:
            raise ValueError("feature_layers is empty: give at least one 1-based vision block, e.g. [6, 12, 18, 24].")
        bad = [layer for layer in self.feature_layers if not 1 <= layer <= depth]
        if bad:
            raise ValueError(
                f"feature_layers {bad} exceed the backbone depth: the vision tower has {depth} blocks, so layers "
                f"must lie in 1..{depth} (e.g. {[round(depth * q / 4) for q in (1, 2, 3, 4)]})."
            )
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} repeats a layer; list each block once.")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}; "
                f"use e.g. {self.grid_size * self.patch_size} or {(self.grid_size + 1) * self.patch_size}."
            )
        for name in ("n_ctx", "n_cls", "adapter_hidden_size", "fgp_num_heads", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.top_k > self.num_patches:
            raise ValueError(
                f"top_k={self.top_k} is larger than the {self.num_patches} patches of a {self.image_size}px input "
                f"with patch {self.patch_size}; lower top_k or raise image_size."
            )
        if self.projection_dim % self.fgp_num_heads != 0:
            raise ValueError(
                f"The projection dim {self.projection_dim} is not divisible by fgp_num_heads={self.fgp_num_heads}."
            )
        if self.prompt_length > int(text.max_position_embeddings):
            raise ValueError(
                f"The prompt needs {self.prompt_length} positions (n_ctx + n_cls + 3) but the text encoder has "
                f"{text.max_position_embeddings}; lower n_ctx or n_cls."
            )
        # Finite floats and sane sizes, checked before any tensor is allocated: a hand-edited `NaN` would only
        # fail at the first forward, a hidden_size of 10**7 would allocate gigabytes before the weights are read.
        for name in ("temperature", "blur_sigma", "blur_truncate", "init_std", "focal_gamma", "loss_smooth",
                     "dice_smooth", "mask_threshold"):  # the two thresholds: their [0, 1] check below
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value != value or value in (
                    float("inf"), float("-inf"))):
                raise ValueError(f"{name}={value!r} is not a finite number.")
        for tower, sub in (("vision_config", vision), ("text_config", text)):
            for name, limit in _SIZE_LIMITS.items():
                value = getattr(sub, name, None)
                if value is not None and (not isinstance(value, int) or not 1 <= value <= limit):
                    raise ValueError(f"clip_config.{tower}.{name}={value!r} is outside 1..{limit}; the config is "
                                     "damaged or not a CLIP backbone's.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.blur_sigma < 0 or self.blur_truncate <= 0:
            raise ValueError("blur_sigma must be >= 0 (0 disables the blur) and blur_truncate > 0.")
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is outside [0, 1]; scores and anomaly maps lie in [0, 1] "
                                 "(recalibrate with `vip2clip calibrate`, or set it to None).")
        for name in ("prompt_start_token_id", "prompt_end_token_id", "normal_state_token_id", "abnormal_state_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < int(text.vocab_size):
                raise ValueError(f"{name}={token_id} is outside the text vocabulary (0..{int(text.vocab_size) - 1}).")


ViP2CLIPConfig.register_for_auto_class()
