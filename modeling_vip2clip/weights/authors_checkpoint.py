"""Convert the authors' released checkpoints (`mvtec_train_epoch_10.pth`, `visa_train_epoch_10.pth`) to a model folder.

(`authors_checkpoint` downloads, verifies and caches those files; this module only converts a local file.)

Their `train.py` saves `{"prompt_learner": ICA.state_dict(), "Zero_try": FGP.state_dict()}`; the CLIP weights are
not in the file, so a transformers CLIP checkpoint (Hub id or folder, at its native resolution) is combined with
it. The file is read with `torch.load(weights_only=True)`: a pickle that needs anything beyond tensors and plain
containers is refused, so nothing in it can run.
"""

from __future__ import annotations

import pickle
from os import PathLike
from pathlib import Path

import torch

from ..modeling_vip2clip import ViP2CLIPModel
from ..processing_vip2clip import ViP2CLIPImageProcessor

__all__ = ["read_authors_checkpoint", "authors_state_to_model_state", "model_from_authors_checkpoint"]

_ICA_KEY, _FGP_KEY = "prompt_learner", "Zero_try"
# authors' FGP (kernel-1 Conv1d) name → our Linear name
_FGP_NAMES = {"q_proj_pre": "q_proj", "k_proj_pre_1": "k_proj", "v_proj_pre_1": "v_proj", "proj_post_t": "out_proj"}


def read_authors_checkpoint(path: str | PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read an authors' `.pth` safely; returns `{"prompt_learner": {...}, "Zero_try": {...}}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint (torch.load(weights_only=True) says: "
            f"{str(error).splitlines()[0]}). Only the authors' state-dict files are accepted; a pickle that needs "
            "code to load is never executed."
        ) from error
    except Exception as error:  # truncated zip, wrong format, ...
        raise ValueError(f"Cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or _ICA_KEY not in checkpoint or _FGP_KEY not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an authors' ViP²-CLIP checkpoint: expected the keys '{_ICA_KEY}' and '{_FGP_KEY}' "
            f"(see their train.py), found {found}."
        )
    return {_ICA_KEY: dict(checkpoint[_ICA_KEY]), _FGP_KEY: dict(checkpoint[_FGP_KEY])}


def authors_state_to_model_state(ica_state: dict, fgp_state: dict, n_cls: int) -> dict[str, torch.Tensor]:
    """Authors' ICA / FGP state dicts → this package's `ica.*` / `fgp.*` parameter names."""
    state = {
        "ica.normal_context": ica_state["ctx_pos"],
        "ica.abnormal_context": ica_state["ctx_neg"],
        "ica.class_context": ica_state["cls_ctx"],
    }
    if "cls_prompter.bias" in ica_state:
        state["ica.image_bias"] = ica_state["cls_prompter.bias"]
    else:  # trained with use_bias=False: b = 0
        state["ica.image_bias"] = torch.zeros(1, ica_state["cls_prompter.fc.0.0.weight"].shape[1])
    for j in range(n_cls):
        for theirs, ours in (("0", "fc1"), ("2", "fc2")):
            for kind in ("weight", "bias"):
                state[f"ica.class_token_mlps.{j}.{ours}.{kind}"] = ica_state[f"cls_prompter.fc.{j}.{theirs}.{kind}"]
    for theirs, ours in _FGP_NAMES.items():
        state[f"fgp.{ours}.weight"] = fgp_state[f"{theirs}.weight"].squeeze(-1)  # (out, in, 1) → (out, in)
        state[f"fgp.{ours}.bias"] = fgp_state[f"{theirs}.bias"]
    state["fgp.unused_temperature"] = fgp_state.get("prompt_temp_l1", torch.tensor(0.0)).reshape(())
    return {key: value.float() for key, value in state.items()}


def model_from_authors_checkpoint(
    checkpoint_path: str | PathLike,
    clip_name_or_path: str | PathLike,
    output_dir: str | PathLike | None = None,
    image_size: int = 518,
    feature_layers: list[int] | None = None,
    top_k: int = 50,
    **config_kwargs,
) -> ViP2CLIPModel:
    """Build a `ViP2CLIPModel` from an authors' checkpoint plus a CLIP; if `output_dir` is given, write it there as a
    complete model folder with its processor (`weights.folder.save_model_folder`).

    n_ctx, n_cls and the adapter width are read from the checkpoint's shapes. The frozen token embeddings stored in the checkpoint
    are checked against the CLIP's, so a checkpoint paired with the wrong CLIP is refused.
    """
    checkpoint = read_authors_checkpoint(checkpoint_path)
    ica_state, fgp_state = checkpoint[_ICA_KEY], checkpoint[_FGP_KEY]
    for key in ("ctx_pos", "ctx_neg", "cls_ctx"):
        if key not in ica_state:
            raise ValueError(f"The checkpoint's '{_ICA_KEY}' lacks '{key}'; it is not a ViP²-CLIP ICA state dict.")
    n_ctx, n_cls = ica_state["ctx_pos"].shape[0], ica_state["cls_ctx"].shape[0]
    config_kwargs.setdefault("adapter_hidden_size", ica_state["cls_prompter.fc.0.0.weight"].shape[0])
    model = ViP2CLIPModel.from_clip(
        clip_name_or_path,
        image_size=image_size,
        feature_layers=list(feature_layers or [6, 12, 18, 24]),
        top_k=top_k,
        n_ctx=n_ctx,
        n_cls=n_cls,
        **config_kwargs,
    )
    # The frozen [SOS] / state word / [EOS] embeddings the authors stored must be this CLIP's.
    if "token_middle_neg" in ica_state:
        fixed = model.fixed_prompt_embeds().detach()  # (4, Dt): SOS, w+, w-, EOS
        stored = torch.stack(
            [ica_state["token_prefix_neg"][0, 0], ica_state["token_middle_neg"][0, 0], ica_state["token_suffix_neg"][0, 0]]
        ).float()
        if not torch.allclose(stored, fixed[[0, 2, 3]], atol=1e-5):
            raise ValueError(
                "The checkpoint's frozen prompt embeddings ([SOS], 'damaged', [EOS]) differ from those of "
                f"{clip_name_or_path}: it was trained on another CLIP (the paper uses "
                "openai/clip-vit-large-patch14-336)."
            )
    state = authors_state_to_model_state(ica_state, fgp_state, n_cls)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatch: a checkpoint for another CLIP width
        raise ValueError(f"The checkpoint does not fit {clip_name_or_path}: {error}") from error
    missing = [key for key in missing if not key.startswith("clip.")]
    if missing or unexpected:
        raise ValueError(f"Checkpoint does not fit the model: missing {missing}, unexpected {unexpected}.")
    model.eval()
    if output_dir is not None:
        from .folder import save_model_folder

        save_model_folder(model, ViP2CLIPImageProcessor.for_model(model.config), output_dir)
    return model
