"""Model card (README.md with Hub YAML metadata) for a ViP²-CLIP model a user publishes under their own namespace
(`hub/publish.py`): weights they trained with this package, or converted from the authors' release.

Built with `huggingface_hub.ModelCard` / `ModelCardData` / `EvalResult`, so the metadata block (including the
`model-index` generated from an evaluation JSON) is the Hub's own serialisation.

Evaluation JSON (written by the project's evaluation command)::

    {"dataset": "visa",
     "per_category": {"candle": {"image_auroc": 0.91, "image_ap": ..., "image_f1_max": ..., "pixel_auroc": ...,
                                 "pixel_aupro": ..., "pixel_f1_max": ..., "pixel_ap": ...}, ...},
     "mean": {...same keys...}}

Values are fractions in [0, 1]; the card and the model-index report them in percent (as the paper does).
A key may be missing or null (e.g. image-only medical sets); it is then left out.
"""

from __future__ import annotations

import json
import math
from os import PathLike
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = [
    "DEFAULT_REPO_ID",
    "BASE_MODEL",
    "TAGS",
    "METRICS",
    "TRAIN_DATASETS",
    "PIPELINE_TAG",
    "load_eval_results",
    "eval_results_for_model_index",
    "build_model_card",
]

DEFAULT_REPO_ID = "vip2clip/vip2clip-vit-l14-336-mvtec"
BASE_MODEL = "openai/clip-vit-large-patch14-336"
# The Hub has no "anomaly-detection" pipeline tag (its validator only accepts its own task list).
# The model's main output is a per-pixel map, so "image-segmentation" is the closest valid tag.
PIPELINE_TAG = "image-segmentation"
TAGS = ["anomaly-detection", "zero-shot", "clip", "vip2clip", "industrial-inspection", "medical-imaging"]
ARXIV_ID = "2505.17692"
PAPER_TITLE = "ViP²-CLIP: Visual-Perception Prompting with Unified Alignment for Zero-Shot Anomaly Detection"

# metric key → (level, model-index metric type, readable name)
METRICS: dict[str, tuple[str, str, str]] = {
    "image_auroc": ("image", "roc_auc", "Image AUROC"),
    "image_ap": ("image", "average_precision", "Image AP"),
    "image_f1_max": ("image", "f1_max", "Image F1-max"),
    "pixel_auroc": ("pixel", "roc_auc", "Pixel AUROC"),
    "pixel_aupro": ("pixel", "aupro", "Pixel AUPRO@0.3"),
    "pixel_f1_max": ("pixel", "f1_max", "Pixel F1-max"),
    "pixel_ap": ("pixel", "average_precision", "Pixel AP"),
}
# image-level metrics are a binary image classification, pixel-level ones a (binary) segmentation
_TASKS = {
    "image": ("image-classification", "Zero-shot anomaly detection (image level)"),
    "pixel": ("image-segmentation", "Zero-shot anomaly segmentation (pixel level)"),
}

# training dataset → (Hub `datasets` entry, readable name, licence of the checkpoint, held-out evaluation set)
TRAIN_DATASETS: dict[str, dict[str, str]] = {
    "mvtec": {
        "id": "mvtec-ad",
        "name": "MVTec AD",
        "license": "cc-by-nc-sa-4.0",
        "dataset_license": "CC BY-NC-SA 4.0",
        "held_out": "VisA",
        "url": "https://www.mvtec.com/company/research/datasets/mvtec-ad",
    },
    "visa": {
        "id": "visa",
        "name": "VisA",
        "license": "cc-by-4.0",
        "dataset_license": "CC BY 4.0",
        "held_out": "MVTec AD",
        "url": "https://github.com/amazon-science/spot-diff",
    },
}
_DATASET_NAMES = {
    "mvtec": "MVTec AD", "mvtec-ad": "MVTec AD", "mvtec_ad": "MVTec AD", "visa": "VisA", "mpdd": "MPDD",
    "btad": "BTAD", "ksdd": "KSDD", "ksdd2": "KSDD2", "dagm": "DAGM", "dtd": "DTD-Synthetic",
    "dtd-synthetic": "DTD-Synthetic", "headct": "HeadCT", "brainmri": "BrainMRI", "br35h": "Br35H", "isic": "ISIC",
    "cvc-colondb": "CVC-ColonDB", "cvc-clinicdb": "CVC-ClinicDB", "kvasir": "Kvasir", "endo": "Endo",
}

CITATION = f"""@article{{yang2025vip2clip,
  title   = {{{{ViP$^2$-CLIP}}: Visual-Perception Prompting with Unified Alignment for Zero-Shot Anomaly Detection}},
  author  = {{Yang, Ziteng and Xu, Jingzehua and Li, Yanshu and Li, Zepeng and Wang, Yeqiang and Li, Xinghui}},
  journal = {{arXiv preprint arXiv:{ARXIV_ID}}},
  year    = {{2025}},
  eprint  = {{{ARXIV_ID}}},
  archivePrefix = {{arXiv}}
}}"""


# ---------------------------------------------------------------------------------------------- evaluation JSON
def load_eval_results(source: str | PathLike | dict) -> dict[str, Any]:
    """Read and check an evaluation JSON (path or already-parsed dict); raises `ValueError` with the reason."""
    if isinstance(source, dict):
        data = source
        where = "evaluation results"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"Evaluation JSON {where} does not exist.") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"Evaluation JSON {where} is not valid JSON: {error}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with 'dataset', 'per_category' and 'mean'.")
    dataset = data.get("dataset")
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"{where}: 'dataset' must be the evaluated dataset's name, e.g. \"visa\".")
    mean = data.get("mean")
    per_category = data.get("per_category", {})
    if not isinstance(mean, dict) or not isinstance(per_category, dict):
        raise ValueError(f"{where}: 'mean' and 'per_category' must be objects of metric → value.")

    def check(block: dict, label: str) -> dict[str, float]:
        clean = {}
        for key, value in block.items():
            if key not in METRICS:
                raise ValueError(f"{where}: unknown metric {key!r} in {label}; expected some of {sorted(METRICS)}.")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}: {label}.{key} = {value!r} is not a finite number.")
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{where}: {label}.{key} = {value} is outside [0, 1]; give fractions, not percentages."
                )
            clean[key] = float(value)
        return clean

    mean = check(mean, "mean")
    if not mean:
        raise ValueError(f"{where}: 'mean' holds no metric.")
    per_category = {str(cat): check(values or {}, f"per_category.{cat}") for cat, values in per_category.items()}
    return {"dataset": dataset.strip(), "mean": mean, "per_category": per_category}


def _dataset_name(dataset: str) -> str:
    return _DATASET_NAMES.get(dataset.lower(), dataset)


def _percent(value: float) -> float:
    return round(100.0 * value, 2)


def eval_results_for_model_index(results: dict[str, Any]) -> list[EvalResult]:
    """The mean metrics as `EvalResult`s (percent), one model-index task per level (image / pixel)."""
    dataset = results["dataset"]
    out = []
    for key, value in results["mean"].items():
        level, metric_type, metric_name = METRICS[key]
        task_type, task_name = _TASKS[level]
        out.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=dataset.lower(),
                dataset_name=_dataset_name(dataset),
                dataset_split="test",
                metric_type=metric_type,
                metric_name=f"{metric_name} (%)",
                metric_value=_percent(value),
                verified=False,
            )
        )
    return out


def _results_table(results: dict[str, Any]) -> str:
    keys = [key for key in METRICS if key in results["mean"] or any(key in row for row in results["per_category"].values())]
    header = "| category | " + " | ".join(METRICS[key][2] for key in keys) + " |"
    rule = "| --- |" + " ---: |" * len(keys)
    rows = []
    for category, values in sorted(results["per_category"].items()):
        rows.append(f"| {category} | " + " | ".join(f"{_percent(values[k]):.1f}" if k in values else "–" for k in keys) + " |")
    rows.append("| **mean** | " + " | ".join(f"**{_percent(results['mean'][k]):.1f}**" if k in results["mean"] else "–" for k in keys) + " |")
    return "\n".join([header, rule, *rows])


# ---------------------------------------------------------------------------------------------- the card
def _usage(repo_id: str) -> str:
    return f'''```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo_id = "{repo_id}"
model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)

image = Image.open("image.png")
inputs = processor(images=[image])
with torch.inference_mode():
    outputs = model(pixel_values=inputs["pixel_values"])

score = outputs.anomaly_score[0].item()  # image anomaly score in [0, 1]
anomaly_map = processor.post_process_anomaly_maps(outputs, target_sizes=inputs["original_sizes"])[0]  # (H, W)
mask = processor.post_process_masks(outputs, threshold=0.5, target_sizes=inputs["original_sizes"])[0]  # bool (H, W)
heatmap = processor.overlay(image, anomaly_map)  # PIL image: the map over the photo
print(f"anomaly score {{score:.3f}}, defect pixels {{int(mask.sum())}}")
```'''


def _origin_section(authors_release: str | None, train_dataset: str) -> str:
    if authors_release is None:
        return (
            "Trained by the owner of this repository with the `vip2clip` package (`vip2clip train`); this is not a "
            "release of the paper's authors. The authors' own weights are not on the Hub: `vip2clip download-authors "
            "mvtec` (or `visa`) fetches them from their repository."
        )
    from modeling_vip2clip.weights.authors_release import AUTHORS_COMMIT, AUTHORS_REPOSITORY, RELEASES

    if authors_release not in RELEASES:
        raise ValueError(f"authors_release must be one of {sorted(RELEASES)} or None, got {authors_release!r}.")
    release = RELEASES[authors_release]
    expected = "mvtec" if release.trained_on == "MVTec AD" else "visa"
    if train_dataset != expected:
        raise ValueError(f"The authors' {release.filename} was trained on {release.trained_on}: pass "
                         f"train_dataset={expected!r}.")
    return (
        f"The authors' released checkpoint `{release.filename}` ({AUTHORS_REPOSITORY}, folder `models/`, commit "
        f"`{AUTHORS_COMMIT}`, git blob `{release.git_blob_sha1}`), converted to this format with "
        f"`vip2clip download-authors {release.name}` and combined with the frozen `{BASE_MODEL}`. It was trained "
        f"on {release.trained_on}: use it on {release.use_on}. At that commit the authors' repository has no licence "
        "file, so it grants no explicit right to redistribute these weights; the vip2clip project does not "
        "redistribute them (each user downloads them from the authors). Ask the authors before making a copy public."
    )


def build_model_card(
    config: Any,
    repo_id: str = DEFAULT_REPO_ID,
    train_dataset: str = "mvtec",
    license: str | None = None,
    eval_results: dict[str, Any] | str | PathLike | None = None,
    base_model: str = BASE_MODEL,
    has_pipeline: bool = False,
    authors_release: str | None = None,
) -> ModelCard:
    """Build the model card of a ViP²-CLIP checkpoint.

    Args:
        config: the model's `ViP2CLIPConfig` (geometry and prompt settings are written into the card).
        repo_id: the Hub id the card is for (used in the usage snippet).
        train_dataset: "mvtec" or "visa", the auxiliary training set (docs/method.md §1).
        license: Hub licence id; by default the training set's (`cc-by-nc-sa-4.0` for MVTec AD, `cc-by-4.0` for VisA).
        eval_results: an evaluation JSON (path or dict, see the module docstring) → model-index and a results table.
        has_pipeline: the folder ships the custom "anomaly-detection" pipeline.
        authors_release: "mvtec" / "visa" when the weights are the authors' released checkpoint converted with
            `vip2clip download-authors` (the card then says so, with its source and terms); None for weights the
            publisher trained.
    """
    if train_dataset not in TRAIN_DATASETS:
        raise ValueError(f"train_dataset must be one of {sorted(TRAIN_DATASETS)}, got {train_dataset!r}.")
    train = TRAIN_DATASETS[train_dataset]
    license = license or train["license"]
    if train_dataset == "mvtec" and license != "cc-by-nc-sa-4.0":
        raise ValueError(
            f"A checkpoint trained on MVTec AD inherits its non-commercial licence (CC BY-NC-SA 4.0); "
            f"license={license!r} is not allowed for it."
        )
    results = load_eval_results(eval_results) if eval_results is not None else None
    model_name = repo_id.split("/")[-1]
    origin = _origin_section(authors_release, train_dataset)

    data = ModelCardData(
        language=None,
        license=license,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        datasets=[train["id"]],
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results_for_model_index(results) if results else None,
    )

    size, patch = int(config.image_size), int(config.patch_size)
    results_section = "No evaluation results were attached to this upload."
    zero_shot_note = ""
    if results:
        evaluated = _dataset_name(results["dataset"])
        if evaluated == train["name"]:
            zero_shot_note = (
                f"\n\n> **Not zero-shot:** these numbers are on {evaluated}, the training set itself; the paper's "
                f"protocol evaluates a {train['name']}-trained model on other datasets only."
            )
        results_section = (
            f"Evaluated on **{evaluated}** (test split), trained on {train['name']} — percent, per category and the "
            f"mean over categories (docs/method.md §7; AUPRO integrated up to FPR 0.3):\n\n{_results_table(results)}"
            f"{zero_shot_note}"
        )

    pipeline_section = ""
    if has_pipeline:
        pipeline_section = f'''

### With a pipeline

```python
from transformers import pipeline

detector = pipeline(model="{repo_id}", trust_remote_code=True)
result = detector("image.png", threshold=0.5)  # {{"score", "anomaly_map", "mask", "is_anomalous"}}
```'''

    body = f"""
# {model_name}

**ViP²-CLIP** zero-shot anomaly detection ([{PAPER_TITLE}](https://arxiv.org/abs/{ARXIV_ID})) as a
`transformers` model with remote code: give it any image — of a category it has never seen — and it returns an
**anomaly score** in [0, 1] and a per-pixel **anomaly map**, without class names, reference images or
per-category training.

A frozen CLIP (`{base_model}`, position table resized to {size}×{size}, patch {patch}) is combined
with two small learnable heads: the **Image-Conditioned Adapter** builds the normal/abnormal text prompts from the
image's own global feature, and the **Fine-Grained Perception** cross-attention refines them on the patch features
of layers {list(config.feature_layers)}; **Unified Text-Patch Alignment** scores patches of every layer against
the two states (top-{config.top_k} patches per layer give the image score; the maps are averaged and blurred with
σ = {config.blur_sigma}).

## Usage

The model code travels with the weights, so `trust_remote_code=True` is needed (read the `.py` files first).
Inputs of any size and mode are accepted (16-bit and grayscale are converted, EXIF orientation honoured).

{_usage(repo_id)}{pipeline_section}

Outputs: `anomaly_score` `(B,)`, `anomaly_map` `(B, {size}, {size})` in [0, 1]; `post_process_anomaly_maps` resizes
the maps to each image's size. There is no universal threshold: calibrate it on a few normal images of your domain.

## Where these weights come from

{origin}

## Training protocol

Zero-shot protocol of the paper: the heads are trained **once** on an auxiliary dataset and applied unchanged to
unseen categories and domains. This checkpoint was trained on the **test split of {train['name']}** (all
categories, images and defect masks) and is meant to be evaluated on other datasets ({train['held_out']},
MPDD, BTAD, KSDD, DAGM, DTD-Synthetic, medical sets, ...); for results on {train['held_out']} the paper uses a
model trained on {'VisA' if train_dataset == 'mvtec' else 'MVTec AD'}.

- CLIP backbone frozen (fp32, eval mode); only the adapter (lr 1e-3) and the perception module (lr 1e-5) train.
- Adam, batch 8, 10 epochs, seed 111, no augmentation, input {size}×{size} (bicubic resize, OpenAI CLIP
  normalisation), masks resized and binarised at 0.5.
- Loss per feature layer: focal + Dice(abnormal, mask) + Dice(normal, 1 − mask); plus the image cross-entropy of
  the mean top-k similarities over temperature {config.temperature}.
- Prompts: {config.n_ctx} context tokens per state, {config.n_cls} image-conditioned class tokens, state words
  "{config.normal_state_word}" / "{config.abnormal_state_word}"; `official_compat={config.official_compat}`
  (reproduces the authors' code, on which the published numbers depend).

## Results

{results_section}

## License

This checkpoint is released under **{license}**.
{"It was trained on MVTec AD, whose licence is CC BY-NC-SA 4.0: the weights are a derivative of that data and inherit its **non-commercial**, share-alike terms — no commercial use; derivatives must carry the same licence. Train on another dataset for commercial use." if train_dataset == "mvtec" else f"It was trained on VisA ({train['dataset_license']}); attribute the VisA authors when you use it."}
The frozen CLIP weights come from `{base_model}` (MIT licence, OpenAI).

## Limitations

- Scores are relative: set the decision threshold per domain; no calibration is shipped.
- The map has the patch grid's resolution ({size // patch}×{size // patch} upsampled), so defects much smaller
  than one patch of the resized image can be missed.
- Trained on industrial images; the medical results in the paper come from the same weights, but check them on
  your data before any use — this is not a medical device.

## Citation

```bibtex
{CITATION}
```
"""
    # Assembled directly (no Jinja: the BibTeX braces would be template syntax); ModelCard re-parses the YAML.
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
