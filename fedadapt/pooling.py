"""Sentence pooling: how a backbone's token states become one vector per text.

A sentence-transformers folder records the pooling the backbone was trained with in
``1_Pooling/config.json`` (and a ``Normalize`` module in ``modules.json``); a head on any
other pooling wastes the backbone (on Banking77 the MiniLM default reaches 92.8% with a
linear probe on mean-pooled embeddings, 85% with LoRA on the stock CLS pooler).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fedadapt.errors import ConfigError

PoolingMode = Literal["mean", "cls", "max", "pooler"]
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max", "pooler")


@dataclass(frozen=True)
class PoolingConfig:
    """How token states are reduced to one vector; ``normalize`` L2-normalizes it."""

    mode: PoolingMode = "cls"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ConfigError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")


def read_sentence_transformers_pooling(model_dir: Path) -> PoolingConfig | None:
    """The pooling a sentence-transformers folder declares, or None if it declares none."""
    pooling_file = model_dir / "1_Pooling" / "config.json"
    if not pooling_file.is_file():
        return None
    settings = json.loads(pooling_file.read_text())
    if settings.get("pooling_mode_mean_tokens"):
        mode: PoolingMode = "mean"
    elif settings.get("pooling_mode_cls_token"):
        mode = "cls"
    elif settings.get("pooling_mode_max_tokens"):
        mode = "max"
    else:
        raise ConfigError(
            f"{pooling_file} asks for a pooling fedadapt does not implement ({settings}); "
            "pass an explicit pooling mode (mean, cls, max or pooler)"
        )
    modules_file = model_dir / "modules.json"
    normalize = False
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return PoolingConfig(mode=mode, normalize=normalize)


class Pooler(nn.Module):
    """Reduces (B, T, H) token states to (B, H) under the attention mask. No parameters."""

    def __init__(self, config: PoolingConfig) -> None:
        super().__init__()
        self.config = config

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        backbone_pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mode = self.config.mode
        if mode == "pooler":
            if backbone_pooled is None:
                raise ConfigError("pooling mode 'pooler' needs a backbone with a pooler layer")
            pooled = backbone_pooled
        elif mode == "cls":
            pooled = hidden[:, 0]
        else:
            mask = _token_mask(hidden, attention_mask)  # (B, T, 1)
            if mode == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            else:
                pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
        if self.config.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled


def _token_mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return hidden.new_ones(hidden.shape[:2]).unsqueeze(-1)
    # Prefix tuning lengthens the mask by its virtual tokens but not the token states:
    # the real tokens are the last T columns.
    mask = attention_mask[:, -hidden.shape[1] :]
    return mask.unsqueeze(-1).to(hidden.dtype)
