"""Frozen-prefix activation cache: the frozen prefix found from the model, the same logits and the same
training as the full model for every method that leaves one, spilling to disk, cleanup, and refusing
what cannot be cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_vocab import TEXTS
from torch import nn
from transformers import BertTokenizerFast

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.data.batching import EncodedTexts, collate, encode_texts
from fedadapt.errors import ConfigError
from fedadapt.methods import MethodConfig
from fedadapt.train.frozen_prefix import frozen_prefix_depth
from fedadapt.train.loop import TrainConfig, train_adapter
from fedadapt.train.personalize import train_only
from fedadapt.train.prefix_cache import PrefixCache, forward_from_cache, train_adapter_cached

TOL = 1e-5


# (method, its settings, the frozen prefix it leaves on the 2-layer tiny BERT)
CACHING_METHODS = [
    pytest.param("pfeiffer", {"drop_layers": 1}, 1, id="pfeiffer-drop1"),
    pytest.param("houlsby", {"drop_layers": 1}, 1, id="houlsby-drop1"),
    pytest.param("parallel", {"drop_layers": 1}, 1, id="parallel-drop1"),
    pytest.param("pfeiffer", {"layers": (1,)}, 1, id="pfeiffer-top-layer"),
    pytest.param("lora", {"drop_layers": 1}, 1, id="lora-drop1"),
    pytest.param("ffa-lora", {"drop_layers": 1}, 1, id="ffa-lora-drop1"),
    pytest.param("ia3", {"drop_layers": 1}, 1, id="ia3-drop1"),
    pytest.param("head", {}, 2, id="head"),
]


def _method(method: str, fields: dict[str, Any]) -> MethodConfig:
    return make_method_config(method, **fields)


def _model(
    folder: Path, method: str | MethodConfig = "pfeiffer", head_dropout: float = 0.1, **fields: Any
) -> AdapterModel:
    loaded = load_backbone(BackboneConfig(name_or_path=str(folder), num_labels=3, head_dropout=head_dropout))
    return AdapterModel(loaded, _method(method, fields))


def _perturb(model: AdapterModel, seed: int = 7) -> None:
    """Random values in every trainable tensor, so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    model.load_state({n: t + 0.3 * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


def _data(folder: Path) -> EncodedTexts:
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    return encode_texts(tokenizer, TEXTS, [i % 3 for i in range(len(TEXTS))], max_length=32)


def _no_dropout(model: AdapterModel) -> None:
    for module in model.module.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@pytest.mark.parametrize(("method", "fields", "depth"), CACHING_METHODS)
def test_the_frozen_prefix_is_found_from_the_model(
    tiny_bert: Path, method: str | MethodConfig, fields: dict[str, Any], depth: int
) -> None:
    assert frozen_prefix_depth(_model(tiny_bert, method, **fields)) == depth


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("pfeiffer", {}),  # adapters from layer 0
        ("lora", {}),
        ("ffa-lora", {}),
        ("ia3", {}),
        ("bitfit", {}),  # biases everywhere, the embeddings' LayerNorm too
        ("full", {}),
        ("prompt", {"num_virtual_tokens": 2}),  # virtual tokens before every layer's input
        ("prefix", {"num_virtual_tokens": 2}),
    ],
)
def test_methods_that_train_the_lowest_layer_leave_no_frozen_prefix(
    tiny_bert: Path, method: str, fields: dict[str, Any]
) -> None:
    assert frozen_prefix_depth(_model(tiny_bert, method, **fields)) == 0


def test_the_frozen_prefix_follows_what_trains_now(tiny_bert: Path) -> None:
    model = _model(tiny_bert, "lora")
    assert frozen_prefix_depth(model) == 0
    with train_only(model, ("head",)):  # personalization: only the head trains meanwhile
        assert frozen_prefix_depth(model) == 2
    assert frozen_prefix_depth(model) == 0


@pytest.mark.parametrize(("method", "depth"), [("pfeiffer", 1), ("lora", 0)])
def test_training_runs_the_frozen_prefix_in_eval_mode_and_the_rest_in_train_mode(
    tiny_bert: Path, method: str, depth: int
) -> None:
    model = _model(tiny_bert, method, **({"drop_layers": 1} if method == "pfeiffer" else {}))
    backbone = model.module.backbone if depth else model.module.get_base_model().backbone
    modes: list[list[bool]] = []

    def record(step: int, total: int, loss: float) -> None:
        modes.append([backbone.embeddings.training, *(layer.training for layer in backbone.encoder.layer)])

    train_adapter(model, _data(tiny_bert), TrainConfig(max_steps=2, batch_size=4, device="cpu"), on_step=record)
    # AdapterDrop's frozen layer 0 and the embeddings run without dropout; with nothing frozen nothing changes
    expected = [False, False, True] if depth else [True, True, True]
    assert modes == [expected, expected]
    assert not any(m.training for m in model.module.modules())  # eval mode after training, as before


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling_folder", ["tiny_bert", "tiny_bert_plain"])
def test_cached_logits_equal_full_model(attn: str, pooling_folder: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(pooling_folder)  # mean pooling + normalize, and CLS pooling
    model = _model(folder, drop_layers=1)
    model.module.backbone.set_attn_implementation(attn)
    _perturb(model)
    data = _data(folder)
    indices = [0, 1, 2, 4, 5]  # lengths differ: the batch is padded
    full_batch = collate(data, indices)
    assert (full_batch["attention_mask"] == 0).any()
    model.eval()
    with torch.no_grad(), PrefixCache(model, data, frozen_layers=1, fill_batch_size=3) as cache:
        expected = model(**full_batch)
        got = forward_from_cache(model, cache.batch(indices), frozen_layers=1)
    torch.testing.assert_close(got.logits, expected.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=TOL, rtol=0)


@pytest.mark.parametrize(("method", "fields", "depth"), CACHING_METHODS)
def test_cached_logits_equal_full_model_for_every_method_that_caches(
    tiny_bert: Path, method: str | MethodConfig, fields: dict[str, Any], depth: int
) -> None:
    model = _model(tiny_bert, method, **fields)
    _perturb(model)  # every trainable tensor moved: adapters and head change the output
    data = _data(tiny_bert)
    indices = [0, 1, 2, 4, 5]
    model.eval()
    with torch.no_grad(), PrefixCache(model, data, frozen_layers=depth, fill_batch_size=3) as cache:
        expected = model(**collate(data, indices))
        got = forward_from_cache(model, cache.batch(indices), frozen_layers=depth)
    assert (got.logits - expected.logits).abs().max().item() <= TOL
    assert abs(got.loss.item() - expected.loss.item()) <= TOL


@pytest.mark.parametrize(("method", "fields", "depth"), CACHING_METHODS)
def test_training_from_cache_equals_full_training_for_every_method_that_caches(
    tiny_bert: Path, method: str | MethodConfig, fields: dict[str, Any], depth: int
) -> None:
    data = _data(tiny_bert)
    config = TrainConfig(max_steps=4, batch_size=3, learning_rate=5e-2, seed=5, device="cpu", warmup_ratio=0.0)
    full, cached = _model(tiny_bert, method, **fields), _model(tiny_bert, method, **fields)
    for model in (full, cached):
        _perturb(model)
    start = full.state()
    train_adapter(full, data, config)  # dropout on above the frozen prefix, in the head too: the same masks
    with PrefixCache(cached, data, frozen_layers=depth) as cache:
        train_adapter_cached(cached, cache, config)
    assert max((full.state()[n] - t).abs().max().item() for n, t in start.items()) > 1e-2  # it did train
    for name, tensor in full.state().items():
        assert (cached.state()[name] - tensor).abs().max().item() <= TOL, name


def test_training_from_cache_masks_absent_labels_as_the_full_model_does(tiny_bert: Path) -> None:
    data = _data(tiny_bert)
    data = EncodedTexts(data.input_ids, tuple(0 if y == 2 else y for y in data.labels), data.pad_token_id)  # no 2
    config = TrainConfig(max_steps=3, batch_size=4, seed=2, device="cpu", mask_absent_labels=True)
    full, cached = _model(tiny_bert, drop_layers=1), _model(tiny_bert, drop_layers=1)
    start = full.state()
    train_adapter(full, data, config)
    with PrefixCache(cached, data, frozen_layers=1) as cache:
        train_adapter_cached(cached, cache, config)
    head = "classifier.bias"
    assert torch.equal(full.state()[head][2], start[head][2])  # zero at start, and no gradient moved it
    for name, tensor in full.state().items():
        assert (cached.state()[name] - tensor).abs().max().item() <= TOL, name


def test_rows_are_unpadded(tiny_bert: Path) -> None:
    data = _data(tiny_bert)
    with PrefixCache(_model(tiny_bert, drop_layers=1), data, frozen_layers=1) as cache:
        assert [cache.row(i).shape[0] for i in range(len(data))] == [len(ids) for ids in data.input_ids]
        assert cache.num_spilled == 0 and cache.spill_path is None
        assert cache.memory_bytes == sum(len(ids) for ids in data.input_ids) * 32 * 4


def _train_pair(folder: Path, dropout: bool, seed: int = 3) -> tuple[AdapterModel, AdapterModel]:
    """Two identical models trained 4 steps: ``train_adapter`` on the full model and
    ``train_adapter_cached``. The full model's frozen lower layer runs in eval mode there too
    (the training loop's rule), so even with dropout on above it both draw the same masks."""
    data = _data(folder)
    config = TrainConfig(max_steps=4, batch_size=3, learning_rate=5e-2, seed=seed, device="cpu", warmup_ratio=0.0)
    models = []
    for _ in range(2):
        model = _model(folder, drop_layers=1, head_dropout=0.1 if dropout else 0.0)
        _perturb(model)
        if not dropout:
            _no_dropout(model)
        models.append(model)
    full, cached = models
    train_adapter(full, data, config)
    with PrefixCache(cached, data, frozen_layers=1) as cache:
        train_adapter_cached(cached, cache, config)
    return full, cached


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "upper-dropout-same-seed"])
def test_training_from_cache_equals_full_training(tiny_bert: Path, dropout: bool) -> None:
    # Without dropout anywhere, and with dropout on in the upper layers and the head: the same
    # seed draws the same masks in both, since the lower layers draw none (eval mode) in either.
    full, cached = _train_pair(tiny_bert, dropout)
    before = _model(tiny_bert, drop_layers=1)
    _perturb(before)
    moved = max((full.state()[n] - t).abs().max().item() for n, t in before.state().items())
    assert moved > 1e-2  # the steps did train
    for name, tensor in full.state().items():
        torch.testing.assert_close(cached.state()[name], tensor, atol=TOL, rtol=0, msg=name)


def test_spill_to_disk_gives_same_batches_and_is_removed(tiny_bert: Path, tmp_path: Path) -> None:
    model = _model(tiny_bert, drop_layers=1)
    data = _data(tiny_bert)
    indices = list(range(len(data)))
    with PrefixCache(model, data, frozen_layers=1, fill_batch_size=2) as in_memory:
        expected = in_memory.batch(indices)
    spilling = PrefixCache(model, data, frozen_layers=1, max_memory_bytes=0, spill_dir=tmp_path, fill_batch_size=2)
    folder = spilling.spill_path
    assert folder is not None and folder.parent == tmp_path
    assert spilling.num_spilled == len(data) and spilling.memory_bytes == 0
    assert sorted(p.suffix for p in folder.iterdir()) == [".npy"] * 4  # one chunk per fill batch
    got = spilling.batch(indices)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, atol=0, rtol=0)
    spilling.close()
    assert not folder.exists()
    with pytest.raises(RuntimeError, match="closed"):
        spilling.row(0)


def test_partial_spill_trains_like_in_memory(tiny_bert: Path, tmp_path: Path) -> None:
    data = _data(tiny_bert)
    config = TrainConfig(max_steps=3, batch_size=4, seed=1, device="cpu")
    states = []
    for cap in (2**30, 2_000):  # everything in memory; a few rows in memory, the rest on disk
        model = _model(tiny_bert, drop_layers=1)
        with PrefixCache(model, data, frozen_layers=1, max_memory_bytes=cap, spill_dir=tmp_path) as cache:
            assert (cache.num_spilled > 0) == (cap == 2_000)
            assert 0 < cache.num_spilled < len(data) or cap != 2_000
            train_adapter_cached(model, cache, config)
        states.append(model.state())
    assert not list(tmp_path.iterdir())
    for name, tensor in states[0].items():
        torch.testing.assert_close(states[1][name], tensor, atol=0, rtol=0)


def test_frozen_layers_above_drop_layers_is_refused(tiny_bert: Path) -> None:
    data = _data(tiny_bert)
    with pytest.raises(ConfigError, match="parameters below layer 1 train .* its frozen prefix is 0 layers"):
        PrefixCache(_model(tiny_bert), data, frozen_layers=1)  # drop_layers=0
    with pytest.raises(ConfigError, match="below layer 2 train .* its frozen prefix is 1 layers"):
        PrefixCache(_model(tiny_bert, drop_layers=1), data, frozen_layers=2)  # the top layer trains
    with pytest.raises(ConfigError, match=r"frozen_layers must be an integer in \[1, 2\]"):
        PrefixCache(_model(tiny_bert, drop_layers=1), data, frozen_layers=0)
    with pytest.raises(ConfigError, match=r"frozen_layers must be an integer in \[1, 2\]"):
        PrefixCache(_model(tiny_bert, drop_layers=1), data, frozen_layers=3)


def test_lora_on_every_layer_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match="'lora' cannot use the prefix cache .* frozen prefix is 0 layers"):
        PrefixCache(_model(tiny_bert, "lora"), _data(tiny_bert), frozen_layers=1)


def test_virtual_tokens_are_refused(tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match="virtual tokens before the input of every layer"):
        PrefixCache(_model(tiny_bert, "prompt", num_virtual_tokens=2), _data(tiny_bert), frozen_layers=1)


def test_bitfit_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match="cannot use the prefix cache"):
        PrefixCache(_model(tiny_bert, "bitfit"), _data(tiny_bert), frozen_layers=1)
