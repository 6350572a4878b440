"""Local training, evaluation, personalization and the `train` command on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from typer.testing import CliRunner

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.checkpoint.folder import load_adapter
from fedadapt.cli import app
from fedadapt.data.batching import EncodedTexts, batch_indices, collate, encode_texts
from fedadapt.errors import ConfigError
from fedadapt.train.loop import TrainConfig, evaluate, macro_f1, make_optimizer, train_adapter, warmup_linear_decay
from fedadapt.train.personalize import compare_on_client, personalize, train_only

TEXTS = ["my card has not arrived yet", "top up my account", "why is my transfer declined", "where is my money"]


def _model(tiny_bert: Path, method: str = "lora", seed: int = 0) -> AdapterModel:
    return AdapterModel(
        load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=4, seed=seed)), make_method_config(method)
    )


def _data(model: AdapterModel, repeat: int = 4) -> EncodedTexts:
    texts = TEXTS * repeat
    labels = [i % 4 for i in range(len(texts))]
    return encode_texts(model.backbone.tokenizer, texts, labels, max_length=16)


def test_collate_pads_to_the_longest_text_in_the_batch(tiny_bert: Path) -> None:
    data = _data(_model(tiny_bert), repeat=1)
    batch = collate(data, [1, 0])
    lengths = [len(data.input_ids[1]), len(data.input_ids[0])]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].tolist() == [1, 0]
    assert sorted(i for b in batch_indices(10, 3, torch.Generator().manual_seed(0)) for i in b) == list(range(10))


def test_training_lowers_the_loss_and_keeps_the_backbone(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    data = _data(model)
    before = evaluate(model, data, device="cpu").loss
    result = train_adapter(model, data, TrainConfig(epochs=15, batch_size=8, learning_rate=1e-2, device="cpu"))
    assert result.steps == 15 * 2
    assert result.examples_seen == 15 * len(data)
    assert evaluate(model, data, device="cpu").loss < before - 0.3
    model.frozen.check_unchanged()


def test_masking_absent_labels_leaves_their_head_rows_untouched(tiny_bert: Path) -> None:
    """A label-skewed client (labels 0 and 1 only) must not push classes 2 and 3 down in the shared head."""
    results = {}
    for mask in (False, True):
        model = _model(tiny_bert)
        texts = TEXTS[:2] * 8
        data = encode_texts(model.backbone.tokenizer, texts, [i % 2 for i in range(len(texts))], max_length=16)
        head = model.backbone.model.classifier.weight
        before = head.detach().clone()
        config = TrainConfig(epochs=3, batch_size=8, device="cpu", weight_decay=0.0, mask_absent_labels=mask)
        result = train_adapter(model, data, config)
        assert all(torch.isfinite(torch.tensor(result.losses)))
        moved = (head.detach() - before).abs().amax(dim=1)
        results[mask] = moved
    assert results[True][2:].max() == 0.0 and results[True][:2].min() > 0  # absent rows: no gradient at all
    assert results[False][2:].min() > 0  # without the mask the absent classes are pushed down


def test_same_seed_same_weights(tiny_bert: Path) -> None:
    states = []
    for _ in range(2):
        model = _model(tiny_bert)
        train_adapter(model, _data(model), TrainConfig(max_steps=4, batch_size=4, device="cpu", seed=3))
        states.append(model.state())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_optimizer_holds_only_trainable_parameters_with_a_head_rate(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-3, head_learning_rate=1e-1))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.trainable_parameters()}
    assert not in_optimizer & {id(p) for p in model.frozen.params.values()}
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-3, 1e-1]


def test_warmup_then_linear_decay() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_linear_decay(optimizer, steps=10, warmup_ratio=0.2)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))


def test_macro_f1_by_hand() -> None:
    predictions = torch.tensor([0, 0, 1, 2])
    labels = torch.tensor([0, 1, 1, 1])
    # class 0: P=1/2 R=1 F1=2/3; class 1: P=1 R=1/3 F1=1/2; class 2: F1=0 (predicted, never true)
    assert macro_f1(predictions, labels, num_classes=4) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("batch_size", -1), ("learning_rate", 0.0), ("warmup_ratio", 1.0), ("max_steps", 0)],
)
def test_train_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_personalize_trains_only_the_head(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    before = model.state()
    personalize(model, _data(model), TrainConfig(max_steps=5, batch_size=8, device="cpu"), roles=("head",))
    after = model.state()
    roles = {s.name: s.role for s in model.schema.tensors}
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (roles[name] == "head"), name
    assert all(p.requires_grad for p in model.trainable_parameters())  # restored after the block
    with pytest.raises(ConfigError, match="roles"), train_only(model, ("backbone",)):  # type: ignore[arg-type]
        pass


def test_compare_on_client_reports_three_models(tiny_bert: Path) -> None:
    shared = _model(tiny_bert)
    data = _data(shared)
    train_adapter(shared, data, TrainConfig(max_steps=3, batch_size=8, device="cpu"))
    report = compare_on_client(
        lambda: _model(tiny_bert),
        shared.state(),
        data,
        data,
        TrainConfig(max_steps=20, batch_size=8, learning_rate=1e-2, device="cpu"),
    )
    assert report.global_model.accuracy == pytest.approx(evaluate(shared, data, device="cpu").accuracy)
    assert report.personalized.loss < report.global_model.loss
    assert report.local_only.examples == len(data)


def test_train_command_end_to_end(tiny_bert: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "data.csv"
    rows = "".join(
        f'"{t}",{["card", "topup", "transfer", "money"][i]}\r\n' for _ in range(10) for i, t in enumerate(TEXTS)
    )
    data_file.write_text("text,label\r\n" + rows)
    out = tmp_path / "adapter"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(data_file),
            "--method",
            "lora",
            "--backbone",
            str(tiny_bert),
            "--max-steps",
            "6",
            "--out",
            str(out),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("test_accuracy", "macro_f1", "train_seconds", "train_examples", "method", "trainable_params"):
        assert key in metrics
    assert metrics["train_examples"] == 32 and metrics["test_examples"] == 8 and metrics["train_steps"] == 6
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == metrics["test_accuracy"]
    reloaded = load_adapter(out)
    assert reloaded.labels == ("card", "money", "topup", "transfer")
    peft_model = peft.PeftModel.from_pretrained(
        load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=4)).model, out
    )
    batch = reloaded.backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    peft_model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, reloaded(**batch).logits, atol=1e-6)


def test_train_command_bad_data_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing.csv"), "--max-steps", "1"])
    assert result.exit_code == 2
    assert "missing.csv" in result.stderr


def test_the_baseline_trains_from_the_frozen_prefix_cache_in_memory_or_kept_between_runs(
    tiny_bert: Path, tmp_path: Path
) -> None:
    from fedadapt.data.splits import DataConfig
    from fedadapt.train.baseline import train_baseline

    data_file = tmp_path / "data.csv"
    rows = "".join(
        f'"{t}",{["card", "topup", "transfer", "money"][i]}\n' for _ in range(5) for i, t in enumerate(TEXTS)
    )
    data_file.write_text("text,label\n" + rows)
    data = DataConfig(path=str(data_file))
    method = make_method_config("pfeiffer", drop_layers=1)
    config = TrainConfig(max_steps=3, batch_size=4, device="cpu")
    in_memory = train_baseline(data, method, config, str(tiny_bert))
    assert in_memory["prefix_layers"] == 1 and in_memory["prefix_cache_hit"] is False
    kept = [train_baseline(data, method, config, str(tiny_bert), prefix_cache_dir=tmp_path / "cache") for _ in "ab"]
    assert [m["prefix_cache_hit"] for m in kept] == [False, True]
    assert kept[0]["final_train_loss"] == kept[1]["final_train_loss"]  # the same float16 states, built or read
    assert abs(kept[0]["final_train_loss"] - in_memory["final_train_loss"]) < 1e-2  # float16 against float32
    lora = train_baseline(data, make_method_config("lora"), config, str(tiny_bert), prefix_cache_dir=tmp_path / "l")
    assert lora["prefix_layers"] == 0 and "prefix_cache_hit" not in lora and not (tmp_path / "l").exists()
