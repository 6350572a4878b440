"""The server's plain round against hostile replies: every client byte ends as that client's named rejection.

Drives ``server.federation.fold_plain_replies`` (read, open, validate and fold each reply as it arrives) on a
hand-made schema, in modes none and aead, and ``server.replies.reply_stream`` on a fake grid. No model, no
training: thousands of hostile replies a second.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from helpers import StubGrid, set_flower_task_identity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedadapt.aggregate.fedavg import StreamingFedAvg
from fedadapt.aggregate.server_optimizers import FedAvgConfig, ServerOptimizer
from fedadapt.aggregate.validation import DeltaValidator
from fedadapt.delta.serialize import max_blob_size, read_metadata, serialize_state
from fedadapt.delta.state import AdapterSchema, State, TensorSpec
from fedadapt.fleet import protocol
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.keys import generate_server_keys
from fedadapt.privacy.transport import ClientSealer, ServerOpener, sealed_delta_overhead

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from server.federation import ReplyPlan, fold_plain_replies  # noqa: E402
from server.replies import reply_stream  # noqa: E402

SHAPES = {"lora_A": (2, 8), "lora_B": (8, 2)}
SCHEMA = AdapterSchema(
    {"name": "lora", "r": 2},
    "fp-test",
    tuple(TensorSpec(n, s, "float32", "shared", "adapter") for n, s in SHAPES.items()),
)
LIMIT = 10_000
RUN_ID = 7
# Every reason a rejection may start with; "unexpected ..." (the last-resort catch) would mean a check is missing.
NAMED = re.compile(
    r"^(client error: |malformed reply: |payload of \d+ bytes exceeds |envelope rejected \(|num_examples must be "
    r"|num-examples \S+ exceeds limit |StateError: |SchemaMismatch: |no reply within )"
)


@pytest.fixture(scope="module", autouse=True)
def task_identity() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        set_flower_task_identity(patch)
        yield


@dataclass
class Round:
    """One privacy mode's server side and the clients' sealers; each call of ``plan`` opens a fresh round."""

    privacy: PrivacyConfig
    opener: ServerOpener
    public_key: str
    server_round: int = 0
    sealers: dict[int, ClientSealer] = field(default_factory=dict)

    def plan(self, compression: str = "none") -> ReplyPlan:
        self.server_round += 1
        self.opener.start_round(self.server_round)
        overhead = sealed_delta_overhead(SCHEMA.schema_id) if self.privacy.sealed else 0
        limit = blob_limit(compression)
        return ReplyPlan(
            opener=self.opener,
            validator=DeltaValidator(SCHEMA, max_bytes=limit),
            optimizer=ServerOptimizer(FedAvgConfig(), SCHEMA),
            server_round=self.server_round,
            timeout=5.0,
            max_payload=limit + overhead,
            max_examples=LIMIT,
        )

    def sealed(self, node: int, blob: bytes, count: int) -> bytes:
        if node not in self.sealers:
            self.sealers[node] = ClientSealer.from_config(self.privacy, RUN_ID, node, self.public_key)
        return self.sealers[node].seal_delta(blob, count, self.server_round, SCHEMA.schema_id)


@pytest.fixture(scope="module")
def plain() -> Round:
    return Round(PrivacyConfig(mode="none"), ServerOpener(PrivacyConfig(mode="none"), RUN_ID, None), "")


@pytest.fixture(scope="module")
def aead(tmp_path_factory: pytest.TempPathFactory) -> Round:
    keys = generate_server_keys(tmp_path_factory.mktemp("keys"))
    privacy = PrivacyConfig(mode="aead")
    return Round(
        privacy, ServerOpener(privacy, RUN_ID, keys.private_path, str(keys.public_path)), str(keys.public_path)
    )


@functools.cache
def blob_limit(compression: str) -> int:
    return max_blob_size(SCHEMA, "shared", compression)  # type: ignore[arg-type]


@functools.cache
def blob_of(seed: int, compression: str = "none") -> bytes:
    return serialize_state(delta(seed), SCHEMA, "shared", compression)  # type: ignore[arg-type]


def zeros() -> State:
    return {n: torch.zeros(s) for n, s in SHAPES.items()}


def delta(seed: int, scale: float = 1.0) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=gen) for n, s in SHAPES.items()}


def original(node: int) -> Message:
    message = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    message.metadata.__dict__["_message_id"] = f"m{node}"
    return message


def reply(node: int, payload: bytes | Array | None, metrics: dict[str, Any] | None) -> Message:
    content = RecordDict()
    if payload is not None:
        array = payload if isinstance(payload, Array) else Array(np.frombuffer(payload, dtype=np.uint8))
        content[protocol.ARRAYS] = ArrayRecord({protocol.ADAPTER_DELTA: array})
    if metrics is not None:
        content[protocol.METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=original(node))


def honest(rnd: Round, node: int, state: State | int, count: int, compression: str = "none") -> Message:
    """Node's reply as an honest client sends it; ``state`` may be a seed of ``delta`` (serialized once)."""
    if isinstance(state, int):
        blob = blob_of(state, compression)
    else:
        blob = serialize_state(state, SCHEMA, "shared", compression)  # type: ignore[arg-type]
    if rnd.privacy.sealed:
        return reply(node, rnd.sealed(node, blob, count), {"partition-id": node - 100})
    return reply(node, blob, {"partition-id": node - 100, protocol.NUM_EXAMPLES: count})


def reasons(fields: dict[str, Any]) -> dict[str, str]:
    return {r["client"]: r["reason"] for r in fields["rejected"]}


def honest_mean(states: Iterable[tuple[State, int]]) -> State:
    mean = StreamingFedAvg(SCHEMA)
    for state, count in states:
        mean.add(state, count)
    return mean.result()


# --- the attacks of issue 16 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "aead"])
def test_99_honest_clients_and_one_claiming_10_15_examples_average_to_the_honest_mean(
    mode: str, request: pytest.FixtureRequest
) -> None:
    rnd: Round = request.getfixturevalue(mode)
    plan = rnd.plan()
    honest_replies = [(100 + i, honest(rnd, 100 + i, delta(i), 20 + i)) for i in range(99)]
    liar = (199, honest(rnd, 199, delta(999, scale=100.0), 10**15))
    state, fields, _ = fold_plain_replies([*honest_replies, liar], zeros(), plan)
    expected = honest_mean((delta(i), 20 + i) for i in range(99))
    assert fields["accepted"] == 99
    assert reasons(fields) == {"client 99 (node 199)": "num-examples 1000000000000000 exceeds limit 10000"}
    for name in SHAPES:
        torch.testing.assert_close(state[name], expected[name], atol=1e-6, rtol=0)


def test_a_sealed_count_of_2_64_minus_1_is_a_rejection_and_the_round_completes(aead: Round) -> None:
    plan = aead.plan()
    replies = [(101, honest(aead, 101, delta(1), 5)), (102, honest(aead, 102, delta(2), 2**64 - 1))]
    state, fields, _ = fold_plain_replies(replies, zeros(), plan)
    assert fields["accepted"] == 1
    assert reasons(fields) == {"client 2 (node 102)": f"num-examples {2**64 - 1} exceeds limit 10000"}
    torch.testing.assert_close(state, delta(1))


def _nested_header_blob() -> bytes:
    header = b"[" * 3000 + b"]" * 3000  # the stdlib parser alone raises RecursionError beyond ~1000
    return struct.pack("<Q", len(header)) + header


def _nested_scales_blob() -> bytes:
    good = serialize_state(delta(3), SCHEMA, "shared", "int8")
    return safetensors_save(
        dict(safetensors_load(good)), metadata={**read_metadata(good), "int8_scales": "[" * 3000 + "]" * 3000}
    )


@pytest.mark.parametrize("mode", ["plain", "aead"])
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_nested_header_blob, "StateError: blob is not safetensors: header: JSON nested 3000 levels deep"),
        (_nested_scales_blob, "StateError: blob's int8 scales: JSON nested 3000 levels deep"),
    ],
)
def test_nested_json_in_a_delta_is_a_named_rejection(
    mode: str, make: Any, reason: str, request: pytest.FixtureRequest
) -> None:
    rnd: Round = request.getfixturevalue(mode)
    # As for a model whose legal blobs take a megabyte: the size cap alone does not stop 6 KB of brackets.
    plan = dataclasses.replace(rnd.plan(), validator=DeltaValidator(SCHEMA, max_bytes=2**20), max_payload=2**20 + 1024)
    blob = make()
    payload = rnd.sealed(102, blob, 3) if rnd.privacy.sealed else blob
    bad = reply(102, payload, {"partition-id": 2} | ({} if rnd.privacy.sealed else {protocol.NUM_EXAMPLES: 3}))
    state, fields, _ = fold_plain_replies([(101, honest(rnd, 101, delta(1), 4, "int8")), (102, bad)], zeros(), plan)
    assert fields["accepted"] == 1
    assert reasons(fields)["client 2 (node 102)"].startswith(reason)


@pytest.mark.parametrize("mode", ["plain", "aead"])
def test_an_oversize_payload_is_rejected_before_it_is_decoded(
    mode: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    rnd: Round = request.getfixturevalue(mode)
    plan = rnd.plan()
    big = reply(102, bytes(plan.max_payload + 1), {"partition-id": 2, protocol.NUM_EXAMPLES: 3})
    good = honest(rnd, 101, delta(1), 4)
    decoded: list[int] = []
    real_numpy = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(len(self.data)) or real_numpy(self))
    _, fields, _ = fold_plain_replies([(101, good), (102, big)], zeros(), plan)
    assert fields["accepted"] == 1 and len(decoded) == 1  # only the honest payload was decoded
    cap = plan.max_payload
    assert reasons(fields) == {"node 102": f"payload of {cap + 1} bytes exceeds the {cap} the largest legal one takes"}


def _beside(array: Array | None = None, record: Any = None) -> Message:
    """An honest reply of node 102 with an array or a record the server did not ask for beside it."""
    message = honest_reply_102()
    if array is not None:
        message.content[protocol.ARRAYS]["junk"] = array
    if record is not None:
        message.content["junk"] = record
    return message


def honest_reply_102() -> Message:
    return reply(102, blob_of(2), {"partition-id": 2, protocol.NUM_EXAMPLES: 3})


def _npz() -> bytes:
    """An .npz archive: np.load reads it as an NpzFile, not an array."""
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(3, np.uint8))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: reply(102, None, {"partition-id": 2}), "malformed reply: no arrays/adapter-delta array"),
        (lambda: reply(102, b"x", None), "malformed reply: no metrics record"),
        (lambda: reply(102, Array(np.zeros(8, np.float32)), {}), "malformed reply: the payload must be a 1-D uint8"),
        (lambda: reply(102, Array(np.zeros((2, 2), np.uint8)), {}), "malformed reply: the payload must be a 1-D uint8"),
        (
            lambda: reply(102, Array(dtype="uint8", shape=(3,), stype="numpy.ndarray", data=_npz()), {}),
            "malformed reply: the payload array's",
        ),
        (lambda: reply(102, b"x", {"accuracy": [0.5, 0.7]}), "malformed reply: metric 'accuracy' is a list"),
        (lambda: _beside(array=Array(np.zeros(2**20, np.uint8))), "malformed reply: unexpected array 'junk' beside"),
        (
            lambda: _beside(record=ArrayRecord({"x": Array(np.zeros(2**20, np.uint8))})),
            "malformed reply: unexpected record",
        ),
        (lambda: _beside(record=MetricRecord({"x": 1})), "malformed reply: unexpected record 'junk' beside arrays"),
        (lambda: reply(102, b"x", {"accuracy": float("nan")}), "malformed reply: metric 'accuracy' is nan"),
        (lambda: reply(102, b"x", {"partition-id": -4}), "malformed reply: partition-id must be a non-negative int"),
        (lambda: reply(102, b"x", {f"m{i}": 1 for i in range(65)}), "malformed reply: 65 metrics, at most 64"),
        (
            lambda: Message(Error(code=3, reason="ValueError: out of memory"), reply_to=original(102)),
            "client error: ValueError: out of memory",
        ),
    ],
)
def test_malformed_replies_are_named_rejections(plain: Round, make: Any, reason: str) -> None:
    plan = plain.plan()
    _, fields, metrics = fold_plain_replies([(101, honest(plain, 101, delta(1), 4)), (102, make())], zeros(), plan)
    assert fields["accepted"] == 1 and fields["uploads"] == 1 and len(metrics) == 1
    assert reasons(fields)["node 102"].startswith(reason)


@pytest.mark.parametrize("count", [0, -1, True, 2.5, float("nan"), 2**63 - 1, 10**15, [3]])
def test_bad_clear_counts_are_named_rejections(plain: Round, count: Any) -> None:
    plan = plain.plan()
    blob = serialize_state(delta(2), SCHEMA, "shared", "none")
    try:
        bad = reply(102, blob, {"partition-id": 2, protocol.NUM_EXAMPLES: count})
    except TypeError:  # Flower's MetricRecord itself refuses a bool
        return
    _, fields, _ = fold_plain_replies([(101, honest(plain, 101, delta(1), 4)), (102, bad)], zeros(), plan)
    assert fields["accepted"] == 1
    ((client, text),) = reasons(fields).items()
    assert NAMED.match(text) and ("count" in text or "num" in text or "metric" in text), text


# --- fuzz ------------------------------------------------------------------------------------------------------


def _mutate(blob: bytes, data: st.DataObject) -> bytes:
    """A hostile variant of a valid blob: bytes flipped, cut, added, or the header length or JSON changed."""
    kind = data.draw(st.sampled_from(["flip", "cut", "extend", "length", "header", "random", "same"]))
    if kind == "flip":
        index = data.draw(st.integers(0, len(blob) - 1))
        return blob[:index] + bytes([blob[index] ^ data.draw(st.integers(1, 255))]) + blob[index + 1 :]
    if kind == "cut":
        return blob[: data.draw(st.integers(0, len(blob) - 1))]
    if kind == "extend":
        return blob + data.draw(st.binary(min_size=1, max_size=64))
    if kind == "length":
        return struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + blob[8:]
    if kind == "header":
        header = data.draw(
            st.sampled_from([b"[" * 3000 + b"]" * 3000, b"{}", b"null", b'{"__metadata__": 5}', b'{"a":' * 40])
        )
        return struct.pack("<Q", len(header)) + header + blob[8:]
    if kind == "random":
        return data.draw(st.binary(max_size=600))
    return blob


_COUNTS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, LIMIT, LIMIT + 1, 2**53 + 1, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(0, 5), max_size=3),
)
_SEALED_COUNTS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, LIMIT, LIMIT + 1, 2**64 - 1]))


def _fuzzed_reply(rnd: Round, data: st.DataObject) -> tuple[Message, bool]:
    """A hostile reply from node 102 and whether it is exactly what an honest client sends."""
    node = 102
    compression = data.draw(st.sampled_from(["none", "fp16", "int8"]))
    blob = blob_of(data.draw(st.integers(0, 3)), compression)
    mutated = _mutate(blob, data)
    shape = data.draw(st.sampled_from(["ok", "ok", "ok", "error", "no-array", "no-metrics", "dtype", "metrics"]))
    if shape == "error":
        return Message(Error(code=0, reason=data.draw(st.text(max_size=400))), reply_to=original(node)), False
    metrics: dict[str, Any] = {"partition-id": data.draw(st.integers(-3, 2**63 - 1))}
    count: Any = data.draw(_SEALED_COUNTS if rnd.privacy.sealed else _COUNTS)
    if rnd.privacy.sealed:
        payload = rnd.sealed(node, mutated, count)
        payload = _mutate(payload, data) if data.draw(st.booleans()) else payload
    else:
        payload, metrics[protocol.NUM_EXAMPLES] = mutated, count
    if shape == "metrics":
        metrics[data.draw(st.text(max_size=80))] = data.draw(
            st.one_of(st.floats(), st.integers(-(2**63), 2**63 - 1), st.lists(st.floats(), max_size=3))
        )
    array: bytes | Array = payload
    if shape == "dtype":
        array = Array(np.frombuffer(payload[: len(payload) // 4 * 4], dtype=np.float32))
    try:
        message = reply(node, None if shape == "no-array" else array, None if shape == "no-metrics" else metrics)
    except (TypeError, ValueError):  # Flower's records refuse it: no client can send it
        message = reply(node, payload, {"partition-id": 2})
    valid = shape == "ok" and mutated == blob and isinstance(count, int) and 0 < count <= LIMIT
    return message, valid and metrics["partition-id"] >= 0


def _check_fuzzed_round(rnd: Round, data: st.DataObject) -> None:
    plan = rnd.plan()
    bad, valid = _fuzzed_reply(rnd, data)
    _, fields, _ = fold_plain_replies([(101, honest(rnd, 101, 9, 3)), (102, bad)], zeros(), plan)
    rejected = reasons(fields)
    assert "client 1 (node 101)" not in rejected, rejected  # the honest client always gets in
    assert fields["accepted"] == (2 if not rejected else 1), fields
    for text in rejected.values():
        assert NAMED.match(text), text
    if not valid:
        # An invalid reply may only get in if it decodes to a legal delta with a legal count (a flipped
        # byte in a tensor value, a float count equal to an int, ...): never silently, never by crashing.
        assert rejected or fields["accepted"] == 2


@settings(max_examples=6_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_plain_replies_end_accepted_or_as_named_rejections(plain: Round, data: st.DataObject) -> None:
    _check_fuzzed_round(plain, data)


@settings(max_examples=4_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_aead_replies_end_accepted_or_as_named_rejections(aead: Round, data: st.DataObject) -> None:
    _check_fuzzed_round(aead, data)


# --- the reply stream ------------------------------------------------------------------------------------------


@dataclass
class TimedGrid(StubGrid):
    """Replies become available at given pulls (node -> pull index); nodes not listed never answer."""

    ready_at: dict[int, int]
    pulls: int = 0
    held: int = 0  # the most replies handed out by one pull
    asked: int = 0  # the most message ids asked for in one pull

    def get_node_ids(self) -> Iterable[int]:
        return list(self.ready_at)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.sent = {m.metadata.dst_node_id: f"id{m.metadata.dst_node_id}" for m in messages}
        return list(self.sent.values())

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        self.asked = max(self.asked, len(wanted))
        out = []
        for node, at in self.ready_at.items():
            if at <= self.pulls and self.sent[node] in wanted:
                message = original(node)
                message.metadata.__dict__["_message_id"] = self.sent[node]
                out.append(Message(RecordDict(), reply_to=message))
                out.append(Message(RecordDict(), reply_to=message))  # a duplicate is ignored
        out.append(Message(RecordDict(), reply_to=original(999)))  # a reply to nothing we sent is ignored
        self.held = max(self.held, len(out))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("the plain round pulls replies as they arrive")


def test_the_reply_stream_yields_replies_as_they_arrive_then_the_missing_ones_at_the_deadline() -> None:
    grid = TimedGrid({101: 3, 102: 1, 103: 2, 104: 10_000})
    messages = [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in grid.ready_at]
    order = [(node, reply is not None) for node, reply in reply_stream(grid, messages, 0.5, poll_seconds=0.01)]
    assert order == [(102, True), (103, True), (101, True), (104, False)]
    assert 4 <= grid.pulls <= 60  # polled until the 0.5 s deadline, at 10 ms intervals


def test_the_reply_stream_pulls_a_few_replies_at_a_time_even_when_all_are_ready() -> None:
    """Flower builds every reply a pull returns before handing any over: one pull for 100 ready replies held
    them all at once (review of issue 16). At most 4 message ids per pull keep the server at a few replies."""
    grid = TimedGrid({n: 1 for n in range(100, 200)})
    messages = [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in grid.ready_at]
    answered = [node for node, reply in reply_stream(grid, messages, 5.0, poll_seconds=0.01) if reply is not None]
    assert sorted(answered) == list(range(100, 200))
    assert grid.asked == 4 and grid.held <= 2 * 4 + 1  # 4 replies, their duplicates and one stray reply
    assert grid.pulls == 25


def test_the_reply_stream_stops_polling_once_every_message_is_answered() -> None:
    grid = TimedGrid({101: 1, 102: 2})
    messages = [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in grid.ready_at]
    assert [node for node, _ in reply_stream(grid, messages, 60.0, poll_seconds=0.01)] == [101, 102]
    assert grid.pulls == 2
