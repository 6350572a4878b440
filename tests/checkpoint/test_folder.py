"""The adapter folder: round trips, PEFT compatibility, manifest checks, atomic replacement, sizes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedadapt import AdapterModel, BackboneConfig, StateSplit, load_backbone, make_method_config
from fedadapt.checkpoint.folder import MANIFEST, load_adapter, read_manifest, save_adapter
from fedadapt.checkpoint.info import adapter_info
from fedadapt.delta.state import AdapterSchema
from fedadapt.errors import AdapterFolderError, ConfigError

METHODS = ["lora", "ffa-lora", "ia3", "prompt", "prefix", "bitfit", "head"]
PEFT_METHODS = [m for m in METHODS if m not in ("bitfit", "head")]
LABELS = ("lost_card", "top_up", "declined")


def _cfg(folder: Path) -> BackboneConfig:
    return BackboneConfig(name_or_path=str(folder), num_labels=3)


def _build(folder: Path, method: str, labels: tuple[str, ...] | None = None, **fields: Any) -> AdapterModel:
    return AdapterModel(load_backbone(_cfg(folder)), make_method_config(method, **fields), labels=labels)


def _perturb(model: AdapterModel, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.load_state({n: t + 0.3 * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


def _logits(model: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits  # type: ignore[operator, no-any-return]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]


# -------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("method", METHODS)
def test_round_trip(tiny_bert: Path, tmp_path: Path, batch: dict[str, torch.Tensor], method: str) -> None:
    model = _build(tiny_bert, method, labels=LABELS).eval()
    _perturb(model)
    folder = save_adapter(model, tmp_path / "adapter")
    assert folder == tmp_path / "adapter"

    loaded = load_adapter(folder).eval()
    assert loaded.schema_id == model.schema_id
    assert loaded.schema == model.schema
    assert loaded.labels == LABELS
    _assert_same_state(loaded.state(), model.state())
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=0)
    loaded.frozen.check_frozen()

    manifest = read_manifest(folder)
    assert manifest["method"]["name"] == method
    assert manifest["backbone"]["fingerprint"] == model.backbone.fingerprint
    assert manifest["backbone"]["name_or_path"] == str(tiny_bert)
    assert manifest["backbone"]["pooling"] == {"mode": "mean", "normalize": True}
    assert manifest["labels"] == list(LABELS)
    assert manifest["schema_id"] == model.schema_id
    for name in manifest["weights"]:
        assert (folder / name).is_file()


def test_round_trip_keeps_the_plain_backbones_cls_pooling(
    tiny_bert_plain: Path, tmp_path: Path, batch: dict[str, torch.Tensor]
) -> None:
    model = _build(tiny_bert_plain, "lora").eval()
    _perturb(model)
    loaded = load_adapter(save_adapter(model, tmp_path / "adapter")).eval()
    assert loaded.backbone.pooling == model.backbone.pooling
    assert loaded.backbone.pooling.mode == "cls"
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=0)


def test_default_labels_survive(tiny_bert: Path, tmp_path: Path) -> None:
    model = _build(tiny_bert, "bitfit")
    assert load_adapter(save_adapter(model, tmp_path / "adapter")).labels == ("LABEL_0", "LABEL_1", "LABEL_2")


def test_state_split_survives(tiny_bert: Path, tmp_path: Path) -> None:
    model = AdapterModel(load_backbone(_cfg(tiny_bert)), make_method_config("lora"), StateSplit(personal=("head",)))
    loaded = load_adapter(save_adapter(model, tmp_path / "adapter"))
    assert loaded.split == model.split
    assert {s.name for s in loaded.schema.specs("personal")} == {
        s.name for s in model.schema.tensors if s.role == "head"
    }
    assert loaded.schema_id == model.schema_id


def test_ffa_lora_round_trip_keeps_a_seed(tiny_bert: Path, tmp_path: Path) -> None:
    model = AdapterModel(load_backbone(_cfg(tiny_bert)), make_method_config("ffa-lora", a_seed=3))
    loaded = load_adapter(save_adapter(model, tmp_path / "adapter"))
    assert loaded.schema.extras == model.schema.extras
    assert loaded.method == model.method
    a_saved = {n: p for n, p in model.module.named_parameters() if ".lora_A." in n}
    a_loaded = {n: p for n, p in loaded.module.named_parameters() if ".lora_A." in n}
    assert all(torch.equal(a_saved[n], a_loaded[n]) and not a_loaded[n].requires_grad for n in a_saved)


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "ia3"])
def test_top_layer_round_trip_keeps_drop_layers(
    tiny_bert: Path, tmp_path: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    model = _build(tiny_bert, method, drop_layers=1).eval()
    _perturb(model)
    folder = save_adapter(model, tmp_path / "adapter")
    manifest = read_manifest(folder)
    assert manifest["method"]["drop_layers"] == 1 and manifest["schema"]["method"]["drop_layers"] == 1
    loaded = load_adapter(folder).eval()
    assert loaded.method == model.method and loaded.schema == model.schema
    assert all(".layer.1." in s.name for s in loaded.schema.tensors if s.role == "adapter")
    _assert_same_state(loaded.state(), model.state())
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=0)
    # PEFT's own files carry the layer selection: PEFT alone rebuilds the same model.
    peft_model = peft.PeftModel.from_pretrained(load_backbone(_cfg(tiny_bert)).model, str(folder)).eval()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "ia3"])
def test_a_folder_saved_before_drop_layers_existed_still_loads(tiny_bert: Path, tmp_path: Path, method: str) -> None:
    """Its manifest's method has no drop_layers: it reads as 0, with the schema id it was saved with."""
    model = _build(tiny_bert, method)
    folder = save_adapter(model, tmp_path / "adapter")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "drop_layers" not in manifest["schema"]["method"]
    del manifest["method"]["drop_layers"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_adapter(folder)
    assert loaded.schema_id == model.schema_id and loaded.method.drop_layers == 0  # type: ignore[attr-defined]


def test_a_manifest_dropping_every_layer_is_refused_before_the_backbone_loads(tiny_bert: Path, tmp_path: Path) -> None:
    folder = save_adapter(_build(tiny_bert, "lora", drop_layers=1), tmp_path / "adapter")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["method"]["drop_layers"] = manifest["schema"]["method"]["drop_layers"] = 2
    manifest["schema_id"] = AdapterSchema.from_dict(manifest["schema"]).schema_id  # a consistent, hostile manifest
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="drop_layers=2 leaves no layer with an adapter"):
        load_adapter(folder)


def test_head_folder_holds_the_head_alone(tiny_bert: Path, tmp_path: Path) -> None:
    model = _build(tiny_bert, "head")
    _perturb(model)
    folder = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "fedadapt_adapter.json"]
    saved = load_file(str(folder / "adapter.safetensors"))
    assert sorted(saved) == ["classifier.bias", "classifier.weight"]
    _assert_same_state(dict(sorted(saved.items())), dict(sorted(model.state().items())))
    assert read_manifest(folder)["method"] == {"name": "head"}


# --------------------------------------------------------------------------------- PEFT compatible


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_methods_write_files_peft_loads(
    tiny_bert: Path, tmp_path: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    model = _build(tiny_bert, method).eval()
    _perturb(model)
    folder = save_adapter(model, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "adapter.safetensors").exists()

    peft_model = peft.PeftModel.from_pretrained(load_backbone(_cfg(tiny_bert)).model, str(folder)).eval()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), atol=1e-6, rtol=0)


def test_bitfit_writes_its_own_weight_file(tiny_bert: Path, tmp_path: Path) -> None:
    model = _build(tiny_bert, "bitfit")
    _perturb(model)
    folder = save_adapter(model, tmp_path / "adapter")
    assert not (folder / "adapter_config.json").exists()
    saved = load_file(str(folder / "adapter.safetensors"))
    _assert_same_state(dict(sorted(saved.items())), dict(sorted(model.state().items())))


# ---------------------------------------------------------------------------------------- failures


def test_load_onto_other_backbone_weights_fails(tiny_bert: Path, tmp_path: Path) -> None:
    other = shutil.copytree(tiny_bert, tmp_path / "other-backbone")
    state = load_file(str(other / "model.safetensors"))
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"] * 1.01
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})

    folder = save_adapter(_build(tiny_bert, "lora"), tmp_path / "adapter")
    with pytest.raises(AdapterFolderError, match="fingerprint"):
        load_adapter(folder, backbone=str(other))
    # The same weights in another folder are fine.
    same = shutil.copytree(tiny_bert, tmp_path / "same-backbone")
    assert load_adapter(folder, backbone=str(same)).schema_id == read_manifest(folder)["schema_id"]


def test_folder_without_manifest_fails(tiny_bert: Path, tmp_path: Path) -> None:
    folder = save_adapter(_build(tiny_bert, "lora"), tmp_path / "adapter")
    (folder / MANIFEST).unlink()
    with pytest.raises(AdapterFolderError, match=MANIFEST):
        load_adapter(folder)
    with pytest.raises(AdapterFolderError, match=MANIFEST):
        read_manifest(tmp_path / "does-not-exist")


def test_manifest_of_another_format_fails(tiny_bert: Path, tmp_path: Path) -> None:
    folder = save_adapter(_build(tiny_bert, "lora"), tmp_path / "adapter")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format"] = "something.else.v9"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AdapterFolderError, match="format"):
        load_adapter(folder)


@pytest.mark.parametrize(
    ("method", "weights"), [("lora", "adapter_model.safetensors"), ("bitfit", "adapter.safetensors")]
)
def test_missing_weight_file_fails(tiny_bert: Path, tmp_path: Path, method: str, weights: str) -> None:
    folder = save_adapter(_build(tiny_bert, method), tmp_path / "adapter")
    (folder / weights).unlink()
    with pytest.raises(AdapterFolderError, match=weights):
        load_adapter(folder)


def test_refuses_to_replace_a_folder_that_is_not_an_adapter(tiny_bert: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterFolderError, match="not an adapter folder"):
        save_adapter(_build(tiny_bert, "lora"), target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_saves_into_an_empty_existing_folder(tiny_bert: Path, tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    save_adapter(_build(tiny_bert, "lora"), target)
    assert (target / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_saving_twice_replaces_the_folder(
    tiny_bert: Path, tmp_path: Path, batch: dict[str, torch.Tensor], method: str
) -> None:
    parent = tmp_path / "runs"
    model = _build(tiny_bert, method).eval()
    save_adapter(model, parent / "adapter")
    (parent / "adapter" / "stale.txt").write_text("from the first save")
    _perturb(model, seed=11)
    save_adapter(model, parent / "adapter")

    assert sorted(p.name for p in parent.iterdir()) == ["adapter"], "temporary folders left behind"
    assert not (parent / "adapter" / "stale.txt").exists()
    loaded = load_adapter(parent / "adapter").eval()
    _assert_same_state(loaded.state(), model.state())
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------- sizes


def test_lora_sizes(tiny_bert: Path) -> None:
    info = adapter_info(make_method_config("lora"), _cfg(tiny_bert))
    hidden, rank, layers, labels = 32, 8, 2, 3
    expected = layers * 2 * (rank * hidden + hidden * rank) + (hidden * labels + labels)
    assert info["trainable_params"] == expected == 2147
    assert info["shared_params"] == expected
    # The weight file is the float32 tensors plus a safetensors header (8-byte length + JSON
    # naming the 10 tensors, about 1.3 KB here).
    overhead = info["adapter_bytes"] - 4 * expected
    assert 0 < overhead < 2048, overhead
    assert info["total_params"] == info["backbone_params"] + expected + (hidden * labels + labels)


def test_lora_weight_file_holds_exactly_the_trainable_floats(tiny_bert: Path, tmp_path: Path) -> None:
    model = _build(tiny_bert, "lora")
    folder = save_adapter(model, tmp_path / "adapter")
    raw = (folder / "adapter_model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    assert len(header) == len(model.schema.tensors)
    assert all(t["dtype"] == "F32" for t in header.values())
    assert len(raw) - 8 - header_len == 4 * model.num_parameters()[1]
