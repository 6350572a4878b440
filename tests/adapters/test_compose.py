"""Composition over one backbone: stacking, AdapterFusion and hot-swapping trained adapter folders."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import train_steps
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import fedadapt.checkpoint.folder
import fedadapt.model.backbone
from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.adapters import Fuse, Stack, set_setup
from fedadapt.adapters.slots import AdaptedOutput, find_slots
from fedadapt.checkpoint.folder import OWN_WEIGHTS, load_adapter, read_manifest, save_adapter
from fedadapt.checkpoint.hotswap import AdapterSwitch
from fedadapt.errors import AdapterFolderError, ConfigError

HIDDEN, LABELS = 32, 3
HEAD = {"classifier.weight", "classifier.bias"}
PFEIFFER_PARAMS = 2 * (HIDDEN * 2 + 2 + 2 * HIDDEN + HIDDEN)  # two FFN adapters, r = 2
FUSION_PARAMS = 2 * 3 * (HIDDEN * HIDDEN + HIDDEN)  # query, key, value at two FFN positions
HEAD_PARAMS = HIDDEN * LABELS + LABELS


def _cfg(folder: Path, num_labels: int = LABELS) -> BackboneConfig:
    return BackboneConfig(name_or_path=str(folder), num_labels=num_labels)


def _build(folder: Path, method: str, num_labels: int = LABELS, **fields: Any) -> AdapterModel:
    return AdapterModel(load_backbone(_cfg(folder, num_labels)), make_method_config(method, **fields))


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(batch)).logits  # type: ignore[operator, no-any-return]


def _encoded(model: AdapterModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's last hidden state (heads differ between the models compared)."""
    with torch.no_grad():
        return model.module.backbone(**_inputs(batch))[0]  # type: ignore[operator, no-any-return]


def _perturb(model: AdapterModel, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.load_state({n: t + scale * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


def _named(model: AdapterModel, marker: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.module.named_parameters() if marker in n}


def _assert_holds_folder(model: AdapterModel, name: str, folder: Path) -> None:
    """Adapter ``name`` of ``model`` holds exactly the adapter tensors saved in ``folder``, frozen."""
    saved = {n: t for n, t in load_file(str(folder / OWN_WEIGHTS)).items() if ".adapters.default." in n}
    params = _named(model, f".adapters.{name}.")
    assert saved and set(params) == {n.replace(".adapters.default.", f".adapters.{name}.") for n in saved}
    for saved_name, tensor in saved.items():
        param = params[saved_name.replace(".adapters.default.", f".adapters.{name}.")]
        assert not param.requires_grad
        assert torch.equal(param, tensor)


def _setups(model: AdapterModel) -> set[object]:
    return {s.setup for s in find_slots(model.module.backbone)}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def folders(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained-looking adapter folders: a and b (Pfeiffer, different weights), c (Houlsby), lora,
    other (Pfeiffer on a backbone with one weight changed) and two_labels (a 2-class head)."""
    root = tmp_path_factory.mktemp("compose")
    out: dict[str, Path] = {}
    for key, method, seed in [("a", "pfeiffer", 1), ("b", "pfeiffer", 2), ("c", "houlsby", 3)]:
        model = _build(tiny_bert, method)
        _perturb(model, seed)
        out[key] = save_adapter(model, root / key)
    out["lora"] = save_adapter(_build(tiny_bert, "lora"), root / "lora")
    two = _build(tiny_bert, "pfeiffer", num_labels=2)
    _perturb(two, 4)
    out["two_labels"] = save_adapter(two, root / "two_labels")

    other_bert = root / "other-bert"
    shutil.copytree(tiny_bert, other_bert)
    weights = load_file(str(other_bert / "model.safetensors"))
    weights["embeddings.word_embeddings.weight"][5, 0] += 0.5
    save_file(weights, str(other_bert / "model.safetensors"), metadata={"format": "pt"})
    other = _build(other_bert, "pfeiffer")
    assert other.backbone.fingerprint != load_backbone(_cfg(tiny_bert)).fingerprint
    _perturb(other, 5)
    out["other"] = save_adapter(other, root / "other")
    return out


# ----------------------------------------------------------------------------------------- stacking


def test_stack_loads_below_frozen_and_trains_only_top(
    tiny_bert: Path, folders: dict[str, Path], batch: dict[str, torch.Tensor]
) -> None:
    model = _build(tiny_bert, "stack", below=(str(folders["a"]),)).eval()
    assert _setups(model) == {Stack(("stacked0", "default"))}
    _assert_holds_folder(model, "stacked0", folders["a"])

    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert trainable == {s.name for s in model.schema.tensors}
    assert {n for n in trainable if ".adapters.default." not in n} == HEAD
    assert model.num_parameters()[1] == PFEIFFER_PARAMS + HEAD_PARAMS
    assert not _named(model, ".adapters.stacked0.").keys() & trainable

    # The new top adapter starts as the identity: the backbone computes what A alone computes.
    alone = load_adapter(folders["a"]).eval()
    torch.testing.assert_close(_encoded(model, batch), _encoded(alone, batch), atol=1e-6, rtol=0)

    below = {n: p.detach().clone() for n, p in _named(model, ".adapters.stacked0.").items()}
    before = model.state()
    train_steps(model, batch)
    model.frozen.check_unchanged()
    assert all(torch.equal(below[n], p) for n, p in _named(model, ".adapters.stacked0.").items())
    after = model.state()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed >= HEAD and any(".adapters.default.up." in n for n in changed)


def test_stack_order_matters(tiny_bert: Path, folders: dict[str, Path], batch: dict[str, torch.Tensor]) -> None:
    model = _build(tiny_bert, "stack", below=(str(folders["a"]),)).eval()
    _perturb(model, seed=11)  # the top adapter stops being the identity
    backbone = model.module.backbone  # type: ignore[union-attr]
    a_then_top = _logits(model, batch)

    set_setup(backbone, Stack(("stacked0", "default")))
    torch.testing.assert_close(_logits(model, batch), a_then_top, atol=0, rtol=0)
    set_setup(backbone, Stack(("default", "stacked0")))
    top_then_a = _logits(model, batch)
    set_setup(backbone, "default")
    top_only = _logits(model, batch)
    set_setup(backbone, "stacked0")
    a_only = _logits(model, batch)
    results = [a_then_top, top_then_a, top_only, a_only]
    for i, x in enumerate(results):
        for y in results[i + 1 :]:
            assert (x - y).abs().max() > 1e-4

    # By hand on one block: the first name reads the sublayer output, the second reads the first's.
    set_setup(backbone, Stack(("stacked0", "default")))
    slot = backbone.encoder.layer[1].output  # type: ignore[union-attr, index]
    gen = torch.Generator().manual_seed(3)
    hidden_states, x = (
        torch.randn(2, 4, slot.dense.in_features, generator=gen),
        torch.randn(2, 4, HIDDEN, generator=gen),
    )
    with torch.no_grad():
        first = slot.dense(hidden_states)
        first = first + slot.adapters["stacked0"](first)
        expected = slot.LayerNorm(first + slot.adapters["default"](first) + x)
        torch.testing.assert_close(slot(hidden_states, x), expected, atol=1e-6, rtol=0)

    with pytest.raises(ConfigError, match=r"no adapters named \['nope'\]"):
        set_setup(backbone, Stack(("stacked0", "nope")))


def test_stack_of_two_applies_below_in_order(tiny_bert: Path, folders: dict[str, Path]) -> None:
    model = _build(tiny_bert, "stack", below=(str(folders["a"]), str(folders["c"])), top="houlsby", r=3)
    assert _setups(model) == {Stack(("stacked0", "stacked1", "default"))}
    _assert_holds_folder(model, "stacked0", folders["a"])
    _assert_holds_folder(model, "stacked1", folders["c"])
    houlsby_r3 = 4 * (HIDDEN * 3 + 3 + 3 * HIDDEN + HIDDEN)
    assert model.num_parameters()[1] == houlsby_r3 + HEAD_PARAMS


def test_stack_round_trip_keeps_order(
    tiny_bert: Path, folders: dict[str, Path], tmp_path: Path, batch: dict[str, torch.Tensor]
) -> None:
    model = _build(tiny_bert, "stack", below=(str(folders["a"]),)).eval()
    _perturb(model, seed=12)
    folder = save_adapter(model, tmp_path / "stacked")
    saved = load_file(str(folder / OWN_WEIGHTS))
    assert set(saved) == {s.name for s in model.schema.tensors}
    assert not [n for n in saved if ".adapters.stacked0." in n]  # A stays in its own folder

    loaded = load_adapter(folder).eval()
    assert loaded.schema_id == model.schema_id
    assert _setups(loaded) == {Stack(("stacked0", "default"))}
    _assert_holds_folder(loaded, "stacked0", folders["a"])
    state, reloaded = model.state(), loaded.state()
    assert all(torch.equal(state[n], reloaded[n]) for n in state)
    expected = _logits(model, batch)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-6, rtol=0)

    set_setup(loaded.module.backbone, Stack(("default", "stacked0")))  # type: ignore[arg-type]
    assert (_logits(loaded, batch) - expected).abs().max() > 1e-4


def test_stack_schema_records_ids_not_paths(tiny_bert: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    first = shutil.copytree(folders["a"], tmp_path / "x" / "a")
    second = shutil.copytree(folders["a"], tmp_path / "y" / "deeper" / "adapter")
    models = [_build(tiny_bert, "stack", below=(str(f),)) for f in (folders["a"], first, second)]
    assert len({m.schema_id for m in models}) == 1
    schema = models[0].schema
    assert schema.method == {"name": "stack", "top": "pfeiffer", "r": None}
    assert schema.extras["below_schema_ids"] == [read_manifest(folders["a"])["schema_id"]]
    assert all(str(folders["a"]) not in str(m.schema.to_dict()) for m in models)

    # B has A's config, hence A's schema id, but other weights: the stack's schema must differ.
    on_b = _build(tiny_bert, "stack", below=(str(folders["b"]),))
    assert on_b.schema.extras["below_schema_ids"] == schema.extras["below_schema_ids"]
    assert on_b.schema.extras["below_weight_hashes"] != schema.extras["below_weight_hashes"]
    assert on_b.schema_id != models[0].schema_id
    # The order of the stack is part of the schema.
    ab = _build(tiny_bert, "stack", below=(str(folders["a"]), str(folders["b"])))
    ba = _build(tiny_bert, "stack", below=(str(folders["b"]), str(folders["a"])))
    assert ab.schema_id != ba.schema_id


def test_stack_config_errors(folders: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="at least one trained adapter folder"):
        make_method_config("stack")
    with pytest.raises(ConfigError, match="top of a stack must be one of"):
        make_method_config("stack", below=(str(folders["a"]),), top="lora")


# ----------------------------------------------------------------------------------- composition errors


@pytest.mark.parametrize("method", ["stack", "fusion"])
def test_composing_foreign_folders_raises(
    tiny_bert: Path, folders: dict[str, Path], tmp_path: Path, method: str
) -> None:
    field = "below" if method == "stack" else "adapters"

    def compose(*keys: Path) -> None:
        fields: dict[str, Any] = {field: tuple(map(str, keys))}
        AdapterModel(load_backbone(_cfg(tiny_bert)), make_method_config(method, **fields))

    with pytest.raises(AdapterFolderError, match=r"holds a 'lora' adapter; only \('houlsby', 'pfeiffer', 'parallel'\)"):
        compose(folders["a"], folders["lora"])
    with pytest.raises(AdapterFolderError, match="trained on another backbone"):
        compose(folders["a"], folders["other"])
    with pytest.raises(AdapterFolderError, match="fedadapt_adapter.json is missing"):
        compose(folders["a"], tmp_path)
    stacked = save_adapter(_build(tiny_bert, "stack", below=(str(folders["a"]),)), tmp_path / "stacked")
    with pytest.raises(AdapterFolderError, match="holds a 'stack' adapter"):
        compose(folders["a"], stacked)


# ----------------------------------------------------------------------------------------- fusion


def test_fusion_trains_only_the_fusion_layers(
    tiny_bert: Path, folders: dict[str, Path], batch: dict[str, torch.Tensor]
) -> None:
    model = _build(tiny_bert, "fusion", adapters=(str(folders["a"]), str(folders["b"]))).eval()
    assert _setups(model) == {Fuse(("fused0", "fused1"), "fusion")}
    _assert_holds_folder(model, "fused0", folders["a"])
    _assert_holds_folder(model, "fused1", folders["b"])

    adapter_role = {s.name for s in model.schema.tensors if s.role == "adapter"}
    assert adapter_role == set(_named(model, ".fusions."))
    assert all(".fusions.fusion." in n for n in adapter_role)
    assert {s.name for s in model.schema.tensors if s.role == "head"} == HEAD
    assert model.num_parameters()[1] == FUSION_PARAMS + HEAD_PARAMS
    # A fusion layer sits where the fused adapters are: the FFN blocks of Pfeiffer adapters.
    slots: list[AdaptedOutput] = find_slots(model.module.backbone)  # type: ignore[arg-type]
    assert [(s.layer, s.position) for s in slots if len(s.fusions)] == [(0, "ffn"), (1, "ffn")]

    assert model.schema.method == {"name": "fusion", "temperature": 1.0}
    assert model.schema.extras["fused_schema_ids"] == [
        read_manifest(folders["a"])["schema_id"],
        read_manifest(folders["b"])["schema_id"],
    ]

    fixed = {n: p.detach().clone() for n, p in model.module.named_parameters() if not p.requires_grad}
    assert any(".adapters.fused0." in n for n in fixed) and any(".adapters.fused1." in n for n in fixed)
    before = model.state()
    train_steps(model, batch)
    model.frozen.check_unchanged()
    now = dict(model.module.named_parameters())
    assert not [n for n, t in fixed.items() if not torch.equal(t, now[n])]
    _assert_holds_folder(model, "fused0", folders["a"])
    _assert_holds_folder(model, "fused1", folders["b"])
    after = model.state()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed >= HEAD
    for layer in (0, 1):
        prefix = f"backbone.encoder.layer.{layer}.output.fusions.fusion."
        assert {f"{prefix}query.weight", f"{prefix}key.weight", f"{prefix}value.weight"} <= changed


def test_fusion_of_one_adapter_twice_is_that_adapter(
    tiny_bert: Path, folders: dict[str, Path], batch: dict[str, torch.Tensor]
) -> None:
    """Value starts as the identity and the attention weights sum to one."""
    a = str(folders["a"])
    fused = _build(tiny_bert, "fusion", adapters=(a, a)).eval()
    alone = load_adapter(folders["a"]).eval()
    torch.testing.assert_close(_encoded(fused, batch), _encoded(alone, batch), atol=1e-5, rtol=0)
    mixed = _build(tiny_bert, "fusion", adapters=(a, str(folders["b"]))).eval()
    assert (_encoded(mixed, batch) - _encoded(alone, batch)).abs().max() > 1e-3


def test_fusion_round_trip(
    tiny_bert: Path, folders: dict[str, Path], tmp_path: Path, batch: dict[str, torch.Tensor]
) -> None:
    model = _build(tiny_bert, "fusion", adapters=(str(folders["a"]), str(folders["b"]))).eval()
    train_steps(model, batch, steps=3)
    folder = save_adapter(model, tmp_path / "fusion")
    saved = load_file(str(folder / OWN_WEIGHTS))
    assert set(saved) == set(_named(model, ".fusions.")) | HEAD
    assert not [n for n in saved if ".adapters." in n]

    loaded = load_adapter(folder).eval()
    assert loaded.schema_id == model.schema_id
    state, reloaded = model.state(), loaded.state()
    assert all(torch.equal(state[n], reloaded[n]) for n in state)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-6, rtol=0)


def test_fusion_config_errors(folders: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="at least two trained adapter folders, got 1"):
        make_method_config("fusion", adapters=(str(folders["a"]),))
    with pytest.raises(ConfigError, match="at least two"):
        make_method_config("fusion")
    with pytest.raises(ConfigError, match="temperature must be positive"):
        make_method_config("fusion", adapters=(str(folders["a"]), str(folders["b"])), temperature=0.0)
    with pytest.raises(ConfigError, match="has no rank or size"):
        make_method_config("fusion", 4, adapters=(str(folders["a"]), str(folders["b"])))


# ---------------------------------------------------------------------------------------- hot-swap

_SWITCHED = {"u0": "a", "u1": "b", "u2": "c"}


def _switch(tiny_bert: Path, folders: dict[str, Path]) -> AdapterSwitch:
    switch = AdapterSwitch(load_backbone(_cfg(tiny_bert)))
    for name, key in _SWITCHED.items():
        switch.add(name, folders[key])
    return switch


def _switch_logits(switch: AdapterSwitch, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return switch(**_inputs(batch)).logits  # type: ignore[no-any-return]


def test_switch_matches_each_loaded_adapter(
    tiny_bert: Path, folders: dict[str, Path], batch: dict[str, torch.Tensor]
) -> None:
    switch = _switch(tiny_bert, folders)
    assert switch.names == ("u0", "u1", "u2")
    got = {}
    for name, key in _SWITCHED.items():
        switch.activate(name)
        assert switch.active == name
        got[name] = _switch_logits(switch, batch)
        expected = _logits(load_adapter(folders[key]).eval(), batch)
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=0)
    names = list(got)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert (got[x] - got[y]).abs().max() > 1e-3

    # Serving never applies dropout, even if someone left the model in training mode.
    switch.loaded.model.train()
    assert torch.equal(_switch_logits(switch, batch), got["u2"])
    assert torch.equal(_switch_logits(switch, batch), got["u2"])

    switch.activate(None)  # the bare backbone
    bare = load_backbone(_cfg(tiny_bert)).model.eval()
    with torch.no_grad():
        hidden = switch.loaded.model.backbone(**_inputs(batch))[0]
        torch.testing.assert_close(hidden, bare.backbone(**_inputs(batch))[0], atol=1e-6, rtol=0)


def test_switching_never_reloads_the_backbone(
    tiny_bert: Path, folders: dict[str, Path], batch: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    switch = _switch(tiny_bert, folders)
    reference = {}
    for name in _SWITCHED:
        switch.activate(name)
        reference[name] = _switch_logits(switch, batch)
    backbone = switch.loaded.model.backbone
    pointers = {n: p.data_ptr() for n, p in backbone.named_parameters()}
    assert any(".adapters.u2." in n for n in pointers)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("activate() must not load anything")

    monkeypatch.setattr(fedadapt.model.backbone, "load_backbone", forbidden)
    monkeypatch.setattr(fedadapt.checkpoint.folder, "load_backbone", forbidden)
    monkeypatch.setattr(AutoModel, "from_pretrained", forbidden)
    monkeypatch.setattr("fedadapt.checkpoint.weights.read_weight_file", forbidden)
    monkeypatch.setattr("fedadapt.checkpoint.weights.load_file", forbidden)
    monkeypatch.setattr("safetensors.torch.load_file", forbidden)

    for active in ["u1", "u0", None, "u2", "u0", "u1", "u2"]:
        switch.activate(active)
        assert {n: p.data_ptr() for n, p in backbone.named_parameters()} == pointers
        if active is not None:
            assert switch.loaded.model.classifier is switch.heads[active]
            assert torch.equal(_switch_logits(switch, batch), reference[active])
    switch.loaded.frozen.check_frozen()
    switch.loaded.frozen.check_unchanged()
    assert not [n for n, p in switch.loaded.model.named_parameters() if p.requires_grad]


def test_switch_errors(tiny_bert: Path, folders: dict[str, Path], batch: dict[str, torch.Tensor]) -> None:
    switch = AdapterSwitch(load_backbone(_cfg(tiny_bert)))
    with pytest.raises(ConfigError, match="activate an adapter first"):
        switch(**_inputs(batch))
    switch.add("u0", folders["a"])
    with pytest.raises(ConfigError, match=r"no adapter named 'nope'; loaded: \['u0'\]"):
        switch.activate("nope")
    with pytest.raises(ConfigError, match="already loaded"):
        switch.add("u0", folders["b"])
    with pytest.raises(AdapterFolderError, match="trained on another backbone"):
        switch.add("other", folders["other"])
    with pytest.raises(AdapterFolderError, match="has a 2-class head; this backbone serves 3"):
        switch.add("two", folders["two_labels"])
    with pytest.raises(AdapterFolderError, match="holds a 'lora' adapter"):
        switch.add("lora", folders["lora"])
    assert switch.names == ("u0",)
    assert {n for s in find_slots(switch.loaded.model.backbone) for n in s.adapters} == {"u0"}
