"""The prototype head (federated nearest class mean): a device's class statistic, the server's head, the basis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.data.batching import EncodedTexts, encode_texts
from fedadapt.errors import ConfigError, DataError, StateError
from fedadapt.train.loop import predict
from fedadapt.train.prototypes import (
    PROTOTYPE_SCALE,
    PrototypeHeadStep,
    class_mean_statistic,
    head_specs,
    label_name_basis,
    pooled_features,
    prototype_head,
)

TEXTS = ["my card has not arrived yet", "top up my account", "why is my transfer declined", "where is my money"]
LABELS = ("card_arrival", "top_up", "declined_transfer", "missing_money")


def _model(tiny_bert: Path, method: str = "head") -> AdapterModel:
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=4, seed=0))
    return AdapterModel(loaded, make_method_config(method), labels=LABELS)


def test_the_statistic_is_each_class_sum_of_pooled_embeddings_over_the_example_count(tiny_bert: Path) -> None:
    model = _model(tiny_bert, "lora")
    labels = [0, 0, 2, 3, 0]
    data = encode_texts(model.backbone.tokenizer, [*TEXTS, "card please"], labels, max_length=16)
    features = pooled_features(model, data, batch_size=2)
    assert features.shape == (5, 32) and torch.allclose(features.norm(dim=1), torch.ones(5))  # normalized pooling
    statistic = class_mean_statistic(model, data, batch_size=2)
    weight, bias = head_specs(model.schema)
    assert set(statistic) == {s.name for s in model.schema.specs("shared")}
    expected = torch.zeros(4, 32)
    for row, label in zip(features, labels, strict=True):
        expected[label] += row
    torch.testing.assert_close(statistic[weight.name], expected / 5)
    assert not statistic[weight.name][1].any() and not statistic[bias.name].any()
    # The adapter (LoRA) part of a statistic is zero: the round changes nothing but the head.
    assert all(not t.any() for name, t in statistic.items() if name not in (weight.name, bias.name))


def test_a_device_without_examples_has_no_statistic(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    with pytest.raises(DataError, match="needs training examples"):
        class_mean_statistic(model, EncodedTexts((), (), pad_token_id=0))


def test_the_head_scores_by_cosine_to_the_prototypes(tiny_bert: Path) -> None:
    """Rows scaled to the same norm: the head predicts the class whose prototype is closest in angle, and its
    logits are scale · cosine (normalized embeddings)."""
    model = _model(tiny_bert)
    data = encode_texts(model.backbone.tokenizer, TEXTS * 3, [0, 1, 2, 3] * 3, max_length=16)
    step = PrototypeHeadStep(model.schema, basis=None)
    statistic = class_mean_statistic(model, data)
    new = step.step(model.state("shared"), statistic)
    weight, bias = head_specs(model.schema)
    assert torch.allclose(new[weight.name].norm(dim=1), torch.full((4,), PROTOTYPE_SCALE))
    assert not new[bias.name].any()
    model.load_state(new, "shared")
    logits = predict(model, data)
    features = pooled_features(model, data)
    prototypes = torch.nn.functional.normalize(statistic[weight.name], dim=1)
    torch.testing.assert_close(logits, PROTOTYPE_SCALE * features @ prototypes.T, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == torch.tensor(data.labels)).all()  # each text is its own class's prototype


def test_a_class_nobody_saw_keeps_a_zero_row_and_the_projection_keeps_the_span() -> None:
    sums = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 7.0]])
    head = prototype_head(sums, scale=2.0)
    torch.testing.assert_close(head[0], torch.tensor([1.2, 1.6, 0.0], dtype=torch.float64))
    assert not head[1].any() and torch.isfinite(head).all()
    basis = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # drops the third coordinate
    projected = prototype_head(sums, basis, scale=1.0)
    torch.testing.assert_close(projected[2], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_projecting_onto_the_label_names_span_removes_noise_outside_it(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    basis = label_name_basis(model, LABELS, max_length=16)
    assert basis.shape[0] <= 4 and basis.shape[1] == 32
    torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0], dtype=basis.dtype), atol=1e-9, rtol=0)
    names = encode_texts(model.backbone.tokenizer, [n.replace("_", " ") for n in LABELS], [0, 1, 2, 3], 16)
    embedded = pooled_features(model, names).double()
    torch.testing.assert_close(embedded @ basis.T @ basis, embedded)  # the names lie in their span
    noise = torch.randn(500, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kept = (noise @ basis.T @ basis).norm() / noise.norm()
    assert kept.item() == pytest.approx((basis.shape[0] / 32) ** 0.5, rel=0.1)  # k of 32 dimensions' noise


def test_the_step_refuses_a_statistic_of_another_layout(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    step = PrototypeHeadStep(model.schema, basis=None)
    weight, _ = head_specs(model.schema)
    bad = model.state("shared") | {weight.name: torch.zeros(3, 32)}
    with pytest.raises(StateError):
        step.step(model.state("shared"), bad)


def test_a_schema_without_a_shared_linear_head_is_refused(tiny_bert: Path) -> None:
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=4, seed=0))
    from fedadapt.model.adapter_model import StateSplit

    model = AdapterModel(loaded, make_method_config("lora"), split=StateSplit(personal=("head",)), labels=LABELS)
    with pytest.raises(ConfigError, match="one linear head"):
        head_specs(model.schema)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"personal_head": True}, "personal-head"),
        ({"initial_head": "somewhere"}, "initial-head"),
        ({"head_warmup_rounds": 1, "rounds": 3}, "head-warmup-rounds"),
        ({"server_warmup_epochs": 1, "server_proxy_data": "proxy.csv"}, "server-warmup-epochs"),
    ],
)
def test_a_prototype_head_refuses_settings_that_start_the_head_another_way(
    changes: dict[str, object], named: str
) -> None:
    from fedadapt.fleet.scenario import ScenarioConfig

    ScenarioConfig(name="ok", head_fit="prototypes", prototype_basis="label-names")
    with pytest.raises(ConfigError, match=named):
        ScenarioConfig(name="x", method="lora", head_fit="prototypes", **changes)  # type: ignore[arg-type]


def test_unknown_head_fit_and_basis_are_refused() -> None:
    from fedadapt.fleet.scenario import ScenarioConfig

    with pytest.raises(ConfigError, match="head-fit must be one of"):
        ScenarioConfig(name="x", head_fit="closed-form")
    with pytest.raises(ConfigError, match="prototype-basis must be one of"):
        ScenarioConfig(name="x", prototype_basis="pca")
    assert ScenarioConfig(name="x", head_fit="prototypes").prototype_round(1)
    assert not ScenarioConfig(name="x", head_fit="prototypes").prototype_round(2)
    assert not ScenarioConfig(name="x").prototype_round(1)
