"""The server's SecAgg+ round against hostile stage replies: every client byte ends as that node's named drop.

Drives ``server.secure_round.run_secure_round`` on an in-process grid whose clients are
``fedadapt.privacy.secagg.client``'s functions (no model, no training: random deltas), in mode secagg+ with
sealed payloads, and lets a test replace one node's reply at one stage.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from helpers import StubGrid, set_flower_task_identity
from test_secagg import RUN_ID, device, secagg

from fedadapt.delta.state import AdapterSchema, TensorSpec
from fedadapt.fleet import protocol
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.keys import KeyFiles, generate_server_keys
from fedadapt.privacy.secagg import client, stages
from fedadapt.privacy.transport import ClientSealer, ServerOpener

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from server.federation import _weighted_accuracy  # noqa: E402
from server.secure_round import SecureRoundOutcome, run_secure_round, stage_limits  # noqa: E402

ROUND = 4
NODES = [101, 102, 103, 104, 105]
HOSTILE = 103


def schema_of(values: int) -> AdapterSchema:
    return AdapterSchema({"name": "lora", "r": 1}, "fp-secagg", (TensorSpec("w", (values,), "float32", "shared", "x"),))


@pytest.fixture(scope="module", autouse=True)
def task_identity() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        set_flower_task_identity(patch)
        yield


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return generate_server_keys(tmp_path_factory.mktemp("keys"))


# (node's honest reply) -> what the server receives instead
Tamper = Callable[[Message], Message]


@dataclass
class SecureGrid(StubGrid):
    """Nodes answer each stage with ``fedadapt.privacy.secagg.client`` in this process, keeping their sessions."""

    privacy: PrivacyConfig
    schema: AdapterSchema
    public_key: str
    nodes: list[int] = field(default_factory=lambda: list(NODES))
    tamper: dict[tuple[int, str], Tamper] = field(default_factory=dict)
    sessions: dict[int, bytes] = field(default_factory=dict)
    crash: set[tuple[int, str]] = field(default_factory=set)  # (node, stage) whose ClientApp raises

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._answer(message) for message in messages]

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        config = message.content.config_records[protocol.CONFIG]
        stage = str(config[protocol.SECAGG_STAGE])
        request = message.content.array_records[protocol.ARRAYS][protocol.SECAGG_PAYLOAD].numpy().tobytes()
        try:
            if (node, stage) in self.crash:
                raise RuntimeError("device lost")
            payload = self._step(node, stage, request)
        except Exception as err:  # Flower's runtime turns a ClientApp exception into an error reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        sealed = ClientSealer.from_config(self.privacy, RUN_ID, node, self.public_key).seal(
            payload, ROUND, self.schema.schema_id, stage
        )
        content = RecordDict({protocol.ARRAYS: ArrayRecord({protocol.SECAGG_PAYLOAD: _array(sealed)})})
        if stage == stages.MASKED:
            content[protocol.METRICS] = MetricRecord({"partition-id": node - 101, "accuracy": 0.5})
        reply = Message(content=content, reply_to=message)
        hook = self.tamper.get((node, stage))
        return hook(reply) if hook is not None else reply

    def _step(self, node: int, stage: str, request: bytes) -> bytes:
        identity, saved = device(node, self.nodes), self.sessions.get(node, b"")
        if stage == stages.SETUP:
            step = client.setup(self.privacy, ROUND, node, request, identity, saved=saved)
        elif stage == stages.SHARE_KEYS:
            step = client.share_keys(self.privacy, ROUND, saved, request, identity)
        elif stage == stages.MASKED:
            session = client.receive_shares(self.privacy, ROUND, saved, request)
            delta = np.random.default_rng(node).normal(0.0, 0.1, self.schema.num_params("shared"))
            step = client.mask(self.privacy, ROUND, session, delta, 10)
        elif stage == stages.CONSISTENCY:
            step = client.consistency(ROUND, saved, request, identity)
        else:
            step = client.unmask(self.privacy, ROUND, saved, request)
        self.sessions[node] = step.session
        return step.reply


def _array(blob: bytes) -> Array:
    return Array(np.frombuffer(blob, dtype=np.uint8))


def secure_round(grid: SecureGrid, keys: KeyFiles) -> SecureRoundOutcome:
    opener = ServerOpener(grid.privacy, RUN_ID, keys.private_path, grid.public_key)
    opener.start_round(ROUND)
    return run_secure_round(
        grid,
        sorted(grid.nodes),
        ROUND,
        privacy=grid.privacy,
        schema=grid.schema,
        opener=opener,
        global_blob=b"global",
        timeout=5.0,
        seed=3,
        run_id=RUN_ID,
    )


def dropped(outcome: SecureRoundOutcome) -> dict[str, str]:
    return {d["client"]: f"{d['stage']}: {d['reason']}" for d in outcome.record["dropped"]}


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(3, np.uint8))
    return buffer.getvalue()


def _with_payload(array: Array) -> Tamper:
    def tamper(reply: Message) -> Message:
        reply.content[protocol.ARRAYS] = ArrayRecord({protocol.SECAGG_PAYLOAD: array})
        return reply

    return tamper


def _with_metrics(metrics: dict[str, Any]) -> Tamper:
    def tamper(reply: Message) -> Message:
        reply.content[protocol.METRICS] = MetricRecord(metrics)
        return reply

    return tamper


def _beside(array: bool) -> Tamper:
    """A reply with a 1 MiB array the server did not ask for, in the payload's record or a record of its own."""

    def tamper(reply: Message) -> Message:
        junk = Array(np.zeros(2**20, np.uint8))
        if array:
            reply.content[protocol.ARRAYS]["junk"] = junk
        else:
            reply.content["junk"] = ArrayRecord({"junk": junk})
        return reply

    return tamper


# --- (A) one client's stage reply cannot end the run ------------------------------------------------------------

HOSTILE_REPLIES: list[tuple[str, Callable[[], Tamper], str]] = [
    (
        "empty .npy data",
        lambda: _with_payload(Array(dtype="uint8", shape=(0,), stype="numpy.ndarray", data=b"")),
        "malformed reply: the payload array does not decode",
    ),
    (
        ".npz data",
        lambda: _with_payload(Array(dtype="uint8", shape=(3,), stype="numpy.ndarray", data=_npz())),
        "malformed reply: the payload array",
    ),
    (
        "float payload",
        lambda: _with_payload(Array(np.zeros(8, np.float32))),
        "malformed reply: the payload must be a 1-D uint8",
    ),
    ("accuracy as a list", lambda: _with_metrics({"accuracy": [0.5, 0.7]}), "malformed reply: metric 'accuracy'"),
    ("accuracy nan", lambda: _with_metrics({"accuracy": float("nan")}), "malformed reply: metric 'accuracy' is nan"),
    ("negative partition", lambda: _with_metrics({"partition-id": -3}), "malformed reply: partition-id must be"),
    ("an extra array", lambda: _beside(array=True), "malformed reply: unexpected array 'junk' beside secagg-payload"),
    ("an extra record", lambda: _beside(array=False), "malformed reply: unexpected record 'junk' beside arrays"),
]


@pytest.mark.parametrize("stage", [stages.SETUP, stages.MASKED])
@pytest.mark.parametrize(("name", "make", "reason"), HOSTILE_REPLIES, ids=[c[0] for c in HOSTILE_REPLIES])
def test_a_hostile_stage_reply_is_that_nodes_named_drop_and_the_round_completes(
    keys: KeyFiles, stage: str, name: str, make: Callable[[], Tamper], reason: str
) -> None:
    grid = SecureGrid(secagg(3, 2), schema_of(32), str(keys.public_path), tamper={(HOSTILE, stage): make()})
    outcome = secure_round(grid, keys)
    assert "error" not in outcome.record, outcome.record
    assert outcome.mean is not None and outcome.record["accepted"] == 4
    (client_name,) = dropped(outcome)
    assert client_name == f"node {HOSTILE}"
    assert dropped(outcome)[client_name].startswith(f"{stage}: {reason}"), dropped(outcome)
    for metrics in outcome.client_metrics:  # every metric kept is a finite number
        assert all(isinstance(v, int | float) and np.isfinite(v) for k, v in metrics.items() if k != "client")
    assert _weighted_accuracy(outcome.client_metrics, 10_000) == pytest.approx(0.5)


@pytest.mark.parametrize("stage", [stages.SETUP, stages.SHARE_KEYS, stages.MASKED, stages.CONSISTENCY, stages.UNMASK])
def test_a_stage_payload_over_its_cap_is_dropped_before_it_is_decoded(keys: KeyFiles, stage: str) -> None:
    privacy = secagg(3, 2)
    schema = schema_of(32)
    cap = stage_limits(privacy, 32, schema.schema_id)[stage]
    tamper = {(HOSTILE, stage): _with_payload(_array(bytes(cap + 1)))}
    outcome = secure_round(SecureGrid(privacy, schema, str(keys.public_path), tamper=tamper), keys)
    reason = f"{stage}: payload of {cap + 1} bytes exceeds the {cap} the largest legal one takes"
    if stage == stages.UNMASK:  # its shares are not needed: its own vector is recovered from its neighbours' shares
        assert outcome.mean is not None and outcome.record["accepted"] == 5
        assert outcome.record["recovered"] == [f"client 2 (node {HOSTILE})"]
        return
    label = f"client 2 (node {HOSTILE})" if stage == stages.CONSISTENCY else f"node {HOSTILE}"  # it sent metrics
    assert dropped(outcome) == {label: reason}
    if stage == stages.CONSISTENCY:  # its neighbours get no signature of it and refuse: the round fails, recorded
        assert outcome.mean is None and "cannot be rebuilt" in outcome.record["error"]
        return
    assert outcome.mean is not None and outcome.record["accepted"] == 4


def test_the_masked_stage_cap_is_the_vector_exactly(keys: KeyFiles) -> None:
    privacy = secagg(3, 2, modulus_bits=64)
    schema = schema_of(1000)
    grid = SecureGrid(privacy, schema, str(keys.public_path))
    sizes: list[int] = []

    def measure(reply: Message) -> Message:
        sizes.append(len(reply.content.array_records[protocol.ARRAYS][protocol.SECAGG_PAYLOAD].numpy()))
        return reply

    grid.tamper = {(node, stages.MASKED): measure for node in NODES}
    outcome = secure_round(grid, keys)
    assert outcome.record["accepted"] == 5
    assert set(sizes) == {stage_limits(privacy, 1000, schema.schema_id)[stages.MASKED]}  # (1000 + 2) × 8 + framing


def test_an_unexpected_exception_in_a_stage_is_the_rounds_recorded_error(
    keys: KeyFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedadapt.privacy.secagg.server import SecAggRound

    def broken(self: SecAggRound, replies: object, failed: object) -> None:
        raise OverflowError("a check nobody foresaw")

    monkeypatch.setattr(SecAggRound, "consistency_received", broken)
    outcome = secure_round(SecureGrid(secagg(3, 2), schema_of(32), str(keys.public_path)), keys)
    assert outcome.mean is None
    assert outcome.record["error"] == "secure aggregation failed: unexpected OverflowError: a check nobody foresaw"


@pytest.mark.parametrize(
    "accuracy",
    [[0.5, 0.7], "0.9", float("nan"), float("inf"), -0.5, 7.0, True, None, {"a": 1}, 10**400],
    ids=["list", "str", "nan", "inf", "negative", "above-1", "bool", "none", "dict", "huge-int"],
)
def test_a_non_numeric_or_out_of_range_accuracy_is_left_out_of_the_score(accuracy: Any) -> None:
    metrics = [
        {"client": "a", "accuracy": 0.8, "test-examples": 30},
        {"client": "b", "accuracy": 0.2, "test-examples": 10},
        {"client": "c", "accuracy": accuracy, "test-examples": 10_000},
        {"client": "d", "accuracy": 0.4, "test-examples": [3]},  # an unusable count counts once
    ]
    assert _weighted_accuracy(metrics, 10_000) == pytest.approx((0.8 * 30 + 0.2 * 10 + 0.4) / 41)


# --- (B) the masked stage folds each vector into the sum before it pulls the next ------------------------------


def test_each_masked_vector_is_in_the_sum_before_the_next_pull(keys: KeyFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the review's fix the server collected every masked vector of the round (O(clients × model)) and
    only then summed them. Now, at every pull of the masked stage, each vector pulled so far is already in the
    running sum, and a pull asks for at most 4 replies."""
    from fedadapt.privacy.secagg.server import SecAggRound
    from server.replies import PULL_BATCH

    rounds: list[SecAggRound] = []
    real_init = SecAggRound.__post_init__

    def keep(self: SecAggRound) -> None:
        real_init(self)
        rounds.append(self)

    monkeypatch.setattr(SecAggRound, "__post_init__", keep)
    nodes = list(range(101, 115))
    grid = SecureGrid(secagg(3, 2), schema_of(64), str(keys.public_path), nodes=nodes)
    handed: list[int] = []  # masked replies handed out so far
    unsummed: list[int] = []  # at each masked-stage pull: vectors handed out but not yet in the sum
    batches: list[int] = []
    real_answer = grid._answer

    def answer(message: Message) -> Message:
        stage = str(message.content.config_records[protocol.CONFIG][protocol.SECAGG_STAGE])
        if stage == stages.MASKED:
            handed.append(message.metadata.dst_node_id)
        return real_answer(message)

    real_send = grid.send_and_receive

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = str(messages[0].content.config_records[protocol.CONFIG][protocol.SECAGG_STAGE])
        if stage == stages.MASKED:
            unsummed.append(len(handed) - len(rounds[0]._masked))
            batches.append(len(messages))
        return real_send(messages, timeout=timeout)

    grid._answer = answer  # type: ignore[method-assign]
    grid.send_and_receive = send_and_receive  # type: ignore[method-assign]
    outcome = secure_round(grid, keys)
    assert outcome.mean is not None and outcome.record["accepted"] == len(nodes)
    assert unsummed == [0] * len(batches) and max(batches) == PULL_BATCH and sum(batches) == len(nodes)
    assert outcome.record["stages"][stages.MASKED]["replies"] == len(nodes)


def test_a_failed_masked_reply_is_recorded_as_that_nodes_drop(keys: KeyFiles) -> None:
    grid = SecureGrid(secagg(3, 2), schema_of(32), str(keys.public_path), crash={(HOSTILE, stages.MASKED)})
    outcome = secure_round(grid, keys)
    assert outcome.mean is not None and outcome.record["accepted"] == 4
    assert dropped(outcome) == {f"node {HOSTILE}": f"{stages.MASKED}: client error: RuntimeError: device lost"}
