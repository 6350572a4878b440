"""Adapter state and deltas ↔ bytes (safetensors), with fp16 or int8 compression.

No pickle: the format is safetensors, whose header is JSON. Every blob carries the
schema id and its compression; ``deserialize_state`` checks both, then names, shapes,
dtypes and byte ranges against the schema from the header alone (``safetensors_header``),
before any tensor exists, then the values, and raises one clear StateError per problem.
int8 is per-tensor symmetric: q = round(x / s), s = max|x| / 127, so |x − q·s| ≤ s / 2. A received scale
is a JSON number, positive and finite (serialize_state writes floats; an integer is taken as a float, and
only within int64); q·s is worked out in float32, so a scale never wraps in int8 arithmetic, and a product
beyond float32 is the non-finite value the values check refuses.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedadapt import jsonsafe
from fedadapt.delta.safetensors_header import check_declared, read_header
from fedadapt.delta.state import AdapterSchema, Part, State, TensorSpec, check_state
from fedadapt.errors import JsonInputError, SchemaMismatch, StateError

Compression = Literal["none", "fp16", "int8"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "fp16", "int8")
FORMAT = "fedadapt.state.v1"  # on the wire and on disk: never renamed with the module
_SCALES_DEPTH = 1  # int8 scales are one flat object of numbers
_WIRE_DTYPE = {"fp16": "float16", "int8": "int8"}
_INT64 = (-(1 << 63), (1 << 63) - 1)
_SCALE_TEXT = 24  # the longest repr of a float ("-2.2250738585072014e-308")
_ENTRY_TEXT = 128  # an entry's text but name and dims ({"dtype":…,"data_offsets":[…]}, 20-digit offsets), a scale
_METADATA_TEXT = 1024  # the metadata's keys and values but the scales, and the header's padding


def serialize_state(
    state: Mapping[str, torch.Tensor],
    schema: AdapterSchema,
    part: Part | None = "shared",
    compression: Compression = "none",
) -> bytes:
    """Bytes of ``state`` (a state or a delta of ``part``), checked against ``schema`` first."""
    if compression not in COMPRESSIONS:
        raise StateError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    check_state(state, schema.specs(part), what="state to serialize")
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if compression == "fp16" and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
            if not bool(torch.isfinite(tensor).all()):
                raise StateError(
                    f"tensor {name!r} has values beyond float16's range (|x| > 65504): use compression 'int8' or 'none'"
                )
        elif compression == "int8" and tensor.is_floating_point():
            scale = float(tensor.abs().max()) / 127.0 or 1.0
            tensor = torch.round(tensor.float() / scale).clamp_(-127, 127).to(torch.int8)
            scales[name] = scale
        tensors[name] = tensor
    metadata = {
        "format": FORMAT,
        "schema_id": schema.schema_id,
        "part": part or "all",
        "compression": compression,
        "int8_scales": json.dumps(scales),
    }
    return safetensors_save(tensors, metadata=metadata)


def deserialize_state(
    data: bytes, schema: AdapterSchema, part: Part | None = "shared", *, check_values: bool = True
) -> State:
    """Inverse of ``serialize_state``: validated tensors in the schema's dtypes and order.

    Everything but the values is checked from the header, before a tensor is built: its length against
    what this schema's header can take, format, schema id, part, compression, each tensor's name, wire
    dtype, shape and byte range, and the blob's size against ``max_blob_size``.
    ``check_values=False`` skips only the finite-values check, for callers that check values
    themselves in the same pass as something else (the server's validator, with the norm).
    """
    header = read_header(data, max_length=_header_limit(schema, part))
    metadata = header.metadata
    if metadata.get("format") != FORMAT:
        raise StateError(f"blob format is {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("schema_id") != schema.schema_id:
        raise SchemaMismatch(
            f"blob was made for adapter schema {metadata.get('schema_id')!r}, this adapter's is "
            f"{schema.schema_id!r}: sender and receiver must use the same method, config and backbone"
        )
    if metadata.get("part") != (part or "all"):
        raise StateError(f"blob holds the {metadata.get('part')!r} part, expected {part or 'all'!r}")
    compression = metadata.get("compression")
    if compression not in COMPRESSIONS:
        raise StateError(f"blob compression {compression!r} is not one of {COMPRESSIONS}")
    specs = {s.name: s for s in schema.specs(part)}
    check_declared(
        header.tensors,
        specs,
        what="received blob",
        dtype_of=functools.partial(_wire_dtype, compression=compression),
        dtype_note=f" for compression {compression!r}",
    )
    try:
        scales = jsonsafe.loads(
            metadata.get("int8_scales", "{}"), what="int8 scales", max_bytes=len(data), max_depth=_SCALES_DEPTH
        )
    except JsonInputError as err:
        raise StateError(f"blob's {err}") from None
    if not isinstance(scales, dict):
        raise StateError(f"blob's int8 scales must be a JSON object, got {type(scales).__name__}")
    limit = max_blob_size(schema, part, compression)
    if len(data) > limit:
        raise StateError(
            f"blob of {len(data)} bytes exceeds the {limit} the largest {compression!r} blob of this schema takes "
            f"(its header is {header.length} bytes)"
        )
    try:
        raw = safetensors_load(bytes(data))
    except (SafetensorError, ValueError) as err:
        raise StateError(f"blob is not valid safetensors: {err}") from err
    if raw.keys() != specs.keys():  # safetensors read the header we checked: the same names, or it is broken
        raise StateError("blob's tensors as safetensors reads them differ from its header's: the blob is malformed")
    state = {name: _decode(raw[name], specs[name], compression, scales.get(name)) for name in specs}
    if check_values:
        check_state(state, schema.specs(part), what="received blob")
    return state  # names, shapes and dtypes were checked from the header; _decode gives the schema's dtypes


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__``; StateError if the bytes are not safetensors.

    The whole header is checked (``safetensors_header.read_header``), not only the metadata.
    """
    return read_header(data).metadata


def max_blob_size(schema: AdapterSchema, part: Part | None = "shared", compression: Compression = "none") -> int:
    """The most bytes a blob ``serialize_state`` makes for ``part`` under ``compression`` can have.

    A bound to check before parsing anything a client sends. The layout fixes every byte but the int8
    scales' text: this serializes an all-zero state once per schema id, part and compression (O(model),
    scales "1.0"; cached) and adds, per tensor, room for the longest float text (24 characters) and
    safetensors' header padding (up to 7 bytes).
    """
    if compression not in COMPRESSIONS:
        raise StateError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    return _max_blob_size(_BySchemaId(schema, schema.schema_id), part, compression)


@dataclass(frozen=True)
class _BySchemaId:
    """A schema as an ``lru_cache`` argument, compared and hashed by its id (which hashes the whole schema)."""

    schema: AdapterSchema = field(compare=False)
    schema_id: str


@functools.lru_cache(maxsize=64)
def _max_blob_size(key: _BySchemaId, part: Part | None, compression: Compression) -> int:
    zeros = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in key.schema.specs(part)}
    return len(serialize_state(zeros, key.schema, part, compression)) + _SCALE_TEXT * len(zeros) + 8


def _header_limit(schema: AdapterSchema, part: Part | None) -> int:
    """The most header bytes ``deserialize_state`` parses for ``part``, whatever the compression (O(tensors), cached).

    An upper bound on this schema's headers, worked out from the names and shapes without serializing:
    per tensor its name as a JSON string in its entry and, escaped once more, in the int8 scales (Python's
    ASCII-only escaping is never shorter than safetensors'), up to 20 digits and a comma per dimension, and
    the entry's fixed text with two offsets and a scale; plus the metadata. Never below jsonsafe's 1 MiB for
    untrusted JSON, so a malformed header small enough to parse cheaply is refused for what is wrong with it.
    """
    return _header_limit_of(_BySchemaId(schema, schema.schema_id), part)


@functools.lru_cache(maxsize=64)
def _header_limit_of(key: _BySchemaId, part: Part | None) -> int:
    total = _METADATA_TEXT
    for spec in key.schema.specs(part):
        quoted = json.dumps(spec.name)
        total += len(quoted) + len(json.dumps(quoted)) + 21 * len(spec.shape) + _ENTRY_TEXT
    return max(jsonsafe.DEFAULT_MAX_BYTES, total)


def _wire_dtype(spec: TensorSpec, compression: str) -> str:
    if compression in _WIRE_DTYPE and spec.dtype.startswith(("float", "bfloat")):
        return _WIRE_DTYPE[compression]
    return spec.dtype


def _decode(tensor: torch.Tensor, spec: TensorSpec, compression: str, scale: object) -> torch.Tensor:
    target = getattr(torch, spec.dtype)
    if compression == "int8" and tensor.dtype == torch.int8 and spec.dtype != "int8":
        # Float first: int8 × a Python int stays int8 and wraps (× 1000), and one past int64 raises OverflowError.
        decoded = tensor.to(torch.float32) * _int8_scale(scale, spec.name)
        return decoded if decoded.dtype == target else decoded.to(target)
    return tensor if tensor.dtype == target else tensor.to(target)


def _int8_scale(scale: object, name: str) -> float:
    """The received int8 scale of tensor ``name`` as a positive finite float; StateError otherwise.

    serialize_state writes floats; an integer is taken as a float only within int64, like any number torch
    takes (a 20-digit one is no scale anything wrote, and is worded by its size, not its digits).
    """
    if type(scale) is int and not _INT64[0] <= scale <= _INT64[1]:
        raise StateError(
            f"received tensor {name!r} has no valid int8 scale (got an integer of {scale.bit_length()} bits, "
            "beyond int64): a positive finite number"
        )
    if type(scale) in (int, float) and 0 < float(cast(float, scale)) < float("inf"):
        return float(cast(float, scale))
    raise StateError(
        f"received tensor {name!r} has no valid int8 scale (got {repr(scale)[:40]}): a positive finite number"
    )
