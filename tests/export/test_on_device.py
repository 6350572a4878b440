"""On-device training (issue 21): the exported prefix and step graphs, the torch-free trainer, parity with torch.

One swappable bundle of a trained tiny-BERT LoRA is exported per module with ``--on-device-training
--train-layers 1`` (the head and the top layer's LoRA train on the phone). The trainer must compute
torch's gradients (1e-5), follow torch's SGD step for step (1e-4), write an adapter the bundle's
``backbone.onnx`` serves as torch scores it (1e-4), import no torch, and refuse bad input leaving the
bundle byte for byte as it was.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import config_operators, onnx_operators, train_steps

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed
    sys.path.insert(0, str(PROJECT_ROOT))

from export import on_device_program  # noqa: E402
from export.bundle_verify import MANIFEST_FILE, ON_DEVICE_SECTION, REPORT_FILE  # noqa: E402
from export.config import ExportConfig, OnDeviceConfig  # noqa: E402
from export.errors import BundleError  # noqa: E402
from export.exporter import export_adapter  # noqa: E402
from export.loading import load_for_export  # noqa: E402
from export.on_device import eager_train_step, example_batch, joint_program, personal_part  # noqa: E402
from export.ort_adapters import read_adapter_file  # noqa: E402
from export.phone_demo import PhoneClassifier  # noqa: E402
from export.phone_trainer import (  # noqa: E402
    PersonalizeConfig,
    PhoneTrainer,
    personalize,
    plan_batches,
    read_examples,
    split_examples,
)
from fedadapt.checkpoint.folder import save_adapter  # noqa: E402
from fedadapt.errors import ConfigError  # noqa: E402
from fedadapt.methods.registry import make_method_config  # noqa: E402
from fedadapt.model.adapter_model import AdapterModel  # noqa: E402
from fedadapt.model.backbone import BackboneConfig, load_backbone  # noqa: E402

pytest.importorskip("executorch", reason="the dev extra installs ExecuTorch")

LABELS = ("lost_card", "top_up", "declined")
KEYWORDS = {"lost_card": ("card", "arrived"), "top_up": ("top", "up", "balance"), "declined": ("declined", "transfer")}
FILLER = ("the", "a", "my", "is", "where", "yet", "not", "has", "why", "money", "account")
TRAIN_TEXTS = ["my card has not arrived yet", "top up", "why is my transfer declined"]
SEQUENCE = 16
TRAINER = PROJECT_ROOT / "export" / "phone_trainer.py"


def user_rows(count: int, seed: int) -> list[tuple[str, str]]:
    """Texts whose label is given by a keyword among filler words: learnable from the pooled states."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        label = LABELS[index % len(LABELS)]
        words = [*rng.choice(FILLER, size=int(rng.integers(2, 6))), str(rng.choice(KEYWORDS[label]))]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def adapter(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained a few steps, so that lora_B is not zero and every gradient is exercised."""
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=len(LABELS)))
    model = AdapterModel(loaded, make_method_config("lora"), labels=LABELS)
    batch = dict(model.backbone.tokenizer(TRAIN_TEXTS, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 2])
    train_steps(model, batch, steps=4, lr=5e-2)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "alice")


@pytest.fixture(scope="module")
def exported(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    on_device = OnDeviceConfig(train_layers=1, batch_size=4, sequence_length=SEQUENCE, learning_rate=0.2)
    # --ort: the operator list covers the on-device graphs too, and every trainer test runs on such a bundle.
    # --quantize int8: the prefix gets its int8 copy too (prefix.int8.onnx), for --prefix-precision int8.
    config = ExportConfig(adapter=adapter, out=out, mode="swappable", on_device=on_device, ort=True, quantize="int8")
    export_adapter(config)
    return out


@pytest.fixture
def bundle(exported: Path, tmp_path: Path) -> Path:
    """A fresh copy of the exported bundle per test: personalizing writes into it."""
    import shutil

    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def torch_model(adapter: Path) -> AdapterModel:
    return load_for_export(adapter, None).eval()


def full_model_loss(model: AdapterModel, batch: dict[str, np.ndarray], input_ids: np.ndarray) -> torch.Tensor:
    """The weighted cross-entropy of the whole torch model (no prefix cache) on one step's batch."""
    rows = np.asarray(batch["rows"])
    logits = model(
        input_ids=torch.from_numpy(input_ids[rows]), attention_mask=torch.from_numpy(batch["attention_mask"])
    ).logits
    ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]), reduction="none")
    weights = torch.from_numpy(batch["weights"])
    return (ce * weights).sum() / weights.sum()


def test_the_manifest_lists_the_on_device_graphs_and_splits_every_per_user_tensor(exported: Path) -> None:
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    section = manifest[ON_DEVICE_SECTION]
    for key in ("prefix", "train_step", "program"):
        assert section[key] in manifest["files"] and (exported / section[key]).stat().st_size > 0
        assert len(manifest["files"][section[key]]["sha256"]) == 64
    per_user = sorted(t["name"] for t in manifest["layout"]["tensors"])
    assert sorted(section["prefix_inputs"] + section["trainable"]) == per_user
    assert section["train_layers"] == 1 and section["frozen_layers"] == 1  # the tiny BERT has 2 layers
    assert all(".layer.0." in name for name in section["prefix_inputs"]) and section["prefix_inputs"]
    assert any(".layer.1." in name for name in section["trainable"])
    assert any("classifier" in name for name in section["trainable"])
    report = json.loads((exported / "report.json").read_text())[ON_DEVICE_SECTION]
    assert report["gradient_max_abs_diff"] <= 1e-5
    # The XNNPACK-delegated program, checked at export: so the ExecuTorch parity tests below run the delegate.
    assert section["program_backend"] == report["program_backend"] == "xnnpack"
    assert report["program_fallback_reason"] is None and report["program_gradient_max_abs_diff"] <= 1e-5


def test_the_operators_list_covers_the_on_device_graphs(exported: Path) -> None:
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    graphs = json.loads((exported / "report.json").read_text())["required_operators"]["graphs"]
    on_device = ["on_device/prefix.onnx", "on_device/train_step.onnx", "on_device/prefix.int8.onnx"]
    assert graphs == ["backbone.ort", "backbone.int8.ort", *on_device]
    assert not (exported / "on_device" / "train_step.ort").exists()  # converted for the list only, not shipped
    operators = config_operators(exported / manifest["required_operators"])["ai.onnx"]
    inference, step = onnx_operators(exported / "backbone.onnx"), onnx_operators(exported / "on_device/train_step.onnx")
    prefixes = onnx_operators(exported / "on_device/prefix.onnx") | onnx_operators(
        exported / "on_device/prefix.int8.onnx"
    )
    assert operators <= inference | step | prefixes | onnx_operators(exported / "backbone.int8.onnx")
    # The int8 graphs' products, as ONNX Runtime fuses them when it converts a graph (MatMulInteger and its scaling).
    assert "DynamicQuantizeLinear" in operators
    assert "MatMulIntegerToFloat" in config_operators(exported / manifest["required_operators"])["com.microsoft"]
    # The step graph's loss and backward need operators no inference graph has: they must be in the list.
    assert {"LogSoftmax", "ScatterElements"} <= operators and not {"LogSoftmax", "ScatterElements"} & inference


INT8_PREFIX = "on_device/prefix.int8.onnx"
# The int8 prefix's states against the fp32 prefix's: ||int8 - fp32|| / ||fp32|| over the kept tokens. Measured
# 0.66-0.82 % on this tiny BERT (one layer); 5 % leaves room for other hosts' int8 kernels, while a prefix that had
# baked in the exported user's tensors is 58 % off for another user's (checked below). MiniLM's five layers and
# outlier features give 11 % (docs/on-device.md), with the same personal accuracy: that is the benchmark's to show.
INT8_RELATIVE_ERROR = 0.05


def relative_error(found: np.ndarray, expected: np.ndarray, masks: np.ndarray) -> float:
    kept = masks.astype(bool)
    return float(np.linalg.norm(found[kept] - expected[kept]) / np.linalg.norm(expected[kept]))


def test_the_int8_prefix_is_written_listed_and_reported(exported: Path) -> None:
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    assert manifest[ON_DEVICE_SECTION]["prefix_int8"] == INT8_PREFIX
    data = (exported / INT8_PREFIX).read_bytes()
    assert manifest["files"][INT8_PREFIX] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    report = json.loads((exported / REPORT_FILE).read_text())[ON_DEVICE_SECTION]["prefix_int8"]
    assert report["graph"] == INT8_PREFIX and report["source"] == "on_device/prefix.onnx"
    assert report["bytes"] == len(data) and report["fp32_bytes"] == manifest["files"]["on_device/prefix.onnx"]["bytes"]
    assert report["quantization"]["per_user_tensors"] == "float32"
    figures = report["vs_fp32"]
    assert 0 < figures["relative_error"] < INT8_RELATIVE_ERROR and 0 < figures["max_abs_diff"] < 0.5, figures
    assert figures["tokens"] > 0 and report["shipped_graph_on_this_host"]["graph"] == INT8_PREFIX


def test_the_int8_prefix_computes_the_fp32_prefixs_states_with_any_users_tensors(bundle: Path) -> None:
    """The user's tensors below the top stay fp32 inputs of the int8 prefix: other tensors move its states as
    they move the fp32 prefix's, so the user's own adapter file feeds it."""
    fp32, int8 = PhoneTrainer(bundle), PhoneTrainer(bundle, prefix_precision="int8")
    assert int8.prefix_file == INT8_PREFIX and fp32.prefix_file == "on_device/prefix.onnx"
    texts = read_examples(write_csv(bundle.parent / "data.csv", user_rows(10, seed=11)), LABELS).texts
    tensors = fp32.start_tensors("alice")
    rng = np.random.default_rng(0)
    other = {n: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) for n, v in tensors.items()}
    states = {}
    for name, values in (("alice", tensors), ("other", other)):
        reference, masks = fp32.prefix_states(texts, values)
        found, found_masks = int8.prefix_states(texts, values)
        assert np.array_equal(masks, found_masks) and found.dtype == np.float32
        assert relative_error(found, reference, masks) < INT8_RELATIVE_ERROR, name
        states[name] = (reference, found)
    # Changed tensors below the top change the fp32 states by far more than int8 differs from fp32: a prefix that
    # had baked alice's tensors in would fail the bound above for "other".
    assert relative_error(states["other"][0], states["alice"][0], masks) > 4 * INT8_RELATIVE_ERROR


def test_a_tampered_int8_prefix_is_refused_before_it_runs(bundle: Path) -> None:
    path = bundle / INT8_PREFIX
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="on_device/prefix.int8.onnx differs from the manifest"):
        PhoneTrainer(bundle, prefix_precision="int8")


def test_an_int8_prefix_that_is_another_graph_is_refused(bundle: Path) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest[ON_DEVICE_SECTION]["prefix_int8"] = manifest[ON_DEVICE_SECTION]["train_step"]  # listed, verified, wrong
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="train_step.onnx does not match its manifest section"):
        PhoneTrainer(bundle, prefix_precision="int8")


def test_personalize_with_the_int8_prefix_trains_an_adapter_the_bundle_serves(bundle: Path) -> None:
    data = write_csv(bundle.parent / "bob.csv", user_rows(60, seed=4))
    command = [sys.executable, str(TRAINER), "personalize", str(bundle), "--user", "bob", "--from", "alice"]
    command += ["--data", str(data), "--epochs", "8", "--json", "--check-imports", "--prefix-precision", "int8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=bundle.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["prefix_precision"] == "int8" and report["forbidden_modules"] == []
    assert report["last_loss"] < report["first_loss"]
    assert report["accuracy_after"] >= report["accuracy_before"], report
    phone = PhoneClassifier(bundle)  # verifies the rewritten manifest and the new file's sha256
    phone.use("bob")  # the adapter fits backbone.onnx: the bundle serves it
    predictions = phone.logits(TRAIN_TEXTS).argmax(-1)
    assert predictions.shape == (len(TRAIN_TEXTS),)
    recorded = json.loads((bundle / REPORT_FILE).read_text())["adapters"]["bob"]["trained_on_device"]
    assert recorded["prefix_precision"] == "int8"
    # The same run on the fp32 prefix (same split, batches and steps) learns the same: the int8 states are close.
    fp32 = personalize(PersonalizeConfig(bundle=bundle, user="carol", data=data, start_from="alice", epochs=8))
    assert abs(fp32.accuracy_after - report["accuracy_after"]) <= 1 / 12 + 1e-9  # at most one of 12 held-out texts
    assert abs(fp32.last_loss - report["last_loss"]) <= 0.1 * fp32.last_loss + 0.01, (fp32, report)


def test_the_int8_prefix_on_a_bundle_without_it_is_refused_naming_what_it_has(bundle: Path) -> None:
    """A bundle exported without --quantize int8 (here: the fixture's, with the int8 prefix taken out)."""
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest[ON_DEVICE_SECTION]["prefix_int8"], manifest["files"][INT8_PREFIX]
    path.write_text(json.dumps(manifest))
    (bundle / INT8_PREFIX).unlink()
    before = digests(bundle)
    data = write_csv(bundle.parent / "alice.csv", user_rows(12, seed=8))
    command = [sys.executable, str(TRAINER), "personalize", str(bundle), "--user", "alice", "--data", str(data)]
    done = subprocess.run([*command, "--prefix-precision", "int8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--prefix-precision int8" in done.stderr and "no int8 prefix" in done.stderr
    assert "'fp32': 'on_device/prefix.onnx'" in done.stderr and "--quantize int8" in done.stderr
    assert digests(bundle) == before
    PhoneTrainer(bundle)  # the fp32 prefix still trains: the int8 one is optional


def test_one_step_computes_torchs_gradients(bundle: Path, adapter: Path) -> None:
    trainer = PhoneTrainer(bundle)
    tensors = trainer.start_tensors("alice")
    rows = user_rows(7, seed=1)
    examples = read_examples(write_csv(bundle.parent / "data.csv", rows), LABELS)
    states, masks = trainer.prefix_states(examples.texts, tensors)
    batch = trainer.step_batch(states, masks, examples.labels, np.array([4, 0, 2]))  # 3 rows + 1 padding row
    loss, gradients = trainer.step(batch, {n: tensors[n] for n in trainer.section["trainable"]})

    model = torch_model(adapter)
    params = dict(model.module.named_parameters())
    input_ids = np.array([e.ids for e in trainer.tokenizer.encode_batch(list(examples.texts))], dtype=np.int64)
    expected = full_model_loss(model, {**batch, "rows": [4, 0, 2, 4]}, input_ids)
    expected.backward()
    assert abs(loss - float(expected)) <= 1e-5
    assert set(gradients) == set(trainer.section["trainable"])
    for name, gradient in gradients.items():
        reference = params[name].grad
        assert reference is not None and float(reference.abs().max()) > 0  # a real gradient, not zeros
        assert np.abs(gradient - reference.numpy()).max() <= 1e-5, name


def test_n_steps_follow_torch_sgd_with_the_same_order(bundle: Path, adapter: Path) -> None:
    trainer = PhoneTrainer(bundle)
    tensors = trainer.start_tensors("alice")
    examples = read_examples(write_csv(bundle.parent / "data.csv", user_rows(10, seed=2)), LABELS)
    states, masks = trainer.prefix_states(examples.texts, tensors)
    batches = plan_batches(len(examples), trainer.section["batch_size"], steps=6, seed=3)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]  # partial batches are padded, with weight 0
    losses = trainer.train(states, masks, examples.labels, tensors, batches, learning_rate=0.5)

    model = torch_model(adapter)
    params = dict(model.module.named_parameters())
    trainable = trainer.section["trainable"]
    optimizer = torch.optim.SGD(
        [params[n] for n in trainable], lr=0.5, momentum=trainer.section["optimizer"]["momentum"]
    )
    input_ids = np.array([e.ids for e in trainer.tokenizer.encode_batch(list(examples.texts))], dtype=np.int64)
    expected_losses = []
    for rows in batches:
        batch = trainer.step_batch(states, masks, examples.labels, rows)
        padded = [*rows, *([rows[0]] * (trainer.section["batch_size"] - len(rows)))]
        optimizer.zero_grad()
        loss = full_model_loss(model, {**batch, "rows": padded}, input_ids)
        loss.backward()
        optimizer.step()
        expected_losses.append(float(loss))
    assert np.allclose(losses, expected_losses, atol=1e-4), (losses, expected_losses)
    for name in trainable:
        assert np.abs(tensors[name] - params[name].detach().numpy()).max() <= 1e-4, name
    assert losses[-1] != losses[0]


def test_personalize_writes_an_adapter_the_bundle_serves_as_torch_scores_it(bundle: Path, adapter: Path) -> None:
    data = write_csv(bundle.parent / "bob.csv", user_rows(60, seed=4))
    command = [sys.executable, str(TRAINER), "personalize", str(bundle), "--user", "bob", "--from", "alice"]
    command += ["--data", str(data), "--epochs", "8", "--json", "--check-imports"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=bundle.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["forbidden_modules"] == []  # no torch, no transformers: what a phone has
    assert report["eval_examples"] == 12 and report["train_examples"] == 48 and report["steps"] == 8 * 12
    assert report["last_loss"] < report["first_loss"]
    assert report["accuracy_after"] > report["accuracy_before"], report

    phone = PhoneClassifier(bundle)  # verifies the rewritten manifest and the new file's sha256
    assert phone.adapter_names == ["alice", "bob"]
    phone.use("bob")
    logits = phone.logits(TRAIN_TEXTS)
    model = torch_model(adapter)
    new = read_adapter_file(bundle / "adapters" / "bob.onnx_adapter")
    model.load_state({name: torch.from_numpy(value) for name, value in new.items()})
    encoded = {k: torch.from_numpy(v) for k, v in phone.encode(TRAIN_TEXTS).items()}
    with torch.no_grad():
        expected = model(**encoded).logits.numpy()
    assert np.abs(logits - expected).max() <= 1e-4
    alice = read_adapter_file(bundle / "adapters" / "alice.onnx_adapter")
    changed = [n for n in new if not np.array_equal(new[n], alice[n])]
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert sorted(changed) == sorted(manifest[ON_DEVICE_SECTION]["trainable"])  # the prefix part is the user's own

    recorded = json.loads((bundle / REPORT_FILE).read_text())  # verified above with every file the phone read
    assert set(recorded["adapters"]) == {"alice", "bob"}
    assert "parity" in recorded["adapters"]["alice"]  # the exporter's own record is kept as it was
    bob = recorded["adapters"]["bob"]
    assert bob["file"] == "adapters/bob.onnx_adapter" and bob["method"] == "lora" and "parity" not in bob
    expected_record = {k: v for k, v in report.items() if k not in ("user", "adapter_file", "forbidden_modules")}
    assert bob["trained_on_device"] == expected_record


def test_training_twice_starts_from_the_users_own_adapter(bundle: Path) -> None:
    data = write_csv(bundle.parent / "alice.csv", user_rows(20, seed=5))
    first = personalize(PersonalizeConfig(bundle=bundle, user="alice", data=data, steps=3))
    second = personalize(PersonalizeConfig(bundle=bundle, user="alice", data=data, steps=3))
    assert first.start_from == second.start_from == "alice"
    assert second.accuracy_before == first.accuracy_after  # the same held-out part, scored with the new file


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([("top up", "refund")], [], "unknown label 'refund'"),
        ([], [], "at least 2"),
        ([("", "top_up"), ("x", "top_up")], [], "the text is empty"),
        ([("top up", "top_up")] * 3, ["--user", "carol"], "start it from another user's with --from"),
        ([("top up", "top_up")] * 3, ["--user", "carol", "--from", "nobody"], "--from 'nobody': no such adapter"),
        ([("x" * 10_001, "top_up"), ("top up", "top_up")], [], "a text of 10001 characters"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_bundle_as_it_was(
    bundle: Path, rows: list[tuple[str, str]], extra: list[str], message: str
) -> None:
    before = digests(bundle)
    data = write_csv(bundle.parent / "bad.csv", rows)
    command = [sys.executable, str(TRAINER), "personalize", str(bundle), "--data", str(data)]
    command += extra or ["--user", "alice"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert digests(bundle) == before


def test_a_failed_commit_puts_back_the_adapter_it_already_replaced(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter is renamed into place before the manifest: if the manifest's rename fails, alice's old
    adapter file comes back, so the bundle still verifies."""
    import export.bundle_files as bundle_files

    before = digests(bundle)
    real_replace = bundle_files.os.replace

    def failing_replace(source: object, target: object) -> None:
        if str(target).endswith(MANIFEST_FILE):
            raise OSError("disk full")
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(bundle_files.os, "replace", failing_replace)
    data = write_csv(bundle.parent / "alice.csv", user_rows(12, seed=8))
    with pytest.raises(OSError, match="disk full"):
        personalize(PersonalizeConfig(bundle=bundle, user="alice", data=data, steps=2))
    monkeypatch.setattr(bundle_files.os, "replace", real_replace)
    assert digests(bundle) == before  # no temporary or kept-back file left either
    PhoneClassifier(bundle).use("alice")


def test_csv_headers_and_labels_are_checked(tmp_path: Path) -> None:
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("text,label,text\ntop up,top_up,x\nmy card,lost_card,y\n")
    with pytest.raises(ConfigError, match="names a column twice"):
        read_examples(doubled, LABELS)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufefftext,label\ntop up,top_up\nmy card,lost_card\n".encode())
    assert read_examples(bom, LABELS).labels.tolist() == [1, 0]  # a spreadsheet's byte-order mark is fine
    with pytest.raises(ConfigError, match="names a label twice"):
        read_examples(bom, ("top_up", "lost_card", "top_up"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(batch_size=s["batch_size"] + 1), "input hidden has shape"),
        (lambda s: s.update(hidden_size=s["hidden_size"] * 2), "input hidden has shape"),
        (lambda s: s["program_parameters"].update({next(iter(s["program_parameters"])): 7}), "program_parameters"),
        (lambda s: s["optimizer"].update(learning_rate=1e9), "learning_rate"),
        (lambda s: s.update(sequence_length=10**9), "sequence_length"),
        (lambda s: s.update(prefix="../outside.onnx"), "not a plain relative path"),
        (lambda s: s.update(program_backend="vulkan"), "program_backend"),
        (lambda s: s.update(prefix_int8="../outside.onnx"), "prefix_int8: '../outside.onnx' is not a plain relative"),
        (lambda s: s.update(prefix_int8=7), "prefix_int8 must be a JSON str"),
        (lambda s: s.update(prefix_int8=None), "prefix_int8 must be a JSON str"),
        (lambda s: s.update(prefix_int8="on_device/x.onnx"), "prefix_int8 'on_device/x.onnx' is not listed in files"),
    ],
)
def test_a_hostile_on_device_section_is_refused_by_name(bundle: Path, change: Any, message: str) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest[ON_DEVICE_SECTION])
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        PhoneTrainer(bundle)


def test_a_bundle_without_on_device_training_is_refused_with_what_to_do(adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    export_adapter(ExportConfig(adapter=adapter, out=out, mode="swappable"))
    data = write_csv(tmp_path / "d.csv", user_rows(4, seed=6))
    with pytest.raises(BundleError, match="--on-device-training"):
        personalize(PersonalizeConfig(bundle=out, user="alice", data=data))


def test_a_tampered_step_graph_is_refused_before_it_runs(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    step = bundle / manifest[ON_DEVICE_SECTION]["train_step"]
    step.write_bytes(step.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="on_device/train_step.onnx differs from the manifest"):
        PhoneTrainer(bundle)


def test_a_manifest_that_hides_a_per_user_tensor_from_the_trainer_is_refused(bundle: Path) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest[ON_DEVICE_SECTION]["trainable"] = manifest[ON_DEVICE_SECTION]["trainable"][:-1]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="split the layout"):
        PhoneTrainer(bundle)


def test_a_damaged_report_is_refused_before_training_and_the_bundle_is_kept(bundle: Path) -> None:
    (bundle / REPORT_FILE).write_text((bundle / REPORT_FILE).read_text().replace("alice", "mallory"))
    before = digests(bundle)
    data = write_csv(bundle.parent / "alice.csv", user_rows(12, seed=8))
    with pytest.raises(BundleError, match="report.json"):
        personalize(PersonalizeConfig(bundle=bundle, user="alice", data=data, steps=2))
    assert digests(bundle) == before


def test_the_cli_trains_the_same_adapter_on_executorch_as_on_onnx_runtime(exported: Path, tmp_path: Path) -> None:
    """``--runtime executorch`` end to end: same data, seed and steps give the same adapter file (1e-5)."""
    import shutil

    data = write_csv(tmp_path / "alice.csv", user_rows(20, seed=9))
    written = {}
    for runtime in ("onnxruntime", "executorch"):
        copy = Path(shutil.copytree(exported, tmp_path / runtime))
        command = [sys.executable, str(TRAINER), "personalize", str(copy), "--user", "alice", "--data", str(data)]
        command += ["--steps", "6", "--runtime", runtime, "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["runtime"] == runtime
        PhoneClassifier(copy).use("alice")  # the rewritten manifest and adapter verify
        written[runtime] = read_adapter_file(copy / "adapters" / "alice.onnx_adapter")
    for name, value in written["onnxruntime"].items():
        assert np.abs(value - written["executorch"][name]).max() <= 1e-5, name
    start = read_adapter_file(exported / "adapters" / "alice.onnx_adapter")
    assert any(not np.array_equal(start[n], written["executorch"][n]) for n in start)  # it did train


def test_the_executorch_program_computes_the_onnx_steps_gradients(bundle: Path) -> None:
    onnx_trainer, et_trainer = PhoneTrainer(bundle), PhoneTrainer(bundle, runtime="executorch")
    tensors = onnx_trainer.start_tensors("alice")
    examples = read_examples(write_csv(bundle.parent / "data.csv", user_rows(9, seed=7)), LABELS)
    states, masks = onnx_trainer.prefix_states(examples.texts, tensors)
    batches = plan_batches(len(examples), 4, steps=5, seed=0)
    via_onnx, via_program = dict(tensors), dict(tensors)
    onnx_losses = onnx_trainer.train(states, masks, examples.labels, via_onnx, batches, learning_rate=0.5)
    program_losses = et_trainer.train(states, masks, examples.labels, via_program, batches, learning_rate=0.5)
    assert np.allclose(onnx_losses, program_losses, atol=1e-5)
    for name in onnx_trainer.section["trainable"]:
        assert np.abs(via_onnx[name] - via_program[name]).max() <= 1e-5, name
        assert not np.array_equal(via_program[name], tensors[name])  # the program's parameters took the updates


def test_a_program_xnnpack_cannot_lower_falls_back_to_portable_and_says_why(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(joint: Any) -> bytes:
        raise RuntimeError("Output node 'aten__softmax_default' is already in the inputs")

    monkeypatch.setitem(on_device_program.LOWERINGS, on_device_program.XNNPACK, refuse)
    model = torch_model(adapter)
    step, names = eager_train_step(model, personal_part(model, 1))
    batch = example_batch(OnDeviceConfig(train_layers=1, batch_size=4, sequence_length=SEQUENCE), 32, len(LABELS))
    path = tmp_path / "train_step.pte"
    with caplog.at_level(logging.WARNING, logger="export.on_device_program"):
        written = on_device_program.write_program(lambda: joint_program(step, batch), step, names, batch, path, 1e-5)
    assert written.backend == "portable" and "already in the inputs" in (written.fallback_reason or "")
    assert "writing the portable one" in caplog.text and "already in the inputs" in caplog.text
    assert written.gradient_max_abs_diff <= 1e-5 and path.stat().st_size > 0


class PackedAtLoad:
    """A training module whose parameters, as the trainer sees them, are copies: writes to them never reach its
    steps, as with weights a delegate packs when the program loads."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def forward_backward(self, method: str, inputs: list[torch.Tensor]) -> Any:
        return self.module.forward_backward(method, inputs)

    def named_gradients(self) -> Any:
        return self.module.named_gradients()

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.module.named_parameters().items()}


def test_a_program_that_ignores_written_parameters_fails_the_exports_check(
    adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import executorch.extension.training as training

    model = torch_model(adapter)
    step, names = eager_train_step(model, personal_part(model, 1))
    batch = example_batch(OnDeviceConfig(train_layers=1, batch_size=4, sequence_length=SEQUENCE), 32, len(LABELS))
    program = on_device_program.lower_portable(joint_program(step, batch))
    assert on_device_program.check_program(program, step, names, batch) <= 1e-5
    load = training._load_for_executorch_for_training_from_buffer
    monkeypatch.setattr(training, "_load_for_executorch_for_training_from_buffer", lambda b: PackedAtLoad(load(b)))
    assert on_device_program.check_program(program, step, names, batch) > 1e-3


def test_on_device_training_needs_a_swappable_export_and_a_layer_count_the_backbone_has(
    adapter: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="--mode swappable"):
        ExportConfig(adapter=adapter, out=tmp_path / "m", on_device=OnDeviceConfig())
    with pytest.raises(ConfigError, match="more than the backbone's 2 layers"):
        export_adapter(
            ExportConfig(
                adapter=adapter, out=tmp_path / "s", mode="swappable", on_device=OnDeviceConfig(train_layers=3)
            )
        )
    assert not (tmp_path / "s").exists()


def test_the_held_out_split_and_the_batch_plan_are_seeded_and_cover_every_row() -> None:
    train, held_out = split_examples(10, 0.2, seed=0)
    assert len(held_out) == 2 and sorted([*train, *held_out]) == list(range(10))
    assert np.array_equal(split_examples(10, 0.2, seed=0)[1], held_out)
    batches = plan_batches(10, 4, steps=3, seed=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))  # one epoch: every row once
