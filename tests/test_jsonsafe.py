"""fedadapt.jsonsafe: JSON from clients parsed with a size and depth limit, one JsonInputError for every failure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedadapt.errors import JsonInputError
from fedadapt.jsonsafe import loads, nesting_depth

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=30
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES)
def test_valid_json_reads_as_the_stdlib_reads_it_and_its_depth_is_measured_exactly(value: Any) -> None:
    text = json.dumps(value)
    assert nesting_depth(text.encode()) == _depth(value)
    assert loads(text, what="test", max_depth=64) == json.loads(text)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 200_000 + b"]" * 200_000,  # the stdlib parser raises RecursionError on this
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        b"[" * 200_000,  # unterminated
    ],
)
def test_deep_nesting_is_a_named_error_not_a_recursion_error(data: bytes) -> None:
    with pytest.raises(RecursionError):
        json.loads(data)  # what the stdlib alone does
    with pytest.raises(JsonInputError, match=r"client header: JSON nested \d+ levels deep, more than the 32 allowed"):
        loads(data, what="client header", max_bytes=len(data))


def test_brackets_inside_strings_do_not_count_and_escaped_quotes_do_not_end_a_string() -> None:
    assert nesting_depth(b'{"a": "[[[[{{{{", "b\\"[[": ["]]]"]}') == 2
    assert loads('{"a": "[[[[[[[[[["}', what="x", max_depth=1) == {"a": "[[[[[[[[[["}


def test_oversize_input_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(JsonInputError, match="int8 scales: 1001 bytes of JSON, more than the 1000 allowed"):
        loads(b" " * 1001, what="int8 scales", max_bytes=1000)


@pytest.mark.parametrize("data", [b"{", b"\xff\xfe", b'{"a": 1,}', b"", b'"\\', b"1e999999" * 0 + b"[1 2]"])
def test_invalid_json_is_a_named_error(data: bytes) -> None:
    with pytest.raises(JsonInputError, match="wire metadata: not (valid JSON|UTF-8)"):
        loads(data, what="wire metadata")


def test_an_unterminated_string_of_escaped_quotes_is_scanned_in_linear_time() -> None:
    import time

    data = b'"' + b'\\"' * 300_000  # a regex that retried at every quote would take minutes
    start = time.perf_counter()
    with pytest.raises(JsonInputError):
        loads(data, what="x", max_bytes=len(data))
    assert time.perf_counter() - start < 2.0


def test_a_non_bytes_value_is_a_named_error() -> None:
    with pytest.raises(JsonInputError, match="expected bytes or str, got int"):
        loads(12, what="x")  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32"])
def test_only_utf8_is_read_so_no_encoding_hides_brackets_from_the_depth_scan(encoding: str) -> None:
    # U+225B encodes as the bytes 5B 22 ('[' '"') in UTF-16-LE: read as bytes, it derails the string scan.
    text = '{"\u225b":0,"a":' + "[" * 500 + "]" * 500 + "}"
    raw = text.encode(encoding)
    # Refused either way: not UTF-8 at all, or UTF-8 (NUL bytes are) that is no JSON document.
    with pytest.raises(JsonInputError, match="header: not (UTF-8|valid JSON)"):
        loads(raw, what="header", max_depth=32, max_bytes=len(raw))


def test_load_file_reads_a_file_skips_a_bom_and_names_the_file_in_every_failure(tmp_path: Any) -> None:
    from fedadapt.jsonsafe import load_file

    good = tmp_path / "labels.json"
    good.write_bytes(b'\xef\xbb\xbf["a", "b"]')
    assert load_file(good) == ["a", "b"]
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(JsonInputError, match="deep.json: JSON nested 100000 levels"):
        load_file(deep)
    with pytest.raises(JsonInputError, match="labels: more than the 5 bytes"):
        load_file(good, what="labels", max_bytes=5)
    with pytest.raises(JsonInputError, match="missing.json: cannot be read"):
        load_file(tmp_path / "missing.json")
    with pytest.raises(JsonInputError, match="cannot be read"):
        load_file(tmp_path)  # a folder


def test_load_file_allocates_about_the_file_not_the_limit_and_stops_reading_an_endless_file(tmp_path: Any) -> None:
    import tracemalloc

    from fedadapt.jsonsafe import load_file

    small = tmp_path / "small.json"
    small.write_text('{"a": 1}')
    tracemalloc.start()
    try:
        assert load_file(small, max_bytes=64 * 1024 * 1024) == {"a": 1}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # a read(max_bytes) would allocate 64 MiB here
    with pytest.raises(JsonInputError, match="more than the 100000 bytes"):
        load_file("/dev/zero", max_bytes=100_000)
