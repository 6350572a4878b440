"""Issue 17: a state blob is judged from its safetensors header, before a single tensor is built.

Each attack below is refused by fedadapt's own header check: ``safetensors_load`` is replaced by a function
that fails the test if called, and the big ones run under tracemalloc with a bound far below what building
their tensors (or parsing their headers) took before.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save

import fedadapt.delta.serialize
from fedadapt import AdapterModel
from fedadapt.delta.serialize import Compression, deserialize_state, max_blob_size, read_metadata, serialize_state
from fedadapt.delta.state import AdapterSchema, State, TensorSpec
from fedadapt.errors import StateError

MiB = 1024 * 1024
Header = dict[str, Any]


class TensorsBuilt(Exception):
    """Raised by the stand-in for safetensors' loader: the blob got as far as building tensors."""


@pytest.fixture
def no_tensors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if deserialize_state gets as far as safetensors' loader."""

    def refuse(data: bytes) -> dict[str, torch.Tensor]:
        raise TensorsBuilt(f"safetensors_load was called on a blob of {len(data)} bytes")

    monkeypatch.setattr(fedadapt.delta.serialize, "safetensors_load", refuse)
    yield


def split(data: bytes) -> tuple[Header, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: Header, body: bytes | bytearray = b"") -> bytes:
    """A blob of ``header`` (compact JSON, padded to 8 bytes like safetensors writes it) and ``body``."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(body)


def edited(data: bytes, edit: Callable[[Header], None]) -> bytes:
    header, body = split(data)
    edit(header)
    return join(header, body)


def names(header: Header) -> list[str]:
    return [name for name in header if name != "__metadata__"]


def refused(call: Callable[[], object]) -> tuple[int, str]:
    """The peak bytes Python allocated while ``call`` ran, and the StateError it must raise."""
    tracemalloc.start()
    try:
        with pytest.raises(StateError) as info:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, str(info.value)


# --- headers far larger than this schema's --------------------------------------------------------------------


def test_a_15_mib_header_of_260000_empty_tensors_is_refused_before_it_is_parsed(
    lora: AdapterModel, blob: bytes, no_tensors: None
) -> None:
    """Was: parsed (16 MiB allowed), then 260,000 tensors built: ~9 s of CPU and +205 MiB."""
    metadata = read_metadata(blob)
    header: Header = {"__metadata__": metadata}
    header |= {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(260_000)}
    data = join(header)
    header_bytes = len(data) - 8
    assert 14 * MiB < header_bytes < 16 * MiB
    peak, message = refused(lambda: deserialize_state(data, lora.schema, "shared"))
    assert peak < 2 * header_bytes, peak
    assert peak < MiB, peak  # refused from the 8-byte length alone: the header is not even copied
    assert f"header length {header_bytes} is implausible (at most {MiB} bytes here)" in message


def test_a_small_schemas_blob_has_at_most_1_mib_of_header_parsed(
    lora: AdapterModel, blob: bytes, no_tensors: None
) -> None:
    """A small schema's bound is jsonsafe's 1 MiB for untrusted JSON: a longer header is not even read."""
    assert fedadapt.delta.serialize._header_limit(lora.schema, "shared") == MiB
    padded = edited(blob, lambda h: h["__metadata__"].update(padding="x" * MiB))
    length = struct.unpack("<Q", padded[:8])[0]
    with pytest.raises(StateError, match=re.escape(f"header length {length} is implausible (at most {MiB} bytes")):
        deserialize_state(padded, lora.schema, "shared")


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_the_header_bound_of_a_large_schema_admits_its_honest_headers(compression: Compression) -> None:
    """A schema whose headers pass 1 MiB: the bound worked out from names and shapes still admits every honest
    header, with the longest int8 scale texts and names that JSON escapes, and stays within a few times it."""
    from fedadapt.delta.state import AdapterSchema, TensorSpec

    count = 6000
    specs = tuple(
        TensorSpec(f'layer.{i}.é\\t"' + "x" * 150, (1, 1 + i % 3), "float32", "shared", "adapter") for i in range(count)
    )
    schema = AdapterSchema(method={"name": "test"}, backbone_fingerprint="f" * 64, tensors=specs)
    # float32's least normal × 127: int8 scales of 23 characters
    tiny = {spec.name: torch.full(spec.shape, 1.1754943508222875e-38 * 127) for spec in specs}
    honest = serialize_state(tiny, schema, "shared", compression)
    length = struct.unpack("<Q", honest[:8])[0]
    bound = fedadapt.delta.serialize._header_limit(schema, "shared")
    assert MiB < length <= bound < 4 * length
    restored = deserialize_state(honest, schema, "shared")
    assert list(restored) == list(tiny)


def test_a_256_mib_blob_with_one_extra_tensor_is_refused_before_any_tensor_exists(
    lora: AdapterModel, blob: bytes, no_tensors: None
) -> None:
    """Was: +257 MiB (every tensor built, the intruder too) before the unknown name was noticed."""
    header, body = split(blob)
    extra = 256 * MiB
    header["base_model.model.intruder.weight"] = {
        "dtype": "F32",
        "shape": [extra // 4],
        "data_offsets": [len(body), len(body) + extra],
    }
    data = join(header, body) + bytes(extra)  # built before measuring: the attacker's bytes, not ours
    peak, message = refused(lambda: deserialize_state(data, lora.schema, "shared"))
    assert peak < 4 * MiB, peak
    assert "has tensors the schema does not know: ['base_model.model.intruder.weight']" in message


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_a_blob_larger_than_the_largest_legal_one_is_refused(
    lora: AdapterModel, state: State, compression: Compression, no_tensors: None
) -> None:
    """Every tensor right, but metadata padded to 300 KB: was accepted, nothing tied the size to the schema."""
    honest = serialize_state(state, lora.schema, "shared", compression)
    data = edited(honest, lambda h: h["__metadata__"].update(padding="x" * 300_000))
    cap = max_blob_size(lora.schema, "shared", compression)
    with pytest.raises(StateError, match=rf"blob of {len(data)} bytes exceeds the {cap} the largest '{compression}'"):
        deserialize_state(data, lora.schema, "shared")


# --- byte ranges that are not exactly the tensors' ------------------------------------------------------------


def _shift(index: int, begin: int, end: int) -> Callable[[Header], None]:
    """Move tensor ``index``'s data_offsets by ``begin`` and ``end`` bytes."""

    def edit(header: Header) -> None:
        entry = header[names(header)[index]]
        entry["data_offsets"] = [entry["data_offsets"][0] + begin, entry["data_offsets"][1] + end]

    return edit


def _overlap(header: Header) -> None:
    first, second = names(header)[:2]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0], header[first]["data_offsets"][1]]


def _swap_same_shape(header: Header) -> None:
    """Two tensors of one shape exchange their byte ranges: contiguous as a set, not in header order."""
    by_shape: dict[str, list[str]] = {}
    for name in names(header):
        by_shape.setdefault(str(header[name]["shape"]), []).append(name)
    a, b = next(group for group in by_shape.values() if len(group) >= 2)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


RANGES: dict[str, Callable[[Header], None]] = {
    "overlapping": _overlap,
    "gap-before": _shift(1, 4, 4),
    "too-short": _shift(0, 0, -4),
    "too-long": _shift(0, 0, 4),
    "misaligned": _shift(1, 2, 2),
    "out-of-order": _swap_same_shape,
    "not-integers": lambda h: h[names(h)[0]].update(data_offsets=[0.0, 4.0]),
    "bool-begin": lambda h: h[names(h)[0]].update(data_offsets=[False, h[names(h)[0]]["data_offsets"][1]]),
    "three-offsets": lambda h: h[names(h)[0]].update(data_offsets=[0, 4, 8]),
}


@pytest.mark.parametrize("case", list(RANGES))
def test_data_offsets_must_be_the_contiguous_in_order_ranges_of_the_tensors(
    lora: AdapterModel, blob: bytes, case: str, no_tensors: None
) -> None:
    with pytest.raises(StateError, match=r"not valid safetensors: tensor '[^']+' has data_offsets .+, expected \["):
        deserialize_state(edited(blob, RANGES[case]), lora.schema, "shared")


@pytest.mark.parametrize("extra", [1, 8, 4096])
def test_trailing_bytes_are_refused(lora: AdapterModel, blob: bytes, extra: int, no_tensors: None) -> None:
    data = blob + b"\0" * extra
    expected = f"it has {len(data)} bytes, its header describes {len(blob)}"
    with pytest.raises(StateError, match=re.escape(expected)):
        deserialize_state(data, lora.schema, "shared")
    with pytest.raises(StateError, match=re.escape(expected)):
        read_metadata(data)


@pytest.mark.parametrize("cut", [1, 4, 1000])
def test_a_blob_shorter_than_its_header_describes_is_refused(
    lora: AdapterModel, blob: bytes, cut: int, no_tensors: None
) -> None:
    data = blob[:-cut]
    expected = f"it has {len(data)} bytes, its header describes {len(blob)}"
    with pytest.raises(StateError, match=re.escape(expected)):
        deserialize_state(data, lora.schema, "shared")


# --- entries that do not describe this schema's tensors -------------------------------------------------------


def _first(field: str, value: object) -> Callable[[Header], None]:
    return lambda h: h[names(h)[0]].update({field: value})


ENTRIES: dict[str, tuple[Callable[[Header], None], str]] = {
    # id: (edit of the header, what the error names besides the tensor)
    "unknown-dtype": (_first("dtype", "C64"), "has dtype 'C64'"),
    "dtype-not-a-string": (_first("dtype", ["F32"]), "has dtype ['F32']"),
    "bool-dimension": (_first("shape", [True, 2]), "has shape [True, 2]"),
    "negative-dimension": (_first("shape", [-1, 2]), "has shape [-1, 2]"),
    "shape-not-a-list": (_first("shape", 4), "has shape 4"),
    "extra-field": (_first("offsets", [0, 0]), "must have exactly the fields"),
    "entry-not-an-object": (lambda h: h.update({names(h)[0]: [1, 2]}), "must have exactly the fields"),
}


@pytest.mark.parametrize("case", list(ENTRIES))
def test_malformed_entries_are_refused_with_tensor_and_field(
    lora: AdapterModel, blob: bytes, case: str, no_tensors: None
) -> None:
    edit, words = ENTRIES[case]
    name = names(split(blob)[0])[0]
    with pytest.raises(StateError) as info:
        deserialize_state(edited(blob, edit), lora.schema, "shared")
    assert f"tensor {name!r}" in str(info.value) and words in str(info.value), str(info.value)


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_a_wrong_wire_dtype_with_consistent_offsets_is_refused_from_the_header(
    lora: AdapterModel, state: State, blob: bytes, compression: str, no_tensors: None
) -> None:
    """fp16 tensors in a blob whose metadata says 'none' or 'int8': every range is right for F16."""
    data = safetensors_save(
        {n: t.half() for n, t in state.items()}, metadata={**read_metadata(blob), "compression": compression}
    )
    expected = "int8" if compression == "int8" else "float32"
    with pytest.raises(StateError, match=rf"has dtype float16, expected {expected} for compression '{compression}'"):
        deserialize_state(data, lora.schema, "shared")


def test_a_wrong_shape_with_consistent_offsets_is_refused_from_the_header(
    lora: AdapterModel, blob: bytes, no_tensors: None
) -> None:
    name = names(split(blob)[0])[0]
    flat = edited(blob, lambda h: h[name].update(shape=[math.prod(h[name]["shape"])]))
    with pytest.raises(StateError, match=re.escape(f"received blob tensor {name!r} has shape (")):
        deserialize_state(flat, lora.schema, "shared")


def test_read_metadata_checks_the_whole_header(blob: bytes) -> None:
    """Was: read_metadata returned the metadata of a blob whose ranges overlap."""
    with pytest.raises(StateError, match="data_offsets"):
        read_metadata(edited(blob, _overlap))
    assert read_metadata(blob)["format"] == fedadapt.delta.serialize.FORMAT


def test_an_honest_blob_still_loads_through_safetensors(lora: AdapterModel, state: State, blob: bytes) -> None:
    restored = deserialize_state(blob, lora.schema, "shared")
    assert all(torch.equal(restored[n], state[n]) for n in state)


# --- shapes whose element counts are no tensor's --------------------------------------------------------------

SHAPES: dict[str, tuple[list[int], list[int], str]] = {
    # id: (shape of an F32 tensor, its data_offsets, what the error says); each was accepted or a ValueError before
    "nine-dimensions": ([1] * 9, [0, 4], "at most 8 integers"),
    "a-dimension-of-2**63": ([2**63, 0], [0, 0], "in [0, 2**63)"),
    "300-dimensions-of-10**18": ([10**18] * 300, [0, 0], "at most 8 integers"),
    "2**65-bytes": ([2**62, 2], [0, 2**65], "2**63 bytes or more"),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_shapes_with_more_than_8_dimensions_or_2_63_bytes_are_refused(case: str) -> None:
    shape, offsets, words = SHAPES[case]
    data = join(
        {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, b"\0" * offsets[1] if offsets[1] < 8 else b""
    )
    with pytest.raises(StateError, match=r"tensor 'w' has shape .*" + re.escape(words)) as info:
        read_metadata(data)
    assert len(str(info.value)) < 400, str(info.value)  # no huge count worded


# --- int8 scales are numbers, multiplied in float -------------------------------------------------------------


def _int8_blob_with_scale(scale: object) -> tuple[bytes, AdapterSchema]:
    schema = AdapterSchema(
        method={"name": "x"},
        backbone_fingerprint="f" * 64,
        tensors=(TensorSpec("w", (4,), "float32", "shared", "adapter"),),
    )
    honest = serialize_state({"w": torch.ones(4)}, schema, "shared", "int8")  # q = 127 everywhere
    header, body = split(honest)
    header["__metadata__"]["int8_scales"] = json.dumps({"w": scale})
    return safetensors_save({"w": torch.full((4,), 127, dtype=torch.int8)}, metadata=header["__metadata__"]), schema


@pytest.mark.parametrize("scale", [1000, 2**63 - 1, 0.5])
def test_an_integer_int8_scale_is_multiplied_in_float_not_wrapped_in_int8(scale: float) -> None:
    """Was: int8 × the Python int 1000 stayed int8 and wrapped, 127 · 1000 decoding as 24."""
    data, schema = _int8_blob_with_scale(scale)
    assert deserialize_state(data, schema, "shared")["w"].tolist() == [float(torch.tensor(127.0) * scale)] * 4


@pytest.mark.parametrize("scale", [2**63, -(2**64), 10**19, 0, -3])
def test_an_integer_int8_scale_beyond_int64_or_not_positive_is_a_named_state_error(scale: int) -> None:
    data, schema = _int8_blob_with_scale(scale)
    with pytest.raises(StateError, match=r"tensor 'w' has no valid int8 scale") as info:
        deserialize_state(data, schema, "shared")
    assert len(str(info.value)) < 200, str(info.value)
