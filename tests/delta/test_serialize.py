"""fedadapt.delta.serialize: round trips, compression sizes and bounds, and one clear error per bad blob."""

from __future__ import annotations

import ast
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from helpers import build_lora
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import fedadapt.delta.serialize
from fedadapt import AdapterModel, StateSplit
from fedadapt.delta.serialize import Compression, deserialize_state, read_metadata, serialize_state
from fedadapt.delta.state import AdapterSchema, State, TensorSpec
from fedadapt.errors import SchemaMismatch, StateError


def first_name(state: State) -> str:
    return next(iter(state))


def craft(tensors: State, blob: bytes, **metadata: str) -> bytes:
    """A safetensors blob of ``tensors`` with ``blob``'s metadata, updated by ``metadata``."""
    return safetensors_save(dict(tensors), metadata={**read_metadata(blob), **metadata})


# --- round trips -----------------------------------------------------------------------------------------------


def test_none_round_trip_is_exact(lora: AdapterModel, state: State, blob: bytes) -> None:
    restored = deserialize_state(blob, lora.schema, "shared")
    assert list(restored) == list(state)
    for name in state:
        assert restored[name].dtype == torch.float32
        assert torch.equal(restored[name], state[name]), name


def test_fp16_round_trip_is_close(lora: AdapterModel, state: State) -> None:
    restored = deserialize_state(serialize_state(state, lora.schema, "shared", "fp16"), lora.schema, "shared")
    assert list(restored) == list(state)
    for name, original in state.items():
        assert restored[name].dtype == torch.float32
        error = (restored[name] - original).abs().max().item()
        assert error <= 1e-3 * original.abs().max().item(), name


def int8_bound(original: torch.Tensor) -> float:
    """Largest error int8 may make on ``original``: half a quantization step."""
    scale = original.abs().max().item() / 127
    return scale / 2 + 1e-7


def test_int8_round_trip_is_within_half_a_step(lora: AdapterModel, state: State) -> None:
    restored = deserialize_state(serialize_state(state, lora.schema, "shared", "int8"), lora.schema, "shared")
    assert list(restored) == list(state)
    for name, original in state.items():
        assert restored[name].dtype == torch.float32
        assert (restored[name] - original).abs().max().item() <= int8_bound(original), name
        # Not trivially exact: the noise does not fall on the int8 grid.
        assert not torch.equal(restored[name], original), name


def test_int8_keeps_an_all_zero_tensor_exact(lora: AdapterModel) -> None:
    zeros = {n: torch.zeros_like(t) for n, t in lora.state("shared").items()}
    restored = deserialize_state(serialize_state(zeros, lora.schema, "shared", "int8"), lora.schema, "shared")
    assert all(torch.equal(restored[n], zeros[n]) for n in zeros)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    magnitude=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_error_bound_holds_for_random_tensors(shape: tuple[int, ...], magnitude: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"x": magnitude * torch.randn(shape, generator=gen), "y": magnitude * torch.rand(shape, generator=gen)}
    schema = AdapterSchema(
        method={"name": "test"},
        backbone_fingerprint="f" * 64,
        tensors=tuple(TensorSpec(n, tuple(t.shape), "float32", "shared", "adapter") for n, t in tensors.items()),
    )
    restored = deserialize_state(serialize_state(tensors, schema, "shared", "int8"), schema, "shared")
    for name, original in tensors.items():
        # Float32 rounding in x/s, s itself and q·s can add a few ulps of max|x| to the exact s/2.
        tolerance = int8_bound(original) + 4 * 2**-24 * original.abs().max().item()
        assert (restored[name] - original).abs().max().item() <= tolerance, name


def test_personal_part_round_trip(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    personal = {n: t + 1.0 for n, t in model.state("personal").items()}
    data = serialize_state(personal, model.schema, "personal")
    assert read_metadata(data)["part"] == "personal"
    restored = deserialize_state(data, model.schema, "personal")
    assert all(torch.equal(restored[n], personal[n]) for n in personal)


def test_full_state_round_trip_with_part_none(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    full = model.state()
    data = serialize_state(full, model.schema, None)
    assert read_metadata(data)["part"] == "all"
    restored = deserialize_state(data, model.schema, None)
    assert list(restored) == list(full)
    assert all(torch.equal(restored[n], full[n]) for n in full)


def test_bytearray_and_memoryview_are_accepted(lora: AdapterModel, state: State, blob: bytes) -> None:
    for data in (bytearray(blob), memoryview(blob)):
        restored = deserialize_state(data, lora.schema, "shared")  # type: ignore[arg-type]
        assert all(torch.equal(restored[n], state[n]) for n in state)


def test_metadata_names_schema_part_and_compression(lora: AdapterModel, state: State) -> None:
    for compression in ("none", "fp16", "int8"):
        metadata = read_metadata(serialize_state(state, lora.schema, "shared", compression))
        assert metadata["format"] == fedadapt.delta.serialize.FORMAT
        assert metadata["schema_id"] == lora.schema_id
        assert metadata["part"] == "shared"
        assert metadata["compression"] == compression
        scales = json.loads(metadata["int8_scales"])
        assert (set(scales) == set(state)) if compression == "int8" else scales == {}


# --- sizes -----------------------------------------------------------------------------------------------------


def test_compressed_blobs_are_smaller(lora: AdapterModel, state: State) -> None:
    sizes: dict[Compression, int] = {
        c: len(serialize_state(state, lora.schema, "shared", c)) for c in ("none", "fp16", "int8")
    }
    payload = lora.schema.num_params("shared") * 4
    assert sizes["none"] >= payload
    assert sizes["int8"] < sizes["fp16"] < sizes["none"]
    # Every blob carries a header of a few KB (names, metadata, int8 scales) on top of the data.
    header_allowance = 4096
    assert sizes["fp16"] <= payload / 2 + header_allowance
    assert sizes["int8"] <= payload / 4 + header_allowance
    assert abs(sizes["fp16"] - sizes["none"] / 2) <= header_allowance
    assert abs(sizes["int8"] - sizes["none"] / 4) <= header_allowance


def test_data_sizes_are_half_and_a_quarter_without_headers(lora: AdapterModel, state: State) -> None:
    def data_bytes(data: bytes) -> int:
        (header_len,) = struct.unpack("<Q", data[:8])
        return len(data) - 8 - header_len

    none, fp16, int8 = (data_bytes(serialize_state(state, lora.schema, "shared", c)) for c in ("none", "fp16", "int8"))
    assert none == lora.schema.num_params("shared") * 4
    assert fp16 * 2 == none
    assert int8 * 4 == none


# --- serialize refuses bad states ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_serialize_refuses_non_finite_values(
    lora: AdapterModel, state: State, compression: Compression, bad_value: float
) -> None:
    name = first_name(state)
    bad = {n: t.clone() for n, t in state.items()}
    bad[name].view(-1)[3] = bad_value
    with pytest.raises(StateError, match=re.escape(name) + ".*non-finite"):
        serialize_state(bad, lora.schema, "shared", compression)


def test_serialize_refuses_values_beyond_fp16_range(lora: AdapterModel, state: State) -> None:
    name = list(state)[2]
    big = dict(state)
    big[name] = state[name] + 1e5
    with pytest.raises(StateError, match=re.escape(name) + ".*float16"):
        serialize_state(big, lora.schema, "shared", "fp16")
    # int8 scales per tensor, so the same values are fine there.
    restored = deserialize_state(serialize_state(big, lora.schema, "shared", "int8"), lora.schema, "shared")
    assert (restored[name] - big[name]).abs().max().item() <= int8_bound(big[name]) + 1e-7 * 1e5


def test_serialize_refuses_an_unknown_compression(lora: AdapterModel, state: State) -> None:
    with pytest.raises(StateError, match="zstd"):
        serialize_state(state, lora.schema, "shared", "zstd")  # type: ignore[arg-type]


def test_serialize_refuses_a_state_that_does_not_match_the_schema(lora: AdapterModel, state: State) -> None:
    name = first_name(state)
    missing = {n: t for n, t in state.items() if n != name}
    with pytest.raises(StateError, match=re.escape(name)):
        serialize_state(missing, lora.schema, "shared")
    wrong_dtype = {**state, name: state[name].double()}
    with pytest.raises(StateError, match=re.escape(name) + ".*float64"):
        serialize_state(wrong_dtype, lora.schema, "shared")


# --- deserialize refuses bad blobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["a string", None, 42, [1, 2, 3]])
def test_non_bytes_are_rejected(lora: AdapterModel, data: object) -> None:
    with pytest.raises(StateError, match="expected bytes"):
        deserialize_state(data, lora.schema, "shared")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage bytes, not safetensors at all",
        struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 19) + b'{"__metadata__": 1}',
    ],
    ids=["empty", "garbage", "header-not-utf8", "header-not-object", "metadata-not-object"],
)
def test_garbage_bytes_are_rejected(lora: AdapterModel, data: bytes) -> None:
    with pytest.raises(StateError, match="safetensors|truncated"):
        deserialize_state(data, lora.schema, "shared")


def test_a_pickle_blob_is_rejected(lora: AdapterModel, state: State) -> None:
    data = pickle.dumps(dict(state))
    with pytest.raises(StateError, match="not safetensors"):
        deserialize_state(data, lora.schema, "shared")
    with pytest.raises(StateError):
        read_metadata(pickle.dumps({"format": fedadapt.delta.serialize.FORMAT}))


@pytest.mark.parametrize("region", ["length", "header", "data"])
def test_truncated_blobs_are_rejected(lora: AdapterModel, blob: bytes, region: str) -> None:
    (header_len,) = struct.unpack("<Q", blob[:8])
    data_start = 8 + header_len
    cuts = {
        "length": [1, 4, 7],
        "header": [8, 9, 8 + header_len // 2, data_start - 1],
        "data": [data_start, data_start + 1, (data_start + len(blob)) // 2, len(blob) - 1],
    }[region]
    expected = "truncated" if region != "data" else "not valid safetensors"
    for cut in cuts:
        with pytest.raises(StateError, match=expected):
            deserialize_state(blob[:cut], lora.schema, "shared")


def test_a_blob_for_another_schema_raises_schema_mismatch(tiny_bert: Path, lora: AdapterModel) -> None:
    rank4 = build_lora(tiny_bert, r=4)
    data = serialize_state(rank4.state("shared"), rank4.schema, "shared")
    with pytest.raises(SchemaMismatch, match=rank4.schema_id):
        deserialize_state(data, lora.schema, "shared")


def test_a_blob_with_an_unknown_tensor_is_rejected(lora: AdapterModel, state: State, blob: bytes) -> None:
    data = craft({**state, "base_model.model.intruder.weight": torch.zeros(2)}, blob)
    with pytest.raises(StateError, match=re.escape("base_model.model.intruder.weight")):
        deserialize_state(data, lora.schema, "shared")


def test_a_blob_missing_a_tensor_is_rejected(lora: AdapterModel, state: State, blob: bytes) -> None:
    name = list(state)[1]
    data = craft({n: t for n, t in state.items() if n != name}, blob)
    with pytest.raises(StateError, match=re.escape(name)):
        deserialize_state(data, lora.schema, "shared")


def test_a_blob_with_a_wrong_shape_is_rejected(lora: AdapterModel, state: State, blob: bytes) -> None:
    name = first_name(state)
    data = craft({**state, name: state[name].reshape(-1)}, blob)
    with pytest.raises(StateError, match=re.escape(name) + ".*shape"):
        deserialize_state(data, lora.schema, "shared")


def test_a_blob_with_a_wrong_dtype_is_rejected(lora: AdapterModel, state: State, blob: bytes) -> None:
    name = first_name(state)
    data = craft({**state, name: state[name].double()}, blob)
    with pytest.raises(StateError, match=re.escape(name) + ".*float64"):
        deserialize_state(data, lora.schema, "shared")


def test_an_int8_blob_with_a_float_tensor_is_rejected(lora: AdapterModel, state: State) -> None:
    name = first_name(state)
    good = serialize_state(state, lora.schema, "shared", "int8")
    data = craft({**safetensors_load(good), name: state[name]}, good)
    with pytest.raises(StateError, match=re.escape(name) + ".*float32, expected int8"):
        deserialize_state(data, lora.schema, "shared")


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_a_blob_with_nan_is_rejected(lora: AdapterModel, state: State, blob: bytes, compression: str) -> None:
    name = list(state)[-1]
    bad = {n: t.clone() for n, t in state.items()}
    bad[name].view(-1)[0] = float("nan")
    if compression == "fp16":
        bad = {n: t.half() for n, t in bad.items()}
    data = craft(bad, blob, compression=compression)
    with pytest.raises(StateError, match=re.escape(name) + ".*non-finite"):
        deserialize_state(data, lora.schema, "shared")


BAD_SCALES: dict[str, tuple[object, bool]] = {
    # id: (replacement for the whole int8_scales entry, or for the first tensor's scale; names the tensor)
    "not-json": ("{", False),
    "not-an-object": ("[1]", False),
    "string": ("x", True),
    "nan": (float("nan"), True),
    "negative": (-1.0, True),
    "zero": (0.0, True),
    "bool": (True, True),
    "missing": (None, True),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_an_int8_blob_with_bad_scales_is_rejected(lora: AdapterModel, state: State, case: str) -> None:
    name = first_name(state)
    good = serialize_state(state, lora.schema, "shared", "int8")
    value, per_tensor = BAD_SCALES[case]
    if per_tensor:
        scales = json.loads(read_metadata(good)["int8_scales"])
        if value is None:
            del scales[name]
        else:
            scales[name] = value
        entry = json.dumps(scales)
    else:
        assert isinstance(value, str)
        entry = value
    data = craft(safetensors_load(good), good, int8_scales=entry)
    with pytest.raises(StateError, match="int8 scale") as info:
        deserialize_state(data, lora.schema, "shared")
    assert (name in str(info.value)) == per_tensor


def test_a_blob_with_an_int8_scale_that_overflows_is_rejected(lora: AdapterModel, state: State) -> None:
    name = first_name(state)
    good = serialize_state(state, lora.schema, "shared", "int8")
    scales = {**json.loads(read_metadata(good)["int8_scales"]), name: 1e300}
    data = craft(safetensors_load(good), good, int8_scales=json.dumps(scales))
    with pytest.raises(StateError, match=re.escape(name) + ".*non-finite"):
        deserialize_state(data, lora.schema, "shared")


def test_a_personal_blob_read_as_shared_is_rejected(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    data = serialize_state(model.state("personal"), model.schema, "personal")
    with pytest.raises(StateError, match="'personal' part, expected 'shared'"):
        deserialize_state(data, model.schema, "shared")


def test_a_blob_with_an_unknown_compression_is_rejected(lora: AdapterModel, state: State, blob: bytes) -> None:
    with pytest.raises(StateError, match="compression 'zstd'"):
        deserialize_state(craft(state, blob, compression="zstd"), lora.schema, "shared")


def test_a_blob_with_another_format_is_rejected(lora: AdapterModel, state: State, blob: bytes) -> None:
    with pytest.raises(StateError, match="format"):
        deserialize_state(craft(state, blob, format="other.v9"), lora.schema, "shared")


def test_plain_safetensors_without_metadata_is_rejected(lora: AdapterModel, state: State) -> None:
    with pytest.raises(StateError, match="format"):
        deserialize_state(safetensors_save(dict(state)), lora.schema, "shared")


# --- no pickle -------------------------------------------------------------------------------------------------


def test_serialize_module_does_not_use_pickle_or_torch_load() -> None:
    source = Path(fedadapt.delta.serialize.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib|marshal)\b", source, re.MULTILINE)
    assert "torch.load" not in source
    imported: set[str] = set()
    attributes: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            attributes.add(f"{node.value.id}.{node.attr}")
    assert not {n for n in imported if "pickle" in n or n == "torch.load"}, imported
    assert "torch.load" not in attributes
    # What it does load with is safetensors' own, pickle-free reader.
    assert "safetensors.torch.load" in imported


# --- hostile headers (issue 16) --------------------------------------------------------------------------------


def test_a_deeply_nested_header_is_a_state_error_not_a_recursion_error(lora: AdapterModel) -> None:
    header = b"[" * 100_000 + b"]" * 100_000
    blob = struct.pack("<Q", len(header)) + header
    with pytest.raises(StateError, match="blob is not safetensors: header: JSON nested 100000 levels deep"):
        deserialize_state(blob, lora.schema, "shared")


def test_deeply_nested_int8_scales_are_a_state_error_not_a_recursion_error(lora: AdapterModel, state: State) -> None:
    good = serialize_state(state, lora.schema, "shared", "int8")
    data = craft(safetensors_load(good), good, int8_scales="[" * 100_000 + "]" * 100_000)
    with pytest.raises(StateError, match="int8 scales: JSON nested 100000 levels deep"):
        deserialize_state(data, lora.schema, "shared")


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_max_blob_size_bounds_every_honest_blob_and_is_tight(
    lora: AdapterModel, state: State, compression: Compression
) -> None:
    from fedadapt.delta.serialize import max_blob_size

    cap = max_blob_size(lora.schema, "shared", compression)
    # Scales with the longest float text: the worst case the cap must still admit.
    tiny = {n: torch.full_like(t, 2.2250738585072014e-308 * 127) for n, t in state.items()}
    sizes = [len(serialize_state(s, lora.schema, "shared", compression)) for s in (state, tiny)]
    assert max(sizes) <= cap < max(sizes) + 64 * len(state) + 64
