"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fedadapt import AdapterModel, BackboneConfig, StateSplit, load_backbone, make_method_config
from fedadapt.scenario import ScenarioConfig


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


def tiny_scenario(tiny_bert: Path, **changes: object) -> ScenarioConfig:
    """A 3-client LoRA r=4 scenario on the tiny BERT, 2 local steps, CPU; ``changes`` override fields."""
    base = ScenarioConfig(
        name="tiny",
        backbone=str(tiny_bert),
        num_clients=3,
        method="lora",
        rank=4,
        local_max_steps=2,
        batch_size=8,
        max_length=16,
        device="cpu",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
