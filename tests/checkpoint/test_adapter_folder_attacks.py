"""Attacks on adapter folders (issue 17 item 1): every number in a manifest and every byte of a weight file is hostile.

Each attack reproduces one finding of the issue's review and failed on the code before the fix:
(a) a manifest of a few hundred bytes asked for a huge head or adapter, which was built before anything
was compared; (b) PEFT-format weights were never checked for NaN; (c) hot-swapping, stacking and fusion
copied tensors with broadcasting ``copy_`` and took the hot-swapped head unchecked; (d) a deeply nested
manifest raised RecursionError. The fuzz at the end mutates real manifests and lets only named errors out.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModel

import fedadapt.checkpoint.folder
import fedadapt.model.backbone
from export.loading import load_for_export, read_adapter_manifest
from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.adapters.slots import find_slots
from fedadapt.checkpoint.folder import (
    FOLDER_FORMAT,
    MANIFEST,
    OWN_WEIGHTS,
    PEFT_WEIGHTS,
    load_adapter,
    read_manifest,
    save_adapter,
)
from fedadapt.checkpoint.hotswap import AdapterSwitch
from fedadapt.checkpoint.limits import DEFAULT_LIMITS, AdapterLimits, BackboneDims, backbone_dims, check_fits_backbone
from fedadapt.delta.state import AdapterSchema
from fedadapt.errors import AdapterFolderError, ConfigError, FedAdaptError, JsonInputError, SchemaMismatch
from fedadapt.methods import method_config_from_dict

HIDDEN, POSITIONS, LABELS = 32, 64, 3  # the tiny BERT of conftest.py, with a 3-class head
# No tensor the tiny BERT or an adapter on it needs comes near this (the largest is a few thousand values).
MAX_ELEMENTS = 1 << 22
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------------- tools


class AllocationGuard(TorchDispatchMode):
    """Fails the test before any tensor of more than ``limit`` elements is allocated (every factory op is seen)."""

    FACTORIES = {"empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "randperm"}
    FACTORIES |= {f"new_{name}" for name in ("empty", "empty_strided", "zeros", "ones", "full")}

    def __init__(self, limit: int = MAX_ELEMENTS) -> None:
        super().__init__()
        self.limit = limit
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in self.FACTORIES:
            sizes = [a for a in (*args[:2], kwargs.get("size")) if isinstance(a, list | tuple | torch.Size)]
            self._admit(math.prod(int(d) for d in sizes[0]) if sizes else 0, func)
        result = func(*args, **kwargs)
        for tensor in result if isinstance(result, list | tuple) else (result,):
            if isinstance(tensor, torch.Tensor):
                self._admit(tensor.numel(), func)
        return result

    def _admit(self, elements: int, func: Any) -> None:
        self.largest = max(self.largest, elements)
        if elements > self.limit:
            raise AssertionError(f"{func} asked for a tensor of {elements} elements (limit {self.limit})")


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1])


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Bytes by which this process's peak resident memory rose inside the block (Linux: VmHWM reset first)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak resident memory")
    before = _status_kib("VmRSS")
    growth: list[int] = []
    yield growth
    growth.append((_status_kib("VmHWM") - before) * 1024)


def _forbid_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of building a backbone (and with it the head) fail the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built before the manifest was checked")

    monkeypatch.setattr(fedadapt.checkpoint.folder, "load_backbone", forbidden)
    monkeypatch.setattr(fedadapt.model.backbone, "load_backbone", forbidden)
    monkeypatch.setattr(AutoModel, "from_pretrained", forbidden)


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())  # type: ignore[no-any-return]


def _rehash(manifest: dict[str, Any]) -> None:
    """Make schema_id agree with the (changed) schema, as an attacker would."""
    manifest["schema_id"] = AdapterSchema.from_dict(manifest["schema"]).schema_id


def _hostile_copy(folder: Path, out: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    copied = Path(shutil.copytree(folder, out))
    manifest = _manifest(copied)
    change(manifest)
    (copied / MANIFEST).write_text(json.dumps(manifest))
    return copied


def _with_weights(folder: Path, out: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    copied = Path(shutil.copytree(folder, out))
    file = copied / (OWN_WEIGHTS if (copied / OWN_WEIGHTS).is_file() else PEFT_WEIGHTS[1])
    weights = load_file(str(file))
    change(weights)
    save_file(weights, str(file), metadata={"format": "pt"})
    return copied


def _build(tiny_bert: Path, method: str, **fields: Any) -> AdapterModel:
    return AdapterModel(
        load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=LABELS)),
        make_method_config(method, **fields),
    )


def _perturb(model: AdapterModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.load_state({n: t + 0.3 * torch.randn(t.shape, generator=gen) for n, t in model.state().items()})


@pytest.fixture(scope="module")
def folders(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved adapter folders on the tiny BERT: a and b (Pfeiffer), lora, prompt, fusion (of a and b)."""
    root = tmp_path_factory.mktemp("attacks")
    out: dict[str, Path] = {}
    for key, method, seed in [("a", "pfeiffer", 1), ("b", "pfeiffer", 2), ("lora", "lora", 3), ("prompt", "prompt", 4)]:
        model = _build(tiny_bert, method)
        _perturb(model, seed)
        out[key] = save_adapter(model, root / key)
    out["fusion"] = save_adapter(_build(tiny_bert, "fusion", adapters=(str(out["a"]), str(out["b"]))), root / "fusion")
    return out


# ------------------------------------------------------- (a) a small manifest asks for a huge model


def _set(*path: Any, value: Any, mirror: bool = False) -> Callable[[dict[str, Any]], None]:
    """Set manifest[path] = value; ``mirror`` also sets it in schema.method and rehashes (a consistent lie)."""

    def change(manifest: dict[str, Any]) -> None:
        targets = [manifest, manifest["schema"]] if mirror else [manifest]
        for target in targets:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        if mirror:
            _rehash(manifest)

    return change


SIZE_ATTACKS = [
    ("lora", _set("backbone", "num_labels", value=10**9), r"backbone\.num_labels is 1000000000, more than the 100000"),
    ("lora", _set("backbone", "num_labels", value=50_000), r"labels lists 3 names, but backbone\.num_labels is 50000"),
    ("lora", _set("method", "r", value=10**7), r"method\.r is 10000000, more than the 4096 allowed"),
    ("lora", _set("method", "r", value=4000, mirror=True), r"method\.r is 4000, more than the backbone's 32"),
    ("a", _set("method", "r", value=10**7), r"method\.r is 10000000, more than the 4096 allowed"),
    ("a", _set("method", "r", value=1000, mirror=True), r"method\.r is 1000, more than the backbone's 32"),
    ("prompt", _set("method", "num_virtual_tokens", value=10**6), r"num_virtual_tokens is 1000000, more than the 4096"),
    ("prompt", _set("method", "num_virtual_tokens", value=3000, mirror=True), r"is 3000, more than the backbone's 64"),
    ("fusion", lambda m: m["method"].update(adapters=m["method"]["adapters"] * 500), r"names 1000 adapter folders"),
    ("a", _set("backbone", "seed", value=2**70), r"backbone\.seed is 1180591620717411303424, more than the"),
    # PEFT condenses a long target_modules list in quadratic time, in the meta plan and again in the build.
    (
        "lora",
        _set("method", "target_modules", value=[f"m{i}" for i in range(257)], mirror=True),
        r"method\.target_modules lists 257 entries, more than the 256 allowed \(max_setting_items\)",
    ),
    (
        "lora",
        _set("method", "target_modules", value=["query", "v" * 257], mirror=True),
        r"method\.target_modules\[1\] is 'vvv.*, 257 characters, more than the 256 allowed",
    ),
    ("a", _set("method", "layers", value=list(range(257)), mirror=True), r"method\.layers lists 257 entries"),
    (
        "fusion",
        lambda m: m["method"].update(adapters=["x" * 5000, m["method"]["adapters"][1]]),
        r"method\.adapters\[0\] is 'xxx.*, 5000 characters, more than the 4096 allowed",
    ),
    (
        "a",
        _set("schema", "tensors", 0, "shape", value=[10**6, 10**6]),
        r"schema\.tensors\[0\] brings the schema to 1000000000000 values",
    ),
]


@pytest.mark.parametrize(("key", "change", "message"), SIZE_ATTACKS, ids=[m for _, _, m in SIZE_ATTACKS])
def test_a_manifest_asking_for_a_huge_model_is_refused_before_anything_is_built(
    folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    change: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    hostile = _hostile_copy(folders[key], tmp_path / "hostile", change)
    assert (hostile / MANIFEST).stat().st_size < 64 * 1024
    _forbid_building(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(AdapterFolderError, match=rf"{re.escape(str(hostile / MANIFEST))}: .*{message}"):
        load_adapter(hostile)
    assert time.perf_counter() - started < 5.0
    # The exporter's path names the field too, instead of calling the folder "corrupt or truncated".
    with pytest.raises(AdapterFolderError, match=message):
        load_for_export(hostile, None)


def test_the_caps_on_list_settings_are_adapter_limits() -> None:
    from fedadapt.checkpoint.manifest import check_method

    method = {"name": "lora", "target_modules": ["query", "value"]}
    assert check_method(method, Path("m.json"), DEFAULT_LIMITS).target_modules == ("query", "value")  # type: ignore[attr-defined]
    with pytest.raises(AdapterFolderError, match=r"m\.json: method\.target_modules lists 2 entries, more than the 1"):
        check_method(method, Path("m.json"), AdapterLimits(max_setting_items=1))
    with pytest.raises(
        AdapterFolderError, match=r"method\.target_modules\[0\] is 'query', 5 characters, more than the 4"
    ):
        check_method(method, Path("m.json"), AdapterLimits(max_setting_chars=4))


def test_ia3_feedforward_modules_outside_target_modules_are_refused_when_the_config_is_made() -> None:
    """Was: accepted until PEFT's IA3Config raised its ValueError in apply(), outside any named error."""
    with pytest.raises(ConfigError, match=r"feedforward_modules must be among target_modules; \['value'\]"):
        make_method_config("ia3", target_modules=["query"], feedforward_modules=["value"])
    assert make_method_config("ia3", target_modules=["query", "value"], feedforward_modules=["value"])


def test_a_rank_of_ten_million_allocates_nothing(folders: dict[str, Path], tmp_path: Path) -> None:
    """Measured, not mocked: no tensor over 4M elements is asked for and the peak resident memory barely moves.

    Before the fix this built the backbone, then LoRA A and B of 10^7 × 32 each (10 GB): the guard stops it
    at the first of them.
    """
    hostile = _hostile_copy(folders["lora"], tmp_path / "hostile", _set("method", "r", value=10**7))
    guard = AllocationGuard()
    with peak_rss_growth() as growth, guard, pytest.raises(AdapterFolderError, match=r"method\.r is 10000000"):
        load_adapter(hostile)
    assert guard.largest <= MAX_ELEMENTS
    assert growth[0] < 64 * MiB, f"peak resident memory rose by {growth[0] / MiB:.0f} MiB"


# -------------------------------------------------------------------- (b) weights hold NaN, or other dtypes


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_peft_weights_are_refused(folders: dict[str, Path], tmp_path: Path, value: float) -> None:
    name = next(n for n in load_file(str(folders["lora"] / PEFT_WEIGHTS[1])) if ".lora_B." in n)

    def poison(weights: dict[str, torch.Tensor]) -> None:
        weights[name][0, 0] = value

    hostile = _with_weights(folders["lora"], tmp_path / "hostile", poison)
    file = re.escape(str(hostile / PEFT_WEIGHTS[1]))
    with pytest.raises(AdapterFolderError, match=rf"{file} tensor {re.escape(repr(name))} has non-finite values"):
        load_adapter(hostile)


def test_peft_weights_of_another_dtype_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    def halve(weights: dict[str, torch.Tensor]) -> None:
        for name in weights:
            weights[name] = weights[name].half()

    hostile = _with_weights(folders["lora"], tmp_path / "hostile", halve)
    with pytest.raises(AdapterFolderError, match="has dtype float16, expected float32"):
        load_adapter(hostile)


def test_weight_file_is_checked_by_its_size_and_header_before_any_tensor_is_read(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedadapt.checkpoint.weights

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensors were read before the file's header was checked")

    monkeypatch.setattr(fedadapt.checkpoint.weights, "load_file", forbidden)
    padded = _with_weights(folders["a"], tmp_path / "padded", lambda w: w.update(junk=torch.zeros(1 << 22)))
    with pytest.raises(AdapterFolderError, match=r"adapter\.safetensors is \d+ bytes, more than the \d+ that its 10"):
        load_adapter(padded)

    def transpose(weights: dict[str, torch.Tensor]) -> None:  # the same bytes in another shape
        name = next(n for n in weights if n.endswith(".up.weight"))
        weights[name] = weights[name].t().contiguous()

    reshaped = _with_weights(folders["a"], tmp_path / "reshaped", transpose)
    with pytest.raises(AdapterFolderError, match=r"up\.weight' has shape \(2, 32\), expected \(32, 2\)"):
        load_adapter(reshaped)


# ------------------------------------------------------- (c) hot-swap, stack and fusion copied with copy_


@pytest.fixture(scope="module")
def one_value_bias(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder a with one adapter bias of shape (32,) replaced by a shape-(1,) tensor (copy_ would broadcast it)."""

    def shrink(weights: dict[str, torch.Tensor]) -> None:
        weights["backbone.encoder.layer.0.output.adapters.default.up.bias"] = torch.tensor([5.0])

    return _with_weights(folders["a"], tmp_path_factory.mktemp("shrunk") / "adapter", shrink)


ONE_VALUE = r"up\.bias' has shape \(1,\), expected \(32,\)"


def test_load_adapter_refuses_a_shape_one_tensor(one_value_bias: Path) -> None:
    with pytest.raises(AdapterFolderError, match=ONE_VALUE):
        load_adapter(one_value_bias)


def test_hot_swap_refuses_a_shape_one_tensor_and_keeps_nothing_of_it(
    tiny_bert: Path, folders: dict[str, Path], one_value_bias: Path
) -> None:
    switch = AdapterSwitch(load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=LABELS)))
    with pytest.raises(AdapterFolderError, match=ONE_VALUE):
        switch.add("u0", one_value_bias)
    assert switch.names == ()
    assert not [s for s in find_slots(switch.loaded.model.backbone) if "u0" in s.adapters]
    switch.add("u0", folders["a"])  # the name is free again
    assert switch.names == ("u0",)


@pytest.mark.parametrize("method", ["stack", "fusion"])
def test_stack_and_fusion_refuse_a_shape_one_tensor(
    tiny_bert: Path, folders: dict[str, Path], one_value_bias: Path, method: str
) -> None:
    fields = (
        {"below": (str(one_value_bias),)}
        if method == "stack"
        else {"adapters": (str(folders["b"]), str(one_value_bias))}
    )
    with pytest.raises(AdapterFolderError, match=ONE_VALUE):
        _build(tiny_bert, method, **fields)


def test_hot_swap_refuses_a_non_finite_head(tiny_bert: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    def poison(weights: dict[str, torch.Tensor]) -> None:
        weights["classifier.weight"][1, 2] = math.nan

    hostile = _with_weights(folders["a"], tmp_path / "hostile", poison)
    switch = AdapterSwitch(load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=LABELS)))
    with pytest.raises(AdapterFolderError, match=r"tensor 'classifier\.weight' has non-finite values"):
        switch.add("u0", hostile)
    assert switch.names == ()


# --------------------------------------------------------------- (d) a deeply nested manifest


def test_a_deeply_nested_manifest_is_a_named_error_not_a_recursion_error(
    tiny_bert: Path, folders: dict[str, Path], tmp_path: Path
) -> None:
    hostile = Path(shutil.copytree(folders["a"], tmp_path / "deep"))
    deep = "[" * 100_000 + "]" * 100_000
    (hostile / MANIFEST).write_text(f'{{"format": "{FOLDER_FORMAT}", "method": {deep}}}')
    nested = r"fedadapt_adapter\.json: JSON nested 100001 levels deep, more than the 32 allowed"
    with pytest.raises(JsonInputError, match=nested):
        read_manifest(hostile)
    with pytest.raises(JsonInputError, match=nested):
        load_adapter(hostile)
    with pytest.raises(JsonInputError, match=nested):
        read_adapter_manifest(hostile)
    switch = AdapterSwitch(load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=LABELS)))
    with pytest.raises(JsonInputError, match=nested):
        switch.add("u0", hostile)
    with pytest.raises(JsonInputError, match=nested):
        _build(tiny_bert, "stack", below=(str(hostile),))


# ------------------------------------------------ (e) max_params bounds what the method builds, not the schema


def _built_values(model: AdapterModel) -> int:
    """Values of what a real build allocated: every parameter that trains or is not the backbone's own."""
    backbone = {id(p) for p in model.backbone.frozen.params.values()}
    return sum(p.numel() for p in model.module.parameters() if p.requires_grad or id(p) not in backbone)


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "prefix", "prompt", "ia3"])
def test_max_params_is_exactly_what_the_method_builds(tiny_bert: Path, tmp_path: Path, method: str) -> None:
    """Adapter, frozen parts (FFA-LoRA's A), the head and PEFT's copy of it: one value fewer is refused.

    Before the review's fix only the recorded schema's tensors (the trainable ones) were counted: PEFT
    methods (a second head inside PEFT, FFA-LoRA's frozen A) loaded with max_params below what they build.
    """
    model = _build(tiny_bert, method)
    folder = save_adapter(model, tmp_path / method)
    values = _built_values(model)
    assert load_adapter(folder, limits=AdapterLimits(max_params=values)).schema_id == model.schema_id
    with pytest.raises(AdapterFolderError, match=rf" {values} values.* more than the {values - 1} allowed"):
        load_adapter(folder, limits=AdapterLimits(max_params=values - 1))


def test_a_stack_counts_its_frozen_adapters_before_anything_is_built(
    tiny_bert: Path, folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack's schema lists its top adapter and head; the two frozen adapters below it are built too."""
    model = _build(tiny_bert, "stack", below=(str(folders["a"]), str(folders["b"])))
    folder = save_adapter(model, tmp_path / "stack")
    recorded = sum(math.prod(t.shape) for t in model.schema.tensors)
    values = _built_values(model)
    assert values > recorded + 1
    _forbid_building(monkeypatch)
    with pytest.raises(AdapterFolderError, match=rf"'stack' builds {values} values .* more than the {recorded + 1}"):
        load_adapter(folder, limits=AdapterLimits(max_params=recorded + 1))


def test_hot_swap_compares_the_schema_with_what_the_folder_builds_before_building_it(
    tiny_bert: Path, folders: dict[str, Path], tmp_path: Path
) -> None:
    """A folder whose schema records no tensors (schema_id rehashed) was inserted: hot-swap never compared them."""

    def no_tensors(manifest: dict[str, Any]) -> None:
        manifest["schema"]["tensors"] = []
        _rehash(manifest)

    hostile = _hostile_copy(folders["a"], tmp_path / "hostile", no_tensors)
    switch = AdapterSwitch(load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=LABELS)))
    with pytest.raises(SchemaMismatch, match=r"builds 10 trainable tensors but schema\.tensors records 0"):
        switch.add("u0", hostile)
    with pytest.raises(AdapterFolderError, match=r" 423 values.* more than the 422 allowed"):
        switch.add("u0", folders["a"], limits=AdapterLimits(max_params=422))
    assert switch.names == ()
    assert not [s for s in find_slots(switch.loaded.model.backbone) if "u0" in s.adapters]


def test_a_40_gb_lora_from_a_small_manifest_allocates_nothing(folders: dict[str, Path], tmp_path: Path) -> None:
    """LoRA of rank = hidden on every linear of a BERT-large-like backbone of hidden 4096 (7 x 10^9 values).

    r passes max_rank and the hidden size, the recorded schema is empty (consistent, rehashed) and passes
    max_params. The backbone folder holds only its config.json: before the fix the backbone was loaded
    (here: BackboneError, no weights), on real weights the 28 GB of LoRA were allocated next.
    """
    big = tmp_path / "big-backbone"
    big.mkdir()
    config = {"model_type": "bert", "hidden_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 32}
    (big / "config.json").write_text(json.dumps({**config, "intermediate_size": 16384, "vocab_size": 30522}))

    def huge(manifest: dict[str, Any]) -> None:
        big_lora = {"r": 4096, "target_modules": ["query", "key", "value", "dense"]}
        manifest["method"].update(big_lora)
        manifest["schema"]["method"].update(big_lora)
        manifest["schema"]["tensors"] = []
        _rehash(manifest)

    hostile = _hostile_copy(folders["lora"], tmp_path / "hostile", huge)
    assert (hostile / MANIFEST).stat().st_size < 4096
    started = time.perf_counter()
    with peak_rss_growth() as growth, pytest.raises(AdapterFolderError, match=r"'lora' builds \d{10} values"):
        load_adapter(hostile, backbone=str(big))
    assert time.perf_counter() - started < 10.0
    assert growth[0] < 64 * MiB, f"peak resident memory rose by {growth[0] / MiB:.0f} MiB"


# -------------------------------------------------------------------------------- fuzz


_INTERESTING = st.sampled_from(
    [0, 1, -1, 2, 31, 32, 33, 63, 64, 65, 4096, 4097, 100_000, 100_001, 2**31, 2**53 + 1, 2**63, 2**64, 10**30]
)
_WORDS = st.sampled_from(
    ["lora", "pfeiffer", "stack", "fusion", "prompt", "full", "head", "adapter", "shared", "personal", "float16"]
    + ["mean", "pooler", "query", "value", "classifier", "", "/", ".", FOLDER_FORMAT, OWN_WEIGHTS, PEFT_WEIGHTS[1]]
)
_SCALARS = st.none() | st.booleans() | st.integers() | _INTERESTING | st.floats() | st.text(max_size=12) | _WORDS
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=5,
)
_HEAVY_LOADS = 80  # full load_adapter calls per run (~0.1 s each), so the fuzz stays well under a minute


def _choose_path(manifest: dict[str, Any], data: st.DataObject) -> list[Any]:
    """A path into the manifest: one top-level field, then deeper with probability 3/4 per level."""
    path: list[Any] = [data.draw(st.sampled_from(sorted(manifest)), label="field")]
    node = manifest[path[0]]
    while isinstance(node, dict | list) and node and data.draw(st.integers(0, 3), label="deeper") > 0:
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    return path


def _apply(manifest: dict[str, Any], path: list[Any], operation: str, value: Any) -> None:
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if operation == "replace":
        parent[path[-1]] = value
    elif operation == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):  # add an extra field
        parent[path[-1]]["extra" if not isinstance(value, str) else value] = value
    elif isinstance(parent[path[-1]], list):
        parent[path[-1]].append(value)


def _mutate(manifest: dict[str, Any], data: st.DataObject) -> str:
    path = _choose_path(manifest, data)
    operation = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    value = data.draw(_VALUES)
    _apply(manifest, path, operation, value)
    # Half of the method changes are mirrored into the recorded schema, which then still agrees with it.
    if path[0] == "method" and len(path) > 1 and isinstance(manifest.get("schema"), dict) and data.draw(st.booleans()):
        with suppress(KeyError, IndexError, TypeError):
            _apply(manifest, ["schema", *path], operation, copy.deepcopy(value))
    return f"{operation} {'.'.join(map(str, path[:2]))}"


@pytest.fixture(scope="module")
def fuzz_bases(
    folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, Any]]]:
    """A working copy of each saved folder (its manifest is rewritten per case) and the original manifest."""
    root = tmp_path_factory.mktemp("fuzz")
    return {key: (Path(shutil.copytree(folders[key], root / key)), _manifest(folders[key])) for key in folders}


@pytest.fixture(scope="module")
def fuzz_dims(tiny_bert: Path) -> BackboneDims:
    return backbone_dims(str(tiny_bert))


@pytest.fixture(scope="module")
def load_budget() -> list[int]:
    """Full load_adapter calls left to the fuzz (counted down)."""
    return [_HEAVY_LOADS]


@contextmanager
def traced_peak() -> Iterator[list[int]]:
    """The peak bytes of Python objects allocated inside the block (tracemalloc, on only for the block)."""
    tracemalloc.start()
    peak: list[int] = []
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_manifests_end_in_named_errors_and_allocate_little(
    fuzz_bases: dict[str, tuple[Path, dict[str, Any]]],
    fuzz_dims: BackboneDims,
    load_budget: list[int],
    data: st.DataObject,
) -> None:
    key = data.draw(st.sampled_from(sorted(fuzz_bases)), label="folder")
    folder, original = fuzz_bases[key]
    manifest = copy.deepcopy(original)
    mutations = [_mutate(manifest, data) for _ in range(data.draw(st.integers(1, 3), label="mutations"))]
    if data.draw(st.booleans(), label="rehash"):
        with suppress(Exception):  # a schema too broken to hash keeps the folder's old id
            _rehash(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    event(f"folder {key}")
    for mutation in mutations:
        event(mutation)

    guard = AllocationGuard()
    try:
        # The cheap path, all that is checked before building: the manifest, then its sizes against the backbone.
        # tracemalloc measures the Python objects it makes (the tensors come later, under the guard).
        with traced_peak() as peak:
            checked = read_manifest(folder)
            method = method_config_from_dict(checked["method"])
            check_fits_backbone(method, checked["backbone"]["num_labels"], fuzz_dims, folder, DEFAULT_LIMITS)
        event("passes the checks before building")
        if load_budget[0] > 0:
            load_budget[0] -= 1
            with guard:
                load_adapter(folder)
            event("loads")
    except FedAdaptError as err:
        event(f"refused: {type(err).__name__}")
    assert peak[0] < 16 * MiB, f"{peak[0] / MiB:.0f} MiB of Python objects to check one manifest"
    assert guard.largest <= MAX_ELEMENTS
