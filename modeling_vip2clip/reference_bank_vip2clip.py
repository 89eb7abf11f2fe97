"""Few-shot mode: a memory of normal patches from k reference images (docs/few_shot.md).

`ViP2CLIPReferenceBank` holds the L2-normalised patch embeddings P̂_l (docs/method.md §2) of k normal reference
images at each feature layer, computed by the same frozen vision tower as the zero-shot path
(`ViP2CLIPModel.build_reference_bank`), with the geometry they are valid for. Scoring a patch is an exact
nearest-neighbour search by one chunked matmul per layer — WinCLIP's visual association score (Jeong et al.,
CVPR 2023, eq. 4), ½·(1 − max cos), averaged over the feature layers. At ViT-L/14 and 518 px a 4-shot bank costs
≈ 46 GFLOP per scored image, a few per cent of the tower's, so no approximate index is needed
(benchmarks/README.md, "Few-shot").

This file travels to the Hub with modeling_vip2clip.py (`trust_remote_code`): it imports only torch and, inside
`save` / `load` (the files the user names), safetensors.
"""

from __future__ import annotations

from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_fast_path_vip2clip import onednn_linear_available

__all__ = ["ViP2CLIPReferenceBank", "backbone_fingerprint"]

_FORMAT = "vip2clip-reference-bank-1"
# Entries per similarity block of the chunked search: a (rows, N) fp32 block of 16 MB stays cheap to reduce.
_BLOCK_ELEMENTS = 1 << 22
# Values taken from the start of every weight of the vision tower and the visual projection (see
# `backbone_fingerprint`), and how far two dtypes of the same weights may round them apart (bf16: 2⁻⁸).
_FINGERPRINT_VALUES = 8
_FINGERPRINT_RTOL, _FINGERPRINT_ATOL = 1e-2, 1e-4
# What `save` writes and `load` needs.
_METADATA_KEYS = ("image_size", "patch_size", "feature_layers", "num_images")
_TENSOR_NAMES = ("patch_embeds", "backbone_fingerprint")
_REBUILD = "rebuild it from normal images with model.build_reference_bank(pixel_values) and bank.save(path)"


def backbone_fingerprint(clip: nn.Module) -> torch.Tensor:
    """A cheap identity of a CLIP model's image side: the first few values of every vision-tower weight and of the
    visual projection, fp32 on the CPU `(n_values,)`. Two loads of the same weights in different dtypes agree to
    their rounding; different weights (another checkpoint, another position-table resize) do not."""
    tensors = [*clip.vision_model.parameters(), clip.visual_projection.weight]
    return torch.cat([t.detach().reshape(-1)[:_FINGERPRINT_VALUES].float() for t in tensors]).cpu()  # one copy


def _cosines_aten(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """`(rows, D)`, `(N, D)` → `(rows, N)` dot products by ATen's matmul (BLAS on CPU, cuBLAS on GPU)."""
    return queries @ references.T


def _cosines_onednn(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """The same fp32 products by oneDNN's GEMM on the CPU (another summation order, the same IEEE fp32 math):
    faster than ATen's BLAS where that runs narrower kernels (benchmarks/README.md, "Few-shot")."""
    return torch.ops.mkldnn._linear_pointwise(queries, references, None, "none", [], "")


def _geometry_of_model(model: nn.Module) -> dict:
    config = model.config
    return {
        "image_size": int(config.image_size),
        "patch_size": int(config.patch_size),
        "feature_layers": tuple(int(layer) for layer in config.feature_layers),
        "embed_dim": int(config.projection_dim),
    }


def _describe(geometry: dict) -> str:
    grid = geometry["image_size"] // geometry["patch_size"]
    return (
        f"image_size {geometry['image_size']} (patch {geometry['patch_size']}, {grid}x{grid} patches), "
        f"feature_layers {list(geometry['feature_layers'])}, embed dim {geometry['embed_dim']}"
    )


class ViP2CLIPReferenceBank:
    r"""The patch memory of k normal reference images, for `ViP2CLIPModel(..., reference_bank=bank)`.

    Build it with [`ViP2CLIPModel.build_reference_bank`]; keep it with `save(path)` / `load(path)` (safetensors).
    n feature layers, g = image_size / patch_size, L = g², N = k·L, D embed dim.

    Args:
        patch_embeds (`torch.Tensor` of shape `(n, N, D)`): the reference patches of each feature layer,
            L2-normalised in fp32 as `patch_scores` normalises its queries (`from_patch_embeds` does this).
        image_size, patch_size (`int`), feature_layers (sequence of `int`): the model geometry the patches come
            from; `embed_dim` is `patch_embeds.shape[-1]`.
        backbone_fingerprint (`torch.Tensor`): [`backbone_fingerprint`] of the model that computed them.
        num_images (`int`): k.
    """

    def __init__(
        self,
        patch_embeds: torch.Tensor,
        *,
        image_size: int,
        patch_size: int,
        feature_layers,
        backbone_fingerprint: torch.Tensor,
        num_images: int,
    ):
        feature_layers = tuple(int(layer) for layer in feature_layers)
        grid = image_size // patch_size
        if patch_embeds.dim() != 3 or patch_embeds.shape[0] != len(feature_layers):
            raise ValueError(
                f"patch_embeds must be (n_layers={len(feature_layers)}, N, D), got {tuple(patch_embeds.shape)}."
            )
        if patch_embeds.shape[1] != num_images * grid * grid:
            raise ValueError(
                f"patch_embeds hold {patch_embeds.shape[1]} patches per layer, expected {num_images} images x "
                f"{grid}x{grid} patches."
            )
        if not bool(torch.isfinite(patch_embeds).all()):
            raise ValueError("the bank's patch features hold NaN or infinite values (a damaged file or a bank built "
                             "from a model that produced them); rebuild it from normal images.")
        self.patch_embeds = patch_embeds.detach().float()  # (n, N, D)
        self.image_size, self.patch_size, self.feature_layers = int(image_size), int(patch_size), feature_layers
        self.backbone_fingerprint = backbone_fingerprint.detach().float().cpu()
        self.num_images = int(num_images)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_patch_embeds(cls, patch_embeds: torch.Tensor, model: nn.Module) -> "ViP2CLIPReferenceBank":
        """A bank from `model.encode_image`'s patch features of k images, `(k, n, L, D)`."""
        num_images, num_layers, num_patches, dim = patch_embeds.shape
        geometry = _geometry_of_model(model)
        per_layer = patch_embeds.transpose(0, 1).reshape(num_layers, num_images * num_patches, dim)  # (n, N, D)
        return cls(
            # the normalisation every query patch gets in `patch_scores`: an image of the bank meets itself at
            # cos = 1 up to fp32 rounding, whatever dtype the tower ran in
            F.normalize(per_layer.float(), dim=-1),
            image_size=geometry["image_size"],
            patch_size=geometry["patch_size"],
            feature_layers=geometry["feature_layers"],
            backbone_fingerprint=backbone_fingerprint(model.clip),
            num_images=num_images,
        )

    # ------------------------------------------------------------------ geometry
    @property
    def geometry(self) -> dict:
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "feature_layers": self.feature_layers,
            "embed_dim": int(self.patch_embeds.shape[-1]),
        }

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def nbytes(self) -> int:
        return self.patch_embeds.numel() * self.patch_embeds.element_size()

    def check_compatible(self, model: nn.Module) -> None:
        """Refuse a bank built for another geometry or another backbone, naming both."""
        expected = _geometry_of_model(model)
        if expected != self.geometry:
            raise ValueError(
                f"This reference bank was built for {_describe(self.geometry)}, but the model has "
                f"{_describe(expected)}; build the bank with this model: model.build_reference_bank(pixel_values)."
            )
        fingerprint = backbone_fingerprint(model.clip)
        if fingerprint.shape != self.backbone_fingerprint.shape or not torch.allclose(
            fingerprint, self.backbone_fingerprint, rtol=_FINGERPRINT_RTOL, atol=_FINGERPRINT_ATOL
        ):
            raise ValueError(
                f"This reference bank ({_describe(self.geometry)}) was built by another CLIP backbone than this "
                "model's (their vision weights differ); build the bank with this model: "
                "model.build_reference_bank(pixel_values)."
            )

    # ------------------------------------------------------------------ scoring
    def patch_scores(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """Few-shot score of every patch: `(B, n, L, D)` → `(B, L)` in [0, 1], exact.

        Per layer, ½·(1 − max_j cos(p, r_j)) over the bank's N patches of that layer (WinCLIP eq. 4), then the
        mean over the layers. The search is one matmul per block of query rows, a (rows, N) block at a time.
        """
        batch, num_layers, num_patches, dim = patch_embeds.shape
        if (num_layers, dim) != (len(self.feature_layers), self.patch_embeds.shape[-1]):
            raise ValueError(
                f"patch_embeds are (B, {num_layers}, L, {dim}) but the bank holds {len(self.feature_layers)} layers "
                f"of dimension {self.patch_embeds.shape[-1]}."
            )
        queries = F.normalize(patch_embeds.float(), dim=-1)  # (B, n, L, D)
        bank = self.patch_embeds.to(queries.device)  # (n, N, D)
        rows = max(1, _BLOCK_ELEMENTS // bank.shape[1])
        cosines = _cosines_onednn if queries.device.type == "cpu" and onednn_linear_available() else _cosines_aten
        best = queries.new_empty(num_layers, batch * num_patches)  # max cos per layer and query patch
        for layer in range(num_layers):
            flat = queries[:, layer].reshape(batch * num_patches, dim)  # (B·L, D)
            for start in range(0, flat.shape[0], rows):
                block = cosines(flat[start : start + rows], bank[layer])  # (rows, N)
                best[layer, start : start + rows] = block.amax(dim=-1)
        distances = ((1 - best) / 2).clamp_(0, 1)  # (n, B·L); rounding may push cos a hair above 1
        return distances.mean(dim=0).view(batch, num_patches)

    # ------------------------------------------------------------------ files
    def save(self, path: str | PathLike) -> None:
        """Write the bank as one safetensors file (the patches in fp32, the geometry in its metadata)."""
        from safetensors.torch import save_file

        metadata = {
            "format": "pt",
            "vip2clip": _FORMAT,
            "image_size": str(self.image_size),
            "patch_size": str(self.patch_size),
            "feature_layers": ",".join(str(layer) for layer in self.feature_layers),
            "num_images": str(self.num_images),
        }
        tensors = {
            "patch_embeds": self.patch_embeds.cpu().contiguous(),
            "backbone_fingerprint": self.backbone_fingerprint.contiguous(),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | PathLike, model: nn.Module | None = None) -> "ViP2CLIPReferenceBank":
        """Read a bank written by `save`; with `model`, refuse it right away unless it fits that model
        (`check_compatible`; `model(..., reference_bank=bank)` checks again in any case)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("vip2clip") != _FORMAT:
                raise ValueError(f"{path} is not a ViP²-CLIP reference bank (written by ViP2CLIPReferenceBank.save).")
            names = set(handle.keys())
            # A hand-made or edited file: name what is missing rather than fail on a bare KeyError.
            missing = [f"metadata key {key!r}" for key in _METADATA_KEYS if key not in metadata]
            missing += [f"tensor {name!r}" for name in _TENSOR_NAMES if name not in names]
            if missing:
                raise ValueError(f"{path}: not a complete reference bank, it lacks the {', '.join(missing)} that "
                                 f"ViP2CLIPReferenceBank.save writes; {_REBUILD}")
            tensors = {name: handle.get_tensor(name) for name in _TENSOR_NAMES}
        try:
            geometry = {key: int(metadata[key]) for key in ("image_size", "patch_size", "num_images")}
            geometry["feature_layers"] = [int(layer) for layer in metadata["feature_layers"].split(",")]
        except ValueError:
            shown = {key: metadata[key] for key in _METADATA_KEYS}
            raise ValueError(f"{path}: the reference bank's metadata {shown} holds a value that is not an integer "
                             f"(feature_layers: integers separated by commas); {_REBUILD}") from None
        bank = cls(
            tensors["patch_embeds"],
            image_size=geometry["image_size"],
            patch_size=geometry["patch_size"],
            feature_layers=geometry["feature_layers"],
            backbone_fingerprint=tensors["backbone_fingerprint"],
            num_images=geometry["num_images"],
        )
        if model is not None:
            bank.check_compatible(model)
        return bank

    def to(self, device: torch.device | str) -> "ViP2CLIPReferenceBank":
        """The bank with its patches on `device` (in place; returns self)."""
        self.patch_embeds = self.patch_embeds.to(device)
        return self

    def __repr__(self) -> str:
        return f"ViP2CLIPReferenceBank({self.num_images} images, {_describe(self.geometry)})"
