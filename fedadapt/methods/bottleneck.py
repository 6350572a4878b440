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

from fedadapt.adapters.bottleneck import DEFAULT_ADAPTER, add_bottleneck
from fedadapt.errors import ConfigError
from fedadapt.methods.base import AppliedMethod
from fedadapt.methods.registry import register_method

if TYPE_CHECKING:
    from fedadapt.adapters.modules import Nonlinearity
    from fedadapt.adapters.slots import Position
    from fedadapt.model.backbone import SequenceClassifier

BOTTLENECK_METHODS = ("houlsby", "pfeiffer", "parallel")


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
        from fedadapt.adapters.slots import set_setup  # torch: when applied, not when configured

        add_bottleneck(model.backbone, DEFAULT_ADAPTER, self)
        set_setup(model.backbone, DEFAULT_ADAPTER)
        return AppliedMethod(module=model)


@register_method
@dataclass(frozen=True)
class HoulsbyConfig(BottleneckConfig):
    """Two sequential adapters per layer: after attention and after the feed-forward block."""

    name: ClassVar[str] = "houlsby"
    positions: ClassVar[tuple[Position, ...]] = ("attention", "ffn")


@register_method
@dataclass(frozen=True)
class PfeifferConfig(BottleneckConfig):
    """One sequential adapter per layer, after the feed-forward block."""

    name: ClassVar[str] = "pfeiffer"


@register_method
@dataclass(frozen=True)
class ParallelConfig(BottleneckConfig):
    """One adapter per layer beside the feed-forward block, reading its input, scaled."""

    name: ClassVar[str] = "parallel"
    parallel: ClassVar[bool] = True
    reduction_factor: int = 4
    scaling: float = 4.0
