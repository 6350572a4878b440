"""Bottleneck adapter methods: Houlsby (two per layer), Pfeiffer (one, after the FFN), parallel.

Presets follow AdapterHub: Pfeiffer = one sequential bottleneck after the feed-forward block
(Pfeiffer et al., EACL 2021); Houlsby = two, after attention and after the feed-forward block
(Houlsby et al., ICML 2019); parallel = one beside the feed-forward block, reading its input,
scaled by 4 (He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning",
ICLR 2022). ``drop_layers`` is static AdapterDrop (Rücklé et al., EMNLP 2021): no adapters in
the lowest k layers, at training and at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedadapt.errors import ConfigError

if TYPE_CHECKING:
    # AppliedMethod: here for annotations, in apply() at run time. The registry in fedadapt.methods
    # imports this module's configs, so importing the methods package at the top made a fresh
    # `import fedadapt.adapters.<this module>` fail on a partially initialized module.
    from torch import nn

    from fedadapt.adapters.modules import Nonlinearity
    from fedadapt.adapters.slots import Position
    from fedadapt.backbone import SequenceClassifier
    from fedadapt.methods.base import AppliedMethod

DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck size ``r`` (or hidden_size // reduction_factor), nonlinearity, scaling, layers."""

    name: ClassVar[str] = "pfeiffer"
    size_field: ClassVar[str | None] = "r"
    saves_peft_format: ClassVar[bool] = False
    positions: ClassVar[tuple[Position, ...]] = ("ffn",)
    parallel: ClassVar[bool] = False
    r: int | None = None
    reduction_factor: int = 16
    nonlinearity: Nonlinearity = "relu"
    scaling: float = 1.0
    drop_layers: int = 0
    layers: tuple[int, ...] | None = None  # None: every layer from drop_layers up

    def __post_init__(self) -> None:
        if self.r is not None and (not isinstance(self.r, int) or self.r <= 0):
            raise ConfigError(f"r (the bottleneck size) must be a positive integer, got {self.r!r}")
        if self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be positive, got {self.reduction_factor!r}")
        if self.nonlinearity not in ("relu", "gelu"):
            raise ConfigError(f"nonlinearity must be 'relu' or 'gelu', got {self.nonlinearity!r}")
        if not isinstance(self.drop_layers, int) or self.drop_layers < 0:
            raise ConfigError(f"drop_layers must be a non-negative integer, got {self.drop_layers!r}")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layers must be non-negative indices, got {self.layers!r}")

    def bottleneck_size(self, hidden_size: int) -> int:
        return self.r if self.r is not None else max(1, hidden_size // self.reduction_factor)

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        from fedadapt.adapters.slots import set_setup
        from fedadapt.methods.base import AppliedMethod

        add_bottleneck(model.backbone, DEFAULT_ADAPTER, self)
        set_setup(model.backbone, DEFAULT_ADAPTER)
        return AppliedMethod(module=model)


@dataclass(frozen=True)
class HoulsbyConfig(BottleneckConfig):
    """Two sequential adapters per layer: after attention and after the feed-forward block."""

    name: ClassVar[str] = "houlsby"
    positions: ClassVar[tuple[Position, ...]] = ("attention", "ffn")


@dataclass(frozen=True)
class PfeifferConfig(BottleneckConfig):
    """One sequential adapter per layer, after the feed-forward block."""

    name: ClassVar[str] = "pfeiffer"


@dataclass(frozen=True)
class ParallelConfig(BottleneckConfig):
    """One adapter per layer beside the feed-forward block, reading its input, scaled."""

    name: ClassVar[str] = "parallel"
    parallel: ClassVar[bool] = True
    reduction_factor: int = 4
    scaling: float = 4.0


def add_bottleneck(backbone: nn.Module, name: str, config: BottleneckConfig) -> None:
    """Insert adapter ``name`` into every selected layer of ``backbone`` (slots made as needed)."""
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
