"""What a scenario trains with: its model (one per process), local training settings and encoded splits.

The same scenario builds the same schema and the same initial adapter everywhere (server, every
device), so the shared part a device receives always fits the model it builds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from fedadapt.data.batching import EncodedTexts, encode_dataset
from fedadapt.data.dataset import TextDataset
from fedadapt.data.label_map import LabelMap
from fedadapt.delta.state import State
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.fleet.variants import local_step_budget, only_fields
from fedadapt.model.adapter_model import AdapterModel, StateSplit
from fedadapt.model.backbone import DEFAULT_BACKBONE, BackboneConfig, load_backbone
from fedadapt.train.loop import TrainConfig

# The scenario fields a model depends on.
MODEL_FIELDS = ("backbone", "method", "rank", "method_settings", "personal_head", "seed")


@dataclass(frozen=True)
class FleetModel:
    """A model built for a scenario and its personal part as initialized (for devices without one on disk)."""

    model: AdapterModel
    initial_personal: State = field(repr=False)


def build_model(scenario: ScenarioConfig, labels: tuple[str, ...]) -> AdapterModel:
    """The scenario's frozen backbone + method + head; the same scenario gives the same schema everywhere."""
    loaded = load_backbone(
        BackboneConfig(name_or_path=scenario.backbone or DEFAULT_BACKBONE, num_labels=len(labels), seed=scenario.seed)
    )
    split = StateSplit(personal=("head",) if scenario.personal_head else ())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(scenario.seed)  # the adapter's initial values (e.g. LoRA's A): same seed, same start
        return AdapterModel(loaded, scenario.method_config(), split, labels)


def cached_model(scenario: ScenarioConfig, labels: tuple[str, ...]) -> FleetModel:
    """The process's model for the scenario; a caller loads the state it needs before each use."""
    return _cached_model(only_fields(scenario, MODEL_FIELDS), labels)


@functools.lru_cache(maxsize=1)
def _cached_model(scenario: ScenarioConfig, labels: tuple[str, ...]) -> FleetModel:
    # One model per process: simulation workers serve many clients, each call reloads every trainable tensor.
    model = build_model(scenario, labels)
    return FleetModel(model=model, initial_personal=model.state("personal"))


def train_config(scenario: ScenarioConfig, seed: int, partition_id: int | None = None) -> TrainConfig:
    """Local training settings of a round (client ``partition_id``'s tier sets its step budget)."""
    return TrainConfig(
        epochs=scenario.local_epochs,
        max_steps=scenario.local_max_steps if partition_id is None else local_step_budget(scenario, partition_id),
        batch_size=scenario.batch_size,
        learning_rate=scenario.learning_rate,
        head_learning_rate=scenario.head_learning_rate,
        max_length=scenario.max_length,
        seed=seed,
        device=scenario.device,
        mask_absent_labels=scenario.mask_absent_labels,
    )


def encode_split(model: AdapterModel, data: TextDataset, labels: LabelMap, max_length: int) -> EncodedTexts:
    """Token ids and class ids of a TextDataset under the global label map, with ``model``'s tokenizer."""
    return encode_dataset(model.backbone.tokenizer, data, labels, text_tokens(model, max_length))


def text_tokens(model: AdapterModel, max_length: int) -> int:
    """The tokens of text ``encode_split`` keeps: ``max_length``, less what ``model`` cannot take."""
    # Prompt and prefix tuning put virtual tokens before the text: they take positions too.
    return min(max_length, model.max_text_tokens)
