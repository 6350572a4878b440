"""Top-layer-only methods: LoRA, FFA-LoRA and IA3 with ``drop_layers`` (PEFT's own layer selection), and ``head``,
which trains the classifier head alone. The lowest layers then hold nothing that trains: their output is the
frozen backbone's, whatever the adapter's values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from transformers import BertConfig, BertModel

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.errors import ConfigError
from fedadapt.methods import schema_method_dict
from fedadapt.model.backbone import SequenceClassifier
from fedadapt.model.pooling import PoolingConfig

TOP_LAYER_METHODS = ["lora", "ffa-lora", "ia3"]
_LAYER = re.compile(r"\.layer\.(\d+)\.")


def _plain(folder: Path) -> SequenceClassifier:
    return load_backbone(BackboneConfig(name_or_path=str(folder), num_labels=3)).model.eval()


def _build(folder: Path, method: str, **fields: Any) -> AdapterModel:
    loaded = load_backbone(BackboneConfig(name_or_path=str(folder), num_labels=3))
    return AdapterModel(loaded, make_method_config(method, **fields))


def _adapted_layers(module: torch.nn.Module) -> set[int]:
    """The encoder layers that hold a PEFT tuner layer (LoRA or IA3)."""
    return {
        int(match.group(1))
        for name, layer in module.named_modules()
        if isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer) and (match := _LAYER.search(name))
    }


def _perturb(model: AdapterModel) -> None:
    gen = torch.Generator().manual_seed(7)
    model.load_state({n: t + 0.3 * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


def _hidden_states(classifier: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Every layer's output of the BERT inside ``classifier`` (a SequenceClassifier, PEFT-wrapped or not)."""
    wrapped = isinstance(classifier, peft.PeftModel)
    bert = classifier.get_submodule("base_model.model.backbone" if wrapped else "backbone")
    with torch.no_grad():
        out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return tuple(out.hidden_states)


# -------------------------------------------------------------------------------- drop_layers on PEFT


@pytest.mark.parametrize("method", TOP_LAYER_METHODS)
def test_drop_layers_puts_the_adapter_in_the_top_layers_only(tiny_bert: Path, method: str) -> None:
    full, top = _build(tiny_bert, method), _build(tiny_bert, method, drop_layers=1)
    assert _adapted_layers(full.module) == {0, 1}
    assert _adapted_layers(top.module) == {1}
    adapters = [s.name for s in top.schema.tensors if s.role == "adapter"]
    assert adapters and all(".layer.1." in n for n in adapters)
    # Half the layers: half the adapter tensors of the full-depth method, the same head.
    assert len(adapters) * 2 == len([s for s in full.schema.tensors if s.role == "adapter"])
    assert [s.name for s in top.schema.tensors if s.role == "head"] == [
        s.name for s in full.schema.tensors if s.role == "head"
    ]


@pytest.mark.parametrize("method", TOP_LAYER_METHODS)
def test_the_dropped_layers_compute_the_frozen_backbone_whatever_the_adapter(
    tiny_bert: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    """What makes them cacheable: embeddings and layer 0 give the plain backbone's states, the top layer does not."""
    plain = _hidden_states(_plain(tiny_bert), batch)
    model = _build(tiny_bert, method, drop_layers=1).eval()
    _perturb(model)
    adapted = _hidden_states(model.module, batch)
    for index in (0, 1):  # embeddings, layer 0
        torch.testing.assert_close(adapted[index], plain[index], atol=0, rtol=0)
    assert (adapted[2] - plain[2]).abs().max() > 1e-3
    below = [n for n, p in model.module.named_parameters() if p.requires_grad and ".layer.0." in n]
    assert below == []


@pytest.mark.parametrize("method", TOP_LAYER_METHODS)
def test_top_layer_methods_are_identity_at_init(tiny_bert: Path, batch: dict[str, torch.Tensor], method: str) -> None:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = _plain(tiny_bert)
    model = _build(tiny_bert, method, drop_layers=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits, atol=1e-6, rtol=0)


def test_ffa_lora_with_drop_layers_freezes_every_a_and_trains_b(
    tiny_bert: Path, batch: dict[str, torch.Tensor]
) -> None:
    model = _build(tiny_bert, "ffa-lora", drop_layers=1)
    a = {n: p.detach().clone() for n, p in model.module.named_parameters() if ".lora_A." in n}
    b = {n: p.detach().clone() for n, p in model.module.named_parameters() if ".lora_B." in n}
    assert sorted(a) == sorted(n.replace("lora_B", "lora_A") for n in b) and len(a) == 2  # query, value of layer 1
    assert not [n for n, p in model.module.named_parameters() if ".lora_A." in n and p.requires_grad]
    assert model.schema.extras["lora_a_hash"] != _build(tiny_bert, "ffa-lora").schema.extras["lora_a_hash"]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    now = dict(model.module.named_parameters())
    assert all(torch.equal(a[n], now[n]) for n in a)
    assert all(not torch.equal(b[n], now[n]) for n in b)


def test_the_layer_rule_reads_the_first_number_so_layer_1_never_selects_layer_10() -> None:
    """On 12 layers, dropping 1 keeps 1..11 (a prefix match on '1' would also drop 10 and 11)."""
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=12, num_attention_heads=2, intermediate_size=8)
    for method in TOP_LAYER_METHODS:
        torch.manual_seed(0)
        classifier = SequenceClassifier(BertModel(config), PoolingConfig(mode="cls"), num_labels=2, head_dropout=0.0)
        applied = make_method_config(method, drop_layers=1).apply(classifier)
        assert _adapted_layers(applied.module) == set(range(1, 12)), method


@pytest.mark.parametrize("method", TOP_LAYER_METHODS)
def test_drop_layers_is_in_the_schema_only_when_set(tiny_bert: Path, method: str) -> None:
    """At 0 the schema is what it was before the field existed, so saved adapters and checkpoints keep their ids."""
    assert "drop_layers" not in schema_method_dict(make_method_config(method))
    assert schema_method_dict(make_method_config(method, drop_layers=1))["drop_layers"] == 1
    assert _build(tiny_bert, method).schema_id != _build(tiny_bert, method, drop_layers=1).schema_id


@pytest.mark.parametrize("method", TOP_LAYER_METHODS)
@pytest.mark.parametrize("bad", [-1, True, 1.5, "1"])
def test_drop_layers_must_be_a_non_negative_integer(method: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"drop_layers must be a non-negative integer, got {re.escape(repr(bad))}"):
        make_method_config(method, drop_layers=bad)


@pytest.mark.parametrize("method", TOP_LAYER_METHODS)
def test_drop_layers_must_leave_a_layer(tiny_bert: Path, method: str) -> None:
    with pytest.raises(ConfigError, match="drop_layers=2 leaves no layer with an adapter: the backbone has 2 layers"):
        _build(tiny_bert, method, drop_layers=2)


# ---------------------------------------------------------------------------------------------- head


def test_head_trains_the_classifier_and_nothing_else(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model = _build(tiny_bert, "head")
    assert [(s.name, s.shape, s.role) for s in model.schema.tensors] == [
        ("classifier.weight", (3, 32), "head"),
        ("classifier.bias", (3,), "head"),
    ]
    assert model.num_parameters()[1] == 3 * 32 + 3
    assert model.schema.method == {"name": "head"}
    assert isinstance(model.module, SequenceClassifier)  # no wrapper: nothing is put on the backbone

    plain = _plain(tiny_bert)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)

    before = model.state()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.frozen.check_frozen()
    model.frozen.check_unchanged()
    assert all(not torch.equal(before[n], t) for n, t in model.state().items())
    hidden, plain_hidden = _hidden_states(model.eval().module, batch), _hidden_states(plain, batch)
    torch.testing.assert_close(hidden[-1], plain_hidden[-1], atol=0, rtol=0)  # the whole encoder stays frozen


def test_head_has_no_size_or_settings() -> None:
    with pytest.raises(ConfigError, match="'head' has no rank or size"):
        make_method_config("head", 8)
    with pytest.raises(ConfigError, match=r"method 'head' has no settings \['drop_layers'\]; it has \[\]"):
        make_method_config("head", drop_layers=1)
