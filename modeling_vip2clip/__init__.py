"""vip2clip: ViP²-CLIP zero-shot anomaly detection as a transformers model (see docs/method.md)."""

from .authors_checkpoint import download_authors_checkpoint, from_authors_checkpoint, load_authors_model
from .configuration_vip2clip import ViP2CLIPConfig
from .modeling_vip2clip import ViP2CLIPModel, ViP2CLIPOutput
from .processing_vip2clip import ViP2CLIPProcessor

# `ViP2CLIPModel.from_authors_checkpoint("mvtec")` downloads, so it cannot live in modeling_vip2clip.py: that file
# travels to the Hub and runs under trust_remote_code, where it must stay free of network code (tests/test_security.py
# scans it). The package attaches it here instead; a model loaded as remote code has no such method.
ViP2CLIPModel.from_authors_checkpoint = classmethod(from_authors_checkpoint)

__all__ = [
    "ViP2CLIPConfig",
    "ViP2CLIPModel",
    "ViP2CLIPOutput",
    "ViP2CLIPProcessor",
    "download_authors_checkpoint",
    "load_authors_model",
]
__version__ = "0.1.0"
