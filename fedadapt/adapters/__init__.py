"""fedadapt's own adapters: bottleneck (Houlsby, Pfeiffer, parallel), stacking, AdapterFusion,
AdapterDrop and hot-swapping. No maintained library offers these on transformers 5.

Names resolve lazily so the method registry can import configs without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HoulsbyConfig": "fedadapt.adapters.bottleneck",
    "PfeifferConfig": "fedadapt.adapters.bottleneck",
    "ParallelConfig": "fedadapt.adapters.bottleneck",
    "add_bottleneck": "fedadapt.adapters.bottleneck",
    "StackConfig": "fedadapt.adapters.compose",
    "FusionConfig": "fedadapt.adapters.compose",
    "load_frozen_adapter": "fedadapt.adapters.compose",
    "AdapterSwitch": "fedadapt.adapters.hotswap",
    "BottleneckAdapter": "fedadapt.adapters.modules",
    "FusionLayer": "fedadapt.adapters.modules",
    "AdaptedOutput": "fedadapt.adapters.slots",
    "Fuse": "fedadapt.adapters.slots",
    "Stack": "fedadapt.adapters.slots",
    "register_layout": "fedadapt.adapters.slots",
    "set_adapter_drop": "fedadapt.adapters.slots",
    "set_setup": "fedadapt.adapters.slots",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedadapt.adapters' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = [
    "AdaptedOutput",
    "AdapterSwitch",
    "BottleneckAdapter",
    "Fuse",
    "FusionConfig",
    "FusionLayer",
    "HoulsbyConfig",
    "ParallelConfig",
    "PfeifferConfig",
    "Stack",
    "StackConfig",
    "add_bottleneck",
    "load_frozen_adapter",
    "register_layout",
    "set_adapter_drop",
    "set_setup",
]
