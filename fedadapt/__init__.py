"""fedadapt: federated, on-device personalization of frozen transformer backbones with adapters.

Importing this package loads the library only: neither Flower nor ONNX Runtime.
"""

from fedadapt.backbone import DEFAULT_BACKBONE, BackboneConfig, LoadedBackbone, load_backbone
from fedadapt.methods import METHODS, make_method_config
from fedadapt.model import AdapterModel, StateSplit
from fedadapt.state import AdapterSchema, apply_delta, compute_delta

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKBONE",
    "METHODS",
    "AdapterModel",
    "AdapterSchema",
    "BackboneConfig",
    "LoadedBackbone",
    "StateSplit",
    "apply_delta",
    "compute_delta",
    "load_backbone",
    "make_method_config",
]
