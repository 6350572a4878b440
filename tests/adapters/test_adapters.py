"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): identity at init, structure, training,
the parallel read, AdapterDrop, the folder round trip and locating blocks in other backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from helpers import train_steps
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.adapters import set_adapter_drop
from fedadapt.adapters import slots as slots_module
from fedadapt.adapters.modules import BottleneckAdapter
from fedadapt.adapters.slots import AdaptedOutput, find_slots, register_layout
from fedadapt.checkpoint.folder import MANIFEST, OWN_WEIGHTS, PEFT_WEIGHTS, load_adapter, save_adapter
from fedadapt.errors import BackboneError, ConfigError
from fedadapt.model.backbone import SequenceClassifier
from fedadapt.model.pooling import PoolingConfig

BOTTLENECK = ["houlsby", "pfeiffer", "parallel"]
HIDDEN, LAYERS, LABELS = 32, 2, 3
HEAD_PARAMS = HIDDEN * LABELS + LABELS  # 99


def _cfg(folder: Path, **kwargs: Any) -> BackboneConfig:
    return BackboneConfig(name_or_path=str(folder), num_labels=LABELS, **kwargs)


def _build(folder: Path, method: str, size: int | None = None, **fields: Any) -> AdapterModel:
    return AdapterModel(load_backbone(_cfg(folder)), make_method_config(method, size, **fields))


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(batch)).logits  # type: ignore[operator, no-any-return]


def _perturb(model: AdapterModel, scale: float = 0.3, seed: int = 7) -> None:
    """Random values in every trainable tensor, so every ``up`` projection stops being zero."""
    gen = torch.Generator().manual_seed(seed)
    model.load_state({n: t + scale * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


def _adapter_params(r: int) -> int:
    return HIDDEN * r + r + r * HIDDEN + HIDDEN  # down (weight, bias) + up (weight, bias)


def _backbone(model: AdapterModel) -> nn.Module:
    return cast(nn.Module, model.module.backbone)


def _slots(model: AdapterModel) -> list[AdaptedOutput]:
    return find_slots(_backbone(model))


def _adapter(slot: AdaptedOutput, name: str = "default") -> BottleneckAdapter:
    return cast(BottleneckAdapter, slot.adapters[name])


# ---------------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("method", BOTTLENECK)
def test_identity_at_init(tiny_bert: Path, batch: dict[str, torch.Tensor], method: str) -> None:
    plain = load_backbone(_cfg(tiny_bert)).model.eval()
    model = _build(tiny_bert, method).eval()
    expected = _logits(plain, batch)
    got = _logits(model, batch)
    # up starts at exactly zero, so each adapter adds exactly zero.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.equal(got, expected)
    # Non-trivial: the logits are not all zero, and perturbing the adapters changes them.
    assert expected.abs().max() > 1e-3
    _perturb(model)
    assert (_logits(model, batch) - expected).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- structure

# method -> (positions with an adapter, parallel, default r)
_STRUCTURE = {
    "houlsby": ({"attention", "ffn"}, False, HIDDEN // 16),
    "pfeiffer": ({"ffn"}, False, HIDDEN // 16),
    "parallel": ({"ffn"}, True, HIDDEN // 4),
}


@pytest.mark.parametrize("method", BOTTLENECK)
def test_adapter_positions_per_layer(tiny_bert: Path, method: str) -> None:
    positions, parallel, r = _STRUCTURE[method]
    slots = _slots(_build(tiny_bert, method))
    assert len(slots) == 2 * LAYERS  # attention and FFN output block of each layer
    assert sorted((s.layer, s.position) for s in slots) == [
        (0, "attention"),
        (0, "ffn"),
        (1, "attention"),
        (1, "ffn"),
    ]
    for slot in slots:
        if slot.position in positions:
            assert list(slot.adapters) == ["default"]
            assert slot.parallel == {"default": parallel}
            adapter = _adapter(slot)
            assert tuple(adapter.down.weight.shape) == (r, HIDDEN)
            assert tuple(adapter.up.weight.shape) == (HIDDEN, r)
            assert adapter.scaling == (4.0 if method == "parallel" else 1.0)
        else:
            assert len(slot.adapters) == 0
        assert slot.setup == "default"
    per_layer = sum(len(s.adapters) for s in slots if s.layer == 0)
    assert per_layer == len(positions)


@pytest.mark.parametrize(
    ("method", "size", "fields", "r"),
    [
        ("houlsby", None, {}, 2),
        ("pfeiffer", None, {}, 2),
        ("parallel", None, {}, 8),
        ("houlsby", 5, {}, 5),
        ("pfeiffer", 3, {}, 3),
        ("parallel", 1, {}, 1),
        ("pfeiffer", None, {"reduction_factor": 8}, 4),
    ],
)
def test_trainable_parameter_count(
    tiny_bert: Path, method: str, size: int | None, fields: dict[str, Any], r: int
) -> None:
    model = _build(tiny_bert, method, size, **fields)
    n_adapters = LAYERS * len(_STRUCTURE[method][0])
    expected = n_adapters * _adapter_params(r) + HEAD_PARAMS
    total, trainable = model.num_parameters()
    assert trainable == expected
    assert model.schema.num_params() == expected
    backbone_params = sum(p.numel() for p in model.frozen.params.values())
    assert total == backbone_params + expected
    downs = [p for n, p in model.module.named_parameters() if n.endswith(".adapters.default.down.weight")]
    assert len(downs) == n_adapters
    assert all(tuple(p.shape) == (r, HIDDEN) for p in downs)


def test_size_sets_r() -> None:
    assert make_method_config("houlsby", 6).r == 6  # type: ignore[attr-defined]
    assert make_method_config("parallel").bottleneck_size(32) == 8  # type: ignore[attr-defined]
    assert make_method_config("pfeiffer").bottleneck_size(32) == 2  # type: ignore[attr-defined]
    assert make_method_config("pfeiffer").bottleneck_size(8) == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", BOTTLENECK)
def test_only_adapter_and_head_train_and_backbone_names_are_unchanged(tiny_bert: Path, method: str) -> None:
    pristine = load_backbone(_cfg(tiny_bert))
    model = _build(tiny_bert, method)
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert trainable == {s.name for s in model.schema.tensors}
    assert {n for n in trainable if ".adapters.default." not in n} == {"classifier.weight", "classifier.bias"}
    roles = {s.name: s.role for s in model.schema.tensors}
    assert {n for n, r in roles.items() if r == "head"} == {"classifier.weight", "classifier.bias"}

    # Every backbone weight is frozen and still guarded.
    assert model.frozen.params
    assert not [n for n, p in model.frozen.params.items() if p.requires_grad]
    model.frozen.check_frozen()
    assert model.backbone.fingerprint == pristine.fingerprint

    # Injection reuses the blocks' children: the backbone's own names and tensors are unchanged.
    backbone = _backbone(model)
    own = {n: p for n, p in backbone.named_parameters() if ".adapters." not in n}
    assert set(own) == set(model.frozen.params) == set(pristine.frozen.params)
    assert all(own[n] is model.frozen.params[n] for n in own)
    own_keys = {k for k in backbone.state_dict() if ".adapters." not in k}
    assert own_keys == set(pristine.model.backbone.state_dict())


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", BOTTLENECK)
def test_training_changes_adapters_not_backbone(tiny_bert: Path, batch: dict[str, torch.Tensor], method: str) -> None:
    model = _build(tiny_bert, method).eval()
    with torch.no_grad():
        start = float(model(**batch).loss)
    before = model.state()
    train_steps(model, batch, steps=8, lr=2e-2)
    with torch.no_grad():
        end = float(model(**batch).loss)
    assert end < start - 0.1, (start, end)

    model.frozen.check_frozen()
    model.frozen.check_unchanged()
    after = model.state()
    adapter_names = [s.name for s in model.schema.tensors if s.role == "adapter"]
    changed = {n for n in adapter_names if not torch.equal(before[n], after[n])}
    # Every adapter trains (its up bias always gets a gradient). With r=2 on this random tiny
    # backbone a ReLU can be dead on every token, so not every single weight has to move.
    up_biases = [n for n in adapter_names if n.endswith(".up.bias")]
    assert len(up_biases) == len(adapter_names) // 4
    assert set(up_biases) <= changed
    assert any(n.endswith(".up.weight") for n in changed)
    assert any(n.endswith(".down.weight") for n in changed)
    assert {"classifier.weight", "classifier.bias"} <= {n for n in before if not torch.equal(before[n], after[n])}


# ------------------------------------------------------------------------------------ parallel read


def _hand_output(slot: AdaptedOutput, hidden_states: torch.Tensor, x: torch.Tensor, parallel: bool) -> torch.Tensor:
    adapter = _adapter(slot)
    sublayer = slot.dense(hidden_states)  # eval: dropout is the identity
    source = x if parallel else sublayer
    delta = adapter.scaling * adapter.up(torch.relu(adapter.down(source)))
    return slot.LayerNorm(sublayer + delta + x)


@pytest.mark.parametrize("method", ["parallel", "pfeiffer", "houlsby"])
def test_adapted_block_matches_hand_computation(tiny_bert: Path, method: str) -> None:
    model = _build(tiny_bert, method).eval()
    _perturb(model)
    slot = model.module.backbone.encoder.layer[0].output  # type: ignore[union-attr, index]
    assert isinstance(slot, AdaptedOutput) and slot.position == "ffn"
    gen = torch.Generator().manual_seed(3)
    hidden_states = torch.randn(2, 5, slot.dense.in_features, generator=gen)  # the FFN's intermediate
    x = torch.randn(2, 5, HIDDEN, generator=gen)  # the FFN's input (the residual)
    with torch.no_grad():
        got = slot(hidden_states, x)
        expected = _hand_output(slot, hidden_states, x, parallel=method == "parallel")
        other = _hand_output(slot, hidden_states, x, parallel=method != "parallel")
        bare = slot.LayerNorm(slot.dense(hidden_states) + x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - other).abs().max() > 1e-3, "sequential and parallel reads must differ"
    assert (got - bare).abs().max() > 1e-3


def test_parallel_differs_from_sequential_with_identical_weights(
    tiny_bert: Path, batch: dict[str, torch.Tensor]
) -> None:
    parallel = _build(tiny_bert, "parallel").eval()
    _perturb(parallel)
    sequential = _build(tiny_bert, "pfeiffer", r=8, scaling=4.0).eval()
    sequential.load_state(parallel.state())  # same names, shapes and values
    assert all(torch.equal(a, b) for a, b in zip(parallel.state().values(), sequential.state().values(), strict=True))
    assert (_logits(parallel, batch) - _logits(sequential, batch)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ AdapterDrop


def test_static_adapter_drop_leaves_lowest_layers_bare(tiny_bert: Path) -> None:
    model = _build(tiny_bert, "houlsby", drop_layers=1)
    slots = _slots(model)
    assert len(slots) == 2 * LAYERS
    assert all(len(s.adapters) == 0 for s in slots if s.layer == 0)
    assert all(list(s.adapters) == ["default"] for s in slots if s.layer == 1)
    assert model.num_parameters()[1] == 2 * _adapter_params(2) + HEAD_PARAMS
    assert model.schema_id != _build(tiny_bert, "houlsby").schema_id


def test_layers_selects_layers(tiny_bert: Path) -> None:
    model = _build(tiny_bert, "pfeiffer", layers=(1,))
    assert [s.layer for s in _slots(model) if s.adapters] == [1]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"drop_layers": 2}, r"drop_layers=2 leaves no layer"),
        ({"drop_layers": 5}, r"drop_layers=5 leaves no layer"),
        ({"layers": (0,), "drop_layers": 1}, r"leaves no layer"),
        ({"layers": (2,)}, r"out of range"),
    ],
)
def test_adapter_drop_too_large_raises(tiny_bert: Path, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _build(tiny_bert, "houlsby", **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"drop_layers": -1}, r"drop_layers must be a non-negative integer"),
        ({"r": 0}, r"positive integer"),
        ({"reduction_factor": 0}, r"reduction_factor must be positive"),
        ({"nonlinearity": "tanh"}, r"nonlinearity must be"),
        ({"layers": (-1,)}, r"non-negative indices"),
    ],
)
def test_bottleneck_config_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_method_config("pfeiffer", **fields)


def _hidden_states(backbone: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(backbone(**_inputs(batch), output_hidden_states=True).hidden_states)


def test_runtime_adapter_drop(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    bare = load_backbone(_cfg(tiny_bert)).model.eval()
    bare_hidden = _hidden_states(bare.backbone, batch)
    model = _build(tiny_bert, "houlsby").eval()
    _perturb(model)
    backbone = _backbone(model)
    adapted = _logits(model, batch)
    state = model.state()

    hidden = _hidden_states(backbone, batch)
    assert len(hidden) == LAYERS + 1
    assert (hidden[1] - bare_hidden[1]).abs().max() > 1e-3  # adapters active in layer 0

    set_adapter_drop(backbone, 1)
    assert [s.dropped for s in _slots(model)] == [s.layer == 0 for s in _slots(model)]
    hidden = _hidden_states(backbone, batch)
    torch.testing.assert_close(hidden[1], bare_hidden[1], atol=1e-6, rtol=0)
    assert (hidden[2] - bare_hidden[2]).abs().max() > 1e-3  # layer 1 still adapted
    assert (_logits(model, batch) - adapted).abs().max() > 1e-4

    set_adapter_drop(backbone, 2)  # every layer: the bare backbone
    for got, expected in zip(_hidden_states(backbone, batch), bare_hidden, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    bare.classifier.load_state_dict(model.module.classifier.state_dict())  # type: ignore[union-attr]
    torch.testing.assert_close(_logits(model, batch), _logits(bare, batch), atol=1e-6, rtol=0)

    set_adapter_drop(backbone, 0)  # back on: dropping never touched the weights
    torch.testing.assert_close(_logits(model, batch), adapted, atol=0, rtol=0)
    assert all(torch.equal(state[n], t) for n, t in model.state().items())

    with pytest.raises(ConfigError, match="drop_layers must be >= 0"):
        set_adapter_drop(backbone, -1)


# ---------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("houlsby", {}),
        ("pfeiffer", {}),
        ("parallel", {}),
        ("pfeiffer", {"r": 3, "nonlinearity": "gelu"}),
        ("houlsby", {"drop_layers": 1}),
    ],
)
def test_round_trip(
    tiny_bert: Path, tmp_path: Path, batch: dict[str, torch.Tensor], method: str, fields: dict[str, Any]
) -> None:
    model = _build(tiny_bert, method, **fields).eval()
    _perturb(model)
    folder = save_adapter(model, tmp_path / "adapter")

    files = {p.name for p in folder.iterdir()}
    assert files == {MANIFEST, OWN_WEIGHTS}
    assert not files & set(PEFT_WEIGHTS)
    saved = load_file(str(folder / OWN_WEIGHTS))
    assert set(saved) == {s.name for s in model.schema.tensors}

    loaded = load_adapter(folder).eval()
    assert loaded.method == model.method
    assert loaded.schema_id == model.schema_id
    state, reloaded = model.state(), loaded.state()
    assert list(state) == list(reloaded)
    assert all(torch.equal(state[n], reloaded[n]) for n in state)
    expected = _logits(model, batch)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-6, rtol=0)
    plain = load_backbone(_cfg(tiny_bert)).model.eval()
    assert (_logits(plain, batch) - expected).abs().max() > 1e-3  # the loaded adapter does something
    loaded.frozen.check_unchanged()


# ------------------------------------------------------------------------------- other architectures


def _tiny_bert_config(config_class: type[BertConfig] = BertConfig) -> BertConfig:
    return config_class(
        vocab_size=30, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )


def test_backbone_without_output_blocks_raises() -> None:
    config = DistilBertConfig(vocab_size=30, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=37)
    classifier = SequenceClassifier(DistilBertModel(config), PoolingConfig(mode="cls"), num_labels=2, head_dropout=0.0)
    with pytest.raises(BackboneError, match="register_layout") as info:
        make_method_config("houlsby").apply(classifier)
    assert "found 0 attention and 0 feed-forward" in str(info.value)
    assert not find_slots(classifier)  # nothing was half-injected


def test_layer_count_mismatch_raises() -> None:
    encoder = BertModel(_tiny_bert_config())
    del encoder.encoder.layer[1]  # the config still says two layers
    classifier = SequenceClassifier(encoder, PoolingConfig(mode="cls"), num_labels=2, head_dropout=0.0)
    with pytest.raises(BackboneError, match="output blocks for 1 layers, the config says 2"):
        make_method_config("pfeiffer").apply(classifier)


class _OtherConfig(BertConfig):
    model_type = "fedadapt-test-encoder"


def test_register_layout_is_used_for_its_model_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots_module, "_LAYOUTS", dict(slots_module._LAYOUTS))  # restored after the test
    calls: list[str] = []

    def reversed_layers(backbone: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        calls.append(type(backbone).__name__)
        layers = list(backbone.encoder.layer)  # type: ignore[union-attr, arg-type]
        return [(layer.attention.output, layer.output) for layer in reversed(layers)]

    register_layout(_OtherConfig.model_type, reversed_layers)
    torch.manual_seed(0)
    encoder = BertModel(_tiny_bert_config(_OtherConfig))
    assert encoder.config.model_type == "fedadapt-test-encoder"
    classifier = SequenceClassifier(encoder, PoolingConfig(mode="cls"), num_labels=2, head_dropout=0.0)
    make_method_config("pfeiffer", drop_layers=1).apply(classifier)

    assert calls == ["BertModel"]
    # The locator's order decides the layer indices: its "layer 1" is the encoder's first layer.
    first, second = encoder.encoder.layer
    assert isinstance(first.output, AdaptedOutput) and first.output.layer == 1
    assert isinstance(second.output, AdaptedOutput) and second.output.layer == 0
    assert list(first.output.adapters) == ["default"]
    assert len(second.output.adapters) == 0

    # Other model types still use the BERT-family locator.
    make_method_config("pfeiffer").apply(SequenceClassifier(BertModel(_tiny_bert_config()), PoolingConfig(), 2, 0.0))
    assert calls == ["BertModel"]
