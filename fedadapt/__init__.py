"""fedadapt: federated, on-device personalization of frozen transformer backbones with adapters.

Importing this package loads the library only: neither Flower nor ONNX Runtime. Names are
resolved lazily, so ``fedadapt --help`` and error paths do not wait for torch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_BACKBONE": "fedadapt.backbone",
    "BackboneConfig": "fedadapt.backbone",
    "LoadedBackbone": "fedadapt.backbone",
    "load_backbone": "fedadapt.backbone",
    "METHODS": "fedadapt.methods",
    "make_method_config": "fedadapt.methods",
    "AdapterModel": "fedadapt.model",
    "StateSplit": "fedadapt.model",
    "AdapterSchema": "fedadapt.state",
    "apply_delta": "fedadapt.state",
    "compute_delta": "fedadapt.state",
    "save_adapter": "fedadapt.folder",
    "load_adapter": "fedadapt.folder",
}

if TYPE_CHECKING:
    from fedadapt.backbone import DEFAULT_BACKBONE, BackboneConfig, LoadedBackbone, load_backbone
    from fedadapt.folder import load_adapter, save_adapter
    from fedadapt.methods import METHODS, make_method_config
    from fedadapt.model import AdapterModel, StateSplit
    from fedadapt.state import AdapterSchema, apply_delta, compute_delta


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedadapt' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


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
    "load_adapter",
    "load_backbone",
    "make_method_config",
    "save_adapter",
]
