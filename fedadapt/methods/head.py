"""Head only: train the classifier head on the frozen backbone's pooled embedding, and nothing else.

Federated, this is a linear probe: every device fits the same linear layer on fixed features, and
FedAvg of a linear layer is exact for the delta averaged. It has no adapter parameters: the schema,
a device's delta and a saved adapter folder hold the head alone, and with nothing trained below the
head the whole encoder's output can be computed once per example and cached.
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
class HeadConfig:
    """Puts nothing on the backbone: the head trains as it does under every method, the backbone stays frozen."""

    name: ClassVar[str] = "head"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = False

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        return AppliedMethod(module=model)
