"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedadapt import AdapterModel, BackboneConfig, StateSplit, load_backbone, make_method_config


def build_lora(tiny_bert: Path, r: int = 8, split: StateSplit | None = None) -> AdapterModel:
    """LoRA r on the tiny BERT with a 3-class head."""
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=3))
    return AdapterModel(loaded, make_method_config("lora", r=r), split)


def train_steps(model: AdapterModel, batch: dict[str, torch.Tensor], steps: int = 5, lr: float = 1e-2) -> None:
    """A few full-batch AdamW steps on the trainable parameters, then eval mode."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
