"""Training checkpoints: head-only `accelerator.save_state` folders written atomically, found and resumed.

`OUTPUT_DIR/checkpoints/epoch_N/` holds the trainable weights only (a save pre-hook drops every `clip.*` tensor: a
few MB instead of 1.7 GB, since the frozen CLIP is re-loaded from `--clip` / `--model`), the Adam state, the RNG
states and `trainer_state.json`. Each is written to `epoch_N.tmp` and renamed, with `trainer_state.json` written
last, so a crash mid-save never leaves a half-written checkpoint as the newest complete one (docs/training.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import UsageError, writing
from ..files import apply_umask, atomic_write_json

__all__ = [
    "TRAINER_STATE",
    "is_backbone_key",
    "drop_backbone_weights",
    "check_checkpoint_keys",
    "find_latest_checkpoint",
    "checkpoint_problem",
    "read_trainer_state",
    "save_checkpoint",
    "prepare_checkpoint_root",
    "clean_checkpoint_root",
]

CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)$")
TRAINER_STATE = "trainer_state.json"


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def is_backbone_key(key: str) -> bool:
    """True for a state-dict key of the frozen CLIP (also under the DDP / step-wrapper prefixes)."""
    return _strip_prefixes(key).startswith("clip.")


def drop_backbone_weights(models: list, weights: list, output_dir: str) -> None:
    """`save_state` pre-hook: keep only the heads (CLIP is frozen and re-loaded from --clip/--model)."""
    for state in weights:
        for key in [key for key in state if is_backbone_key(key)]:
            del state[key]


def check_checkpoint_keys(models: list, input_dir: str) -> None:
    """`load_state` pre-hook: every head weight must be in the checkpoint, since it is loaded non-strictly."""
    from safetensors import safe_open

    for position, model in enumerate(models):
        name = "model.safetensors" if position == 0 else f"model_{position}.safetensors"
        path = Path(input_dir) / name
        if not path.is_file():
            continue  # accelerate falls back to pytorch_model.bin, loaded non-strictly as well
        with safe_open(str(path), framework="pt") as handle:
            saved = set(handle.keys())
        wanted = {key for key in model.state_dict() if not is_backbone_key(key)}
        missing = sorted(wanted - saved)
        if missing:
            raise UsageError(
                f"--resume {input_dir}: the checkpoint lacks {len(missing)} head weights (e.g. {missing[:3]}), it was "
                "written by a model with another architecture (--n-ctx/--n-cls/...); resume with the original "
                "settings."
            )


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why a complete-looking `epoch_N` folder cannot be resumed (a truncated or corrupt file in it), or None.

    Reads headers and checksums only, never unpickles: `trainer_state.json` parses, every safetensors header
    covers its file, every torch zip archive (`optimizer.bin`, ...) passes its CRC check, every pickle ends with
    its STOP opcode."""
    import zipfile

    folder = Path(checkpoint)
    try:
        json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE} cannot be read ({' '.join(str(error).split())[:120]})"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt"):
                    pass
            elif zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path.name} is corrupt (member {bad})"
            elif path.suffix in (".pkl", ".bin", ".pt", ".pth"):
                with open(path, "rb") as handle:
                    if handle.seek(0, os.SEEK_END) == 0:
                        return f"{path.name} is empty"
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b".":
                        return f"{path.name} is truncated"
        except Exception as error:  # noqa: BLE001 - any reading failure makes the checkpoint unusable
            return f"{path.name} cannot be read ({' '.join(str(error).split())[:120]})"
    return None


def find_latest_checkpoint(checkpoint_root: str | os.PathLike, intact: bool = False, log=None) -> Path | None:
    """Newest complete `epoch_N` folder (a `.tmp` one, or one without trainer_state.json, is never picked).

    With `intact`, damaged ones (:func:`checkpoint_problem`) are passed over, each reported through `log`, so
    `--resume` falls back to the newest checkpoint that can be read and says which."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return None
    found = []
    for entry in root.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and (entry / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), entry))
    skipped = []
    for _, entry in sorted(found, reverse=True):
        problem = checkpoint_problem(entry) if intact else None
        if problem is None:
            if skipped and log is not None:
                log.warning("--resume: falling back to %s (the newer %s cannot be used)", entry, ", ".join(skipped))
            return entry
        skipped.append(entry.name)
        if log is not None:
            log.warning("--resume: checkpoint %s is damaged: %s", entry, problem)
    return None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))


def prepare_checkpoint_root(checkpoint_root: Path, resume: str | None, overwrite: bool,
                            log=None) -> tuple[Path | None, bool]:
    """Decide where a run starts: `(checkpoint to resume or None, whether old checkpoints must be deleted)`.

    `resume` is None (fresh run), "latest" (newest complete checkpoint, or from scratch when there is none) or a
    checkpoint folder. A fresh run over existing checkpoints is refused unless `overwrite`.
    """
    resume_dir: Path | None = None
    if resume:
        if resume == "latest":
            resume_dir = find_latest_checkpoint(checkpoint_root, intact=True, log=log)
            if resume_dir is None and find_latest_checkpoint(checkpoint_root) is not None:
                raise UsageError(f"--resume: every checkpoint in {checkpoint_root} is damaged (listed above); pass "
                                 "--overwrite-output-dir to start over.")
        else:
            resume_dir = Path(resume)
        if resume_dir is not None and not (resume_dir / TRAINER_STATE).is_file():
            raise UsageError(f"--resume {resume_dir}: not a complete checkpoint (no {TRAINER_STATE}); pass a "
                             "checkpoints/epoch_N folder, or --resume alone for the newest one.")
        problem = checkpoint_problem(resume_dir) if resume_dir is not None and resume != "latest" else None
        if problem:
            raise UsageError(f"--resume {resume_dir}: the checkpoint is damaged ({problem}); pass an older "
                             "checkpoints/epoch_N folder, or --resume alone for the newest intact one.")
    start_over = resume_dir is None and find_latest_checkpoint(checkpoint_root) is not None
    if start_over and not overwrite:
        raise UsageError(f"{checkpoint_root} already holds checkpoints; pass --resume to continue that run or "
                         "--overwrite-output-dir to start over.")
    return resume_dir, start_over


def clean_checkpoint_root(checkpoint_root: Path, start_over: bool, log) -> None:
    """Main process, before training: drop `.tmp` folders of an interrupted save, and old checkpoints when
    starting over."""
    if not checkpoint_root.is_dir():
        return
    for stale in checkpoint_root.glob("*.tmp"):
        log.warning("removing %s, left by a run interrupted while saving a checkpoint", stale)
        shutil.rmtree(stale)
    if start_over:
        shutil.rmtree(checkpoint_root)


def save_checkpoint(accelerator, checkpoint_root: Path, epoch: int, trainer_state: dict) -> Path:
    """`save_state` into epoch_N.tmp, then an atomic rename to epoch_N (all processes call this)."""
    final = checkpoint_root / f"epoch_{epoch}"
    tmp = checkpoint_root / f"epoch_{epoch}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with writing(tmp):  # a full disk's write() names no file
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)  # written last: marks the folder complete
        apply_umask(tmp)  # save_state's safetensors writer makes 0600 files, unreadable to the user's group
        if final.exists():  # re-training over an old run (--overwrite-output-dir)
            old = checkpoint_root / f"epoch_{epoch}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
