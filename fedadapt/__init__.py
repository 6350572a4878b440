"""fedadapt: federated, on-device personalization of frozen transformer backbones with adapters.

Importing this package loads the library only: neither Flower nor ONNX Runtime. Names are
resolved lazily, so ``fedadapt --help`` and error paths do not wait for torch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_BACKBONE": "fedadapt.model.backbone",
    "BackboneConfig": "fedadapt.model.backbone",
    "LoadedBackbone": "fedadapt.model.backbone",
    "load_backbone": "fedadapt.model.backbone",
    "METHODS": "fedadapt.methods",
    "make_method_config": "fedadapt.methods",
    "AdapterModel": "fedadapt.model.adapter_model",
    "StateSplit": "fedadapt.model.adapter_model",
    "AdapterSchema": "fedadapt.delta.state",
    "apply_delta": "fedadapt.delta.state",
    "compute_delta": "fedadapt.delta.state",
    "save_adapter": "fedadapt.checkpoint.folder",
    "load_adapter": "fedadapt.checkpoint.folder",
}

if TYPE_CHECKING:
    from fedadapt.checkpoint.folder import load_adapter, save_adapter
    from fedadapt.delta.state import AdapterSchema, apply_delta, compute_delta
    from fedadapt.methods import METHODS, make_method_config
    from fedadapt.model.adapter_model import AdapterModel, StateSplit
    from fedadapt.model.backbone import DEFAULT_BACKBONE, BackboneConfig, LoadedBackbone, load_backbone


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
