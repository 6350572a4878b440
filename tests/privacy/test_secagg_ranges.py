"""Issue 17: every integer a SecAgg+ stage receives is range-checked and refused with the protocol's error.

Rounds come from the server's messages, node ids from field names; a negative, huge, bool or non-integer
value is a SecAggError that names the field, never an OverflowError, a ValueError or a silent truncation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from helpers import set_flower_task_identity
from test_secagg import ROUND, Trace, expect_refusal, run_round, secagg

from fedadapt.errors import SecAggError
from fedadapt.fleet import protocol
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.secagg import client, stages, wire
from fedadapt.privacy.secagg.server import SecAggRound
from fedadapt.privacy.transport import ClientSealer

BAD_ROUNDS: list[object] = [-1, -(2**70), 2**64, 2**100, True, False, 3.0, np.float64(3.0), "3", None]
ROUND_ERROR = "the round must be an integer in [0, 2**64)"


@pytest.fixture(scope="module")
def before_masked() -> Trace:
    return run_round(3, 8, stop_before=stages.MASKED)


def _stage_calls(trace: Trace, value: object) -> dict[str, Callable[[], object]]:
    """Each client stage function called with ``value`` as the round and otherwise what it would get."""
    node = trace.nodes[0]
    config, saved, device = trace.config, trace.sessions[node], trace.devices[node]
    return {
        "setup": lambda: client.setup(config, value, node, trace.requests[stages.SETUP][node], device),  # type: ignore[arg-type]
        "share-keys": lambda: client.share_keys(config, value, saved, b"", device),  # type: ignore[arg-type]
        "receive-shares": lambda: client.receive_shares(config, value, saved, trace.requests[stages.MASKED][node]),  # type: ignore[arg-type]
        "mask": lambda: client.mask(config, value, saved, trace.deltas[node], 5),  # type: ignore[arg-type]
        "consistency": lambda: client.consistency(value, saved, b"", device),  # type: ignore[arg-type]
        "unmask": lambda: client.unmask(config, value, saved, b""),  # type: ignore[arg-type]
    }


STAGE_FUNCTIONS = ["setup", "share-keys", "receive-shares", "mask", "consistency", "unmask"]


@pytest.mark.parametrize("value", BAD_ROUNDS, ids=repr)
@pytest.mark.parametrize("stage", STAGE_FUNCTIONS)
def test_every_client_stage_refuses_a_round_outside_uint64(before_masked: Trace, stage: str, value: object) -> None:
    """Was: receive-shares took round 3.0 as round 3, and the others blamed the stage order for round -1."""
    expect_refusal(_stage_calls(before_masked, value)[stage], ROUND_ERROR, repr(value)[:20])


# --- the ClientApp reads the round from the server's message ----------------------------------------------------

MISSING = object()
APP_ROUNDS: list[object] = [-1, 2**64, True, 3.5, float("inf"), float("nan"), "3", b"3", [3], MISSING]


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_flower_task_identity(monkeypatch)


def _answer(config: dict[str, object], tmp_path: Path) -> tuple[Callable[[], object], Context]:
    """The ClientApp's answer to a stage message with ``config``, to call; and the device's context."""
    from clients.device import Device
    from clients.secure import run_stage

    privacy = PrivacyConfig(mode="secagg+", num_shares=3, reconstruction_threshold=2)
    run = SimpleNamespace(scenario=SimpleNamespace(privacy=privacy))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    request = wire.pack({stages.NEIGHBOURS: wire.pack_ids([8, 9])})
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({protocol.SECAGG_PAYLOAD: Array(np.frombuffer(request, np.uint8))}),
            protocol.CONFIG: ConfigRecord(config),  # type: ignore[arg-type]
        }
    )
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)
    sealer = ClientSealer(privacy, run_id=1, node_id=7)
    device = Device(2, tmp_path)
    return lambda: run_stage(message, context, run, sealer, device), context  # type: ignore[arg-type]


@pytest.mark.parametrize("value", APP_ROUNDS, ids=lambda v: "missing" if v is MISSING else repr(v))
@pytest.mark.parametrize("stage", stages.STAGES)
def test_the_client_app_refuses_a_message_round_outside_uint64(
    tmp_path: Path, task_identity: None, stage: str, value: object
) -> None:
    """Was: int(config["server-round"]): OverflowError for inf, ValueError for nan and "3"-like text, TypeError
    for a list, KeyError when missing; True and 3.5 went on as rounds 1 and 3."""
    config: dict[str, object] = {protocol.SCHEMA_ID: "s", protocol.SECAGG_STAGE: stage}
    if value is not MISSING:
        config[protocol.SERVER_ROUND] = value
    answer, context = _answer(config, tmp_path)
    shown = "None" if value is MISSING else repr(value)[:20]
    expect_refusal(answer, "the message's server-round must be an integer in [0, 2**64)", shown)
    assert protocol.SECAGG_SESSION not in context.state.config_records  # nothing was kept for such a message


def test_the_client_app_refuses_a_stage_that_is_not_a_string(tmp_path: Path, task_identity: None) -> None:
    config = {protocol.SCHEMA_ID: "s", protocol.SECAGG_STAGE: stages.SETUP.encode(), protocol.SERVER_ROUND: 3}
    answer, _ = _answer(config, tmp_path)  # type: ignore[arg-type]
    expect_refusal(answer, "unknown secure-aggregation stage b'secagg-setup'")


# --- node ids in field names -----------------------------------------------------------------------------------


def test_one_neighbours_share_forwarded_under_two_names_is_refused(before_masked: Trace) -> None:
    """Was: ``share/017`` read as node 17, so one share counted twice towards reconstruction-threshold − 1
    (the withheld-shares check) and the session then held node 17 twice (a PayloadError in the next stage)."""
    trace = run_round(5, 8, secagg(5, 4), stop_before=stages.MASKED)
    node = trace.nodes[0]
    fields = wire.unpack(trace.requests[stages.MASKED][node])
    name, share = next(iter(fields.items()))
    other = name.removeprefix(stages.SHARE)
    for alias in ("0" + other, "00" + other):
        forged = {name: share, stages.SHARE + alias: share}
        expect_refusal(
            lambda forged=forged: client.receive_shares(trace.config, ROUND, trace.sessions[node], wire.pack(forged)),  # type: ignore[misc]
            "not a share from a neighbour",
        )


@pytest.mark.parametrize(
    ("name", "node"),
    [("b/0", 0), ("b/17", 17), (f"b/{2**64 - 1}", 2**64 - 1), ("b/017", None), ("b/00", None), (f"b/{2**64}", None)],
)
def test_node_of_reads_only_canonical_uint64_ids(name: str, node: int | None) -> None:
    assert stages.node_of(name, stages.SEED_SHARE) == node


# --- the server's round -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"vector_length": -1}, "vector length"),
        ({"vector_length": 2.0}, "vector length"),
        ({"vector_length": True}, "vector length"),
        ({"seed": -1}, "seed"),
        ({"seed": "x"}, "seed"),
        ({"max_examples_per_client": 0}, "max-examples-per-client"),
        ({"max_examples_per_client": -5}, "max-examples-per-client"),
        ({"max_examples_per_client": True}, "max-examples-per-client"),
        ({"max_examples_per_client": 2**64}, "max-examples-per-client"),
    ],
)
def test_a_secure_round_refuses_out_of_range_settings(changes: dict[str, object], field: str) -> None:
    """Was: a negative vector length crashed in NumPy (ValueError); the others were taken as they came."""
    arguments: dict[str, object] = {"vector_length": 4, **changes}
    expect_refusal(
        lambda: SecAggRound(secagg(), ROUND, [1, 2, 3], **arguments),  # type: ignore[arg-type]
        f"a secure round's {field} must be",
    )


def test_uint64_is_the_one_range_check(before_masked: Trace) -> None:
    assert wire.uint64(np.uint64(2**64 - 1), "x") == 2**64 - 1
    with pytest.raises(SecAggError, match=r"the run must be an integer in \[0, 2\*\*64\), got 'xxxxx"):
        wire.uint64("x" * 500, "the run", SecAggError)


@pytest.mark.parametrize("value", APP_ROUNDS, ids=lambda v: "missing" if v is MISSING else repr(v))
def test_a_plain_round_message_names_its_round_as_an_integer_in_uint64(value: object) -> None:
    """Was: the plain train path read int(config["server-round"]) too (OverflowError for inf, 3.5 as round 3)."""
    from clients.client_app import train
    from clients.secure import message_round
    from fedadapt.errors import ConfigError

    assert "message_round(config, ConfigError)" in inspect.getsource(train)  # the plain path reads it this way
    config = ConfigRecord({} if value is MISSING else {protocol.SERVER_ROUND: value})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"the message's server-round must be an integer in \[0, 2\*\*64\)"):
        message_round(config, ConfigError)
    assert message_round(ConfigRecord({protocol.SERVER_ROUND: 7}), ConfigError) == 7
