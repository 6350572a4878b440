"""Full fine-tuning: every backbone weight trains. The baseline adapters are measured against.

Not an adapter: its "delta" is the whole backbone, which is exactly what ordinary full-model
FedAvg sends. Scenarios use it through ``full-model = true``; ``fedadapt train --method full``
gives the centralized full fine-tuning baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedadapt.methods.base import AppliedMethod
from fedadapt.methods.registry import register_method

if TYPE_CHECKING:
    from fedadapt.model.backbone import SequenceClassifier


@register_method
@dataclass(frozen=True)
class FullFineTuneConfig:
    """Releases every backbone parameter from the frozen guard; the head trains as usual."""

    name: ClassVar[str] = "full"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = False

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        released = []
        for name, param in model.backbone.named_parameters():
            param.requires_grad_(True)
            released.append(name)
        return AppliedMethod(module=model, released=tuple(released))
