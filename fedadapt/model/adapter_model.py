"""AdapterModel: a frozen backbone with one adapter method applied, and its state."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn

from fedadapt.delta.state import PARTS, AdapterSchema, Part, Role, State, TensorSpec, check_state, dtype_name
from fedadapt.errors import ConfigError
from fedadapt.methods import MethodConfig, schema_method_dict
from fedadapt.model.backbone import LoadedBackbone
from fedadapt.model.freeze import FrozenWeights

ROLES: tuple[Role, ...] = ("adapter", "head")


@dataclass(frozen=True)
class StateSplit:
    """Which roles stay on the device (personal); the rest is shared with the federation."""

    personal: tuple[Role, ...] = ()

    def __post_init__(self) -> None:
        bad = [r for r in self.personal if r not in ROLES]
        if bad:
            raise ConfigError(f"personal roles must be among {ROLES}, got {bad}")

    def part_of(self, role: Role) -> Part:
        return "personal" if role in self.personal else "shared"


class AdapterModel:
    """Frozen backbone + adapter + head. Call it like a transformers classifier.

    Only the adapter (and head) parameters require grad; ``train()``/``eval()`` only switch
    dropout and never change weights (no silent LoRA merging).
    """

    def __init__(
        self,
        loaded: LoadedBackbone,
        method: MethodConfig,
        split: StateSplit | None = None,
        labels: tuple[str, ...] | None = None,
    ) -> None:
        self.backbone = loaded
        self.method = method
        self.split = split or StateSplit()
        num_labels = loaded.config.num_labels
        self.labels = labels or tuple(f"LABEL_{i}" for i in range(num_labels))
        if len(self.labels) != num_labels:
            raise ConfigError(f"{len(self.labels)} label names given for a head with {num_labels} labels")
        applied = method.apply(loaded.model)
        self.module: nn.Module = applied.module
        self.frozen: FrozenWeights = loaded.frozen.release(applied.released)
        self.frozen.check_frozen()
        head_ids = {id(p) for p in loaded.model.classifier.parameters()}
        self._params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self._roles: dict[str, Role] = {n: "head" if id(p) in head_ids else "adapter" for n, p in self._params.items()}
        self.schema = AdapterSchema(
            method=schema_method_dict(method),
            backbone_fingerprint=loaded.fingerprint,
            tensors=tuple(
                TensorSpec(n, tuple(p.shape), dtype_name(p.dtype), self.split.part_of(self._roles[n]), self._roles[n])
                for n, p in self._params.items()
            ),
            extras=applied.extras,
        )

    @property
    def schema_id(self) -> str:
        return self.schema.schema_id

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def train(self, mode: bool = True) -> AdapterModel:
        self.module.train(mode)
        # The backbone's dropout follows the mode; its weights never do.
        return self

    def eval(self) -> AdapterModel:
        return self.train(False)

    def to(self, device: torch.device | str) -> AdapterModel:
        self.module.to(device)
        return self

    @property
    def max_text_tokens(self) -> int:
        """Tokens of text one input may hold: the backbone's positions (BERT: max_position_embeddings)
        less the virtual tokens that prompt and prefix tuning put before the text, which take positions too."""
        positions = getattr(self.backbone.model.config, "max_position_embeddings", None)
        limit = int(positions) if positions else int(self.backbone.tokenizer.model_max_length)
        if isinstance(self.module, peft.PeftModel) and self.module.active_peft_config.is_prompt_learning:
            limit -= int(self.module.active_peft_config.num_virtual_tokens)
        return limit

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimizer may update (adapter and head)."""
        return iter(self._params.values())

    def num_parameters(self) -> tuple[int, int]:
        """(total, trainable) parameter counts, each tensor counted once."""
        seen: dict[int, int] = {}
        for param in self.module.parameters():
            seen[id(param)] = param.numel()
        return sum(seen.values()), sum(p.numel() for p in self._params.values())

    def state(self, part: Part | None = None) -> State:
        """Detached copies of the trainable tensors of ``part`` (or all), in schema order."""
        return {s.name: self._params[s.name].detach().clone() for s in self.schema.specs(part)}

    def load_state(self, state: Mapping[str, torch.Tensor], part: Part | None = None) -> None:
        """Copy ``state`` into the model after checking it against the schema's ``part``."""
        if part is not None and part not in PARTS:
            raise ConfigError(f"part must be one of {PARTS} or None, got {part!r}")
        check_state(state, self.schema.specs(part), what=f"{part or 'full'} state")
        with torch.no_grad():
            for name, tensor in state.items():
                self._params[name].copy_(tensor)

    def merged_copy(self) -> nn.Module:
        """A separate module with the adapter folded into the weights; this model is untouched."""
        if not isinstance(self.module, peft.PeftModel):
            return copy.deepcopy(self.module)
        if self.module.peft_config["default"].is_prompt_learning:
            raise ConfigError(f"{self.method.name} adds virtual tokens and cannot be merged into the weights")
        merged: nn.Module = copy.deepcopy(self.module).merge_and_unload(safe_merge=True)
        return merged
