"""What every adapter method provides to the registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from torch import nn

    from fedadapt.model.backbone import SequenceClassifier


@dataclass
class AppliedMethod:
    """The result of putting a method on a classifier.

    ``module`` is what is called for forward passes; ``released`` names backbone weights
    the method trains on purpose (BitFit's biases) so the frozen guard stops watching them;
    ``extras`` are facts that belong in the adapter schema (e.g. FFA-LoRA's hash of A).
    """

    module: nn.Module
    released: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)


class MethodConfig(Protocol):
    """A frozen dataclass per method. ``size_field`` is what ``--rank`` sets, if anything."""

    name: ClassVar[str]
    size_field: ClassVar[str | None]
    saves_peft_format: ClassVar[bool]

    def apply(self, model: SequenceClassifier) -> AppliedMethod: ...


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    """JSON-ready fields of a method config, with its name."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    return {"name": config.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def schema_method_dict(config: MethodConfig) -> dict[str, Any]:
    """The config as the schema records it: without fields that only say where files are.

    Composed methods name adapter folders (``location_fields``); their content enters the
    schema as schema ids instead, so devices that keep the folders elsewhere still agree.
    A setting added to a method after its adapters were in use (``schema_omits_at_default``)
    enters only when set: at its default the schema, and so every schema id saved before, stays
    what it was.
    """
    located = getattr(config, "location_fields", ())
    defaults = {f.name: f.default for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    omitted = {k for k in getattr(config, "schema_omits_at_default", ()) if getattr(config, k) == defaults[k]}
    return {k: v for k, v in config_to_dict(config).items() if k not in located and k not in omitted}
