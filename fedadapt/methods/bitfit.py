"""BitFit: train only the backbone's bias terms (Ben Zaken et al., ACL 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedadapt.methods.base import AppliedMethod
from fedadapt.methods.registry import register_method

if TYPE_CHECKING:
    from fedadapt.model.backbone import SequenceClassifier


@register_method
@dataclass(frozen=True)
class BitFitConfig:
    """Biases are found by structure: the parameter a module registers as ``bias``."""

    name: ClassVar[str] = "bitfit"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = False

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        released = []
        for module_name, module in model.backbone.named_modules():
            bias = module._parameters.get("bias")
            if bias is not None:
                bias.requires_grad_(True)
                released.append(f"{module_name}.bias" if module_name else "bias")
        return AppliedMethod(module=model, released=tuple(released))
