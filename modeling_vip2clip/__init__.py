"""vip2clip: ViP²-CLIP zero-shot anomaly detection as a transformers model (the method: docs/method.md).

The public classes and the jobs' Python entry points (`predict`, `evaluate`, `calibrate`, `train`, `export`: each
the function behind the `vip2clip` command of that name, with its options as keyword arguments) are imported on
first use, so that `vip2clip --help` and the other command-line entry points start without importing torch and
transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "ViP2CLIPConfig",
    "ViP2CLIPModel",
    "ViP2CLIPOutput",
    "ViP2CLIPImageProcessor",
    "ViP2CLIPProcessor",
    "ViP2CLIPReferenceBank",
    "download_authors_checkpoint",
    "load_authors_model",
    "predict",
    "evaluate",
    "calibrate",
    "train",
    "export",
]
__version__ = "0.1.0"

_LAZY = {
    "ViP2CLIPConfig": ".configuration_vip2clip",
    "ViP2CLIPModel": ".modeling_vip2clip",
    "ViP2CLIPOutput": ".modeling_vip2clip",
    "ViP2CLIPImageProcessor": ".processing_vip2clip",
    "ViP2CLIPProcessor": ".processing_vip2clip",
    "ViP2CLIPReferenceBank": ".reference_bank_vip2clip",
    "download_authors_checkpoint": ".weights.authors_release",
    "load_authors_model": ".weights.authors_release",
    "predict": ".engine.prediction",
    "evaluate": ".engine.evaluation",
    "calibrate": ".engine.calibration",
    "train": ".engine.training",
    "export": ".deploy.export",
}

if TYPE_CHECKING:  # pragma: no cover
    from .configuration_vip2clip import ViP2CLIPConfig
    from .modeling_vip2clip import ViP2CLIPModel, ViP2CLIPOutput
    from .processing_vip2clip import ViP2CLIPImageProcessor, ViP2CLIPProcessor
    from .reference_bank_vip2clip import ViP2CLIPReferenceBank
    from .weights.authors_release import download_authors_checkpoint, load_authors_model
    from .engine.prediction import predict
    from .engine.evaluation import evaluate
    from .engine.calibration import calibrate
    from .engine.training import train
    from .deploy.export import export


def _attach_authors_loader(model_class) -> None:
    """`ViP2CLIPModel.from_authors_checkpoint("mvtec")` downloads, so it cannot live in modeling_vip2clip.py: that
    file travels to the Hub and runs under trust_remote_code, where it must stay free of network code
    (tests/test_security.py scans it). The package attaches it when it hands out the class; a model loaded as
    remote code has no such method (use `modeling_vip2clip.load_authors_model` there)."""
    from .weights.authors_release import from_authors_checkpoint

    model_class.from_authors_checkpoint = classmethod(from_authors_checkpoint)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        if name == "ViP2CLIPModel":
            _attach_authors_loader(value)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
