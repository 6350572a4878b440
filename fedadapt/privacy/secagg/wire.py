"""The framing of secure-aggregation payloads: named byte fields, length-prefixed, no pickle.

``pack({"c-pk": b"...", "share/17": b"..."})`` → ``FASA`` magic, a version byte, a field count,
then for each field its name (u16 length + UTF-8) and its data (u64 length + bytes). ``unpack``
reads it back or raises ``PayloadError`` — and nothing else — for any input, so a client or the
server can feed it untrusted bytes. Node ids travel as little-endian uint64 arrays.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import numpy as np

from fedadapt.errors import FedAdaptError, PayloadError

MAGIC = b"FASA"
VERSION = 1
MAX_FIELDS = 100_000
UINT64_LIMIT = 2**64  # node ids, rounds and run ids travel and are signed as uint64
_HEAD = struct.Struct("<4sBI")
_NAME = struct.Struct("<H")
_DATA = struct.Struct("<Q")
_SHOWN = 60  # characters of an untrusted name quoted in an error


def pack(fields: Mapping[str, bytes]) -> bytes:
    """Frame named byte fields (names are non-empty UTF-8 strings of at most 65535 bytes)."""
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"a payload holds at most {MAX_FIELDS} fields, got {len(fields)}")
    parts = [_HEAD.pack(MAGIC, VERSION, len(fields))]
    for name, data in fields.items():
        raw = name.encode()
        if not 0 < len(raw) <= 0xFFFF:
            raise ValueError(f"field names must be 1 to 65535 UTF-8 bytes, got {name!r}")
        parts += [_NAME.pack(len(raw)), raw, _DATA.pack(len(data)), bytes(data)]
    return b"".join(parts)


def unpack(blob: bytes, what: str = "payload") -> dict[str, bytes]:
    """The fields of ``blob``; PayloadError (naming ``what``) if it is not exactly one well-formed payload."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise PayloadError(f"{what} must be bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if len(data) < _HEAD.size:
        raise PayloadError(f"{what} is truncated: {len(data)} bytes, its header alone needs {_HEAD.size}")
    magic, version, count = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"{what} is not a fedadapt secure-aggregation payload (bad magic)")
    if version != VERSION:
        raise PayloadError(f"{what} has version {version}, this build reads version {VERSION}")
    if count > MAX_FIELDS:
        raise PayloadError(f"{what} announces {count} fields, at most {MAX_FIELDS} are allowed")
    fields: dict[str, bytes] = {}
    offset = _HEAD.size
    for index in range(count):
        name, offset = _read(data, offset, _NAME, what, index)
        try:
            key = name.decode()
        except UnicodeDecodeError:
            raise PayloadError(f"{what}: the name of field {index} is not UTF-8") from None
        if not key:
            raise PayloadError(f"{what}: field {index} has an empty name")
        if key in fields:
            raise PayloadError(f"{what}: field {key[:_SHOWN]!r} appears twice")
        fields[key], offset = _read(data, offset, _DATA, what, index)
    if offset != len(data):
        raise PayloadError(f"{what} has {len(data) - offset} bytes after its {count} fields")
    return fields


def _read(data: bytes, offset: int, length: struct.Struct, what: str, index: int) -> tuple[bytes, int]:
    if offset + length.size > len(data):
        raise PayloadError(f"{what} is truncated inside field {index}")
    (size,) = length.unpack_from(data, offset)
    start = offset + length.size
    if size > len(data) - start:
        raise PayloadError(f"{what} is truncated: field {index} announces {size} bytes, {len(data) - start} remain")
    return data[start : start + size], start + size


def require(fields: Mapping[str, bytes], names: Iterable[str], what: str = "payload") -> None:
    """PayloadError unless every name in ``names`` is present."""
    missing = [name for name in names if name not in fields]
    if missing:
        raise PayloadError(f"{what} lacks the fields {missing[:5]}")


def uint64(value: object, what: str, error: type[FedAdaptError] = PayloadError) -> int:
    """``value`` as an int if it is an integer in [0, 2**64) (a bool or a float is not); ``error`` naming ``what``.

    The one range check for every round, node id and run id of the protocol, whichever side sent it.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < UINT64_LIMIT:
        raise error(f"{what} must be an integer in [0, 2**64), got {value!r:.80}")
    return int(value)


def pack_ids(ids: Iterable[int]) -> bytes:
    """Node ids as little-endian uint64; PayloadError for an id outside [0, 2**64)."""
    values = [uint64(value, "a node id") for value in ids]
    return np.asarray(values, dtype="<u8").tobytes()


def unpack_ids(data: bytes, what: str = "node id list") -> list[int]:
    """Node ids written by ``pack_ids``; PayloadError on a ragged length or a repeated id."""
    if len(data) % 8:
        raise PayloadError(f"{what} has {len(data)} bytes, not a whole number of 8-byte node ids")
    ids = [int(i) for i in np.frombuffer(data, dtype="<u8")]
    if len(set(ids)) != len(ids):
        raise PayloadError(f"{what} names a node twice")
    return ids
