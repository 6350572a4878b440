"""Where adapters sit: post-LN output blocks of an encoder layer, found by structure.

A BERT-family layer has two output blocks of the same shape — after self-attention and
after the feed-forward network — each ``dense → dropout → LayerNorm(· + residual)``.
``AdaptedOutput`` replaces such a block, reusing its ``dense``, ``dropout`` and ``LayerNorm``
children under the same attribute names (so backbone weight names do not change), and adds
named adapters and fusion layers between the dropout and the residual — Houlsby's position.

Another architecture is added by registering a locator with ``register_layout`` that returns
each layer's two output blocks; its blocks must compute ``LayerNorm(dropout(dense(h)) + x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from fedadapt.adapters.modules import BottleneckAdapter, FusionLayer
from fedadapt.errors import BackboneError, ConfigError

Position = Literal["attention", "ffn"]


@dataclass(frozen=True)
class Stack:
    """Apply adapters one after the other, first name first (e.g. language, then task)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Fuse:
    """Mix the adapters' outputs with the fusion layer named ``fusion``."""

    names: tuple[str, ...]
    fusion: str


Setup = str | Stack | Fuse


class AdaptedOutput(nn.Module):
    """A post-LN output block with named adapters (see module docstring)."""

    def __init__(self, block: nn.Module, position: Position, layer: int) -> None:
        super().__init__()
        self.dense: nn.Linear = cast(nn.Linear, block.dense)
        self.dropout: nn.Module = cast(nn.Module, block.dropout)
        self.LayerNorm: nn.Module = cast(nn.Module, block.LayerNorm)  # noqa: N815 — the backbone's own name
        self.hidden_size: int = self.dense.out_features
        self.position = position
        self.layer = layer
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.setup: Setup | None = None
        self.dropped = False  # AdapterDrop at run time

    def add_adapter(self, name: str, adapter: BottleneckAdapter, parallel: bool) -> None:
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} already exists in layer {self.layer} ({self.position})")
        self.adapters[name] = adapter.to(device=self.dense.weight.device, dtype=self.dense.weight.dtype)
        self.parallel[name] = parallel

    def add_fusion(self, name: str, fusion: FusionLayer) -> None:
        if name in self.fusions:
            raise ConfigError(f"fusion {name!r} already exists in layer {self.layer} ({self.position})")
        self.fusions[name] = fusion.to(device=self.dense.weight.device, dtype=self.dense.weight.dtype)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.dense(hidden_states))  # (B, T, H): the sublayer's output
        if self.setup is not None and not self.dropped:
            hidden = self._compose(self.setup, hidden, input_tensor)
        return self.LayerNorm(hidden + input_tensor)

    def _compose(self, setup: Setup, hidden: torch.Tensor, sublayer_input: torch.Tensor) -> torch.Tensor:
        if isinstance(setup, str):
            return self._apply_one(setup, hidden, sublayer_input)
        if isinstance(setup, Stack):
            for name in setup.names:
                hidden = self._apply_one(name, hidden, sublayer_input)
            return hidden
        present = [n for n in setup.names if n in self.adapters]
        if not present or setup.fusion not in self.fusions:
            return hidden
        outputs = torch.stack([self._apply_one(n, hidden, sublayer_input) for n in present], dim=2)
        fused: torch.Tensor = self.fusions[setup.fusion](hidden, outputs)
        return fused

    def _apply_one(self, name: str, hidden: torch.Tensor, sublayer_input: torch.Tensor) -> torch.Tensor:
        if name not in self.adapters:  # none at this position (Pfeiffer's attention slot, AdapterDrop)
            return hidden
        # Parallel adapters read the sublayer's input (He et al., ICLR 2022); sequential ones its output.
        source = sublayer_input if self.parallel[name] else hidden
        delta: torch.Tensor = self.adapters[name](source)
        return hidden + delta


@dataclass(frozen=True)
class LayerSlots:
    """The two adapter positions of one encoder layer."""

    attention: AdaptedOutput
    ffn: AdaptedOutput

    def at(self, position: Position) -> AdaptedOutput:
        return self.attention if position == "attention" else self.ffn


Locator = Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]
_LAYOUTS: dict[str, Locator] = {}


def register_layout(model_type: str, locator: Locator) -> None:
    """Use ``locator`` (backbone → [(attention_output, ffn_output)] per layer) for ``model_type``."""
    _LAYOUTS[model_type] = locator


def _is_post_ln_block(module: nn.Module) -> bool:
    return (
        isinstance(module, AdaptedOutput)
        or isinstance(getattr(module, "dense", None), nn.Linear)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
        and set(dict(module.named_children())) == {"dense", "LayerNorm", "dropout"}
    )


def locate_bert_family(backbone: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """BERT, RoBERTa, ELECTRA, XLM-R…: per layer, the hidden→hidden output block (attention)
    followed by the intermediate→hidden one (FFN), in module order."""
    blocks = [m for _, m in backbone.named_modules() if _is_post_ln_block(m)]
    attention = [b for b in blocks if b.dense.in_features == b.dense.out_features]
    ffn = [b for b in blocks if b.dense.in_features != b.dense.out_features]
    if not attention or len(attention) != len(ffn):
        raise BackboneError(
            f"found {len(attention)} attention and {len(ffn)} feed-forward output blocks in "
            f"{type(backbone).__name__}; bottleneck adapters need a BERT-family post-LN encoder. "
            "Register a locator for this architecture with fedadapt.adapters.register_layout."
        )
    return list(zip(attention, ffn, strict=True))


def ensure_slots(backbone: nn.Module) -> list[LayerSlots]:
    """Replace each layer's output blocks by ``AdaptedOutput`` (once) and return them per layer."""
    model_type = getattr(getattr(backbone, "config", None), "model_type", "")
    pairs = _LAYOUTS.get(model_type, locate_bert_family)(backbone)
    expected = getattr(getattr(backbone, "config", None), "num_hidden_layers", len(pairs))
    if len(pairs) != expected:
        raise BackboneError(
            f"found output blocks for {len(pairs)} layers, the config says {expected}; register a locator "
            "for this architecture with fedadapt.adapters.register_layout"
        )
    paths = {id(m): name for name, m in backbone.named_modules()}
    slots = []
    for layer, (attention, ffn) in enumerate(pairs):
        slots.append(
            LayerSlots(
                attention=_replace(backbone, paths[id(attention)], attention, "attention", layer),
                ffn=_replace(backbone, paths[id(ffn)], ffn, "ffn", layer),
            )
        )
    return slots


def _replace(backbone: nn.Module, path: str, block: nn.Module, position: Position, layer: int) -> AdaptedOutput:
    if isinstance(block, AdaptedOutput):
        return block
    parent_path, _, attribute = path.rpartition(".")
    slot = AdaptedOutput(block, position, layer)
    setattr(backbone.get_submodule(parent_path) if parent_path else backbone, attribute, slot)
    return slot


def find_slots(backbone: nn.Module) -> list[AdaptedOutput]:
    """Every adapted output block already in ``backbone``, in module order."""
    return [m for m in backbone.modules() if isinstance(m, AdaptedOutput)]


def set_setup(backbone: nn.Module, setup: Setup | None) -> None:
    """Activate an adapter, a Stack or a Fuse in every layer (None: the bare backbone)."""
    slots = find_slots(backbone)
    names = {setup} if isinstance(setup, str) else set(setup.names) if setup else set()
    known = {n for s in slots for n in s.adapters}
    if names - known:
        raise ConfigError(f"no adapters named {sorted(names - known)}; this backbone has {sorted(known)}")
    for slot in slots:
        slot.setup = setup


def set_adapter_drop(backbone: nn.Module, drop_layers: int) -> None:
    """AdapterDrop (Rücklé et al., EMNLP 2021): skip every adapter in the lowest ``drop_layers`` layers."""
    if drop_layers < 0:
        raise ConfigError(f"drop_layers must be >= 0, got {drop_layers}")
    for slot in find_slots(backbone):
        slot.dropped = slot.layer < drop_layers
