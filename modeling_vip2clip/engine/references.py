"""The few-shot protocol around `ViP2CLIPReferenceBank` (docs/few_shot.md): which normal images become the
references, and the banks built from them.

* `draw_references(dataset, k, seed)`: per category, K normal images drawn with `seed` (numpy's
  `default_rng(seed).choice` without replacement over the category's normal rows in dataset order), so a
  results.json's seeds reproduce its references.
* `build_category_banks(model, processor, dataset, drawn)`: one bank per category.
* `load_reference_bank(model, processor, source)`: `--references` of predict / the demo: a saved bank
  (`.safetensors`), a folder of images or a glob.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError, explain

logger = logging.getLogger("modeling_vip2clip.engine.references")

__all__ = ["draw_references", "build_category_banks", "bank_from_images", "load_reference_bank"]


def draw_references(dataset, k: int, seed: int, split_name: str = "train") -> dict[str, list[int]]:
    """`{category: [row, ...]}`: K normal rows per category of `dataset` (the reference split), drawn with `seed`.

    A category with fewer than K normal images is refused, naming it and its count.
    """
    labels = np.asarray(dataset["label"])
    categories = np.asarray(dataset["category"])
    drawn: dict[str, list[int]] = {}
    rng = np.random.default_rng(seed)
    for category in sorted(set(categories.tolist())):
        normal = np.flatnonzero((categories == category) & (labels == 0))
        if len(normal) < k:
            raise UsageError(f"--k-shot {k}: category {category!r} has only {len(normal)} normal image(s) in the "
                             f"reference split {split_name!r}; lower --k-shot or pick another --reference-split.")
        drawn[category] = sorted(int(row) for row in rng.choice(normal, size=k, replace=False))
    return drawn


def bank_from_images(model, processor, images: list, batch_size: int = 8):
    """A `ViP2CLIPReferenceBank` of these PIL images, preprocessed by `processor`."""
    import torch

    if not hasattr(model, "build_reference_bank"):
        raise UsageError("few-shot references need a PyTorch model folder (an exported ONNX / OpenVINO model has no "
                         "reference bank); pass the model folder the export was made from.")

    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.build_reference_bank(pixel_values.to(device), batch_size=batch_size)


def build_category_banks(model, processor, dataset, drawn: dict[str, list[int]], batch_size: int = 8) -> dict[str, Any]:
    """One bank per category from the drawn rows of `dataset`."""
    from ..data.images import read_image

    banks = {}
    for category, rows in drawn.items():
        images = [processor.to_pil(read_image(dataset[row]["image"], what=str(dataset[row]["image_path"])),
                                   what=str(dataset[row]["image_path"])) for row in rows]
        banks[category] = bank_from_images(model, processor, images, batch_size=batch_size)
    return banks


def load_reference_bank(model, processor, source: str, batch_size: int = 8):
    """`--references SOURCE`: a bank saved with `bank.save(...)` (`.safetensors`, checked against the model), or
    the normal images of a folder / glob. Unreadable images are reported and skipped; none left is an error."""
    from ..reference_bank_vip2clip import ViP2CLIPReferenceBank

    if str(source).endswith(".safetensors"):
        if not Path(source).is_file():
            raise UsageError(f"--references {source}: no such file; pass a saved bank, a folder or a glob of normal "
                             "images.")
        try:
            return ViP2CLIPReferenceBank.load(source, model=model)
        except ValueError as error:  # the bank's own sentence; it may name the file itself
            raise UsageError(f"--references {source}: {str(error).removeprefix(f'{source}: ')}") from None
        except Exception as error:  # noqa: BLE001 - a truncated / foreign file is one line naming it
            known = explain(error, path=source, what="--references: cannot read the bank")
            if known is None:
                raise
            raise known from None
    from ..data.images import collect_inputs, read_image

    files = [path for path, _ in collect_inputs([str(Path(source).expanduser())])[0]]
    if not files:
        raise UsageError(f"--references {source}: no image files there; pass a folder or a glob of normal "
                         "reference images, or a saved .safetensors bank.")
    images = []
    for file in files:
        try:
            images.append(processor.to_pil(read_image(file), what=str(file)))
        except Exception as error:  # noqa: BLE001 - reported, then skipped
            logger.warning("reference image %s skipped: %s", file, error)
    if not images:
        raise UsageError(f"--references {source}: none of its {len(files)} file(s) is a readable image.")
    logger.info("reference bank: %d normal image(s) from %s", len(images), source)
    return bank_from_images(model, processor, images, batch_size=batch_size)
