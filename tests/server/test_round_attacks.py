"""Whole runs (ServerApp + ClientApps on the in-process grid of test_privacy_rounds) against a lying client.

A client that claims 10^15 examples, or seals a count of 2^64 − 1, is left out with the reason
``num-examples N exceeds limit L`` and the round completes with the honest clients' mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from helpers import set_flower_task_identity
from test_privacy_rounds import PLAIN, PrivacyGrid, _config, _delta_blob, _run, _scenario_file, _state, _with_payload

from fedadapt.checkpoint.folder import load_adapter
from fedadapt.delta.serialize import deserialize_state
from fedadapt.fleet import protocol
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.envelope import EnvelopeContext, EnvelopeOpener
from fedadapt.privacy.keys import generate_server_keys, load_private_key
from fedadapt.privacy.secagg import wire
from fedadapt.privacy.transport import ClientSealer


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_flower_task_identity(monkeypatch)


def _reasons(record: dict[str, Any]) -> dict[str, str]:
    return {r["client"]: r["reason"] for r in record["rejected"]}


def test_a_client_claiming_10_15_examples_is_rejected_and_the_round_keeps_the_honest_mean(
    tiny_bert: Path, tmp_path: Path
) -> None:
    counts: dict[int, int] = {}

    def record_count(message: Message, reply: Message, server_round: int) -> Message:
        counts[message.metadata.dst_node_id] = int(reply.content[protocol.METRICS][protocol.NUM_EXAMPLES])  # type: ignore[arg-type]
        return reply

    def claim_10_15(message: Message, reply: Message, server_round: int) -> Message:
        metrics = dict(reply.content[protocol.METRICS]) | {protocol.NUM_EXAMPLES: 10**15}
        content = RecordDict({protocol.ARRAYS: reply.content[protocol.ARRAYS], protocol.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
        return Message(content=content, reply_to=message)

    scenario = _scenario_file(tmp_path, tiny_bert, rounds=1)
    tamper = {(101, PLAIN): record_count, (102, PLAIN): record_count, (103, PLAIN): claim_10_15}
    grid = PrivacyGrid(3, _config(scenario, tmp_path / "run"), tamper)
    metrics = _run(grid)
    (record,) = metrics["rounds"]
    assert metrics["complete"] and record["accepted"] == 2
    assert _reasons(record) == {"client 2 (node 103)": "num-examples 1000000000000000 exceeds limit 10000"}
    # The new global state is the sent one plus the two honest clients' weighted mean, to float32 rounding.
    schema = load_adapter(tmp_path / "run" / "final_adapter").schema
    sent = deserialize_state(grid.sent_state[(1, 101)], schema, "shared")
    deltas = {node: deserialize_state(grid.payloads(PLAIN, 1)[(1, node)], schema, "shared") for node in (101, 102)}
    total = sum(counts.values())
    state = _state(tmp_path / "run")
    for name, tensor in sent.items():
        mean = sum(deltas[n][name].double() * counts[n] for n in deltas) / total
        torch.testing.assert_close(state[name].double(), tensor.double() + mean, atol=1e-6, rtol=0)


def test_a_sealed_count_of_2_64_minus_1_is_rejected_and_the_run_completes(tiny_bert: Path, tmp_path: Path) -> None:
    keys = generate_server_keys(tmp_path / "keys")
    spy = EnvelopeOpener(load_private_key(keys.private_path))  # the lying client's own delta, to re-seal

    def seal_2_64_minus_1(message: Message, reply: Message, server_round: int) -> Message:
        schema_id = str(message.content.config_records[protocol.CONFIG][protocol.SCHEMA_ID])
        plaintext = spy.open(_delta_blob(reply), EnvelopeContext(1, server_round, 102, schema_id, "delta"))
        blob = wire.unpack(plaintext)["delta"]
        sealer = ClientSealer.from_config(PrivacyConfig(mode="aead"), 1, 102, str(keys.public_path))
        return _with_payload(
            message, reply, protocol.ADAPTER_DELTA, sealer.seal_delta(blob, 2**64 - 1, server_round, schema_id)
        )

    scenario = _scenario_file(tmp_path, tiny_bert, {"mode": "aead"})
    grid = PrivacyGrid(3, _config(scenario, tmp_path / "run", keys), {(102, PLAIN): seal_2_64_minus_1})
    metrics = _run(grid)
    assert grid.errors == [] and metrics["complete"] and len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        assert record["accepted"] == 2
        assert _reasons(record) == {"client 1 (node 102)": "num-examples 18446744073709551615 exceeds limit 10000"}
    assert all(torch.isfinite(t).all() for t in _state(tmp_path / "run").values())
