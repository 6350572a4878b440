"""Adapter state and deltas ↔ bytes (safetensors), with fp16 or int8 compression.

No pickle: the format is safetensors, whose header is JSON. Every blob carries the
schema id and its compression; ``deserialize_state`` checks both, then names, shapes,
dtypes and values against the schema, and raises one clear StateError per problem.
int8 is per-tensor symmetric: q = round(x / s), s = max|x| / 127, so |x − q·s| ≤ s / 2.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedadapt import jsonsafe
from fedadapt.errors import JsonInputError, SchemaMismatch, StateError
from fedadapt.state import AdapterSchema, Part, State, TensorSpec, check_names_and_shapes, check_state, dtype_name

Compression = Literal["none", "fp16", "int8"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "fp16", "int8")
FORMAT = "fedadapt.state.v1"
_HEADER_LIMIT = 16 * 1024 * 1024  # a state header is a few KB; refuse absurd lengths before parsing
_HEADER_DEPTH = 4  # {name: {"shape": [...]}} is 3 deep; anything deeper is not a state header
_SCALES_DEPTH = 1  # int8 scales are one flat object of numbers
_WIRE_DTYPE = {"fp16": "float16", "int8": "int8"}
_SCALE_TEXT = 24  # the longest repr of a float ("-2.2250738585072014e-308")


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

    ``check_values=False`` skips only the finite-values check, for callers that check values
    themselves in the same pass as something else (the server's validator, with the norm).
    """
    metadata = read_metadata(data)
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
    try:
        raw = safetensors_load(bytes(data))
    except (SafetensorError, ValueError) as err:
        raise StateError(f"blob is not valid safetensors: {err}") from err
    try:
        scales = jsonsafe.loads(
            metadata.get("int8_scales", "{}"), what="int8 scales", max_bytes=len(data), max_depth=_SCALES_DEPTH
        )
    except JsonInputError as err:
        raise StateError(f"blob's {err}") from None
    if not isinstance(scales, dict):
        raise StateError(f"blob's int8 scales must be a JSON object, got {type(scales).__name__}")
    specs = {s.name: s for s in schema.specs(part)}
    _check_wire(raw, specs, compression)
    state = {name: _decode(raw[name], specs[name], compression, scales.get(name)) for name in specs}
    if check_values:
        check_state(state, schema.specs(part), what="received blob")
    else:
        check_names_and_shapes(state, specs, what="received blob")
    return state


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__``; StateError if the bytes are not safetensors."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StateError(f"expected bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise StateError(f"blob is truncated: {len(data)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > _HEADER_LIMIT:
        raise StateError(f"blob is not safetensors: header length {header_len} is implausible")
    if 8 + header_len > len(data):
        raise StateError(f"blob is truncated: header needs {header_len} bytes, {len(data) - 8} present")
    try:
        header = jsonsafe.loads(data[8 : 8 + header_len], what="header", max_bytes=header_len, max_depth=_HEADER_DEPTH)
    except JsonInputError as err:
        raise StateError(f"blob is not safetensors: {err}") from None
    if not isinstance(header, dict):
        raise StateError("blob is not safetensors: header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise StateError("blob is not safetensors: its __metadata__ is not a JSON object")
    return {str(k): str(v) for k, v in metadata.items()}


def max_blob_size(schema: AdapterSchema, part: Part | None = "shared", compression: Compression = "none") -> int:
    """The most bytes a blob ``serialize_state`` makes for ``part`` under ``compression`` can have.

    A bound to check before parsing anything a client sends. The layout fixes every byte but the int8
    scales' text: this serializes an all-zero state once (O(model), scales "1.0") and adds, per tensor,
    room for the longest float text (24 characters) and safetensors' header padding (up to 7 bytes).
    """
    zeros = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in schema.specs(part)}
    return len(serialize_state(zeros, schema, part, compression)) + _SCALE_TEXT * len(zeros) + 8


def _wire_dtype(spec: TensorSpec, compression: str) -> str:
    if compression in _WIRE_DTYPE and spec.dtype.startswith(("float", "bfloat")):
        return _WIRE_DTYPE[compression]
    return spec.dtype


def _check_wire(raw: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec], compression: str) -> None:
    check_names_and_shapes(raw, specs, what="received blob")
    for name, tensor in raw.items():
        spec = specs[name]
        expected = _wire_dtype(spec, compression)
        if dtype_name(tensor.dtype) != expected:
            raise StateError(
                f"received tensor {name!r} has dtype {dtype_name(tensor.dtype)}, expected {expected} "
                f"for compression {compression!r}"
            )


def _decode(tensor: torch.Tensor, spec: TensorSpec, compression: str, scale: float | None) -> torch.Tensor:
    target = getattr(torch, spec.dtype)
    if compression == "int8" and tensor.dtype == torch.int8 and spec.dtype != "int8":
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not 0 < scale < float("inf"):
            raise StateError(f"received tensor {spec.name!r} has no valid int8 scale (got {scale!r})")
        decoded = tensor * scale  # int8 × float promotes to the default float dtype in one pass
        return decoded if decoded.dtype == target else decoded.to(target)
    return tensor if tensor.dtype == target else tensor.to(target)
