"""Hostile and broken files: malicious pickles, what the Hub files may do, missing / mismatched model folders."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from modeling_vip2clip import ViP2CLIPProcessor
from modeling_vip2clip.weights.authors_checkpoint import model_from_authors_checkpoint, read_authors_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_vip2clip"
HUB_FILES = ["configuration_vip2clip.py", "modeling_vip2clip.py", "processing_vip2clip.py", "cpu_fast_path_vip2clip.py",
             "reference_bank_vip2clip.py"]


class _Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, tiny_clip_dir):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"prompt_learner": _Payload(str(marker)), "Zero_try": {}}, checkpoint)
    with pytest.raises(ValueError, match="Refusing to load .*evil.pth"):
        read_authors_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="never executed"):
        model_from_authors_checkpoint(checkpoint, tiny_clip_dir, tmp_path / "out", image_size=32, feature_layers=[1, 2], top_k=5)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_wrong_or_truncated_checkpoints_get_a_reason(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(ValueError, match="expected the keys 'prompt_learner' and 'Zero_try'"):
        read_authors_checkpoint(plain)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(plain.read_bytes()[:50])
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        read_authors_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        read_authors_checkpoint(tmp_path / "missing.pth")


# Names whose use would mean network access, a new process, or reading arbitrary files / executing code.
_FORBIDDEN_MODULES = {"socket", "urllib", "http", "requests", "httpx", "aiohttp", "subprocess", "multiprocessing",
                      "pickle", "shutil", "ftplib", "smtplib", "ctypes", "importlib", "runpy", "glob"}
_FORBIDDEN_BUILTINS = {"open", "eval", "exec", "compile", "__import__", "input"}
_FORBIDDEN_METHODS = {"system", "popen", "spawnv", "execv", "load", "loads", "hf_hub_download", "snapshot_download",
                      "read_text", "read_bytes", "urlopen", "open"}
# The one file access a Hub file may make: a reference bank's save(path) / load(path) writes / reads the safetensors
# file the *user* names (never during model loading); safetensors holds tensors only, no code.
_USER_FILE_FUNCTIONS = {"reference_bank_vip2clip.py": ("save", "load")}
_USER_FILE_CALLS = {"save_file", "load_file", "safe_open"}


def _inside_functions(tree: ast.AST, node: ast.AST, names) -> bool:
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in names]
    return any(node in list(ast.walk(f)) for f in functions)


@pytest.mark.parametrize("name", HUB_FILES)
def test_hub_files_make_no_network_call_spawn_nothing_and_read_no_file(name):
    """The Hub files run under trust_remote_code on users' machines. Static scan: imports are limited to
    torch / transformers / numpy / PIL / huggingface_hub.dataclasses / stdlib typing helpers and single-dot
    siblings; no call can open a file, a socket or a process. (`ViP2CLIPModel.from_clip` calls
    `CLIPModel.from_pretrained` on the id the *user* passes — never during loading — and is the only
    `from_pretrained` in these files; likewise `ViP2CLIPReferenceBank.save` / `load` import safetensors and
    write / read the file the user names, and nothing else does.)"""
    tree = ast.parse((PACKAGE / name).read_text())
    allowed_roots = {"torch", "transformers", "numpy", "PIL", "huggingface_hub", "__future__", "dataclasses",
                     "typing", "math", "os", "warnings", "functools"}  # functools: partial, for the fast-path dispatch
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                assert root in allowed_roots and root not in _FORBIDDEN_MODULES, f"{name} imports {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                assert node.module and (node.module + ".py") in HUB_FILES, f"{name}: relative import {node.module}"
                continue
            assert node.level == 0, f"{name}: only single-dot sibling imports may be relative"
            root = node.module.split(".")[0]
            if root == "safetensors":
                user_io = _USER_FILE_FUNCTIONS.get(name, ())
                assert _inside_functions(tree, node, user_io), f"{name} imports {node.module} outside {user_io}"
                continue
            assert root in allowed_roots and root not in _FORBIDDEN_MODULES, f"{name} imports from {node.module}"
            if root == "os":
                assert [a.name for a in node.names] == ["PathLike"], f"{name} uses os beyond PathLike"
            if root == "huggingface_hub":
                assert node.module == "huggingface_hub.dataclasses", f"{name} imports {node.module}"
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            forbidden = _FORBIDDEN_BUILTINS if isinstance(func, ast.Name) else _FORBIDDEN_METHODS
            assert called not in forbidden, f"{name} calls {called}() at line {node.lineno}"
            if called in _USER_FILE_CALLS:
                user_io = _USER_FILE_FUNCTIONS.get(name, ())
                assert _inside_functions(tree, node, user_io), f"{name} calls {called}() at line {node.lineno}"
            if called == "from_pretrained":
                # allowed: from_clip (the user's CLIP id) and the strict override loading the model's own folder
                enclosing = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("from_clip", "from_pretrained")]
                assert enclosing and any(node in list(ast.walk(f)) for f in enclosing), f"{name}: from_pretrained at line {node.lineno}"


@pytest.fixture
def saved_model(tiny_model, tmp_path):
    # A unique basename: transformers caches remote code per folder *name*, so a shared name could hide a missing file.
    folder = tmp_path / f"model_{tmp_path.name}"
    tiny_model.save_pretrained(folder)
    ViP2CLIPProcessor(image_size=32, min_image_size=8).save_pretrained(folder)
    return folder


def test_missing_weights_file_is_named(saved_model):
    (saved_model / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModel.from_pretrained(saved_model, trust_remote_code=True)


def test_missing_modeling_file_is_named(saved_model):
    (saved_model / "modeling_vip2clip.py").unlink()
    with pytest.raises(Exception, match="modeling_vip2clip.py"):
        AutoModel.from_pretrained(saved_model, trust_remote_code=True)


def test_mismatched_weights_are_named(saved_model):
    weights = load_file(saved_model / "model.safetensors")
    weights["fgp.q_proj.weight"] = torch.zeros(16, 16)
    save_file(weights, saved_model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="fgp.q_proj.weight"):
        AutoModel.from_pretrained(saved_model, trust_remote_code=True)


def test_corrupt_config_is_reported(saved_model):
    """A config.json that is not JSON: an OSError naming that file and saying why, not a bare JSONDecodeError."""
    config_file = saved_model / "config.json"
    config_file.write_text("{ not json")
    with pytest.raises(OSError, match=re.escape(str(config_file)) + r".* not a valid JSON file") as raised:
        AutoModel.from_pretrained(saved_model, trust_remote_code=True)
    assert isinstance(raised.value.__context__, json.JSONDecodeError)  # the parser's reason stays attached


def test_a_model_folder_holds_no_pickles(saved_model):
    assert not [p.name for p in saved_model.iterdir() if p.suffix in {".bin", ".pth", ".pt", ".pkl"}]
    shutil.rmtree(saved_model)


def test_a_weights_file_lacking_a_head_weight_is_refused_not_reinitialised(saved_model):
    weights = load_file(saved_model / "model.safetensors")
    del weights["ica.class_context"]
    save_file(weights, saved_model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \['ica.class_context'\]"):
        AutoModel.from_pretrained(saved_model, trust_remote_code=True)
