"""Tiny, randomly initialised CLIP and ViP²-CLIP checkpoints built on the fly (no network, no download), for the
tests, the benchmarks' smoke runs and anyone trying the package without the real weights (as transformers'
`testing_utils`; not a Hub file).

`save_tiny_clip(dir)` writes a complete transformers CLIP folder — weights, config, a real byte-level BPE
`CLIPTokenizer` whose vocabulary holds the state words as single tokens, and a CLIP image processor — at a
*native* resolution of 24 px (patch 8), so that building a 32 px ViP²-CLIP from it really resizes the position
table, as `openai/clip-vit-large-patch14-336` → 518 px does. `save_tiny_vip2clip(dir)` writes a ready model
folder (what `--model DIR` takes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

__all__ = [
    "tiny_clip_config", "tiny_tokenizer", "save_tiny_clip", "tiny_vip2clip_config", "tiny_vip2clip_model",
    "save_tiny_vip2clip",
    "authors_loop_aupro",
]

NATIVE_IMAGE_SIZE = 24
PATCH = 8


def _bytes_to_unicode() -> list[str]:
    # GPT-2 / CLIP byte-level alphabet (the standard published table).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


_MERGES = [
    ("d", "a"), ("da", "m"), ("dam", "a"), ("dama", "g"), ("damag", "e"), ("damage", "d</w>"),
    ("g", "o"), ("go", "o"), ("goo", "d</w>"),
    ("f", "l"), ("fl", "a"), ("fla", "w</w>"),
]


def tiny_tokenizer() -> CLIPTokenizer:
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last two ids, as in CLIP (49406, 49407)
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES))


def tiny_clip_config(vocab_size: int, bos: int, eos: int) -> CLIPConfig:
    return CLIPConfig(
        projection_dim=32,
        text_config=dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=NATIVE_IMAGE_SIZE, patch_size=PATCH,
        ),
    )


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP checkpoint folder (model, tokenizer, image processor) and return its path."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    config = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # Random init leaves the position table tiny; make it O(1) so resizing it matters numerically.
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": NATIVE_IMAGE_SIZE}, crop_size=NATIVE_IMAGE_SIZE).save_pretrained(directory)
    return directory


def tiny_vip2clip_config(**overrides):
    """A ViP2CLIPConfig at test scale (hidden 32, 2 layers, image 32, patch 8) without any checkpoint."""
    from . import ViP2CLIPConfig

    tokenizer = tiny_tokenizer()
    clip = tiny_clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).to_dict()
    clip["vision_config"]["image_size"] = 32
    kwargs = dict(
        clip_config=clip, feature_layers=[1, 2], n_ctx=3, n_cls=2, adapter_hidden_size=16, top_k=5,
        blur_sigma=2.0, prompt_start_token_id=tokenizer.bos_token_id, prompt_end_token_id=tokenizer.eos_token_id,
        normal_state_token_id=tokenizer.convert_tokens_to_ids("good</w>"),
        abnormal_state_token_id=tokenizer.convert_tokens_to_ids("damaged</w>"),
    )
    kwargs.update(overrides)
    return ViP2CLIPConfig(**kwargs)


def tiny_vip2clip_model(seed: int = 0):
    """`(model, processor)`: a tiny ViP²-CLIP (`tiny_vip2clip_config`, 32 px) initialised at random from `seed`, in
    memory, with its processor — also what the demo serves, labelled, when no trained weights can be had."""
    from . import ViP2CLIPModel, ViP2CLIPImageProcessor

    torch.manual_seed(seed)
    model = ViP2CLIPModel(tiny_vip2clip_config()).eval()
    return model, ViP2CLIPImageProcessor(image_size=32, min_image_size=8)


def save_tiny_vip2clip(directory: str | Path) -> Path:
    """A tiny random ViP²-CLIP (`tiny_vip2clip_model`) with heads drawn at N(0, 0.5²) — larger than their init,
    so every head parameter visibly moves the outputs — saved with its processor (what `--model DIR` gets)."""
    model, processor = tiny_vip2clip_model(seed=0)
    with torch.no_grad():
        for parameter in list(model.ica.parameters()) + list(model.fgp.parameters()):
            parameter.normal_(0, 0.5)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


def authors_loop_aupro(masks, maps, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """AUPRO the way the authors' evaluation computes it, loop for loop (docs/method.md §7): for each of the
    `max_step` thresholds `np.arange(min, max, (max - min) / max_step)`, threshold the whole stack (`map > t`),
    re-label every mask (8-connectivity) and loop over its regions in Python; keep the thresholds with
    FPR < `expect_fpr`, rescale those FPRs min–max to [0, 1], trapezoid.

    Slow on purpose: the independent oracle for `metrics.aupro_reference` and the baseline that
    `benchmarks/bench_aupro.py` times. `masks` and `maps` are `(N, H, W)` arrays; masks are binarised at 0.5.
    """
    import numpy as np
    from scipy import ndimage
    from sklearn.metrics import auc

    masks = np.asarray(masks) > 0.5
    maps = np.asarray(maps)
    lo, hi = maps.min(), maps.max()
    inverse = ~masks
    n_neg = inverse.sum()
    pros, fprs = [], []
    for threshold in np.arange(lo, hi, (hi - lo) / max_step):
        binary = maps > threshold
        overlaps = []
        for predicted, mask in zip(binary, masks):
            labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))  # re-labelled at each threshold, as theirs
            for region, box in enumerate(ndimage.find_objects(labels), start=1):
                rows, cols = np.nonzero(labels[box] == region)  # bounding-box-local coordinates
                overlaps.append(predicted[rows + box[0].start, cols + box[1].start].sum() / rows.size)
        fprs.append(np.logical_and(inverse, binary).sum() / n_neg)
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < expect_fpr
    kept = fprs[keep]
    kept = (kept - kept.min()) / (kept.max() - kept.min())
    return float(auc(kept, pros[keep]))


def main(argv=None) -> int:
    """`python -m modeling_vip2clip.testing_utils DIR`: write a tiny random ViP²-CLIP model folder (32 px; its
    scores are meaningless) to try every command offline in seconds (README: "Try the whole CLI offline")."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modeling_vip2clip.testing_utils", description=main.__doc__)
    parser.add_argument("out", metavar="DIR", help="folder to write the tiny model to (created).")
    args = parser.parse_args(argv)
    print(f"wrote a tiny random ViP2-CLIP model (meaningless scores) to {save_tiny_vip2clip(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
