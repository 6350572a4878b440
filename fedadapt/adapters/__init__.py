"""fedadapt's own adapter modules: bottleneck adapters, the slots that hold them in each layer,
stacking, AdapterFusion, AdapterDrop and switching the active adapter. No maintained library offers
these on transformers 5. The methods that configure them live in ``fedadapt.methods``; this package
imports neither the methods nor the folder code.

Names resolve lazily so the method registry can import ``add_bottleneck`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_bottleneck": "fedadapt.adapters.bottleneck",
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
    "BottleneckAdapter",
    "Fuse",
    "FusionLayer",
    "Stack",
    "add_bottleneck",
    "register_layout",
    "set_adapter_drop",
    "set_setup",
]
