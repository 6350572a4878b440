"""Hot-swapping: several trained bottleneck adapters on one loaded backbone, one active at a time.

Switching is a pointer change (the active adapter name in every slot and the head module):
no weights are copied and the backbone is never reloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fedadapt.adapters.slots import set_setup
from fedadapt.checkpoint.folder import read_manifest
from fedadapt.checkpoint.frozen_adapters import insert_frozen_adapter
from fedadapt.checkpoint.limits import DEFAULT_LIMITS, AdapterLimits
from fedadapt.delta.state import State
from fedadapt.errors import AdapterFolderError, ConfigError
from fedadapt.model.backbone import LoadedBackbone


class AdapterSwitch:
    """Named adapters (each with its own head) over one frozen backbone."""

    def __init__(self, loaded: LoadedBackbone) -> None:
        self.loaded = loaded
        self.heads = nn.ModuleDict()
        self.active: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def add(self, name: str, folder: str | Path, limits: AdapterLimits = DEFAULT_LIMITS) -> None:
        """Load the adapter and head saved in ``folder`` under ``name`` (frozen, inactive).

        The folder is checked like any (``insert_frozen_adapter``): nothing is built beyond ``limits``.
        """
        if name in self.heads:
            raise ConfigError(f"an adapter named {name!r} is already loaded; remove it or pick another name")
        manifest = read_manifest(folder, limits)
        labels = manifest["backbone"]["num_labels"]
        if labels != self.loaded.config.num_labels:
            served = self.loaded.config.num_labels
            raise AdapterFolderError(f"{folder} has a {labels}-class head; this backbone serves {served}")
        head = insert_frozen_adapter(self.loaded.model, name, Path(folder), manifest, limits)
        self.heads[name] = self._head(head)

    def activate(self, name: str | None) -> None:
        """Route every forward pass through adapter ``name`` and its head (None: bare backbone)."""
        if name is not None and name not in self.heads:
            raise ConfigError(f"no adapter named {name!r}; loaded: {list(self.heads)}")
        set_setup(self.loaded.model.backbone, name)
        if name is not None:
            self.loaded.model.classifier = cast(nn.Linear, self.heads[name])
        self.active = name

    @torch.no_grad()
    def __call__(self, **inputs: Any) -> Any:
        if self.active is None:
            raise ConfigError("activate an adapter first")
        self.loaded.model.eval()  # serving: load_backbone leaves the head's dropout in training mode
        return self.loaded.model(**inputs)

    def _head(self, saved: State) -> nn.Linear:
        """A frozen head holding ``saved`` (classifier.weight and .bias, checked by insert_frozen_adapter)."""
        template = self.loaded.model.classifier
        head = nn.Linear(template.in_features, template.out_features).to(template.weight.device)
        head.load_state_dict({n.removeprefix("classifier."): t for n, t in saved.items()})
        head.requires_grad_(False)
        return head
