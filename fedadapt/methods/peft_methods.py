"""Adapter methods provided by Hugging Face PEFT: LoRA, FFA-LoRA, IA3, prompt and prefix tuning.

FFA-LoRA: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.
Freezing A at a seeded random init makes FedAvg of the B matrices the exact average of
the updates B·A, which plain LoRA (averaging A and B separately) is not.

``drop_layers`` means what it means for the bottleneck methods (AdapterDrop): no adapter in the
lowest k encoder layers, so they hold nothing that trains and their output can be computed once
and cached. It is PEFT's own layer selection: LoRA's ``layers_to_transform`` (k..L-1, L read from
the backbone's config when the method is applied); PEFT's IA3Config has no ``layers_to_transform``,
so IA3 excludes the lowest k layers with ``exclude_modules`` by the same rule PEFT uses to find a
module's layer (the first numbered part of its name: ``backbone.encoder.layer.3.…`` is in layer 3).

Configs validate without importing torch or PEFT (the CLI answers bad input at once);
PEFT is imported when a method is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from fedadapt.errors import BackboneError, ConfigError
from fedadapt.methods.base import AppliedMethod
from fedadapt.methods.registry import register_method

if TYPE_CHECKING:
    from torch import nn

    from fedadapt.model.backbone import SequenceClassifier


def _wrap(model: SequenceClassifier, config: Any, method: str) -> nn.Module:
    import peft  # seconds (torch, transformers): when applied, not when configured (see the module's docstring)

    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as err:
        raise BackboneError(
            f"PEFT cannot apply {method} to backbone type {model.config.model_type!r}: {err}. "
            "Name its target modules explicitly or pick another method."
        ) from err


def _peft_config(method: str, kind: str, **settings: Any) -> Any:
    """``peft.<kind>(task_type=SEQ_CLS, **settings)``; PEFT's own checks of the settings become a ConfigError."""
    import peft  # heavy: see _wrap

    try:
        return getattr(peft, kind)(task_type=peft.TaskType.SEQ_CLS, **settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"PEFT refuses the {method} settings: {str(err)[:500]}") from err


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {value!r}")


def _check_drop_layers(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"drop_layers must be a non-negative integer, got {value!r}")


def _kept_layers(model: SequenceClassifier, drop_layers: int) -> list[int]:
    """The layers that get an adapter: ``drop_layers`` and up, of the backbone's ``num_hidden_layers``."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise BackboneError(
            f"drop_layers needs the backbone's number of layers, but its config ({model.config.model_type!r}) "
            "has no num_hidden_layers"
        )
    if drop_layers >= num_layers:
        raise ConfigError(
            f"drop_layers={drop_layers} leaves no layer with an adapter: the backbone has {num_layers} layers"
        )
    return list(range(drop_layers, num_layers))


def _in_layers(layers: range) -> str:
    """A regex (PEFT full-matches it) for module names whose first numbered part is one of ``layers``."""
    # (?!\d+\.) skips only non-numeric parts before the index, so "….layer.1.….dense" is in layer 1 and
    # never in layer 10, and an index deeper in the name (an expert, a head) is not read as the layer.
    return r"(?:(?!\d+\.)[^.]+\.)+(?:" + "|".join(str(i) for i in layers) + r")\..+"


@register_method
@dataclass(frozen=True)
class LoraConfig:
    """LoRA: W + (alpha/r)·B·A on the target linear layers; B starts at zero (identity)."""

    name: ClassVar[str] = "lora"
    size_field: ClassVar[str | None] = "r"
    saves_peft_format: ClassVar[bool] = True
    # Added after adapters were deployed: left out of the schema at 0, so their schema ids stay the same.
    schema_omits_at_default: ClassVar[tuple[str, ...]] = ("drop_layers",)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # None: PEFT's default for the backbone's model type (BERT: query and value).
    target_modules: tuple[str, ...] | None = None
    drop_layers: int = 0  # no LoRA in the lowest k encoder layers (AdapterDrop; see the module's docstring)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r (the LoRA rank) must be a positive integer, got {self.r!r}")
        _check_positive("alpha", self.alpha)
        _check_dropout(self.dropout)
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules must name at least one module, or be None for the default")
        _check_drop_layers(self.drop_layers)

    def peft_config(self, layers: list[int] | None = None) -> Any:
        """The equivalent ``peft.LoraConfig``; ``layers``: the layer indices to adapt (None: all)."""
        targets = list(self.target_modules) if self.target_modules else None
        return _peft_config(
            self.name,
            "LoraConfig",
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            layers_to_transform=layers,
        )

    def _wrapped(self, model: SequenceClassifier) -> nn.Module:
        layers = _kept_layers(model, self.drop_layers) if self.drop_layers else None
        return _wrap(model, self.peft_config(layers), self.name)

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        return AppliedMethod(module=self._wrapped(model))


@register_method
@dataclass(frozen=True)
class FfaLoraConfig(LoraConfig):
    """FFA-LoRA: LoRA with A frozen at a random init drawn from ``a_seed``; only B trains."""

    name: ClassVar[str] = "ffa-lora"
    a_seed: int = 0

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        module = self._wrapped(model)
        frozen_a = _reinit_lora_a(module, self.a_seed)
        return AppliedMethod(module=module, extras={"lora_a_seed": self.a_seed, "lora_a_hash": frozen_a})


def _reinit_lora_a(module: nn.Module, seed: int) -> str:
    """Draw every A from one seeded generator, in module order, freeze it, return its hash."""
    # torch and PEFT: when applied, not when configured (see _wrap)
    import peft
    import torch

    from fedadapt.model.freeze import fingerprint_tensors

    generator = torch.Generator(device="cpu").manual_seed(seed)
    a_weights: list[tuple[str, torch.Tensor]] = []
    for name, layer in module.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            for adapter_name, linear in layer.lora_A.items():
                weight = cast("torch.Tensor", linear.weight)
                bound = 1.0 / weight.shape[1] ** 0.5  # kaiming-uniform(a=sqrt(5)) bound, as PEFT uses
                if not weight.is_meta:  # a planned build (fedadapt.checkpoint.plan) has no values to draw
                    with torch.no_grad():
                        weight.copy_(torch.rand(weight.shape, generator=generator) * 2 * bound - bound)
                weight.requires_grad_(False)
                a_weights.append((f"{name}.lora_A.{adapter_name}", weight))
    if not a_weights:
        raise BackboneError("FFA-LoRA found no LoRA layers to freeze; check target_modules")
    return "" if a_weights[0][1].is_meta else fingerprint_tensors(a_weights)


@register_method
@dataclass(frozen=True)
class IA3Config:
    """IA3: learned per-channel scales on keys, values and the FFN (ones at init: identity)."""

    name: ClassVar[str] = "ia3"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = True
    schema_omits_at_default: ClassVar[tuple[str, ...]] = ("drop_layers",)  # as LoRA's
    target_modules: tuple[str, ...] | None = None
    feedforward_modules: tuple[str, ...] | None = None
    drop_layers: int = 0  # no IA3 scales in the lowest k encoder layers (see the module's docstring)

    def __post_init__(self) -> None:
        _check_drop_layers(self.drop_layers)
        if (self.target_modules is None) != (self.feedforward_modules is None):
            raise ConfigError("set target_modules and feedforward_modules together, or neither")
        outside = sorted(set(self.feedforward_modules or ()) - set(self.target_modules or ()))
        if outside:  # PEFT's IA3Config refuses these too, but only when the method is applied
            raise ConfigError(
                f"feedforward_modules must be among target_modules; {outside[:5]} are not "
                f"({len(outside)} in all): list them in target_modules too, or drop them"
            )

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        excluded = None
        if self.drop_layers:
            _kept_layers(model, self.drop_layers)  # refuses a drop_layers that leaves no layer its scales
            excluded = _in_layers(range(self.drop_layers))
        config = _peft_config(
            self.name,
            "IA3Config",
            target_modules=list(self.target_modules) if self.target_modules else None,
            feedforward_modules=list(self.feedforward_modules) if self.feedforward_modules else None,
            exclude_modules=excluded,
        )
        return AppliedMethod(module=_wrap(model, config, self.name))


@dataclass(frozen=True)
class _VirtualTokens:
    """Shared size and validation of the methods that add virtual tokens."""

    size_field: ClassVar[str | None] = "num_virtual_tokens"
    saves_peft_format: ClassVar[bool] = True
    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")


@register_method
@dataclass(frozen=True)
class PromptConfig(_VirtualTokens):
    """Prompt tuning: trainable virtual token embeddings put before the input."""

    name: ClassVar[str] = "prompt"

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        config = _peft_config(self.name, "PromptTuningConfig", num_virtual_tokens=self.num_virtual_tokens)
        return AppliedMethod(module=_wrap(model, config, self.name))


@register_method
@dataclass(frozen=True)
class PrefixConfig(_VirtualTokens):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""

    name: ClassVar[str] = "prefix"

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        from fedadapt.model.backbone import cache_argument  # torch: when applied, not when configured

        if cache_argument(model.backbone) is None:
            raise BackboneError(
                f"prefix tuning needs a backbone whose forward takes a key/value cache (past_key_values); "
                f"{type(model.backbone).__name__} does not. Use prompt tuning or LoRA instead."
            )
        config = _peft_config(self.name, "PrefixTuningConfig", num_virtual_tokens=self.num_virtual_tokens)
        return AppliedMethod(module=_wrap(model, config, self.name))
