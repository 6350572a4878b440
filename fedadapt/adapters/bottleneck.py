"""Inserting bottleneck adapters into a backbone's layers (the slots of ``fedadapt.adapters.slots``).

Which adapters, where and how large is the method's business (``fedadapt.methods.bottleneck``): this
module takes any ``BottleneckSpec`` and imports no method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from fedadapt.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fedadapt.adapters.modules import Nonlinearity
    from fedadapt.adapters.slots import Position

DEFAULT_ADAPTER = "default"


class BottleneckSpec(Protocol):
    """What ``add_bottleneck`` reads from a bottleneck method's config (read-only)."""

    @property
    def positions(self) -> tuple[Position, ...]: ...
    @property
    def parallel(self) -> bool: ...
    @property
    def nonlinearity(self) -> Nonlinearity: ...
    @property
    def scaling(self) -> float: ...
    @property
    def drop_layers(self) -> int: ...
    @property
    def layers(self) -> tuple[int, ...] | None: ...

    def bottleneck_size(self, hidden_size: int) -> int: ...


def add_bottleneck(backbone: nn.Module, name: str, config: BottleneckSpec) -> None:
    """Insert adapter ``name`` into every selected layer of ``backbone`` (slots made as needed)."""
    # torch: when built, not when configured (the bottleneck methods import this module to configure)
    from fedadapt.adapters.modules import BottleneckAdapter
    from fedadapt.adapters.slots import ensure_slots

    layers = ensure_slots(backbone)
    wanted = set(range(len(layers))) if config.layers is None else set(config.layers)
    if max(wanted, default=-1) >= len(layers):
        raise ConfigError(f"layers {sorted(wanted)} out of range for a backbone with {len(layers)} layers")
    selected = sorted(i for i in wanted if i >= config.drop_layers)
    if not selected:
        raise ConfigError(f"drop_layers={config.drop_layers} leaves no layer with an adapter")
    hidden = layers[0].ffn.hidden_size
    for index in selected:
        for position in config.positions:
            adapter = BottleneckAdapter(hidden, config.bottleneck_size(hidden), config.nonlinearity, config.scaling)
            layers[index].at(position).add_adapter(name, adapter, config.parallel)
