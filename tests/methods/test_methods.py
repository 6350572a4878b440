"""Adapter methods on a frozen backbone: pooling, identity at init, trainable sets, training, merging."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.errors import BackboneError, ConfigError
from fedadapt.model.backbone import SequenceClassifier
from fedadapt.model.pooling import PoolingConfig

METHODS = ["lora", "ffa-lora", "ia3", "prompt", "prefix", "bitfit"]
PEFT_METHODS = [m for m in METHODS if m != "bitfit"]


def _cfg(folder: Path, **kwargs: Any) -> BackboneConfig:
    return BackboneConfig(name_or_path=str(folder), num_labels=3, **kwargs)


def _build(folder: Path, method: str, seed: int = 0, **fields: Any) -> AdapterModel:
    return AdapterModel(load_backbone(_cfg(folder, seed=seed)), make_method_config(method, **fields))


def _logits(model: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits  # type: ignore[operator, no-any-return]


def _perturb(model: AdapterModel, scale: float = 0.3, seed: int = 7) -> None:
    """Random non-trivial values in every trainable tensor (LoRA's B stops being zero)."""
    gen = torch.Generator().manual_seed(seed)
    model.load_state({n: t + scale * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state_dict(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed[:5]}"


# ---------------------------------------------------------------------------------------- pooling


def test_sentence_transformers_folder_loads_mean_normalized_pooling(tiny_bert: Path) -> None:
    assert load_backbone(_cfg(tiny_bert)).pooling == PoolingConfig(mode="mean", normalize=True)


def test_plain_folder_loads_cls_pooling(tiny_bert_plain: Path) -> None:
    assert load_backbone(_cfg(tiny_bert_plain)).pooling == PoolingConfig(mode="cls", normalize=False)


@pytest.mark.parametrize("method", METHODS)
def test_mean_pooling_ignores_padding(tiny_bert: Path, batch: dict[str, torch.Tensor], method: str) -> None:
    """A text alone and the same text inside a right-padded batch get the same logits."""
    model = _build(tiny_bert, method).eval()
    if method != "lora":  # LoRA is checked at init, as the brief says; the others with trained-looking values
        _perturb(model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    padded = _logits(model, batch)
    assert int(batch["attention_mask"][1].sum()) < batch["attention_mask"].shape[1], "text 1 must be padded"
    alone = _logits(model, dict(tokenizer(["top up"], return_tensors="pt")))
    torch.testing.assert_close(alone[0], padded[1], atol=1e-5, rtol=0)


def test_normalized_mean_pooling_gives_unit_vectors(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    loaded = load_backbone(_cfg(tiny_bert))
    model = loaded.model.eval()
    with torch.no_grad():
        hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        pooled = model.pooler(hidden, batch["attention_mask"])
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "ia3"])
def test_reparametrizing_methods_are_identity_at_init(
    tiny_bert: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    plain = load_backbone(_cfg(tiny_bert)).model.eval()
    model = _build(tiny_bert, method).eval()
    torch.testing.assert_close(_logits(model, batch), _logits(plain, batch), atol=1e-6, rtol=0)


def test_head_is_seeded(tiny_bert: Path) -> None:
    a = load_backbone(_cfg(tiny_bert, seed=0)).model.classifier.weight
    b = load_backbone(_cfg(tiny_bert, seed=0)).model.classifier.weight
    c = load_backbone(_cfg(tiny_bert, seed=1)).model.classifier.weight
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------ trainable structure

_ADAPTER_NAME: dict[str, Callable[[str], bool]] = {
    "lora": lambda n: re.search(r"\.lora_[AB]\.default\.weight$", n) is not None,
    "ffa-lora": lambda n: re.search(r"\.lora_B\.default\.weight$", n) is not None,
    "ia3": lambda n: re.search(r"\.ia3_l\.default$", n) is not None,
    "prompt": lambda n: n == "prompt_encoder.default.embedding.weight",
    "prefix": lambda n: n.startswith("prompt_encoder.default."),
    "bitfit": lambda n: n.startswith("backbone.") and n.endswith(".bias"),
}


def _is_head(method: str, name: str) -> bool:
    if method == "bitfit":
        return name in ("classifier.weight", "classifier.bias")
    return ".classifier.modules_to_save." in name


@pytest.mark.parametrize("method", METHODS)
def test_exactly_the_intended_parameters_train(tiny_bert: Path, method: str) -> None:
    model = _build(tiny_bert, method)
    trainable = {n: p for n, p in model.module.named_parameters() if p.requires_grad}
    # What the optimizer gets and what the schema names are exactly the trainable parameters.
    assert [s.name for s in model.schema.tensors] == list(trainable)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in trainable.values()}

    heads = sorted(n for n in trainable if _is_head(method, n))
    adapters = sorted(n for n in trainable if not _is_head(method, n))
    assert len(heads) == 2, heads
    assert sorted(tuple(trainable[n].shape) for n in heads) == [(3,), (3, 32)]
    assert adapters, f"{method} has no adapter tensors"
    wrong = [n for n in adapters if not _ADAPTER_NAME[method](n)]
    assert not wrong, f"{method} trains unexpected parameters {wrong}"

    roles = {s.name: s.role for s in model.schema.tensors}
    assert {n for n, r in roles.items() if r == "head"} == set(heads)
    assert {n for n, r in roles.items() if r == "adapter"} == set(adapters)

    # Every guarded backbone weight is frozen, and the guard agrees.
    assert model.frozen.params
    assert not [n for n, p in model.frozen.params.items() if p.requires_grad]
    model.frozen.check_frozen()
    frozen_ids = {id(p) for p in model.frozen.params.values()}
    assert not frozen_ids & {id(p) for p in trainable.values()}


def test_lora_trains_a_and_b_of_query_and_value(tiny_bert: Path) -> None:
    model = _build(tiny_bert, "lora")
    names = [s.name for s in model.schema.tensors if s.role == "adapter"]
    assert len(names) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    assert all(".attention.self.query." in n or ".attention.self.value." in n for n in names)


def test_ffa_lora_freezes_every_a(tiny_bert: Path) -> None:
    model = _build(tiny_bert, "ffa-lora")
    a = {n: p for n, p in model.module.named_parameters() if ".lora_A." in n}
    assert len(a) == 4
    assert not [n for n, p in a.items() if p.requires_grad]
    model.train()
    assert not [n for n, p in a.items() if p.requires_grad], "train() must not thaw A"


def test_bitfit_trains_every_backbone_bias_and_nothing_else(tiny_bert: Path) -> None:
    model = _build(tiny_bert, "bitfit")
    backbone = dict(model.module.backbone.named_parameters())  # type: ignore[union-attr]
    biases = {n for n in backbone if n.endswith(".bias")}
    trainable = {n for n, p in backbone.items() if p.requires_grad}
    assert biases and trainable == biases
    # The guard stops watching exactly the released biases and keeps every other weight.
    assert set(model.frozen.params) == set(backbone) - biases


# ----------------------------------------------------------------------------------------- FFA-LoRA


def _lora_a(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.module.named_parameters() if ".lora_A." in n}


def test_ffa_lora_a_comes_from_a_seed_only(tiny_bert: Path) -> None:
    first = _build(tiny_bert, "ffa-lora", seed=0)
    torch.manual_seed(999)  # the global RNG must not matter, nor the head seed
    second = _build(tiny_bert, "ffa-lora", seed=5)
    other = _build(tiny_bert, "ffa-lora", a_seed=1)

    a1, a2, a3 = _lora_a(first), _lora_a(second), _lora_a(other)
    assert list(a1) == list(a2) == list(a3)
    assert all(torch.equal(a1[n], a2[n]) for n in a1)
    assert all(not torch.equal(a1[n], a3[n]) for n in a1)

    assert first.schema.extras["lora_a_hash"] == second.schema.extras["lora_a_hash"]
    assert first.schema.extras["lora_a_hash"] != other.schema.extras["lora_a_hash"]
    assert other.schema.extras["lora_a_seed"] == 1
    assert first.schema_id != other.schema_id


def _train(model: AdapterModel, batch: dict[str, torch.Tensor], steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    model.eval()


def test_ffa_lora_training_changes_b_never_a(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model = _build(tiny_bert, "ffa-lora")
    a_before = _lora_a(model)
    b_before = {n: p.detach().clone() for n, p in model.module.named_parameters() if ".lora_B." in n}
    _train(model, batch, steps=3, lr=1e-2)
    a_after = _lora_a(model)
    assert all(torch.equal(a_before[n], a_after[n]) for n in a_before)
    b_after = {n: p for n, p in model.module.named_parameters() if ".lora_B." in n}
    assert all(not torch.equal(b_before[n], b_after[n]) for n in b_before)


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_trainable_parameters(
    tiny_bert: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    model = _build(tiny_bert, method)
    fixed = {n: p.detach().clone() for n, p in model.module.named_parameters() if not p.requires_grad}
    state_before = model.state()
    _train(model, batch, steps=3, lr=1e-2)

    model.frozen.check_frozen()
    model.frozen.check_unchanged()
    now = dict(model.module.named_parameters())
    changed_fixed = [n for n, t in fixed.items() if not torch.equal(t, now[n])]
    assert not changed_fixed, f"non-trainable parameters changed: {changed_fixed[:5]}"

    state_after = model.state()
    changed = {n for n in state_before if not torch.equal(state_before[n], state_after[n])}
    assert any(s.role == "head" and s.name in changed for s in model.schema.tensors)
    assert any(s.role == "adapter" and s.name in changed for s in model.schema.tensors)


def test_lora_loss_decreases(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model = _build(tiny_bert, "lora").eval()
    with torch.no_grad():
        start = float(model(**batch).loss)
    _train(model, batch, steps=20, lr=1e-2)
    with torch.no_grad():
        end = float(model(**batch).loss)
    # Random tiny backbone, unit-norm pooled features: the loss falls steadily but not fast.
    assert end < start - 0.1, (start, end)
    model.frozen.check_unchanged()


# -------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "ia3", "bitfit"])
def test_merged_copy_matches_and_leaves_model_untouched(
    tiny_bert: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    model = _build(tiny_bert, method).eval()
    _perturb(model)
    before = _snapshot(model.module)
    merged = model.merged_copy().eval()

    assert isinstance(merged, SequenceClassifier)
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n or "ia3_" in n]
    torch.testing.assert_close(_logits(merged, batch), _logits(model, batch), atol=1e-5, rtol=0)
    _assert_same_state_dict(before, model.module)
    model.frozen.check_unchanged()
    # The merge is non-trivial: the merged weights differ from the frozen backbone's.
    if method != "bitfit":
        plain = load_backbone(_cfg(tiny_bert)).model.eval()
        assert (_logits(plain, batch) - _logits(merged, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_methods_cannot_merge(tiny_bert: Path, method: str) -> None:
    model = _build(tiny_bert, method)
    with pytest.raises(ConfigError, match="cannot be merged"):
        model.merged_copy()


@pytest.mark.parametrize("method", METHODS)
def test_train_eval_toggling_never_changes_weights(
    tiny_bert: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    model = _build(tiny_bert, method)
    _perturb(model)
    model.eval()
    reference = _logits(model, batch)
    before = _snapshot(model.module)
    for _ in range(3):
        model.train()
        _logits(model, batch)
        model.eval()
        model.train(True)
        model.train(False)
    _assert_same_state_dict(before, model.module)
    assert not model.module.training
    torch.testing.assert_close(_logits(model, batch), reference, atol=0, rtol=0)


# ------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("name", "size", "fields", "message"),
    [
        ("nope", None, {}, r"unknown method 'nope'.*lora"),
        ("lora", 0, {}, r"r \(the LoRA rank\) must be a positive integer"),
        ("lora", None, {"r": 0}, r"must be a positive integer, got 0"),
        ("ffa-lora", -4, {}, r"positive integer, got -4"),
        ("lora", None, {"alpha": -1.0}, r"alpha must be positive"),
        ("lora", None, {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ("ia3", 8, {}, r"'ia3' has no rank or size.*--rank"),
        ("bitfit", 8, {}, r"'bitfit' has no rank or size.*--rank"),
        ("lora", None, {"rank": 8}, r"no settings \['rank'\].*'r'"),
        ("prompt", 0, {}, r"num_virtual_tokens must be a positive integer"),
        ("ia3", None, {"target_modules": ["key"]}, r"together"),
    ],
)
def test_make_method_config_errors(name: str, size: int | None, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_method_config(name, size, **fields)


def test_make_method_config_sizes() -> None:
    assert make_method_config("lora", 4).r == 4  # type: ignore[attr-defined]
    assert make_method_config("prefix", 5).num_virtual_tokens == 5  # type: ignore[attr-defined]
    assert make_method_config("lora", target_modules=["query"]).target_modules == ("query",)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- prefix needs a cache


class _NoCacheBert(BertModel):
    """A BERT whose forward takes no past_key_values."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> object:
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def test_prefix_on_backbone_without_past_key_values_raises() -> None:
    config = BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    classifier = SequenceClassifier(_NoCacheBert(config), PoolingConfig(mode="cls"), num_labels=2, head_dropout=0.0)
    with pytest.raises(BackboneError, match="past_key_values"):
        make_method_config("prefix").apply(classifier)


# ------------------------------------------------------------------------------------------ imports


def test_import_loads_neither_flower_nor_onnxruntime() -> None:
    code = (
        "import fedadapt, fedadapt.checkpoint.folder, fedadapt.checkpoint.info, fedadapt.delta.serialize; "
        "import fedadapt.cli; "
        "import sys; "
        "print('flwr' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_hub_id_reads_sentence_transformers_pooling(monkeypatch: pytest.MonkeyPatch, tiny_bert: Path) -> None:
    """A hub id gets the pooling its repo declares; with no such files it falls back to CLS."""
    import huggingface_hub

    from fedadapt.model.backbone import detect_pooling

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(tiny_bert))
    assert detect_pooling("someone/sentence-model") == PoolingConfig(mode="mean", normalize=True)

    def offline(repo_id: str, allow_patterns: list[str]) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert detect_pooling("someone/plain-model") == PoolingConfig(mode="cls")
