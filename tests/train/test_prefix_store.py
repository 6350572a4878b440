"""Frozen-prefix states on disk (fedadapt.train.prefix_store): the states the model computes, a hit without
recomputing, a new entry for any change of key, never over the cap, least recently used evicted first, and a
damaged or half-written file is a miss, never a crash."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_vocab import TEXTS
from transformers import BertModel, BertTokenizerFast

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.data.batching import EncodedTexts, collate, encode_texts
from fedadapt.train import prefix_store
from fedadapt.train.loop import TrainConfig
from fedadapt.train.prefix_cache import PrefixCache, forward_from_cache, train_adapter_cached
from fedadapt.train.prefix_store import (
    TEMP_PREFIX,
    PrefixKey,
    PrefixStore,
    examples_digest,
    prefix_key,
    tokenizer_digest,
)

LABELS = tuple(i % 3 for i in range(len(TEXTS)))
TOL = 1e-5


def _model(folder: Path, method: Any = None) -> AdapterModel:
    loaded = load_backbone(BackboneConfig(name_or_path=str(folder), num_labels=3))
    return AdapterModel(loaded, method or make_method_config("pfeiffer", drop_layers=1))


def _encode(model: AdapterModel, texts: tuple[str, ...], labels: tuple[int, ...], max_length: int) -> EncodedTexts:
    return encode_texts(model.backbone.tokenizer, texts, labels, max_length)


@dataclasses.dataclass
class Examples:
    """A model, its examples and the key of their frozen prefix: what one device trains on."""

    model: AdapterModel
    data: EncodedTexts
    key: PrefixKey


def _examples(
    model: AdapterModel,
    texts: tuple[str, ...] = TEXTS,
    labels: tuple[int, ...] = LABELS,
    max_length: int = 32,
    frozen_layers: int = 1,
    dtype: str = "float16",
) -> Examples:
    key = prefix_key(model, frozen_layers, texts, labels, max_length, dtype)
    return Examples(model, _encode(model, texts, labels, max_length), key)


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the times the frozen prefix is computed (each time: every example through the lower layers)."""
    calls: list[int] = []
    compute = prefix_store.compute_prefix_states

    def counting(model: AdapterModel, data: EncodedTexts, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(data))
        return compute(model, data, *args, **kwargs)

    monkeypatch.setattr(prefix_store, "compute_prefix_states", counting)
    return calls


@pytest.fixture(scope="module")
def other_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with one weight of layer 0 changed: another backbone, the same tokenizer."""
    folder = tmp_path_factory.mktemp("other-bert")
    shutil.copytree(tiny_bert, folder, dirs_exist_ok=True)
    model = BertModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.add_(0.01)
    model.save_pretrained(folder)
    return folder


def test_a_stored_entry_holds_what_the_model_computes(tiny_bert: Path, tmp_path: Path) -> None:
    model = _model(tiny_bert)
    exact, half = _examples(model, dtype="float32"), _examples(model)
    store = PrefixStore(tmp_path / "cache")
    indices = list(range(len(TEXTS)))
    with PrefixCache(model, exact.data, frozen_layers=1) as in_memory:
        expected = in_memory.batch(indices)
    for examples, tolerance in ((exact, 0.0), (half, 2e-3)):  # float16 keeps 11 significant bits
        states, use = store.load_or_build(model, examples.data, examples.key, device="cpu")
        assert not use.hit and use.stored and store.path(examples.key).is_file()
        got = states.batch(indices)
        assert torch.equal(got["attention_mask"], expected["attention_mask"])
        assert torch.equal(got["labels"], expected["labels"])
        assert (got["hidden"] - expected["hidden"]).abs().max().item() <= tolerance * expected["hidden"].abs().max()
    assert len(store.entries()) == 2
    stored = load_file(store.path(half.key))
    assert stored["states"].dtype == torch.float16
    assert stored["lengths"].tolist() == [len(ids) for ids in half.data.input_ids]


def test_logits_from_a_stored_float32_entry_equal_the_full_model(tiny_bert: Path, tmp_path: Path) -> None:
    model = _model(tiny_bert)
    model.load_state({n: t + 0.3 for n, t in model.state().items()})
    examples = _examples(model, dtype="float32")
    store = PrefixStore(tmp_path)
    store.load_or_build(model, examples.data, examples.key, device="cpu")
    states, use = store.load_or_build(model, examples.data, examples.key, device="cpu")  # read back, mapped
    assert use.hit
    indices = [0, 1, 2, 4, 5]
    model.eval()
    with torch.no_grad():
        expected = model(**collate(examples.data, indices)).logits
        got = forward_from_cache(model, states.batch(indices), frozen_layers=1).logits
    assert (got - expected).abs().max().item() <= TOL


def test_a_second_run_reads_the_entry_without_computing(tiny_bert: Path, tmp_path: Path, computed: list[int]) -> None:
    model = _model(tiny_bert)
    examples = _examples(model)
    first, use = PrefixStore(tmp_path).load_or_build(model, examples.data, examples.key, device="cpu")
    assert not use.hit and computed == [len(TEXTS)]
    again, use = PrefixStore(tmp_path).load_or_build(model, examples.data, examples.key, device="cpu")  # a new store
    assert use.hit and use.stored and computed == [len(TEXTS)]
    indices = list(range(len(TEXTS)))
    assert torch.equal(again.batch(indices)["hidden"], first.batch(indices)["hidden"])


# Each part of the key changed by what really changes it: a backbone weight below layer k, the tokenizer's
# lower-casing, max_length, k, the examples' order or a label, and the stored dtype.
KEY_CHANGES: dict[str, Callable[[Path, Path], Examples]] = {
    "prefix": lambda bert, other: _examples(_model(other)),
    "tokenizer": lambda bert, other: _examples(_lowercase_off(_model(bert))),
    "max_length": lambda bert, other: _examples(_model(bert), max_length=6),
    "frozen_layers": lambda bert, other: _examples(_model(bert, make_method_config("head")), frozen_layers=2),
    "examples-order": lambda bert, other: _examples(_model(bert), texts=TEXTS[::-1], labels=LABELS[::-1]),
    "examples-label": lambda bert, other: _examples(_model(bert), labels=(2, *LABELS[1:])),
    "dtype": lambda bert, other: _examples(_model(bert), dtype="float32"),
}


def _lowercase_off(model: AdapterModel) -> AdapterModel:
    model.backbone.tokenizer = BertTokenizerFast.from_pretrained(
        model.backbone.config.name_or_path, do_lower_case=False
    )
    return model


@pytest.mark.parametrize("part", sorted(KEY_CHANGES))
def test_any_change_of_key_is_a_new_entry(
    tiny_bert: Path, other_bert: Path, tmp_path: Path, computed: list[int], part: str
) -> None:
    store = PrefixStore(tmp_path)
    original = _examples(
        _model(tiny_bert, make_method_config("head")) if part == "frozen_layers" else _model(tiny_bert)
    )
    store.load_or_build(original.model, original.data, original.key, device="cpu")
    changed = KEY_CHANGES[part](tiny_bert, other_bert)
    field = part.split("-")[0]
    assert getattr(changed.key, field) != getattr(original.key, field)
    assert [f for f in ("prefix", "tokenizer", "max_length", "frozen_layers", "examples", "dtype")
            if getattr(changed.key, f) != getattr(original.key, f)] == [field]  # fmt: skip
    assert store.open(changed.key, changed.data) is None
    _, use = store.load_or_build(changed.model, changed.data, changed.key, device="cpu")
    assert not use.hit and len(computed) == 2  # computed afresh
    assert {p.name for p in store.entries()} == {store.path(original.key).name, store.path(changed.key).name}
    assert store.open(original.key, original.data) is not None  # the other entry stays until the cap needs room


def test_the_tokenizer_digest_ignores_what_each_call_sets(tiny_bert: Path) -> None:
    tokenizer = BertTokenizerFast.from_pretrained(tiny_bert)
    before = prefix_store._tokenizer_digest(tokenizer)  # computed, not remembered
    encode_texts(tokenizer, TEXTS, LABELS, max_length=4)  # leaves truncation set on the fast backend
    assert prefix_store._tokenizer_digest(tokenizer) == before
    assert tokenizer_digest(BertTokenizerFast.from_pretrained(tiny_bert)) == before


def test_the_tokenizer_digest_is_remembered_until_the_vocabulary_grows(tiny_bert: Path) -> None:
    tokenizer = BertTokenizerFast.from_pretrained(tiny_bert)
    before = tokenizer_digest(tokenizer)
    assert prefix_store._TOKENIZER_DIGESTS[tokenizer] == (len(tokenizer), before)
    tokenizer.add_tokens(["overdraft"])  # the same object, other ids for some texts
    assert tokenizer_digest(tokenizer) != before


def test_the_examples_digest_sees_order_labels_and_boundaries() -> None:
    digests = {
        examples_digest(["ab", "c"], [0, 1]),
        examples_digest(["a", "bc"], [0, 1]),
        examples_digest(["c", "ab"], [1, 0]),
        examples_digest(["ab", "c"], [1, 1]),
    }
    assert len(digests) == 4


def _sized_examples(model: AdapterModel, count: int) -> list[Examples]:
    """``count`` different example sets of the same size (a label changed): entries of one size each."""
    return [_examples(model, labels=(i, *LABELS[1:])) for i in range(count)]


def test_the_cap_is_never_exceeded_and_the_least_recently_used_go_first(tiny_bert: Path, tmp_path: Path) -> None:
    model = _model(tiny_bert)
    sets = _sized_examples(model, 8)
    probe = PrefixStore(tmp_path / "probe")
    probe.load_or_build(model, sets[0].data, sets[0].key, device="cpu")
    entry_bytes = probe.used_bytes()
    cap = int(3.5 * entry_bytes)
    store = PrefixStore(tmp_path / "cache", max_bytes=cap)
    for index, examples in enumerate(sets):
        if index >= 3:
            assert store.open(sets[0].key, sets[0].data) is not None  # the first entry, used in every round
        store.load_or_build(model, examples.data, examples.key, device="cpu")
        assert store.used_bytes() <= cap
        assert len(store.entries()) == min(index + 1, 3)
    # Each write evicted the entry used least recently: never the first one, which is used each time.
    assert [p.name for p in store.entries()] == [store.path(sets[i].key).name for i in (6, 0, 7)]


def test_an_entry_over_the_whole_cap_serves_from_memory(tiny_bert: Path, tmp_path: Path, computed: list[int]) -> None:
    model = _model(tiny_bert)
    examples = _examples(model)
    for cap in (0, 100):
        store = PrefixStore(tmp_path / f"cap-{cap}", max_bytes=cap)
        states, use = store.load_or_build(model, examples.data, examples.key, device="cpu")
        assert not use.hit and not use.stored and store.used_bytes() == 0
        assert states.batch([0, 1])["hidden"].shape == (2, len(examples.data.input_ids[0]), 32)
    assert not (tmp_path / "cap-0").exists()  # nothing to keep: no folder either


def test_a_folder_that_cannot_be_written_serves_from_memory(
    tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(tiny_bert)
    examples = _examples(model, dtype="float32")
    (tmp_path / "a-file").write_text("not a folder")
    store = PrefixStore(tmp_path / "a-file" / "cache")
    with caplog.at_level(logging.WARNING, logger="fedadapt.train.prefix_store"):
        states, use = store.load_or_build(model, examples.data, examples.key, device="cpu")
    assert not use.stored and "could not keep" in caplog.text
    with PrefixCache(model, examples.data, frozen_layers=1) as in_memory:
        assert torch.equal(states.batch([0, 5])["hidden"], in_memory.batch([0, 5])["hidden"])


def _damage(path: Path, how: str, other: Path) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[:-50])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(blob)))
    elif how == "header-too-long":
        path.write_bytes((2**40).to_bytes(8, "little") + blob[8:])
    elif how == "another-key":  # a sound file of another entry under this name
        shutil.copyfile(other, path)
    elif how == "wrong-lengths":  # sound safetensors, its lengths not the examples' token counts
        tensors = load_file(path)
        tensors["lengths"] = tensors["lengths"].flip(0)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "header-too-long", "another-key", "wrong-lengths"])
def test_a_damaged_entry_is_a_miss_then_rebuilt(
    tiny_bert: Path, tmp_path: Path, computed: list[int], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(tiny_bert)
    examples, other = _sized_examples(model, 2)
    store = PrefixStore(tmp_path)
    store.load_or_build(model, other.data, other.key, device="cpu")
    expected, _ = store.load_or_build(model, examples.data, examples.key, device="cpu")
    expected_hidden = expected.batch([0, 3])["hidden"].clone()
    _damage(store.path(examples.key), how, store.path(other.key))
    with caplog.at_level(logging.WARNING, logger="fedadapt.train.prefix_store"):
        assert store.open(examples.key, examples.data) is None
    assert "unreadable" in caplog.text and not store.path(examples.key).exists()
    states, use = store.load_or_build(model, examples.data, examples.key, device="cpu")
    assert not use.hit and use.stored and len(computed) == 3
    assert torch.equal(states.batch([0, 3])["hidden"], expected_hidden)
    result = train_adapter_cached(model, states, TrainConfig(max_steps=2, batch_size=4, device="cpu"))
    assert result.steps == 2


def test_a_write_cut_short_leaves_no_entry_and_its_leftover_is_never_read(
    tiny_bert: Path, tmp_path: Path, computed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny_bert)
    examples = _examples(model)
    store = PrefixStore(tmp_path)

    def crash(*args: Any) -> None:
        raise KeyboardInterrupt  # the process stops between writing and renaming

    with monkeypatch.context() as patch:
        patch.setattr(prefix_store.os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            store.load_or_build(model, examples.data, examples.key, device="cpu")
    assert list(tmp_path.iterdir()) == []  # the temporary file went with it
    leftover = tmp_path / f"{TEMP_PREFIX}killed"  # a process killed outright leaves its temporary file
    leftover.write_bytes(b"half an entry")
    assert store.open(examples.key, examples.data) is None  # never read
    os.utime(leftover, (1, 1))  # long ago: its writer is gone
    store.load_or_build(model, examples.data, examples.key, device="cpu")
    assert not leftover.exists() and [p.name for p in tmp_path.iterdir()] == [store.path(examples.key).name]
