"""The Flower apps: the server's round loop and the ClientApp on an in-process grid, then a real simulation."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from helpers import seed_with_one_crash

from fedadapt.checkpoint.folder import load_adapter
from fedadapt.delta.serialize import deserialize_state, serialize_state
from fedadapt.errors import ConfigError
from fedadapt.fleet import protocol

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed; Flower imports them from the project folder
    sys.path.insert(0, str(PROJECT_ROOT))

from server_harness import (  # noqa: E402
    InProcessGrid,
    run_server,
    server_run_config,
    server_scenario_file,
    task_identity,  # noqa: F401  (autouse)
)

from clients.client_app import app as client_app  # noqa: E402
from fedadapt.checkpoint.rounds import list_checkpoints, load_run_checkpoint  # noqa: E402


def test_rounds_write_metrics_checkpoints_and_the_final_adapter(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    grid = InProcessGrid(3, server_run_config(server_scenario_file(tmp_path, tiny_bert), out))
    metrics = run_server(grid)
    assert metrics["complete"] and [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert record["clients"] == 2 and record["accepted"] == 2 and record["rejected"] == []
        assert record["bytes_up"] > 0 and record["bytes_down"] > record["bytes_up"]  # fp16 up, fp32 down
        assert 0.0 <= record["accuracy"] <= 1.0 and record["loss"] > 0
        # The figures the load benchmark splits a round by: the exchange, each device's own time, memory.
        assert 0 < record["exchange_seconds"] < record["seconds"]
        for client in record["client_results"]:
            assert 0 < client["train-seconds"] < client["client-seconds"] <= record["exchange_seconds"]
            assert client["process-seconds"] > client["client-seconds"]  # in process: this test's own age
        assert 50 < record["server_rss_mb"] <= record["server_peak_rss_mb"]
    summary = metrics["summary"]
    assert summary["rounds"] == 2 and summary["accuracy_source"] == "central"
    assert summary["final_accuracy"] == metrics["rounds"][-1]["accuracy"]
    latest = {c["partition-id"]: c["accuracy"] for r in metrics["rounds"] for c in r["client_results"]}
    assert summary["personalized_clients"] == len(latest)
    assert summary["personalized_accuracy"] == pytest.approx(sum(latest.values()) / len(latest))
    assert summary["full_model_bytes"] > 10 * summary["bytes_up_per_client_round"]
    assert len(grid.sent) == 4 and set(grid.sent) <= set(grid.nodes)
    model = load_adapter(out / "final_adapter")
    assert model.schema_id == metrics["schema_id"]
    assert [p.name for p in list_checkpoints(out)] == ["round-0001.safetensors", "round-0002.safetensors"]


def test_resume_continues_where_the_checkpoint_left_off(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert)
    straight = run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "straight")))
    run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "resumed", **{"num-rounds": 1})))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "resumed")))
    grid = InProcessGrid(3, server_run_config(scenario, tmp_path / "resumed", resume=True))
    resumed = run_server(grid)
    assert len(grid.sent) == 2  # round 2 only
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    for a, b in zip(straight["rounds"], resumed["rounds"], strict=True):
        assert a["accuracy"] == b["accuracy"] and a["client_results"] == _without_seconds(b["client_results"], a)
    final_a = load_run_checkpoint(tmp_path / "straight")
    final_b = load_run_checkpoint(tmp_path / "resumed")
    assert final_a is not None and final_b is not None
    for name, tensor in final_a.global_state.items():
        assert torch.equal(tensor, final_b.global_state[name]), name  # sampling RNG and state restored exactly


def test_resume_with_fedyogi_equals_an_uninterrupted_run(tiny_bert: Path, tmp_path: Path) -> None:
    """The scenario's server optimizer runs the rounds, and its buffers (m, v) come back from the checkpoint."""
    yogi = {"server-optimizer": "fedyogi", "server-lr": 0.05, "server-beta2": 0.999}
    scenario = server_scenario_file(tmp_path, tiny_bert, **yogi)
    straight = run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "straight")))
    run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "resumed", **{"num-rounds": 1})))
    after_one = load_run_checkpoint(tmp_path / "resumed")
    assert after_one is not None and after_one.optimizer.scalars["kind"] == "fedyogi"
    assert after_one.optimizer.scalars["config"] == {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.999, "tau": 0.001}
    v = {n: t for n, t in after_one.optimizer.tensors.items() if n.startswith("v/")}
    assert len(v) == len(after_one.global_state) and any(bool((t != 0.001**2).any()) for t in v.values())
    resumed = run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "resumed", resume=True)))
    for a, b in zip(straight["rounds"], resumed["rounds"], strict=True):
        assert a["accuracy"] == b["accuracy"] and a["client_results"] == _without_seconds(b["client_results"], a)
    final_a, final_b = load_run_checkpoint(tmp_path / "straight"), load_run_checkpoint(tmp_path / "resumed")
    assert final_a is not None and final_b is not None and final_b.optimizer.scalars["steps"] == 2
    for name, tensor in final_a.global_state.items():
        assert torch.equal(tensor, final_b.global_state[name]), name
    assert sorted(final_a.optimizer.tensors) == sorted(final_b.optimizer.tensors)  # m/ and v/ of every tensor
    for name, tensor in final_a.optimizer.tensors.items():
        assert torch.equal(tensor, final_b.optimizer.tensors[name]), name


TIMINGS = ("train-seconds", "client-seconds", "import-seconds", "process-seconds")


def _without_seconds(results: list[dict[str, Any]], like: dict[str, Any]) -> list[dict[str, Any]]:
    # Times differ run to run; everything else must match.
    seconds = {r["client"]: {k: r[k] for k in TIMINGS if k in r} for r in like["client_results"]}
    return [r | seconds.get(r["client"], {}) for r in results]


def _garbage_delta(reply: Message) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({protocol.ADAPTER_DELTA: Array(torch.zeros(64, dtype=torch.uint8).numpy())}),
            protocol.METRICS: reply.content[protocol.METRICS],
        }
    )
    return Message(content=content, reply_to=_original(reply))


def _error_reply(reply: Message) -> Message:
    return Message(Error(code=0, reason="device ran out of battery"), reply_to=_original(reply))


def _original(reply: Message) -> Message:
    # A reply is built from the message it answers; rebuild one addressed the same way.
    return Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=reply.metadata.src_node_id)


def test_bad_clients_are_left_out_and_the_round_completes(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert, **{"clients-per-round": 3, "rounds": 1})
    tamper = {101: _garbage_delta, 102: _error_reply}
    metrics = run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "run"), tamper))
    record = metrics["rounds"][0]
    assert record["accepted"] == 1 and record["clients"] == 3
    reasons = {r["client"]: r["reason"] for r in record["rejected"]}
    assert len(reasons) == 2
    assert any("StateError" in reason for reason in reasons.values())
    assert any("out of battery" in reason for reason in reasons.values())
    assert metrics["complete"]


def _replace_delta(reply: Message, change: Callable[[dict[str, torch.Tensor]], None]) -> Message:
    """The client's own blob with its tensors edited and the header (schema id, part) kept."""
    from safetensors.torch import load as safetensors_load
    from safetensors.torch import save as safetensors_save

    from fedadapt.delta.serialize import read_metadata

    blob = reply.content[protocol.ARRAYS][protocol.ADAPTER_DELTA].numpy().tobytes()
    tensors = dict(safetensors_load(blob))
    change(tensors)
    edited = safetensors_save(tensors, metadata=read_metadata(blob))
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({protocol.ADAPTER_DELTA: Array(np.frombuffer(edited, dtype=np.uint8))}),
            protocol.METRICS: reply.content[protocol.METRICS],
        }
    )
    return Message(content=content, reply_to=_original(reply))


def _nan_delta(reply: Message) -> Message:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")

    return _replace_delta(reply, poison)


def _wrong_shape_delta(reply: Message) -> Message:
    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        name = next(iter(tensors))
        tensors[name] = torch.zeros((*tensors[name].shape[:-1], tensors[name].shape[-1] + 1), dtype=tensors[name].dtype)

    return _replace_delta(reply, reshape)


def test_nan_and_wrong_shaped_deltas_are_rejected_and_the_round_completes(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert, **{"clients-per-round": 3, "rounds": 2})
    tamper = {101: _nan_delta, 102: _wrong_shape_delta}
    grid = InProcessGrid(3, server_run_config(scenario, tmp_path / "run"), tamper)
    metrics = run_server(grid)
    assert metrics["complete"] and len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        assert record["accepted"] == 1 and record["clients"] == 3
        reasons = sorted(r["reason"] for r in record["rejected"])
        assert len(reasons) == 2
        assert any("non-finite" in reason for reason in reasons), reasons
        assert any("shape" in reason for reason in reasons), reasons
    # The NaN delta left no trace in the global state.
    checkpoint = load_run_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    assert all(torch.isfinite(t).all() for t in checkpoint.global_state.values())


def test_a_device_that_never_replies_is_left_out_with_the_timeout_named(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert, **{"clients-per-round": 3, "rounds": 1, "round-timeout": 1.5})
    metrics = run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "run"), {103: lambda reply: None}))
    record = metrics["rounds"][0]
    assert record["accepted"] == 2 and record["clients"] == 3 and metrics["complete"]
    assert record["rejected"] == [
        {"client": "node 103", "reason": "no reply within the round timeout (1.5 s): a lost or straggling device"}
    ]


def test_client_errors_are_reduced_to_the_exception_message() -> None:
    from server.federation import client_error_reason

    ray_text = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "fedadapt.fleet.faults.SimulatedDeviceFailure: client 3 crashed in round 2 (simulated)\n"
        "Exception ClientAppException occurred. Message: client 3 crashed in round 2 (simulated)'>"
    )
    assert client_error_reason(ray_text) == "client 3 crashed in round 2 (simulated)"
    assert client_error_reason("Traceback:\n  File y\nValueError: bad shape") == "ValueError: bad shape"
    assert client_error_reason("device ran out of battery") == "device ran out of battery"
    assert client_error_reason("") == "(no reason given)"
    assert len(client_error_reason("x" * 1000)) == 300


def test_a_round_without_accepted_deltas_keeps_the_global_state(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert, **{"clients-per-round": 2, "rounds": 1, "num-clients": 2})
    grid = InProcessGrid(2, server_run_config(scenario, tmp_path / "run"), {101: _garbage_delta, 102: _garbage_delta})
    metrics = run_server(grid)
    record = metrics["rounds"][0]
    assert record["accepted"] == 0 and len(record["rejected"]) == 2
    checkpoint = load_run_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    schema = load_adapter(tmp_path / "run" / "final_adapter").schema
    sent = deserialize_state(grid.global_blobs[0], schema, "shared")
    for name, tensor in checkpoint.global_state.items():
        assert torch.equal(tensor, sent[name])


def test_personal_heads_are_scored_by_the_clients(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert, **{"personal-head": True, "rounds": 1})
    out = tmp_path / "run"
    metrics = run_server(InProcessGrid(3, server_run_config(scenario, out)))
    summary = metrics["summary"]
    assert summary["accuracy_source"] == "clients" and summary["personalized_clients"] == 2
    assert summary["final_accuracy"] == metrics["rounds"][0]["client_accuracy"]
    assert len(list((out / "clients").glob("client-*.safetensors"))) == 2
    # The evaluate handler scores a device's own model: the final global adapter with its personal head.
    schema = load_adapter(out / "final_adapter").schema
    checkpoint = load_run_checkpoint(out)
    assert checkpoint is not None
    blob = serialize_state(checkpoint.global_state, schema, "shared", "none")
    arrays = ArrayRecord({protocol.ADAPTER_STATE: Array(np.frombuffer(blob, dtype=np.uint8))})
    message = Message(RecordDict({protocol.ARRAYS: arrays}), message_type=MessageType.EVALUATE, dst_node_id=101)
    context = Context(
        run_id=1,
        node_id=101,
        node_config={"partition-id": 0, "state-dir": str(out / "clients")},
        state=RecordDict(),
        run_config=server_run_config(scenario, out),
    )
    scores = client_app(message, context).content.metric_records[protocol.METRICS]
    assert 0.0 <= float(scores["accuracy"]) <= 1.0 and scores["partition-id"] == 0


def test_simulate_command_refuses_bad_input_before_starting_flower(tiny_bert: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedadapt.cli import app as cli

    bad = tmp_path / "bad.toml"
    bad.write_text("num-clients = 2\nlocal-epoch = 1\n")
    result = CliRunner().invoke(cli, ["simulate", "--scenario", str(bad)])
    assert result.exit_code == 2 and "unknown keys ['local-epoch']" in result.output
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "round-0001.safetensors").write_bytes(b"")
    scenario = server_scenario_file(tmp_path, tiny_bert)
    result = CliRunner().invoke(cli, ["simulate", "--scenario", str(scenario), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--resume" in result.output


@pytest.mark.slow
@pytest.mark.simulation
@pytest.mark.timeout(420)
def test_flower_simulation_end_to_end(tiny_bert: Path, tmp_path: Path) -> None:
    """`fedadapt simulate` for real: SuperLink, `flwr run`, Ray workers; a device crashes, full-model FedAvg
    runs beside the adapters, plots are written, and everything it started is gone after."""
    from simulations.processes import alive, descendants
    from simulations.runner import simulate

    seed, (crash_round, crash_client) = seed_with_one_crash(rounds=2, clients=3, dropout=0.2)
    extra = {"num-clients": 3, "clients-per-round": 3, "dropout-fraction": 0.2, "seed": seed, "full-model": True}
    metrics = simulate(server_scenario_file(tmp_path, tiny_bert, **extra), out=tmp_path / "run", show=False)
    assert metrics["complete"] and len(metrics["rounds"]) == 2
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in written["rounds"]] == [1, 2]
    for record in written["rounds"]:
        crashed = record["round"] == crash_round
        assert record["accepted"] == (2 if crashed else 3) and len(record["rejected"]) == (1 if crashed else 0)
    (rejected,) = written["rounds"][crash_round - 1]["rejected"]
    assert f"client {crash_client} crashed in round {crash_round}" in rejected["reason"]
    assert load_adapter(tmp_path / "run" / "final_adapter").schema_id == written["schema_id"]
    # The virtual devices found their own folder (FEDADAPT_DEVICE_ROOT, not the run config): their cached splits.
    cached = sorted(p.name for p in (tmp_path / "run" / "clients").glob("data-*.json"))
    assert cached == ["data-0.json", "data-1.json", "data-2.json"]
    # The same scenario as full-model FedAvg, compared in the summary: every backbone weight goes up.
    full = json.loads((tmp_path / "run" / "full-model" / "metrics.json").read_text())
    assert full["complete"] and full["scenario"]["method"] == "full" and full["scenario"]["compression"] == "none"
    comparison = written["summary"]["full_model"]
    assert comparison["full_model"]["bytes_up_per_client_round"] == full["summary"]["bytes_up_per_client_round"]
    assert full["summary"]["bytes_up_per_client_round"] > 0.9 * full["summary"]["full_model_bytes"]
    assert comparison["bytes_ratio"] > 10
    for name in ("accuracy.png", "bytes.png"):
        assert (tmp_path / "run" / name).read_bytes().startswith(b"\x89PNG")
    assert not [pid for pid in descendants(os.getpid()) if alive(pid)]


def test_default_out_dir_never_refuses_a_repeated_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running the README's command twice starts a second run; --resume continues the newest."""
    from simulations.runner import CHECKPOINTS, plan_simulation

    scenario = Path(__file__).resolve().parents[2] / "simulations" / "quickstart.toml"
    monkeypatch.chdir(tmp_path)
    assert plan_simulation(scenario, None, None, resume=False).out_dir == tmp_path / "runs" / "sim-quickstart"
    (tmp_path / "runs" / "sim-quickstart" / CHECKPOINTS).mkdir(parents=True)
    (tmp_path / "runs" / "sim-quickstart" / CHECKPOINTS / "round-0001.safetensors").write_bytes(b"x")
    assert plan_simulation(scenario, None, None, resume=False).out_dir == tmp_path / "runs" / "sim-quickstart-2"
    assert plan_simulation(scenario, None, None, resume=True).out_dir == tmp_path / "runs" / "sim-quickstart"
    with pytest.raises(ConfigError, match="already holds a run"):
        plan_simulation(scenario, None, tmp_path / "runs" / "sim-quickstart", resume=False)


def test_an_error_the_superlink_makes_is_filed_under_the_node_it_was_sent_to() -> None:
    """Flower's own "Node Unavailable" replies come from the SuperLink (id 1); the reply-to id names the node."""
    from types import SimpleNamespace

    from server.replies import destinations, reply_node

    sent = [SimpleNamespace(metadata=SimpleNamespace(message_id=f"m{n}", dst_node_id=n)) for n in (101, 102)]
    unsent = SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=103))
    sent_to = destinations([*sent, unsent])  # type: ignore[list-item]
    assert sent_to == {"m101": 101, "m102": 102}
    from_superlink = SimpleNamespace(metadata=SimpleNamespace(src_node_id=1, reply_to_message_id="m102"))
    from_node = SimpleNamespace(metadata=SimpleNamespace(src_node_id=101, reply_to_message_id="unknown"))
    assert reply_node(from_superlink, sent_to) == 102  # type: ignore[arg-type]
    assert reply_node(from_node, sent_to) == 101  # type: ignore[arg-type]


def test_a_run_config_cannot_choose_where_devices_write(
    tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's run config names a folder on the devices: they ignore it, write only to their own."""
    target = tmp_path / "attacker-chosen"
    scenario = server_scenario_file(tmp_path, tiny_bert, **{"personal-head": True, "rounds": 1})
    grid = InProcessGrid(3, server_run_config(scenario, tmp_path / "run", **{"client-state-dir": str(target)}))
    with caplog.at_level(logging.WARNING, logger="clients.device"):
        metrics = run_server(grid)
    assert metrics["complete"] and metrics["rounds"][0]["accepted"] == 2
    assert not target.exists()
    own = sorted(p.name for p in (tmp_path / "run" / "clients").iterdir())
    assert len([name for name in own if name.startswith("client-")]) == 2, own
    assert any("'client-state-dir'" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_resume_refuses_a_substituted_checkpoint(tiny_bert: Path, tmp_path: Path) -> None:
    """Someone who can write the run folder but lacks the key plants a later round: resume refuses it."""
    from safetensors.torch import save as safetensors_save

    from fedadapt.checkpoint.rounds import checkpoint_path, content_sha256
    from fedadapt.errors import CheckpointAuthError

    scenario = server_scenario_file(tmp_path, tiny_bert)
    out = tmp_path / "run"
    run_server(InProcessGrid(3, server_run_config(scenario, out, **{"num-rounds": 1})))
    genuine = load_run_checkpoint(out)
    assert genuine is not None and genuine.round == 1
    tensors = {"global/" + n: torch.full_like(t, 7.0) for n, t in genuine.global_state.items()}
    header = {"round": 2, "schema_id": genuine.schema_id, "optimizer": {}, "rng_state": genuine.rng_state}
    header = json.loads(json.dumps(header | {"history": genuine.history * 2}))
    header["sha256"] = content_sha256(tensors, header)
    forged = checkpoint_path(out, 2)
    metadata = {"format": "fedadapt.checkpoint.v2", "json": json.dumps(header)}
    forged.write_bytes(safetensors_save(tensors, metadata=metadata))
    grid = InProcessGrid(3, server_run_config(scenario, out, resume=True))
    with pytest.raises(CheckpointAuthError, match=f"{forged} is fedadapt.checkpoint.v2, which carries no HMAC"):
        run_server(grid)
    assert grid.sent == []  # refused before any round
    forged.unlink()
    resumed = run_server(InProcessGrid(3, server_run_config(scenario, out, resume=True)))
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]


def test_a_device_that_requires_secagg_refuses_a_plain_run(tiny_bert: Path, tmp_path: Path) -> None:
    """The run config (the server's, unsigned) names a plain scenario: the device's own policy refuses it."""
    scenario = server_scenario_file(tmp_path, tiny_bert)
    config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.SCHEMA_ID: "x", protocol.COMPRESSION: "none"})
    arrays = ArrayRecord({protocol.ADAPTER_STATE: Array(np.zeros(4, dtype=np.uint8))})
    message = Message(
        RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config}), message_type=MessageType.TRAIN, dst_node_id=101
    )
    node_config = {"partition-id": 0, "state-dir": str(tmp_path / "state"), "require-privacy": "secagg+"}
    context = Context(
        run_id=1,
        node_id=101,
        node_config=node_config,
        state=RecordDict(),
        run_config=server_run_config(scenario, tmp_path),
    )
    with pytest.raises(Exception, match="requires privacy 'secagg\\+'.*asks for 'none'"):
        client_app(message, context)
    assert not (tmp_path / "state").exists()  # refused before any training or file
