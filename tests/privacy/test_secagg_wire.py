"""SecAgg+ framing: round trips, each rejection, and fuzzing of ``unpack`` and of the client stages."""

from __future__ import annotations

import random
import struct
from functools import cache

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_secagg import ROUND, Trace, run_round, secagg

from fedadapt.errors import PayloadError, SecAggError
from fedadapt.privacy.secagg import client, stages, wire
from fedadapt.privacy.secagg.server import SecAggResult

_HEADER = struct.Struct("<4sBI")
_SAMPLE = {"c-pk": b"-----BEGIN PUBLIC KEY-----", "share/17": bytes(range(40)), "\u00e9t\u00e9/\u2603": b""}

_names = st.text(min_size=1, max_size=24)
_payloads = st.dictionaries(_names, st.binary(max_size=80), max_size=8)
_ids = st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=50)


def _field(name: bytes, data: bytes) -> bytes:
    return struct.pack("<H", len(name)) + name + struct.pack("<Q", len(data)) + data


def _framed(*fields: tuple[bytes, bytes], count: int | None = None, magic: bytes = b"FASA", version: int = 1) -> bytes:
    """A payload written by hand, so that it can be wrong in exactly one way."""
    head = _HEADER.pack(magic, version, len(fields) if count is None else count)
    return head + b"".join(_field(name, data) for name, data in fields)


def _rejected(blob: object, *words: str) -> str:
    with pytest.raises(PayloadError) as info:
        wire.unpack(blob, "test payload")  # type: ignore[arg-type]
    message = str(info.value)
    assert "test payload" in message, message
    for word in words:
        assert word in message, message
    return message


# --- round trips -----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(_payloads)
def test_pack_unpack_round_trip(fields: dict[str, bytes]) -> None:
    blob = wire.pack(fields)
    assert wire.unpack(blob) == fields
    assert list(wire.unpack(blob)) == list(fields)  # the order is kept
    assert wire.unpack(bytearray(blob)) == wire.unpack(memoryview(blob)) == fields
    assert wire.pack(wire.unpack(blob)) == blob  # one payload, one encoding


def test_the_layout_is_the_documented_one() -> None:
    blob = wire.pack({"ab": b"xyz"})
    assert blob == b"FASA" + bytes([1]) + (1).to_bytes(4, "little") + b"\x02\x00ab" + (3).to_bytes(8, "little") + b"xyz"
    assert wire.pack({}) == b"FASA\x01\x00\x00\x00\x00"
    assert wire.unpack(wire.pack({})) == {}


@settings(max_examples=300, deadline=None)
@given(_ids)
def test_ids_round_trip(ids: list[int]) -> None:
    data = wire.pack_ids(ids)
    assert len(data) == 8 * len(ids)
    assert wire.unpack_ids(data) == ids
    assert all(isinstance(node, int) for node in wire.unpack_ids(data))


def test_ids_are_little_endian_uint64() -> None:
    assert wire.pack_ids([1, 2**64 - 1]) == b"\x01" + bytes(7) + b"\xff" * 8
    assert wire.unpack_ids(b"") == []


def test_pack_refuses_names_it_could_not_frame() -> None:
    with pytest.raises(ValueError, match="1 to 65535"):
        wire.pack({"": b"x"})
    with pytest.raises(ValueError, match="1 to 65535"):
        wire.pack({"\u00e9" * 32768: b"x"})  # 65536 UTF-8 bytes
    assert wire.unpack(wire.pack({"a" * 65535: b"x"})) == {"a" * 65535: b"x"}
    with pytest.raises(ValueError, match="at most 100000 fields"):
        wire.pack({str(i): b"" for i in range(wire.MAX_FIELDS + 1)})


# --- rejections ------------------------------------------------------------------------------------------------


def test_every_truncation_is_rejected() -> None:
    blob = wire.pack(_SAMPLE)
    for cut in range(len(blob)):
        _rejected(blob[:cut], "truncated")


def test_a_short_header_says_how_short() -> None:
    _rejected(b"FAS", "3 bytes", "needs 9")
    _rejected(b"", "0 bytes")


def test_bad_magic_is_rejected() -> None:
    _rejected(b"PK\x03\x04" + wire.pack(_SAMPLE)[4:], "bad magic")
    _rejected(_framed(magic=b"fasa"), "bad magic")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_versions_are_rejected(version: int) -> None:
    _rejected(_framed((b"a", b"x"), version=version), f"version {version}", "reads version 1")


def test_trailing_bytes_are_rejected() -> None:
    _rejected(wire.pack(_SAMPLE) + b"\x00", "1 bytes after its 3 fields")
    _rejected(wire.pack({}) + wire.pack({}), "9 bytes after its 0 fields")


def test_a_repeated_field_name_is_rejected() -> None:
    _rejected(_framed((b"share/1", b"a"), (b"share/1", b"b")), "'share/1'", "appears twice")


def test_a_long_repeated_name_is_quoted_short() -> None:
    message = _rejected(_framed((b"n" * 5000, b""), (b"n" * 5000, b"")), "appears twice")
    assert len(message) < 200


@pytest.mark.parametrize("name", [b"\xff", b"ok\xc3", b"\xed\xa0\x80"], ids=["ff", "cut-sequence", "surrogate"])
def test_a_non_utf8_name_is_rejected(name: bytes) -> None:
    _rejected(_framed((b"first", b""), (name, b"x")), "field 1", "not UTF-8")


def test_an_empty_name_is_rejected() -> None:
    _rejected(_framed((b"", b"x")), "field 0", "empty name")


def test_too_many_fields_announced_is_rejected() -> None:
    _rejected(_framed(count=wire.MAX_FIELDS + 1), "announces 100001 fields")
    _rejected(_framed(count=2**32 - 1), "announces")
    _rejected(_framed((b"a", b"x"), count=2), "truncated inside field 1")  # more announced than sent
    assert wire.unpack(_framed(count=0)) == {}


def test_a_field_announcing_more_bytes_than_remain_is_rejected() -> None:
    blob = _HEADER.pack(b"FASA", 1, 1) + struct.pack("<H", 1) + b"a" + struct.pack("<Q", 2**64 - 1) + b"xyz"
    _rejected(blob, "field 0 announces 18446744073709551615 bytes", "3 remain")
    blob = _HEADER.pack(b"FASA", 1, 1) + struct.pack("<H", 60000) + b"abc"
    _rejected(blob, "field 0 announces 60000 bytes")


@pytest.mark.parametrize("blob", ["FASA", None, 17, [b"FASA"]], ids=["str", "none", "int", "list"])
def test_non_bytes_are_rejected(blob: object) -> None:
    _rejected(blob, "must be bytes")


def test_require_names_the_missing_fields() -> None:
    wire.require({"a": b"", "b": b""}, ["a", "b"])
    with pytest.raises(PayloadError, match=r"request lacks the fields \['c', 'd'\]"):
        wire.require({"a": b""}, ["a", "c", "d"], "request")


@pytest.mark.parametrize("size", [1, 7, 9, 15])
def test_a_ragged_id_list_is_rejected(size: int) -> None:
    with pytest.raises(PayloadError, match=f"neighbour list has {size} bytes, not a whole number"):
        wire.unpack_ids(bytes(size), "neighbour list")


def test_a_repeated_id_is_rejected() -> None:
    with pytest.raises(PayloadError, match="names a node twice"):
        wire.unpack_ids(wire.pack_ids([5, 6, 5]))
    with pytest.raises(PayloadError, match="twice"):
        wire.unpack_ids(bytes(16))  # node 0 twice


# --- fuzzing ---------------------------------------------------------------------------------------------------


@cache
def _before_shares() -> Trace:
    """A 5-client round stopped when the clients hold their forwarded shares."""
    return run_round(5, 16, secagg(), stop_before=stages.MASKED)


@cache
def _before_unmask() -> Trace:
    """A 5-client round stopped when the clients hold their unmask requests."""
    return run_round(5, 16, secagg(), stop_before=stages.UNMASK)


@cache
def _unmask_replies() -> dict[int, bytes]:
    trace = _before_unmask()
    return {
        node: client.unmask(trace.config, ROUND, trace.sessions[node], request).reply
        for node, request in trace.requests[stages.UNMASK].items()
    }


def _client_node(trace: Trace, stage: str) -> int:
    return sorted(trace.requests[stage])[0]


@cache
def _seeds() -> tuple[bytes, ...]:
    """Real payloads of every stage, as starting points for mutation."""
    trace = _before_unmask()
    shares = _before_shares()
    blobs = [wire.pack(_SAMPLE), wire.pack({}), wire.pack({"a": b""})]
    for stage in (stages.SETUP, stages.SHARE_KEYS, stages.MASKED, stages.UNMASK):
        blobs.append(trace.requests[stage][_client_node(trace, stage)])
    for stage in (stages.SETUP, stages.SHARE_KEYS, stages.MASKED):
        blobs.append(next(iter(trace.replies[stage].values())))
    blobs.append(shares.requests[stages.MASKED][_client_node(shares, stages.MASKED)])
    blobs.append(trace.sessions[_client_node(trace, stages.UNMASK)])
    return tuple(blobs)


_NAME_PARTS = ("a", "share/", "b/", "sk/", "c-pk/", "s-pk", "17", "\u00e9", "\u2603", "\u00b2", "neighbours", "masked")


def _random_payload(rng: random.Random) -> bytes:
    names = {"".join(rng.choices(_NAME_PARTS, k=rng.randint(1, 3))) for _ in range(rng.randint(0, 6))}
    return wire.pack({name: rng.randbytes(rng.choice([0, 1, 8, 16, 50])) for name in names})


def _mutate(base: bytes, rng: random.Random) -> bytes:
    """``base`` after 1 to 4 edits: byte flips, cuts, insertions, deletions, a length field overwritten,
    or its first field repeated (with the count raised to match)."""
    data = bytearray(base)
    for _ in range(rng.randint(1, 4)):
        place = rng.randint(0, len(data))
        edit = rng.choice(["flip", "flip", "truncate", "insert", "delete", "overwrite", "extreme", "repeat"])
        if edit == "flip" and place < len(data):
            data[place] ^= rng.randint(1, 255)
        elif edit == "truncate":
            del data[place:]
        elif edit == "insert":
            data[place:place] = rng.randbytes(rng.randint(1, 12))
        elif edit == "delete":
            del data[place : place + rng.randint(1, 12)]
        elif edit == "overwrite":
            patch = rng.randbytes(rng.randint(1, 8))
            data[place : place + len(patch)] = patch
        elif edit == "extreme":  # a count or length that claims everything or nothing
            width = rng.choice([2, 4, 8])
            data[place : place + width] = rng.choice([b"\xff", b"\x00", b"\x7f"]) * width
        elif edit == "repeat" and len(data) >= 11:
            _, _, count = _HEADER.unpack_from(data)
            (name_size,) = struct.unpack_from("<H", data, 9)
            if count and 11 + name_size + 8 <= len(data):
                (data_size,) = struct.unpack_from("<Q", data, 11 + name_size)
                first = data[9 : 11 + name_size + 8 + min(data_size, 2**20)]
                data[5:9] = struct.pack("<I", (count + 1) % 2**32)
                data += first
    return bytes(data)


def _fuzz_payload(seed: int) -> bytes:
    """Random bytes, random bytes behind a valid header, or a mutated real or random payload."""
    rng = random.Random(seed)
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.randint(0, 200))
    if kind < 0.2:
        return b"FASA\x01" + rng.randbytes(rng.randint(0, 120))
    base = rng.choice(_seeds()) if kind < 0.55 else _random_payload(rng)
    return _mutate(base, rng)


_seeds_of_payloads = st.integers(0, 2**64 - 1)
_REASONS = ("truncated", "bad magic", "version", "announces", "after its", "twice", "UTF-8", "empty name", "bytes")
_FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@_FUZZ
@given(_seeds_of_payloads)
def test_fuzz_unpack_returns_fields_or_payload_error(seed: int) -> None:
    """10 000 random, framed-random and mutated payloads: a dict or PayloadError, nothing else."""
    blob = _fuzz_payload(seed)
    try:
        fields = wire.unpack(blob, "fuzzed payload")
    except PayloadError as err:
        assert "fuzzed payload" in str(err)
        event(next(word for word in _REASONS if word in str(err)))
        return
    event("accepted")
    assert all(isinstance(name, str) and name and isinstance(data, bytes) for name, data in fields.items())
    assert wire.pack(fields) == blob  # what it accepts is exactly one canonical payload


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.binary(max_size=120), st.lists(st.integers(0, 3), max_size=6).map(wire.pack_ids)))
def test_fuzz_unpack_ids(data: bytes) -> None:
    try:
        ids = wire.unpack_ids(data)
    except PayloadError:
        assert len(data) % 8 or len(set(data[i : i + 8] for i in range(0, len(data), 8))) < len(data) // 8
        return
    assert wire.pack_ids(ids) == data


_STAGE_FUZZ = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _stage_payload(trace_of: str, stage: str, seed: int) -> bytes:
    """The real request of ``stage`` mutated, or (one time in ten) random bytes."""
    trace = _before_shares() if trace_of == "shares" else _before_unmask()
    rng = random.Random(seed)
    request = trace.requests[stage][_client_node(trace, stage)]
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.randint(0, 80))
    if kind < 0.5:  # well framed, wrong inside: one field's value (or name) edited, or a field dropped
        fields = wire.unpack(request)
        name = rng.choice(sorted(fields)) if fields else "x"
        value = fields.pop(name, b"")
        edit = rng.random()
        if edit < 0.6:
            fields[name] = _mutate(b"FASA\x01" + value, rng)[5:]
        elif edit < 0.8:
            fields[rng.choice(["share/", "b/", "x"]) + str(rng.choice([0, 1, 2**64 - 1]))] = value
        return wire.pack(fields)
    return _mutate(request, rng)


@_STAGE_FUZZ
@given(_seeds_of_payloads)
def test_fuzz_client_setup(seed: int) -> None:
    request = _stage_payload("unmask", stages.SETUP, seed)
    trace = _before_unmask()
    node = _client_node(trace, stages.SETUP)
    try:
        step = client.setup(trace.config, ROUND, node, request, trace.devices[node])
    except (PayloadError, SecAggError):
        return
    neighbours = wire.unpack_ids(wire.unpack(request)[stages.NEIGHBOURS])
    assert len(neighbours) == trace.config.num_shares - 1 and node not in neighbours
    assert set(wire.unpack(step.reply)) == {
        stages.ENCRYPTION_KEY,
        stages.MASK_KEY,
        stages.IDENTITY_KEY,
        stages.SETUP_SIGNATURE,
    }


@_STAGE_FUZZ
@given(_seeds_of_payloads)
def test_fuzz_client_receive_shares(seed: int) -> None:
    request = _stage_payload("shares", stages.MASKED, seed)
    trace = _before_shares()
    node = _client_node(trace, stages.MASKED)
    try:
        session = client.receive_shares(trace.config, ROUND, trace.sessions[node], request)
    except (PayloadError, SecAggError):
        return
    assert wire.unpack(session)["done"] == b"secagg-shares"


@_STAGE_FUZZ
@given(_seeds_of_payloads)
def test_fuzz_client_unmask(seed: int) -> None:
    request = _stage_payload("unmask", stages.UNMASK, seed)
    trace = _before_unmask()
    node = _client_node(trace, stages.UNMASK)
    try:
        step = client.unmask(trace.config, ROUND, trace.sessions[node], request)
    except (PayloadError, SecAggError):
        return
    fields = wire.unpack(step.reply)
    survivors = {stages.node_of(name, stages.SEED_SHARE) for name in fields} - {None}
    dropped = {stages.node_of(name, stages.KEY_SHARE) for name in fields} - {None}
    assert node in survivors and not survivors & dropped  # never both shares of one node


@_STAGE_FUZZ
@given(_seeds_of_payloads)
def test_fuzz_client_share_keys(seed: int) -> None:
    request = _stage_payload("unmask", stages.SHARE_KEYS, seed)
    trace = _before_unmask()
    node = _client_node(trace, stages.SHARE_KEYS)
    session = client.setup(trace.config, ROUND, node, trace.requests[stages.SETUP][node], trace.devices[node]).session
    try:
        client.share_keys(trace.config, ROUND, session, request, trace.devices[node])
    except (PayloadError, SecAggError):
        return


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_fuzz_server_unmask_replies(data: st.DataObject) -> None:
    """One mutated unmask reply: the server returns a result or fails with SecAggError, nothing else."""
    trace = _before_unmask()
    replies = dict(_unmask_replies())
    victim = data.draw(st.sampled_from(sorted(replies)))
    replies[victim] = _mutate(replies[victim], random.Random(data.draw(_seeds_of_payloads)))
    try:
        result = trace.server.unmask_received(replies, {})
    except SecAggError:
        return
    assert isinstance(result, SecAggResult)
