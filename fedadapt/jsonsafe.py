"""JSON from untrusted sources (client headers, wire metadata), parsed with a size and a nesting-depth limit.

The stdlib parser recurses once per nesting level, so ``[[[[...]]]]`` a few thousand deep raises
RecursionError, which no caller expects. ``loads`` measures the depth first without recursing (string
literals removed by a linear regex, then a running sum over the brackets left), so the parser only ever
sees shallow input, and every failure is one ``JsonInputError`` naming the source. Like ``json.loads`` it
reads NaN and Infinity (Python's ``json.dumps`` writes them): callers check the values they use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedadapt.errors import JsonInputError

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_DEPTH = 32
# A JSON string literal: quote, then characters other than quote and backslash or escaped pairs, then quote.
# Possessive quantifiers do not backtrack, and an unterminated literal runs to the end of the input (which is
# then invalid JSON anyway): every quote starts a match that succeeds, so the scan is linear in the input.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte that is not a bracket, to delete
_BOM = b"\xef\xbb\xbf"
_CHUNK = 64 * 1024
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    what: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """The value of the JSON document ``data``; JsonInputError (naming ``what``) if it is oversize, too deep or invalid.

    ``max_bytes`` bounds the UTF-8 size, checked before anything is parsed; ``max_depth`` bounds how many
    arrays and objects may be open at once (a flat object is depth 1).
    """
    raw = data.encode() if isinstance(data, str) else bytes(data) if isinstance(data, bytearray | memoryview) else data
    if not isinstance(raw, bytes):
        raise JsonInputError(what, f"expected bytes or str, got {type(data).__name__}")
    if len(raw) > max_bytes:
        raise JsonInputError(what, f"{len(raw)} bytes of JSON, more than the {max_bytes} allowed")
    try:
        # UTF-8 only (RFC 8259 8.1): json.loads(bytes) would also sniff UTF-16/32, whose bytes the depth scan
        # below cannot read, so a UTF-16 document could hide its brackets from it.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonInputError(what, f"not UTF-8 ({err.reason} at byte {err.start})") from None
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JsonInputError(what, f"JSON nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise JsonInputError(what, f"not valid JSON ({str(err)[:200]})") from None


def load_file(
    path: str | Path,
    *,
    what: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """The value of the JSON file ``path``, read through ``loads``; every failure is a JsonInputError.

    At most ``max_bytes`` + 1 bytes are read, so a huge (or endless, e.g. /dev/zero) file costs no more
    than the limit. A leading UTF-8 byte-order mark, which Windows editors write, is skipped. ``what``
    names the file in errors (default: its path); a file that cannot be read is a JsonInputError too.
    """
    what = what or str(path)
    limit = max_bytes + len(_BOM)
    chunks: list[bytes] = []
    size = 0
    try:
        with open(path, "rb") as handle:
            # In chunks: read(limit) would allocate the whole limit up front, whatever the file's size.
            while size <= limit and (chunk := handle.read(min(_CHUNK, limit + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
    except OSError as err:
        raise JsonInputError(what, f"cannot be read ({err.strerror or err})") from None
    raw = b"".join(chunks).removeprefix(_BOM)
    if len(raw) > max_bytes:
        raise JsonInputError(what, f"more than the {max_bytes} bytes of JSON allowed")
    return loads(raw, what=what, max_bytes=max_bytes, max_depth=max_depth)


def nesting_depth(raw: bytes) -> int:
    """The most arrays and objects open at once in ``raw``, brackets inside string literals not counted."""
    brackets = _STRING.sub(b"", raw).translate(None, _BRACKETS)
    if not brackets:
        return 0
    steps = _STEP[np.frombuffer(brackets, dtype=np.uint8)].astype(np.int64)
    return int(np.cumsum(steps).max())
