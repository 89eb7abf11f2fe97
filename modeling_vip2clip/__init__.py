"""vip2clip: ViP²-CLIP zero-shot anomaly detection as a transformers model (see SPEC.md)."""

from .configuration_vip2clip import ViP2CLIPConfig
from .modeling_vip2clip import ViP2CLIPModel, ViP2CLIPOutput
from .processing_vip2clip import ViP2CLIPProcessor

__all__ = ["ViP2CLIPConfig", "ViP2CLIPModel", "ViP2CLIPOutput", "ViP2CLIPProcessor"]
__version__ = "0.1.0"
