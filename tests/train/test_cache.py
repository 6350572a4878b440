"""Frozen-prefix activation cache: same logits and same training as the full model with its
lower layers in eval mode, spilling to disk, cleanup, and refusing what cannot be cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn
from transformers import BertTokenizerFast

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.data.batching import EncodedTexts, collate, encode_texts
from fedadapt.errors import ConfigError
from fedadapt.train.loop import TrainConfig, train_adapter
from fedadapt.train.prefix_cache import PrefixCache, forward_from_cache, train_adapter_cached

TEXTS = [
    "my card has not arrived yet",
    "top up",
    "why is my transfer declined",
    "where is my money",
    "balance",
    "the account top up has not arrived yet why",
    "card declined",
]
TOL = 1e-5


def _model(folder: Path, method: str = "pfeiffer", head_dropout: float = 0.1, **fields: Any) -> AdapterModel:
    loaded = load_backbone(BackboneConfig(name_or_path=str(folder), num_labels=3, head_dropout=head_dropout))
    return AdapterModel(loaded, make_method_config(method, **fields))


def _perturb(model: AdapterModel, seed: int = 7) -> None:
    """Random values in every trainable tensor, so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    model.load_state({n: t + 0.3 * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


def _data(folder: Path) -> EncodedTexts:
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    return encode_texts(tokenizer, TEXTS, [i % 3 for i in range(len(TEXTS))], max_length=32)


def _lower_eval(model: AdapterModel, frozen_layers: int) -> None:
    """The cache's rule on the full model: embeddings and layers below ``frozen_layers`` in eval mode."""
    backbone = cast(nn.Module, model.module.backbone)
    for module in (backbone.embeddings, *backbone.encoder.layer[:frozen_layers]):
        module.eval()


def _no_dropout(model: AdapterModel) -> None:
    for module in model.module.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


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


def test_rows_are_unpadded(tiny_bert: Path) -> None:
    data = _data(tiny_bert)
    with PrefixCache(_model(tiny_bert, drop_layers=1), data, frozen_layers=1) as cache:
        assert [cache.row(i).shape[0] for i in range(len(data))] == [len(ids) for ids in data.input_ids]
        assert cache.num_spilled == 0 and cache.spill_path is None
        assert cache.memory_bytes == sum(len(ids) for ids in data.input_ids) * 32 * 4


def _train_pair(folder: Path, dropout: bool, seed: int = 3) -> tuple[AdapterModel, AdapterModel]:
    """Two identical models trained 4 steps: ``train_adapter`` on the full model and
    ``train_adapter_cached``. With dropout, the full model's lower layers are kept in eval mode
    through the ``forward`` hook (the cache's rule); without, plain ``train_adapter`` runs."""
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

    def full_forward(indices: list[int], device: torch.device) -> torch.Tensor:
        _lower_eval(full, 1)  # train_adapter switched the whole model to train mode
        return cast(torch.Tensor, full(**collate(data, indices)).loss)

    train_adapter(full, data, config, forward=full_forward if dropout else None)
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
    with pytest.raises(ConfigError, match="layer 0 holds adapters"):
        PrefixCache(_model(tiny_bert), data, frozen_layers=1)  # drop_layers=0
    with pytest.raises(ConfigError, match="frozen_layers must be an integer in"):
        PrefixCache(_model(tiny_bert, drop_layers=1), data, frozen_layers=2)  # the top layer
    with pytest.raises(ConfigError, match="frozen_layers must be an integer in"):
        PrefixCache(_model(tiny_bert, drop_layers=1), data, frozen_layers=0)


def test_lora_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match="adapters in every layer"):
        PrefixCache(_model(tiny_bert, "lora"), _data(tiny_bert), frozen_layers=1)


def test_bitfit_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match="cannot use the prefix cache"):
        PrefixCache(_model(tiny_bert, "bitfit"), _data(tiny_bert), frozen_layers=1)
