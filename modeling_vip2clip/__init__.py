"""vip2clip: ViP²-CLIP zero-shot anomaly detection as a transformers model (the method: docs/method.md).

The public classes are imported on first use, so that `vip2clip --help` and the other command-line entry points
start without importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["ViP2CLIPConfig", "ViP2CLIPModel", "ViP2CLIPOutput", "ViP2CLIPProcessor"]
__version__ = "0.1.0"

_LAZY = {
    "ViP2CLIPConfig": ".configuration_vip2clip",
    "ViP2CLIPModel": ".modeling_vip2clip",
    "ViP2CLIPOutput": ".modeling_vip2clip",
    "ViP2CLIPProcessor": ".processing_vip2clip",
}

if TYPE_CHECKING:  # pragma: no cover
    from .configuration_vip2clip import ViP2CLIPConfig
    from .modeling_vip2clip import ViP2CLIPModel, ViP2CLIPOutput
    from .processing_vip2clip import ViP2CLIPProcessor


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
