"""Method "full": full fine-tuning on a tiny BERT, the baseline of full-model FedAvg."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import train_steps

from fedadapt import AdapterModel, BackboneConfig, StateSplit, load_backbone, make_method_config
from fedadapt.data.batching import encode_texts
from fedadapt.delta.serialize import deserialize_state, read_metadata, serialize_state
from fedadapt.errors import ConfigError
from fedadapt.fleet.build import build_model
from fedadapt.fleet.data import load_fleet_data
from fedadapt.fleet.device_data import DeviceContext
from fedadapt.fleet.device_round import run_client_round
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.fleet.variants import full_model_variant
from fedadapt.methods import METHODS
from fedadapt.methods.full import FullFineTuneConfig
from fedadapt.train.loop import TrainConfig, train_adapter

WEIGHT = "backbone.encoder.layer.0.attention.self.query.weight"
TEXTS = ["my card has not arrived yet", "top up my account", "why is my transfer declined", "where is my money"]


def _full(tiny_bert: Path, split: StateSplit | None = None) -> AdapterModel:
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=3))
    return AdapterModel(loaded, make_method_config("full"), split)


def test_full_is_registered_without_a_size() -> None:
    assert METHODS["full"] is FullFineTuneConfig
    assert isinstance(make_method_config("full"), FullFineTuneConfig)
    with pytest.raises(ConfigError, match="'full' has no rank or size"):
        make_method_config("full", size=8)


def test_every_backbone_weight_trains_and_is_shared(tiny_bert: Path) -> None:
    model = _full(tiny_bert)
    backbone = dict(model.backbone.model.backbone.named_parameters())
    assert len(backbone) > 10
    assert all(p.requires_grad for p in backbone.values())
    assert model.frozen.params == {} and model.frozen.digests == {}  # nothing left for the guard to watch
    shared = {s.name: s for s in model.schema.specs("shared")}
    assert {f"backbone.{n}" for n in backbone} <= set(shared)
    assert all(shared[f"backbone.{n}"].role == "adapter" for n in backbone)
    assert {n for n, s in shared.items() if s.role == "head"} == {"classifier.weight", "classifier.bias"}
    assert model.schema.specs("personal") == ()
    total, trainable = model.num_parameters()
    assert total == trainable == sum(p.numel() for p in backbone.values()) + 32 * 3 + 3


def test_personal_head_keeps_the_backbone_shared(tiny_bert: Path) -> None:
    model = _full(tiny_bert, StateSplit(personal=("head",)))
    assert {s.name for s in model.schema.specs("personal")} == {"classifier.weight", "classifier.bias"}
    assert WEIGHT in {s.name for s in model.schema.specs("shared")}


def test_training_steps_change_backbone_weights(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model = _full(tiny_bert)
    before = model.state("shared")
    train_steps(model, batch, steps=2)
    after = model.state("shared")
    assert not torch.equal(before[WEIGHT], after[WEIGHT])
    embeddings = "backbone.embeddings.word_embeddings.weight"
    assert not torch.equal(before[embeddings], after[embeddings])
    blob = serialize_state({n: after[n] - before[n] for n in after}, model.schema, "shared", "none")
    delta = deserialize_state(blob, model.schema, "shared")
    assert float(delta[WEIGHT].abs().max()) > 0  # the "delta" of full-model FedAvg is the backbone itself


def test_train_adapter_trains_the_backbone_under_the_guard(tiny_bert: Path) -> None:
    model = _full(tiny_bert)
    data = encode_texts(model.backbone.tokenizer, TEXTS * 2, [i % 3 for i in range(8)], max_length=16)
    before = model.state("shared")[WEIGHT]
    result = train_adapter(model, data, TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, device="cpu"))
    assert result.steps == 2
    assert not torch.equal(model.state("shared")[WEIGHT], before)
    assert model.module.backbone.encoder.layer[0].attention.self.query.weight.requires_grad


def test_a_full_model_client_round_sends_backbone_deltas(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = full_model_variant(
        ScenarioConfig(
            name="tiny",
            backbone=str(tiny_bert),
            num_clients=3,
            local_max_steps=1,
            batch_size=8,
            max_length=16,
            device="cpu",
            full_model_learning_rate=1e-2,
        )
    )
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    blob = serialize_state(model.state("shared"), model.schema, "shared", "none")
    reply = run_client_round(DeviceContext(scenario, 0, tmp_path), blob, server_round=1)
    assert read_metadata(reply.delta_blob)["compression"] == "none"
    delta = deserialize_state(reply.delta_blob, model.schema, "shared")
    assert WEIGHT in delta and float(delta[WEIGHT].abs().max()) > 0
    assert reply.metrics["train-steps"] == 1
