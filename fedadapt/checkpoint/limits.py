"""Caps on what an adapter folder may ask to be built, checked before anything is allocated.

An adapter folder comes from elsewhere (a device, a download, a checkpoint), so its manifest's
numbers are hostile: ``num_labels`` sizes the head and a LoRA ``r`` sizes every A and B, and a
400-byte manifest could otherwise ask for gigabytes. The backbone is the user's choice and is
trusted: its dimensions bound what an adapter on it can sensibly be (a rank above the hidden size
or more virtual tokens than positions is never useful), so sizes are checked against both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedadapt.errors import AdapterFolderError, BackboneError, ConfigError

if TYPE_CHECKING:
    from fedadapt.methods import MethodConfig


@dataclass(frozen=True)
class AdapterLimits:
    """The most an adapter folder may ask for; defaults fit every model a phone or laptop serves."""

    max_labels: int = 100_000  # classes of the head (backbone.num_labels, the labels list)
    max_rank: int = 4096  # LoRA / FFA-LoRA rank and bottleneck size ``r``; also at most the hidden size
    max_virtual_tokens: int = 4096  # prompt / prefix tuning tokens; also at most the backbone's positions
    max_composed: int = 16  # adapter folders a stack or a fusion names
    max_params: int = 1 << 30  # values in the recorded schema, and all the method builds (adapter_plan)
    max_manifest_bytes: int = 8 * 1024 * 1024  # fedadapt_adapter.json (100,000 labels need a few MB)
    # A method's list settings (LoRA / IA3 target_modules, a bottleneck's layers): PEFT condenses a long
    # target_modules list in time quadratic in its length, and splits every name at each dot.
    max_setting_items: int = 256  # entries of one list setting (a stack's or fusion's folders: max_composed)
    max_setting_chars: int = 256  # characters of a string setting or entry (a folder path: up to 4096)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"AdapterLimits.{name} must be a positive integer, got {value!r}")

    def size_cap(self, size_field: str | None) -> int | None:
        """The cap on a method's size field (``r`` or ``num_virtual_tokens``); None for other fields."""
        return {"r": self.max_rank, "num_virtual_tokens": self.max_virtual_tokens}.get(size_field or "")


DEFAULT_LIMITS = AdapterLimits()


@dataclass(frozen=True)
class BackboneDims:
    """The dimensions of a backbone that bound an adapter on it (None where its config does not say)."""

    hidden_size: int | None
    max_positions: int | None

    @classmethod
    def of(cls, config: Any) -> BackboneDims:
        """From a transformers config (the loaded backbone's ``model.config``)."""
        return cls(
            _positive(getattr(config, "hidden_size", None)), _positive(getattr(config, "max_position_embeddings", None))
        )

    def bound(self, size_field: str | None) -> tuple[int | None, str]:
        """The backbone's bound on a method's size field, and what it is called."""
        if size_field == "r":
            return self.hidden_size, "its hidden size"
        if size_field == "num_virtual_tokens":
            return self.max_positions, "its positions (max_position_embeddings)"
        return None, ""


def backbone_dims(name_or_path: str) -> BackboneDims:
    """The dimensions of backbone ``name_or_path`` from its config.json alone: no weights are loaded."""
    return BackboneDims.of(read_backbone_config(name_or_path))


def read_backbone_config(name_or_path: str) -> Any:
    """The transformers config of backbone ``name_or_path`` (its config.json alone: no weights are loaded)."""
    # transformers (and torch, through the backbone module): only when a config is read, so the limits stay cheap
    from transformers import AutoConfig

    from fedadapt.model.backbone import resolve_backbone_path

    try:
        return AutoConfig.from_pretrained(resolve_backbone_path(name_or_path))
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"could not load backbone {name_or_path!r}: {err}. "
            "Pass a Hugging Face model folder or, when online, a hub id."
        ) from err


def check_fits_backbone(
    method: MethodConfig, num_labels: int, dims: BackboneDims, where: str | Path, limits: AdapterLimits = DEFAULT_LIMITS
) -> None:
    """AdapterFolderError unless ``method`` and a ``num_labels`` head fit the backbone of ``dims``.

    Run after the manifest's own caps and before the head or the adapter is built.
    """
    field = method.size_field
    size = getattr(method, field, None) if field else None
    bound, what = dims.bound(field)
    if isinstance(size, int) and bound is not None and size > bound:
        raise AdapterFolderError(
            f"{where}: method.{field} is {size}, more than the backbone's {bound} ({what}); "
            "the adapter was not made for this backbone"
        )
    if dims.hidden_size is not None and num_labels * (dims.hidden_size + 1) > limits.max_params:
        raise AdapterFolderError(
            f"{where}: backbone.num_labels is {num_labels}: a head of {num_labels * (dims.hidden_size + 1)} values on "
            f"hidden size {dims.hidden_size}, more than the {limits.max_params} allowed"
        )


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
