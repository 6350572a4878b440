"""The header of a safetensors blob, read and checked without building a single tensor.

A safetensors blob is an 8-byte little-endian header length, a JSON header
``{name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, "__metadata__": {...}}``
and the tensors' bytes. ``read_header`` parses the header through ``jsonsafe`` (size and depth bounded)
and checks that it describes exactly the bytes that follow: each tensor's range is as long as its dtype's
size times its element count and starts where the previous tensor's ended (safetensors writes them in
header order), and the blob ends where the last one does. ``check_declared`` then compares the declared
names, shapes and dtypes with the expected ``TensorSpec``s (for a received state blob and an adapter
folder's weight file alike), so a hostile blob costs one bounded JSON parse and nothing is allocated for it.

A shape has at most ``MAX_DIMS`` (8) dimensions, each below 2**63 (torch's sizes are int64), and a tensor's
bytes are fewer than 2**63: the element count is then at most eight multiplications of 64-bit numbers, and
every integer an error message formats (a count, an offset, the bytes described) has a few dozen digits at most.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol, cast

import torch

from fedadapt import jsonsafe
from fedadapt.delta.state import TensorSpec, check_names_and_shapes
from fedadapt.errors import JsonInputError, StateError

MAX_HEADER = 16 * 1024 * 1024  # without a schema to bound it: a state header is a few KB, a checkpoint's more
MAX_DIMS = 8  # dimensions of a tensor's shape (adapters' have at most 3; the manifest's schema allows 8 too)
_DIM_END = 1 << 63  # torch's sizes are int64
_DEPTH = 4  # {name: {"shape": [...]}} is 3 deep; anything deeper is not a safetensors header
_LENGTH = struct.Struct("<Q")
_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_SHOWN = 80  # characters of an untrusted value quoted in an error
_NAME_SHOWN = 200  # characters of a tensor name (those of real adapters run to about 100)

# safetensors' dtype names → (torch's name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}


class TensorEntry(NamedTuple):
    """One tensor as the header describes it: torch's dtype name, its shape and its bytes after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked header: its ``__metadata__`` (strings), its tensors in file order, and its length in bytes."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    length: int


def read_header(data: bytes | bytearray | memoryview, *, max_length: int = MAX_HEADER) -> Header:
    """The header of ``data``; StateError unless it is a well-formed safetensors blob, header at most ``max_length``.

    Costs one parse of the header and a pass over its entries: no tensor is built and no data byte is read.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StateError(f"expected bytes, got {type(data).__name__}")
    if len(data) < _LENGTH.size:
        raise StateError(f"blob is truncated: {len(data)} bytes, too short for a safetensors header")
    (length,) = _LENGTH.unpack_from(data)
    if length > max_length:
        raise StateError(
            f"blob is not safetensors: header length {length} is implausible (at most {max_length} bytes here)"
        )
    if _LENGTH.size + length > len(data):
        raise StateError(f"blob is truncated: header needs {length} bytes, {len(data) - _LENGTH.size} present")
    try:
        parsed = jsonsafe.loads(
            data[_LENGTH.size : _LENGTH.size + length], what="header", max_bytes=length, max_depth=_DEPTH
        )
    except JsonInputError as err:
        raise StateError(f"blob is not safetensors: {err}") from None
    if not isinstance(parsed, dict):
        raise StateError("blob is not safetensors: header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise StateError("blob is not safetensors: its __metadata__ is not a JSON object")
    tensors: dict[str, TensorEntry] = {}
    end = 0
    for name, described in parsed.items():
        tensors[name] = entry = _entry(name, described, begin=end)
        end = entry.end
    expected = _LENGTH.size + length + end
    if len(data) != expected:
        raise StateError(
            f"blob is not valid safetensors: it has {len(data)} bytes, its header describes {expected} "
            f"({_LENGTH.size} + {length} of header + {end} of tensor data)"
        )
    return Header({str(k): str(v) for k, v in metadata.items()}, tensors, length)


class Declared(Protocol):
    """A tensor as a header declares it, before it is read: a ``TensorEntry``, or what ``safe_open`` reports."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...


def _declared_dtype(spec: TensorSpec) -> str:
    return spec.dtype


def check_declared(
    declared: Mapping[str, Declared],
    expected: Mapping[str, TensorSpec],
    *,
    what: str,
    dtype_of: Callable[[TensorSpec], str] = _declared_dtype,
    dtype_note: str = "",
) -> None:
    """StateError unless ``declared`` names exactly the ``expected`` tensors, each of its shape and dtype.

    ``dtype_of`` gives the dtype a spec is stored as (a state blob's compression changes it), and
    ``dtype_note`` says why in the error. Byte extents follow from shape and dtype: ``read_header``
    (or safetensors itself) has checked that each entry's bytes are exactly that many.
    """
    # check_names_and_shapes reads names and ``.shape`` only, which declarations carry like tensors
    check_names_and_shapes(cast(Mapping[str, torch.Tensor], declared), expected, what=what)
    for name, entry in declared.items():
        wanted = dtype_of(expected[name])
        if entry.dtype != wanted:
            raise StateError(f"{what} tensor {name!r} has dtype {entry.dtype}, expected {wanted}{dtype_note}")


def _entry(name: str, described: object, begin: int) -> TensorEntry:
    """The entry of tensor ``name``, whose bytes must start at ``begin``; StateError naming the field otherwise.

    Runs once per tensor of every blob the server receives, so it does plain type checks (JSON gives exact
    ``int``, ``str``, ``list`` and ``dict``; ``type(x) is int`` also leaves out bools) and words errors lazily.
    """
    if type(described) is not dict or described.keys() != _FIELDS:
        raise _bad(name, f"must have exactly the fields {sorted(_FIELDS)}, got {_shown(described)}")
    dtype, shape, offsets = described["dtype"], described["shape"], described["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPES:
        raise _bad(name, f"has dtype {_shown(dtype)}, not one of safetensors' {list(DTYPES)}")
    if type(shape) is not list or len(shape) > MAX_DIMS or not _are_counts(shape):
        raise _bad(
            name,
            f"has shape {_shown(shape)}: a shape is a list of at most {MAX_DIMS} integers in [0, 2**63)",
        )
    torch_dtype, size = DTYPES[dtype]
    count = math.prod(shape)  # at most 8 factors below 2**63: a few hundred bits at worst
    if count * size >= _DIM_END:  # no blob holds that much; worded without the count, which may run to 150 digits
        raise _bad(name, f"has shape {_shown(shape)} of {dtype}: 2**63 bytes or more, more than any blob holds")
    end = begin + count * size
    if type(offsets) is not list or len(offsets) != 2 or not _are_counts(offsets) or offsets != [begin, end]:
        raise _bad(
            name,
            f"has data_offsets {_shown(offsets)}, expected [{begin}, {end}]: its {count} {dtype} values right after "
            "the previous tensor's bytes (tensors are contiguous, in header order)",
        )
    return TensorEntry(torch_dtype, tuple(shape), begin, end)


def _are_counts(values: list[object]) -> bool:
    for value in values:  # noqa: SIM110  (a loop: all() over a generator costs twice as much here)
        if type(value) is not int or not 0 <= value < _DIM_END:
            return False
    return True


def _bad(name: str, problem: str) -> StateError:
    return StateError(f"blob is not valid safetensors: tensor {name[:_NAME_SHOWN]!r} {problem}")


def _shown(value: object) -> str:
    return repr(value)[:_SHOWN]
