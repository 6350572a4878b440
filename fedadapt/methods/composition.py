"""Composition over one backbone: stacking adapters and AdapterFusion, as adapter methods.

Both start from trained bottleneck adapter folders, load them frozen under their own
names, and train something new on top: a task adapter above the stack, or (AdapterFusion
stage 2, Pfeiffer et al., EACL 2021) only a per-layer fusion attention over their outputs.
Folders are where the adapters come from, not what they are: the schema records their
schema ids and a hash of their frozen weights instead of their paths, so devices with
different paths agree and devices with differently trained adapters do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedadapt.adapters.bottleneck import DEFAULT_ADAPTER, add_bottleneck
from fedadapt.errors import ConfigError
from fedadapt.methods.base import AppliedMethod
from fedadapt.methods.bottleneck import BOTTLENECK_METHODS
from fedadapt.methods.registry import make_method_config, register_method

if TYPE_CHECKING:
    from fedadapt.model.backbone import SequenceClassifier

FUSION = "fusion"


@register_method
@dataclass(frozen=True)
class StackConfig:
    """Frozen adapters from ``below`` (applied first, in order), then a new trainable ``top`` adapter."""

    name: ClassVar[str] = "stack"
    size_field: ClassVar[str | None] = "r"
    saves_peft_format: ClassVar[bool] = False
    location_fields: ClassVar[tuple[str, ...]] = ("below",)
    below: tuple[str, ...] = ()
    top: str = "pfeiffer"
    r: int | None = None

    def __post_init__(self) -> None:
        if not self.below:
            raise ConfigError("stack needs at least one trained adapter folder in 'below'")
        if self.top not in BOTTLENECK_METHODS:
            raise ConfigError(f"the top of a stack must be one of {BOTTLENECK_METHODS}, got {self.top!r}")

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        from fedadapt.adapters.slots import Stack, set_setup  # torch: when applied, not when configured

        names, schema_ids, hashes = _load_all(model, self.below, "stacked")
        add_bottleneck(model.backbone, DEFAULT_ADAPTER, make_method_config(self.top, size=self.r))  # type: ignore[arg-type]
        set_setup(model.backbone, Stack((*names, DEFAULT_ADAPTER)))
        return AppliedMethod(module=model, extras={"below_schema_ids": schema_ids, "below_weight_hashes": hashes})


@register_method
@dataclass(frozen=True)
class FusionConfig:
    """AdapterFusion stage 2: ``adapters`` frozen, one trainable fusion attention per position."""

    name: ClassVar[str] = "fusion"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = False
    location_fields: ClassVar[tuple[str, ...]] = ("adapters",)
    adapters: tuple[str, ...] = ()
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if len(self.adapters) < 2:
            raise ConfigError(f"fusion needs at least two trained adapter folders, got {len(self.adapters)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature!r}")

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        # torch: when applied, not when configured
        from fedadapt.adapters.modules import FusionLayer
        from fedadapt.adapters.slots import Fuse, find_slots, set_setup

        names, schema_ids, hashes = _load_all(model, self.adapters, "fused")
        for slot in find_slots(model.backbone):
            if any(n in slot.adapters for n in names):
                slot.add_fusion(FUSION, FusionLayer(slot.hidden_size, self.temperature))
        set_setup(model.backbone, Fuse(tuple(names), FUSION))
        return AppliedMethod(module=model, extras={"fused_schema_ids": schema_ids, "fused_weight_hashes": hashes})


def _load_all(
    model: SequenceClassifier, folders: tuple[str, ...], prefix: str
) -> tuple[list[str], list[str], list[str]]:
    """Load ``folders`` frozen as ``prefix0``, ``prefix1``…; return names, schema ids and weight hashes.

    Schema ids alone do not tell two adapters of the same config apart; the hashes bind the
    schema to the frozen weights, as FFA-LoRA's ``lora_a_hash`` does for its frozen A.
    """
    # Composition is the one method built on saved folders: it reads them through the checkpoint stage,
    # which itself builds models through this registry, so the import waits until a stack is applied.
    from fedadapt.checkpoint.frozen_adapters import is_planned, load_frozen_adapter
    from fedadapt.model.freeze import fingerprint_tensors  # torch: when applied, not when configured

    names = [f"{prefix}{index}" for index in range(len(folders))]
    schema_ids = [load_frozen_adapter(model, name, folder) for name, folder in zip(names, folders, strict=True)]
    hashes = [
        ""
        if is_planned(model)
        else fingerprint_tensors((n, p) for n, p in model.named_parameters() if f".adapters.{name}." in n)
        for name in names
    ]
    return names, schema_ids, hashes
