"""Privacy modes end to end on an in-process grid: sealed deltas (aead) and SecAgg+ rounds (secagg+).

The grid keeps one Context per node across messages (as Flower does), so a SecAgg+ session survives
between the five stage messages of a round (the devices' identity keys come from FEDADAPT_DEVICE_ROOT);
it records every reply the server receives and lets a test tamper with (or lose) the reply of one node at one stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from helpers import StubGrid, seed_with_one_crash, set_flower_task_identity, write_tiny_scenario

from fedadapt.delta.serialize import deserialize_state
from fedadapt.errors import ConfigError
from fedadapt.fleet import protocol
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.envelope import HEADER_SIZE, MAGIC, EnvelopeContext, EnvelopeOpener
from fedadapt.privacy.keys import KeyFiles, generate_server_keys, load_private_key
from fedadapt.privacy.secagg import masking, stages, wire
from fedadapt.privacy.transport import DELTA_KIND, ClientSealer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed; Flower imports them from the project folder
    sys.path.insert(0, str(PROJECT_ROOT))

from clients.client_app import app as client_app  # noqa: E402
from fedadapt.checkpoint.key import read_checkpoint_key  # noqa: E402
from fedadapt.checkpoint.rounds import (  # noqa: E402
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    load_run_checkpoint,
)
from server.server_app import app as server_app  # noqa: E402

PLAIN = "train"  # the grid's stage name for a plain round's message
SECAGG_STAGES = list(stages.STAGES)
PRIVACY_SECAGG = {"mode": "secagg+", "num-shares": 3, "reconstruction-threshold": 2}
# (message, reply, server round) -> the reply the server receives, or None when it is lost
Tamper = Callable[[Message, Message, int], Message | None]


@dataclass
class Received:
    """One reply as the server received it (after any tampering)."""

    server_round: int
    stage: str
    node: int
    payload: bytes  # the sealed delta (plain round) or the sealed SecAgg+ payload


@dataclass
class PrivacyGrid(StubGrid):
    """Nodes 101, 102, ... run the ClientApp in this process (node 101 is partition 0), one Context each."""

    num_nodes: int
    run_config: dict[str, Any]
    tamper: dict[tuple[int, str], Tamper] = field(default_factory=dict)  # (node, stage) -> hook
    configs: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # (node, round) -> run config
    received: list[Received] = field(default_factory=list)
    sent_state: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (round, node) -> global blob sent
    errors: list[str] = field(default_factory=list)  # exceptions raised by the ClientApp
    offline: dict[int, set[int]] = field(default_factory=dict)  # round -> nodes not connected when it starts

    def __post_init__(self) -> None:
        self.nodes = {101 + i: i for i in range(self.num_nodes)}
        self.contexts: dict[int, Context] = {}

    def get_node_ids(self) -> Iterable[int]:
        # The server asks as a round starts: the round after the last one it checkpointed.
        saved = list_checkpoints(Path(str(self.run_config["out-dir"])))
        starting = int(saved[-1].stem.split("-")[1]) + 1 if saved else 1
        gone = self.offline.get(starting, set())
        return [node for node in self.nodes if node not in gone]

    def context(self, node: int) -> Context:
        if node not in self.contexts:
            self.contexts[node] = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": self.nodes[node], "state-dir": _device_root(self.run_config)},
                state=RecordDict(),
                run_config=self.run_config,
            )
        return self.contexts[node]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            config = message.content.config_records[protocol.CONFIG]
            stage = str(config.get(protocol.SECAGG_STAGE, PLAIN))
            server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[arg-type]
            arrays = message.content.array_records[protocol.ARRAYS]
            if protocol.ADAPTER_STATE in arrays:
                self.sent_state[(server_round, node)] = arrays[protocol.ADAPTER_STATE].numpy().tobytes()
            context = self.context(node)
            context.run_config = self.configs.get((node, server_round), self.run_config)
            try:
                reply = client_app(message, context)
            except Exception as err:  # Flower's runtime turns a ClientApp exception into an error reply
                self.errors.append(f"node {node} {stage} round {server_round}: {type(err).__name__}: {err}")
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            hook = self.tamper.get((node, stage))
            if hook is not None:
                reply = hook(message, reply, server_round)
            if reply is None:  # lost on the way
                continue
            if not reply.has_error():
                key = protocol.ADAPTER_DELTA if stage == PLAIN else protocol.SECAGG_PAYLOAD
                blob = reply.content.array_records[protocol.ARRAYS][key].numpy().tobytes()
                self.received.append(Received(server_round, stage, node, blob))
            replies.append(reply)
        return replies

    def payloads(self, stage: str, server_round: int | None = None) -> dict[tuple[int, int], bytes]:
        return {
            (r.server_round, r.node): r.payload
            for r in self.received
            if r.stage == stage and server_round in (None, r.server_round)
        }


DEVICES = 8  # identity keys made for partitions 0..7


def make_device_root(folder: Path, count: int = DEVICES) -> Path:
    """What the simulation runner makes: device-<i>/identity.key (0600) and roster.pub."""
    from fedadapt.privacy.secagg.identity import generate_private_key

    lines = [generate_private_key(folder / f"device-{i}" / "identity.key") for i in range(count)]
    (folder / "roster.pub").write_bytes(b"\n".join(lines) + b"\n")
    return folder


@pytest.fixture(scope="module", autouse=True)
def device_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every secagg+ device of this module signs with its own identity key and trusts the fleet's roster."""
    root = make_device_root(tmp_path_factory.mktemp("devices"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDADAPT_DEVICE_ROOT", str(root))
        yield root


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_flower_task_identity(monkeypatch)


def _scenario_file(folder: Path, tiny_bert: Path, privacy: dict[str, Any] | None = None, **extra: Any) -> Path:
    return write_tiny_scenario(folder, tiny_bert, privacy, **{"clients-per-round": 3, "compression": "none", **extra})


def _config(scenario: Path, out_dir: Path, keys: KeyFiles | None = None, **extra: Any) -> dict[str, Any]:
    config = {"scenario": str(scenario), "out-dir": str(out_dir)}
    if keys is not None:
        config |= {"server-key": str(keys.private_path), "server-public-key": str(keys.public_path)}
    return config | extra


def _run(grid: PrivacyGrid) -> dict[str, Any]:
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=grid.run_config))
    out_dir = Path(str(grid.run_config["out-dir"]))
    return dict(json.loads((out_dir / "metrics.json").read_text()))


def _state(out_dir: Path, server_round: int | None = None) -> dict[str, torch.Tensor]:
    """The shared global state checkpointed after ``server_round`` (the latest when None)."""
    key = read_checkpoint_key(out_dir / "keys")
    checkpoint = (
        load_latest_checkpoint(out_dir, key)
        if server_round is None
        else load_checkpoint(checkpoint_path(out_dir, server_round), key)
    )
    assert checkpoint is not None
    return checkpoint.global_state


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def _initial_state(grid: PrivacyGrid, out_dir: Path) -> dict[str, torch.Tensor]:
    """The global state the server sent in round 1 (before any update)."""
    from fedadapt.checkpoint.folder import load_adapter

    schema = load_adapter(out_dir / "final_adapter").schema
    blob = next(blob for (server_round, _), blob in grid.sent_state.items() if server_round == 1)
    return deserialize_state(blob, schema, "shared")


def _lost_in(*rounds: int) -> Tamper:
    def hook(message: Message, reply: Message, server_round: int) -> Message | None:
        return None if server_round in rounds else reply

    return hook


_RETRAINED: dict[tuple[str, int, int, bytes], Any] = {}


def _retrain(grid: PrivacyGrid, scenario_file: Path, server_round: int, node: int, folder: Path) -> Any:
    """The LocalUpdate ``node`` computed in ``server_round``, recomputed here (local training is deterministic:
    same scenario seed, round and partition, same received state)."""
    from fedadapt.fleet.device_data import DeviceContext
    from fedadapt.fleet.device_round import train_client_update
    from fedadapt.fleet.scenario_file import load_scenario

    blob = grid.sent_state[(server_round, node)]
    key = (str(scenario_file), server_round, node, hashlib.sha256(blob).digest())
    if key not in _RETRAINED:
        scenario = load_scenario(scenario_file)
        device = DeviceContext(scenario, grid.nodes[node], folder)
        _RETRAINED[key] = train_client_update(device, blob, server_round=server_round)
    return _RETRAINED[key]


def _expected_state(
    grid: PrivacyGrid, scenario_file: Path, server_round: int, nodes: list[int], folder: Path
) -> dict[str, torch.Tensor]:
    """The state a plain FedAvg round (server_lr 1) reaches from the very state this grid's clients got in
    ``server_round``, averaging the true deltas of ``nodes`` weighted by their example counts."""
    total: dict[str, torch.Tensor] = {}
    weights = 0
    for node in nodes:
        update = _retrain(grid, scenario_file, server_round, node, folder)
        for name, tensor in update.delta.items():
            total[name] = total.get(name, 0) + tensor.double() * update.num_examples
        weights += update.num_examples
    before = deserialize_state(grid.sent_state[(server_round, nodes[0])], update.schema, "shared")
    return {name: before[name].double() + total[name] / weights for name in before}


def _with_payload(message: Message, reply: Message, key: str, blob: bytes) -> Message:
    content = RecordDict({protocol.ARRAYS: ArrayRecord({key: Array(np.frombuffer(blob, dtype=np.uint8))})})
    if protocol.METRICS in reply.content.metric_records:
        content[protocol.METRICS] = reply.content.metric_records[protocol.METRICS]
    return Message(content=content, reply_to=message)


def _delta_blob(reply: Message) -> bytes:
    return reply.content.array_records[protocol.ARRAYS][protocol.ADAPTER_DELTA].numpy().tobytes()


# --- shared runs ------------------------------------------------------------------------------------------------


@dataclass
class SharedRun:
    out: Path
    metrics: dict[str, Any]
    grid: PrivacyGrid
    keys: KeyFiles | None
    scenario: Path


@pytest.fixture(scope="module")
def module_patch() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        set_flower_task_identity(patch)
        yield patch


@pytest.fixture(scope="module")
def server_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return generate_server_keys(tmp_path_factory.mktemp("privacy-keys") / "keys")


def _shared_run(
    tiny_bert: Path, folder: Path, privacy: dict[str, Any] | None, keys: KeyFiles | None, **extra: Any
) -> SharedRun:
    scenario = _scenario_file(folder, tiny_bert, privacy, **extra)
    grid = PrivacyGrid(3, _config(scenario, folder / "run", keys))
    metrics = _run(grid)
    assert grid.errors == []
    return SharedRun(folder / "run", metrics, grid, keys, scenario)


@pytest.fixture(scope="module")
def plain_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory, module_patch: Any) -> SharedRun:
    """Mode none, 3 clients, 2 rounds, uncompressed deltas: what the private runs must reproduce."""
    return _shared_run(tiny_bert, tmp_path_factory.mktemp("plain"), None, None)


@pytest.fixture(scope="module")
def aead_run(
    tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory, module_patch: Any, server_keys: KeyFiles
) -> SharedRun:
    return _shared_run(tiny_bert, tmp_path_factory.mktemp("aead"), {"mode": "aead"}, server_keys)


@pytest.fixture(scope="module")
def secagg_run(
    tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory, module_patch: Any, server_keys: KeyFiles
) -> SharedRun:
    return _shared_run(tiny_bert, tmp_path_factory.mktemp("secagg"), PRIVACY_SECAGG, server_keys)


# --- aead -------------------------------------------------------------------------------------------------------


def test_aead_rounds_seal_every_delta_and_learn_exactly_what_plain_rounds_learn(
    aead_run: SharedRun, plain_run: SharedRun
) -> None:
    metrics = aead_run.metrics
    assert metrics["complete"] and metrics["privacy"] == "aead"
    assert metrics["summary"]["privacy_mode"] == "aead" and plain_run.metrics["summary"]["privacy_mode"] == "none"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert record["accepted"] == 3 and record["rejected"] == []
        assert 0.0 <= record["accuracy"] <= 1.0
    deltas = aead_run.grid.payloads(PLAIN)
    assert sorted(deltas) == [(r, n) for r in (1, 2) for n in (101, 102, 103)]
    assert all(blob.startswith(MAGIC) for blob in deltas.values())
    assert not any(blob.startswith(MAGIC) for blob in plain_run.grid.payloads(PLAIN).values())
    # Each envelope costs its header, the schema id, the kind, the 16-byte tag and the framing that seals
    # the example count with the delta, nothing more.
    framing = len(wire.pack({"delta": b"", "num-examples": bytes(8)}))
    overhead = HEADER_SIZE + len(metrics["schema_id"].encode()) + len(DELTA_KIND) + 16 + framing
    for sealed, plain in zip(metrics["rounds"], plain_run.metrics["rounds"], strict=True):
        assert sealed["bytes_up"] - plain["bytes_up"] == 3 * overhead
        assert sealed["accuracy"] == plain["accuracy"]
    # Same seeds, same opened bytes: the learning result is bit-identical.
    sealed_state, plain_state = _state(aead_run.out), _state(plain_run.out)
    for name, tensor in plain_state.items():
        assert torch.equal(sealed_state[name], tensor), name
    assert _max_difference(plain_state, _initial_state(plain_run.grid, plain_run.out)) > 0


def test_aead_seals_the_fedavg_weight_so_a_count_injected_in_transit_changes_nothing(
    tiny_bert: Path, tmp_path: Path, server_keys: KeyFiles, aead_run: SharedRun
) -> None:
    """The example count travels inside the envelope: a clear-text count added on the way is ignored."""
    from flwr.app import MetricRecord

    def inflate_the_weight(message: Message, reply: Message, server_round: int) -> Message | None:
        assert protocol.NUM_EXAMPLES not in reply.content.metric_records[protocol.METRICS]  # never in the clear
        metrics = dict(reply.content.metric_records[protocol.METRICS]) | {protocol.NUM_EXAMPLES: 10_000_000}
        content = RecordDict(
            {
                protocol.ARRAYS: reply.content.array_records[protocol.ARRAYS],
                protocol.METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
            }
        )
        return Message(content=content, reply_to=message)

    scenario = _scenario_file(tmp_path, tiny_bert, {"mode": "aead"})
    grid = PrivacyGrid(3, _config(scenario, tmp_path / "run", server_keys), {(101, PLAIN): inflate_the_weight})
    metrics = _run(grid)
    assert grid.errors == [] and all(r["accepted"] == 3 for r in metrics["rounds"])
    tampered, honest = _state(tmp_path / "run"), _state(aead_run.out)
    for name, tensor in honest.items():
        assert torch.equal(tampered[name], tensor), name


def test_aead_tampered_misaddressed_replayed_and_wrongly_keyed_deltas_are_rejected(
    tiny_bert: Path, tmp_path: Path
) -> None:
    keys = generate_server_keys(tmp_path / "keys")
    other_keys = generate_server_keys(tmp_path / "other-keys")
    privacy = PrivacyConfig(mode="aead")
    scenario = _scenario_file(tmp_path, tiny_bert, {"mode": "aead"})
    config = _config(scenario, tmp_path / "run", keys)
    spy = EnvelopeOpener(load_private_key(keys.private_path))  # the test's own opener, to re-seal a delta
    kept: dict[int, bytes] = {}

    def flip_a_byte(message: Message, reply: Message, server_round: int) -> Message | None:  # node 101, round 1
        if server_round != 1:
            return reply
        blob = bytearray(_delta_blob(reply))
        assert len(blob) // 2 > HEADER_SIZE + 200  # inside the ciphertext, not the header
        blob[len(blob) // 2] ^= 0x01
        return _with_payload(message, reply, protocol.ADAPTER_DELTA, bytes(blob))

    def sealed_as_node_103(message: Message, reply: Message, server_round: int) -> Message | None:  # node 102, r 1
        if server_round != 1:
            return reply
        schema_id = str(message.content.config_records[protocol.CONFIG][protocol.SCHEMA_ID])
        plaintext = spy.open(_delta_blob(reply), EnvelopeContext(1, server_round, 102, schema_id, "delta"))
        resealed = ClientSealer.from_config(privacy, 1, 103, str(keys.public_path)).seal(
            plaintext, server_round, schema_id, DELTA_KIND
        )
        return _with_payload(message, reply, protocol.ADAPTER_DELTA, resealed)

    def replay_round_1(message: Message, reply: Message, server_round: int) -> Message | None:  # node 103, r 2
        if server_round == 1:
            kept[103] = _delta_blob(reply)
            return reply
        return _with_payload(message, reply, protocol.ADAPTER_DELTA, kept[103])

    tamper = {(101, PLAIN): flip_a_byte, (102, PLAIN): sealed_as_node_103, (103, PLAIN): replay_round_1}
    # In round 2, node 102 holds another server's public key.
    configs = {(102, 2): config | {"server-public-key": str(other_keys.public_path)}}
    grid = PrivacyGrid(3, config, tamper, configs)
    metrics = _run(grid)
    assert grid.errors == [] and metrics["complete"] and len(metrics["rounds"]) == 2
    first, second = metrics["rounds"]
    assert first["accepted"] == 1 and second["accepted"] == 1

    def reasons(record: dict[str, Any]) -> dict[str, str]:
        return {r["client"]: r["reason"] for r in record["rejected"]}

    assert set(reasons(first)) == {"client 0 (node 101)", "client 1 (node 102)"}
    assert reasons(first)["client 0 (node 101)"].startswith("envelope rejected (tampered-or-wrong-key)")
    assert reasons(first)["client 1 (node 102)"].startswith("envelope rejected (wrong-sender)")
    assert "names sender 103 but arrived from node 102" in reasons(first)["client 1 (node 102)"]
    assert set(reasons(second)) == {"client 1 (node 102)", "client 2 (node 103)"}
    assert reasons(second)["client 2 (node 103)"].startswith("envelope rejected (replayed)")
    assert "sealed for round 1, the current round is 2" in reasons(second)["client 2 (node 103)"]
    assert reasons(second)["client 1 (node 102)"].startswith("envelope rejected (tampered-or-wrong-key)")
    # The accepted delta of each round moved the global state, and nothing non-finite got in.
    state = _state(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in state.values())
    assert _max_difference(state, _state(tmp_path / "run", 1)) > 0
    assert _max_difference(_state(tmp_path / "run", 1), _initial_state(grid, tmp_path / "run")) > 0


def test_missing_or_wrong_key_material_is_a_clear_config_error(tiny_bert: Path, tmp_path: Path) -> None:
    keys = generate_server_keys(tmp_path / "keys")
    other = generate_server_keys(tmp_path / "other")
    scenario = _scenario_file(tmp_path, tiny_bert, {"mode": "aead"})
    out = tmp_path / "run"
    public_only = _config(scenario, out, **{"server-public-key": str(keys.public_path)})
    with pytest.raises(ConfigError, match=r"needs the server's private key \(server-key\).*fedadapt keys generate"):
        _run(PrivacyGrid(3, public_only))
    missing = _config(scenario, out, keys, **{"server-key": str(tmp_path / "nowhere" / "server.key")})
    with pytest.raises(ConfigError, match=r"does not exist: create one with `fedadapt keys generate`"):
        _run(PrivacyGrid(3, missing))
    mismatched = _config(scenario, out, keys, **{"server-public-key": str(other.public_path)})
    with pytest.raises(ConfigError, match="server-public-key does not belong to the private key"):
        _run(PrivacyGrid(3, mismatched))
    keys.private_path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"accessible by group or others \(mode 0644\).*chmod 600"):
        _run(PrivacyGrid(3, _config(scenario, out, keys)))
    assert not out.exists() or not any(out.iterdir())  # refused before a round ran
    # A client without the server's public key refuses to send anything.
    no_public = _config(scenario, out, **{"server-key": str(keys.private_path)})
    grid = PrivacyGrid(3, no_public)
    context = grid.context(101)
    config = ConfigRecord({protocol.SERVER_ROUND: 1})
    message = Message(RecordDict({protocol.CONFIG: config}), message_type=MessageType.TRAIN, dst_node_id=101)
    with pytest.raises(ConfigError, match=r"needs the server's public key \(server-public-key\)"):
        client_app(message, context)


# --- secagg+ ----------------------------------------------------------------------------------------------------


def test_secagg_rounds_match_plain_rounds_within_the_quantization_bound(
    secagg_run: SharedRun, plain_run: SharedRun, tmp_path: Path
) -> None:
    metrics = secagg_run.metrics
    assert metrics["complete"] and metrics["privacy"] == "secagg+"
    assert metrics["summary"]["privacy_mode"] == "secagg+"
    privacy = PrivacyConfig(**{k.replace("-", "_"): v for k, v in PRIVACY_SECAGG.items()})
    for record, plain in zip(metrics["rounds"], plain_run.metrics["rounds"], strict=True):
        assert record["accepted"] == 3 and record["clients"] == 3
        assert record["dropped"] == [] and record["recovered"] == [] and record["rejected"] == []
        assert "error" not in record
        assert list(record["stages"]) == SECAGG_STAGES
        assert all(record["stages"][s]["replies"] == 3 for s in SECAGG_STAGES)
        assert isinstance(record["clipped_values"], int) and record["clipped_values"] == 0
        assert 0.0 <= record["accuracy"] <= 1.0
        assert {c["client"] for c in record["client_results"]} == {c["client"] for c in plain["client_results"]}
        assert all("num-examples" not in c for c in record["client_results"])
        # nothing that reveals a device's example count travels in the clear under secagg+
        assert all(not {"train-steps", "train-seconds", "test-examples"} & set(c) for c in record["client_results"])
        assert all("accuracy" in c and "train-loss" in c for c in record["client_results"])
    # The ring and sample come from a fresh run secret kept for resume; plain runs have none.
    secret = load_run_checkpoint(secagg_run.out).run_secret  # type: ignore[union-attr]
    assert isinstance(secret, bytes) and len(secret) == 32
    assert load_run_checkpoint(plain_run.out).run_secret is None  # type: ignore[union-attr]
    # Each round's mean is off by at most one quantization step per value; errors add up over rounds.
    bound = privacy.quantization_step  # 2 * clipping_range / quantization_range, times server_lr = 1
    round_1 = _max_difference(_state(secagg_run.out, 1), _state(plain_run.out, 1))
    assert round_1 <= bound + 1e-6
    # Round 2 starts from a state that differs by up to one step; local training (Adam) amplifies that, so
    # the plain run is no reference for round 2. Instead: round 2's update equals the FedAvg mean of the
    # clients' true deltas from the state they received, within one quantization step.
    expected = _expected_state(secagg_run.grid, secagg_run.scenario, 2, [101, 102, 103], tmp_path)
    assert _max_difference(_state(secagg_run.out, 2), expected) <= bound + 1e-6
    # The example total comes out of the masked sum: it is the clients' own counts added up (the same each round).
    examples = sum(_retrain(secagg_run.grid, secagg_run.scenario, 2, n, tmp_path).num_examples for n in (101, 102, 103))
    assert [r["total_examples"] for r in metrics["rounds"]] == [examples, examples]
    assert _max_difference(_state(secagg_run.out), _state(plain_run.out)) < 1e-2  # the same learning, roughly
    assert _max_difference(_state(plain_run.out), _initial_state(plain_run.grid, plain_run.out)) > 100 * bound


def test_secagg_server_only_sees_masked_vectors_and_sealed_key_exchanges(secagg_run: SharedRun, tmp_path: Path) -> None:
    from fedadapt.delta.state import flatten_state
    from fedadapt.fleet.scenario_file import load_scenario

    assert secagg_run.keys is not None
    grid, schema_id = secagg_run.grid, secagg_run.metrics["schema_id"]
    for stage in SECAGG_STAGES:
        payloads = grid.payloads(stage)
        assert sorted(payloads) == [(r, n) for r in (1, 2) for n in (101, 102, 103)], stage
        assert all(blob.startswith(MAGIC) for blob in payloads.values()), stage
    scenario = load_scenario(secagg_run.scenario)
    privacy = scenario.privacy
    opener = EnvelopeOpener(load_private_key(secagg_run.keys.private_path))
    for (server_round, node), sealed in sorted(grid.payloads(stages.MASKED).items()):
        context = EnvelopeContext(1, server_round, node, schema_id, stages.MASKED)
        fields = wire.unpack(opener.open(sealed, context))
        assert set(fields) == {stages.MASKED_VECTOR}
        masked = np.frombuffer(fields[stages.MASKED_VECTOR], dtype=masking.field_dtype(privacy))
        # What the client would have sent without masks: its true delta, encoded in the field.
        update = _retrain(grid, secagg_run.scenario, server_round, node, tmp_path)
        vector = flatten_state(update.delta, update.schema.specs("shared")).numpy()
        encoded = masking.encode(vector, update.num_examples, privacy).vector
        assert masked.shape == encoded.shape and masked.size > 500
        assert np.mean(masked == encoded) < 0.01
        assert abs(np.corrcoef(masked.astype(np.float64), encoded.astype(np.float64))[0, 1]) < 0.15
        assert 0.45 <= float(np.mean(masked / 2.0**32)) <= 0.55  # uniform over the field
        # An encoded delta sits near quantization_range / 2 * n, far below 2**32: nothing like the masked one.
        assert float(np.mean(encoded[:-2] / 2.0**32)) < 0.01
        assert masked[-2] != update.num_examples  # the example count travels masked too


def test_secagg_dropouts_are_survived_recovered_or_fail_the_round_safely(tiny_bert: Path, tmp_path: Path) -> None:
    """Round 1 loses 2 of 3 masked vectors (fails safely), round 2 loses one (the other two are summed),
    round 3 loses one unmask reply (its contribution is recovered); each update equals plain FedAvg of the
    deltas that arrived, within the quantization bound."""
    keys = generate_server_keys(tmp_path / "keys")
    # The server waits the round timeout for a lost reply (it pulls replies as they arrive): keep it short.
    extra = {"rounds": 3, "min-clients": 2, "round-timeout": 1}
    secure = _scenario_file(tmp_path / "secure", tiny_bert, PRIVACY_SECAGG, **extra)
    tamper = {
        (101, stages.MASKED): _lost_in(1),
        (102, stages.MASKED): _lost_in(1),
        (103, stages.MASKED): _lost_in(2),
        (101, stages.UNMASK): _lost_in(3),
    }
    grid = PrivacyGrid(3, _config(secure, tmp_path / "secure" / "run", keys), tamper)
    metrics = _run(grid)
    assert grid.errors == [] and metrics["complete"] and len(metrics["rounds"]) == 3
    failed, survived, recovered = metrics["rounds"]

    assert failed["accepted"] == 0 and "fewer than 2" in failed["error"]
    assert "only 1 masked vectors arrived in round 1" in failed["error"]
    assert {(d["client"], d["stage"]) for d in failed["dropped"]} == {
        ("node 101", stages.MASKED),
        ("node 102", stages.MASKED),
    }
    assert list(failed["stages"]) == SECAGG_STAGES[:3]  # the unmask stage never ran
    out = tmp_path / "secure" / "run"
    initial = _initial_state(grid, out)
    for name, tensor in _state(out, 1).items():
        assert torch.equal(tensor, initial[name]), name  # the global state stayed as it was

    assert survived["accepted"] == 2 and "error" not in survived and survived["recovered"] == []
    assert survived["dropped"] == [
        {"client": "node 103", "stage": stages.MASKED, "reason": "no reply within the round timeout (1 s)"}
    ]
    assert survived["rejected"] == [
        {"client": "node 103", "reason": "secagg-masked: no reply within the round timeout (1 s)"}
    ]
    assert survived["stages"][stages.UNMASK]["replies"] == 2

    assert recovered["accepted"] == 3 and recovered["dropped"] == [] and "error" not in recovered
    assert recovered["recovered"] == ["client 0 (node 101)"]
    assert recovered["stages"][stages.UNMASK]["replies"] == 2

    # What plain FedAvg makes of the deltas that arrived, from the states the clients received: round 2
    # averages 101 and 102 only (103 is absent), round 3 all three (101's contribution recovered).
    bound = PrivacyConfig().quantization_step
    assert survived["total_examples"] == sum(_retrain(grid, secure, 2, n, tmp_path).num_examples for n in (101, 102))
    expected = _expected_state(grid, secure, 2, [101, 102], tmp_path)
    assert _max_difference(_state(out, 2), expected) <= bound + 1e-6
    assert _max_difference(_state(out, 2), initial) > 100 * bound
    expected = _expected_state(grid, secure, 3, [101, 102, 103], tmp_path)
    assert _max_difference(_state(out, 3), expected) <= bound + 1e-6
    assert recovered["total_examples"] == sum(
        _retrain(grid, secure, 3, n, tmp_path).num_examples for n in (101, 102, 103)
    )
    assert all(torch.isfinite(t).all() for t in _state(out).values())


# --- the ClientApp's key stages stay light ----------------------------------------------------------------------

_KEY_STAGES_WITHOUT_TORCH = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from pathlib import Path
import os

TaskIdentity._run_id = 1
TaskIdentity._task_id = 1
TaskIdentity._node_id = 0

from clients.client_app import app
from fedadapt.fleet import protocol
from fedadapt.privacy.secagg import crypto, identity, stages, wire


def message(stage, payload):
    arrays = ArrayRecord({{protocol.SECAGG_PAYLOAD: Array(np.frombuffer(payload, dtype=np.uint8))}})
    config = ConfigRecord(
        {{protocol.SERVER_ROUND: 1, protocol.SCHEMA_ID: "schema-under-test", protocol.SECAGG_STAGE: stage}}
    )
    content = RecordDict({{protocol.ARRAYS: arrays, protocol.CONFIG: config}})
    return Message(content, message_type=MessageType.TRAIN, dst_node_id=101)


context = Context(
    run_id=1, node_id=101, node_config={{"partition-id": 0}}, state=RecordDict(), run_config={run_config!r}
)
replies = []
reply = app(message(stages.SETUP, wire.pack({{stages.NEIGHBOURS: wire.pack_ids([102, 103])}})), context)
replies.append(reply.content.array_records[protocol.ARRAYS][protocol.SECAGG_PAYLOAD].numpy().tobytes())
keys = {{}}
root = Path(os.environ["FEDADAPT_DEVICE_ROOT"])
for partition, other in ((1, 102), (2, 103)):
    fresh = [crypto.public_bytes(crypto.generate_private_key().public_key()) for _ in range(2)]
    signer = identity.load_private_key(root / f"device-{{partition}}" / "identity.key")
    keys[f"{{stages.ENCRYPTION_KEY}}/{{other}}"], keys[f"{{stages.MASK_KEY}}/{{other}}"] = fresh
    keys[f"{{stages.IDENTITY_KEY}}/{{other}}"] = identity.openssh_public(signer.public_key())
    keys[f"{{stages.SETUP_SIGNATURE}}/{{other}}"] = identity.sign(signer, identity.setup_message(1, 1, other, *fresh))
reply = app(message(stages.SHARE_KEYS, wire.pack(keys)), context)
replies.append(reply.content.array_records[protocol.ARRAYS][protocol.SECAGG_PAYLOAD].numpy().tobytes())
print(json.dumps({{
    "torch": "torch" in sys.modules,
    "envelopes": [r[:4].decode() for r in replies],
    "session": protocol.SECAGG_SESSION in context.state.config_records,
}}))
"""


def test_the_client_key_stages_never_import_torch(tiny_bert: Path, tmp_path: Path) -> None:
    keys = generate_server_keys(tmp_path / "keys")
    scenario = _scenario_file(tmp_path, tiny_bert, PRIVACY_SECAGG)
    run_config = _config(scenario, tmp_path / "run", keys)
    code = _KEY_STAGES_WITHOUT_TORCH.format(root=str(PROJECT_ROOT), run_config=run_config)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"torch": False, "envelopes": ["FAEN", "FAEN"], "session": True}


def test_the_run_secret_survives_a_checkpoint_and_seeds_each_round_and_purpose_apart(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fedadapt.aggregate.server_optimizers import OptimizerState
    from fedadapt.checkpoint.rounds import Checkpoint, save_checkpoint
    from fedadapt.errors import StateError
    from server.federation import Federation

    secret = os.urandom(32)
    state = {"w": torch.zeros(2)}
    checkpoint = Checkpoint(1, "schema", state, OptimizerState({}, {}), [3, [1, 2], None], [], run_secret=secret)
    key = os.urandom(32)
    path = save_checkpoint(tmp_path, checkpoint, key)
    assert load_checkpoint(path, key).run_secret == secret
    assert secret.hex() not in repr(load_checkpoint(path, key))
    plain_checkpoint = Checkpoint(1, "schema", state, OptimizerState({}, {}), [3, [1], None])
    plain = save_checkpoint(tmp_path / "plain", plain_checkpoint, key)
    assert load_checkpoint(plain, key).run_secret is None
    short = Checkpoint(2, "schema", state, OptimizerState({}, {}), [3, [1], None], run_secret=b"short")
    with pytest.raises(StateError, match="run_secret must be 32 bytes"):
        load_checkpoint(save_checkpoint(tmp_path / "short", short, key), key)

    def seed(key: bytes, server_round: int, purpose: str) -> int:
        return Federation._secret_seed(SimpleNamespace(run_secret=key), server_round, purpose)  # type: ignore[arg-type]

    seeds = {seed(secret, r, p) for r in (1, 2, 3) for p in ("ring", "sampling")}
    assert len(seeds) == 6 and seed(secret, 2, "ring") == seed(secret, 2, "ring")
    assert seed(os.urandom(32), 2, "ring") != seed(secret, 2, "ring")


def test_simulation_runner_makes_one_identity_per_device_and_the_roster(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fedadapt.privacy.secagg.identity import load_identity
    from simulations.runner import device_root

    secure = SimpleNamespace(secure_aggregation=True)
    plan = SimpleNamespace(out_dir=tmp_path / "run", scenario=SimpleNamespace(num_clients=3, privacy=secure))
    root = device_root(plan)  # type: ignore[arg-type]
    assert root == tmp_path / "run" / "clients"
    keys = [root / f"device-{i}" / "identity.key" for i in range(3)]
    assert all(oct(key.stat().st_mode & 0o777) == "0o600" for key in keys)
    roster = (root / "roster.pub").read_bytes()
    identities = [load_identity(key, root / "roster.pub", run_id=1) for key in keys]
    assert len({i.public_key for i in identities}) == 3 and all(i.public_key in i.roster for i in identities)
    assert len(identities[0].roster) == 3
    assert device_root(plan) == root and (root / "roster.pub").read_bytes() == roster  # reused on resume
    assert b"PRIVATE" not in roster
    plain = SimpleNamespace(secure_aggregation=False)
    other = SimpleNamespace(out_dir=tmp_path / "plain", scenario=SimpleNamespace(num_clients=3, privacy=plain))
    assert device_root(other) == tmp_path / "plain" / "clients"  # type: ignore[arg-type]
    assert not (tmp_path / "plain").exists()  # no identities where no secagg+ needs them


def test_a_device_finds_its_identity_in_node_config_or_the_device_root(tmp_path: Path, device_root: Path) -> None:

    from clients.client_app import _device
    from clients.secure import Device, device_identity

    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    device = _device(context)
    assert device.identity_key == device_root / "device-2" / "identity.key"
    assert device.roster == device_root / "roster.pub"
    assert device_identity(device, context).public_key in device_identity(device, context).roster
    configured = {"partition-id": 2, "identity-key": "/abs/id.key", "roster": "/abs/roster.pub"}
    context = Context(run_id=1, node_id=7, node_config=configured, state=RecordDict(), run_config={})
    device = _device(context)
    assert (device.identity_key, device.roster) == (Path("/abs/id.key"), Path("/abs/roster.pub"))
    with pytest.raises(ConfigError, match="identity-key .* roster .* FEDADAPT_DEVICE_ROOT"):
        device_identity(Device(2, tmp_path), context)


def test_the_client_app_answers_one_setup_per_round(device_root: Path) -> None:
    """A server that re-sends a round's setup would wipe the device's session and get a second survivor-set
    signature for the round: the ClientApp refuses it (the session of a later round or another run is new)."""
    from types import SimpleNamespace

    from clients.client_app import _device
    from clients.secure import run_stage
    from fedadapt.errors import SecAggError

    privacy = PrivacyConfig(mode="secagg+", num_shares=3, reconstruction_threshold=2)
    run = SimpleNamespace(scenario=SimpleNamespace(privacy=privacy))
    sealer = ClientSealer(privacy, run_id=1, node_id=7)  # no server key: payloads pass through
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    device = _device(context)

    def setup(server_round: int) -> Message:
        request = wire.pack({stages.NEIGHBOURS: wire.pack_ids([8, 9])})
        config = {protocol.SERVER_ROUND: server_round, protocol.SCHEMA_ID: "s", protocol.SECAGG_STAGE: stages.SETUP}
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord({protocol.SECAGG_PAYLOAD: Array(np.frombuffer(request, np.uint8))}),
                protocol.CONFIG: ConfigRecord(config),  # type: ignore[arg-type]
            }
        )
        message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)
        return run_stage(message, context, run, sealer, device)  # type: ignore[arg-type]

    first = setup(3)
    saved = context.state.config_records[protocol.SECAGG_SESSION]["session"]
    for server_round in (3, 2):
        refused = f"setup for round {server_round}, but this device already set up round 3"
        with pytest.raises(SecAggError, match=refused):
            setup(server_round)
    assert context.state.config_records[protocol.SECAGG_SESSION]["session"] == saved  # the signed-for session stays
    assert not first.has_error() and not setup(4).has_error()  # the next round sets up as usual
    context.state = RecordDict()  # a device that lost its context state simply has no session
    assert not setup(3).has_error()


# --- a real Flower simulation -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.simulation
@pytest.mark.timeout(420)
def test_secagg_plus_in_a_real_flower_simulation_survives_a_crash_and_leaks_no_key(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedadapt simulate` with secagg+ for real: Flower keeps each device's session in context.state across
    the five stage messages, the runner's device identities reach the simulated ClientApps, a device that
    crashes while training is recovered from its neighbours' shares, and no key material reaches the logs
    or metrics."""
    from simulations.processes import alive, descendants
    from simulations.runner import simulate

    monkeypatch.delenv("FEDADAPT_DEVICE_ROOT")  # only the runner's own device folder can make the rounds work

    seed, (crash_round, crash_client) = seed_with_one_crash(rounds=2, clients=3, dropout=0.2)
    scenario = _scenario_file(tmp_path, tiny_bert, PRIVACY_SECAGG, **{"dropout-fraction": 0.2, "seed": seed})
    out = tmp_path / "run"
    metrics = simulate(scenario, out=out, show=False)
    assert metrics["complete"] and metrics["privacy"] == "secagg+" and len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        crashed = record["round"] == crash_round
        assert list(record["stages"]) == list(stages.STAGES)
        assert record["accepted"] == (2 if crashed else 3), record
        assert record["total_examples"] > 0 and isinstance(record["clipped_values"], int)
        if crashed:
            (dropped,) = record["dropped"]
            assert dropped["stage"] == stages.MASKED
            assert f"client {crash_client} crashed in round {crash_round}" in dropped["reason"]
        else:
            assert record["dropped"] == []
    devices = out / "clients"
    assert len((devices / "roster.pub").read_text().splitlines()) == 3
    private_pem = (out / "keys" / "server.key").read_text()
    private_pem += "".join((devices / f"device-{i}" / "identity.key").read_text() for i in range(3))
    secret_lines = [line for line in private_pem.splitlines() if line and not line.startswith("-----")]
    written = "".join(p.read_text(errors="replace") for p in (out / "flwr.log", out / "metrics.json"))
    assert secret_lines and not any(line in written for line in secret_lines)
    assert "PRIVATE KEY" not in written
    assert not [pid for pid in descendants(os.getpid()) if alive(pid)]


# --- devices that are gone when a round starts ------------------------------------------------------------------


def test_a_round_goes_on_with_the_devices_left_and_a_returning_device_rejoins(tiny_bert: Path, tmp_path: Path) -> None:
    """Node 103 is gone when round 2 starts: the round waits rejoin-timeout, then runs with two; it is back in 3."""
    scenario = _scenario_file(tmp_path, tiny_bert, None, **{"rounds": 3, "rejoin-timeout": 0.5})
    grid = PrivacyGrid(3, _config(scenario, tmp_path / "run"), offline={2: {103}})
    metrics = _run(grid)
    assert grid.errors == [] and metrics["complete"]
    assert [r["clients"] for r in metrics["rounds"]] == [3, 2, 3]
    assert [r["accepted"] for r in metrics["rounds"]] == [3, 2, 3]
    assert sorted(node for (r, node) in grid.payloads(PLAIN) if r == 2) == [101, 102]


def test_too_few_devices_for_secagg_fail_that_round_cleanly_and_the_next_proceeds(
    tiny_bert: Path, tmp_path: Path, server_keys: KeyFiles
) -> None:
    """num-shares 3 needs 3 devices: with 2 left round 2 fails with a clear error, state unchanged; round 3 runs."""
    extra = {"rounds": 3, "rejoin-timeout": 0.5, "min-clients": 2}
    scenario = _scenario_file(tmp_path, tiny_bert, PRIVACY_SECAGG, **extra)
    grid = PrivacyGrid(3, _config(scenario, tmp_path / "run", server_keys), offline={2: {102}})
    metrics = _run(grid)
    assert grid.errors == [] and metrics["complete"]
    first, second, third = metrics["rounds"]
    assert first["accepted"] == 3 and third["accepted"] == 3
    assert second["accepted"] == 0 and "num-shares" in second["error"] and second["clients"] == 2
    assert _max_difference(_state(tmp_path / "run", 2), _state(tmp_path / "run", 1)) == 0  # unchanged
    assert _max_difference(_state(tmp_path / "run", 3), _state(tmp_path / "run", 2)) > 0


def _device_root(run_config: dict[str, Any]) -> str:
    """Where the in-process devices keep their files: as in a simulation, ``<out-dir>/clients``."""
    return str(Path(str(run_config["out-dir"])) / "clients")


# --- differential privacy under secagg+ (issue 22) --------------------------------------------------------------


def _clipped_mean(grid: PrivacyGrid, scenario: Path, nodes: list[int], clip: float, folder: Path) -> dict[str, Any]:
    """Σ clip(Δᵢ, C) / len(nodes) over the nodes' true round-1 deltas, each device weighing 1, and the plain mean."""
    from fedadapt.privacy.dp.clipping import clip_delta

    clipped: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for node in nodes:
        delta = {n: t.double() for n, t in _retrain(grid, scenario, 1, node, folder).delta.items()}
        for name, tensor in clip_delta(delta, clip).delta.items():
            clipped[name] = clipped.get(name, 0) + tensor / len(nodes)
            plain[name] = plain.get(name, 0) + delta[name] / len(nodes)
    return {"clipped": clipped, "plain": plain}


def _norm(state: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values())))


@pytest.mark.parametrize(
    ("mode", "z"), [("central", 0.005), ("distributed", 0.005), ("central", 2.0), ("distributed", 2.0)]
)
def test_secagg_with_dp_releases_the_mean_of_deltas_clipped_on_the_devices(
    mode: str, z: float, tiny_bert: Path, tmp_path: Path, server_keys: KeyFiles
) -> None:
    """The server cannot clip what it cannot see: each device clips before masking, weighs 1, and the released
    mean is Σ clip(Δᵢ, C) / m plus noise of std z·C / m per value. With little noise the clipped mean shows
    through; with much, the noise itself: its norm is the planned one (so no path drops it)."""
    clip = 0.02
    dp = {"mode": mode, "noise-multiplier": z, "clip": clip, "delta": 1e-3}
    run = _shared_run(tiny_bert, tmp_path, {**PRIVACY_SECAGG, "dp": dp}, server_keys, rounds=1)
    record = run.metrics["rounds"][0]
    assert record["accepted"] == 3 and record["total_examples"] == 3  # every device weighs 1
    assert record["epsilon"] > 0 and run.metrics["summary"]["epsilon"] == record["epsilon"]
    assert all("norm-clipped" not in c for c in record["client_results"])
    schema = _retrain(run.grid, run.scenario, 1, 101, tmp_path).schema
    before = deserialize_state(run.grid.sent_state[(1, 101)], schema, "shared")
    update = {n: t.double() - before[n].double() for n, t in _state(run.out, 1).items()}
    means = _clipped_mean(run.grid, run.scenario, [101, 102, 103], clip, tmp_path)
    error = _norm({n: update[n] - means["clipped"][n] for n in update})
    values = sum(t.numel() for t in update.values())
    step = PrivacyConfig().quantization_step
    # SecAgg+'s rounding may carry a clipped vector up to C + step·√n: the accountant counts that sensitivity.
    assert record["dp"]["mode"] == mode and record["dp"]["noise_multiplier"] == pytest.approx(
        z * clip / (clip + step * values**0.5)
    )
    noise = z * clip / 3 * values**0.5  # the expected norm of the noise on the mean
    assert _norm(means["plain"]) > 5 * _norm(means["clipped"])  # the deltas are far above C: clipping matters
    if z < 0.1:
        assert error < 3 * noise + values**0.5 * step
        assert error < 0.5 * _norm(means["clipped"])  # the release is the clipped mean, not noise alone
        assert _norm({n: update[n] - means["plain"][n] for n in update}) > 3 * error  # not the unclipped mean
    else:  # ~1,200 values: the noise norm is within a few % of its expectation
        assert 0.8 * noise < error < 1.2 * noise + _norm(means["clipped"])


def test_secagg_dp_refuses_a_device_that_claims_more_weight(
    tiny_bert: Path, tmp_path: Path, server_keys: KeyFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that masks its delta with weight 5 instead of 1 would count five times in the DP sum."""
    real_mask = masking.encode

    def heavy(delta: np.ndarray, num_examples: int, config: PrivacyConfig) -> Any:
        return real_mask(delta, 5 if num_examples == 1 else num_examples, config)

    monkeypatch.setattr(masking, "encode", heavy)
    dp = {"mode": "central", "noise-multiplier": 1.0, "clip": 0.1, "delta": 1e-3}
    run = _shared_run(tiny_bert, tmp_path, {**PRIVACY_SECAGG, "dp": dp}, server_keys, rounds=1)
    record = run.metrics["rounds"][0]
    assert "claimed more" in record["error"] and record["accepted"] == 0 and not record["dp"]["accounted"]
    assert _max_difference(_state(run.out, 1), _initial_state(run.grid, run.out)) == 0.0


# --- the prototype head (head-fit = "prototypes"): round 1 fits the head from the devices' class means -----------


def _statistic_mean(run: SharedRun, nodes: list[int], folder: Path, weighted: bool) -> tuple[Any, torch.Tensor]:
    """The schema and the mean head-weight statistic of ``nodes`` in round 1, recomputed here: example-weighted
    (FedAvg) or each device weighing 1 (DP)."""
    from fedadapt.train.prototypes import head_specs

    total: torch.Tensor | float = 0.0
    weights = 0
    for node in nodes:
        update = _retrain(run.grid, run.scenario, 1, node, folder)
        weight = head_specs(update.schema)[0].name
        assert "train-steps" not in update.metrics and update.metrics["prototype-examples"] > 0  # no training
        count = update.num_examples if weighted else 1
        total = total + update.delta[weight].double() * count
        weights += count
    assert isinstance(total, torch.Tensor)
    return update.schema, total / weights


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("privacy", [None, PRIVACY_SECAGG], ids=["none", "secagg+"])
def test_a_prototype_round_fits_the_head_from_the_fleets_class_means(
    privacy: dict[str, Any] | None, tiny_bert: Path, tmp_path: Path, server_keys: KeyFiles
) -> None:
    """Round 1: no device trains; the server's head is the fleet's example-weighted class means scaled to norm 16
    (the secure sum only rounds them); round 2 trains from that head as usual."""
    from fedadapt.train.prototypes import PROTOTYPE_SCALE, head_specs

    keys = server_keys if privacy else None
    run = _shared_run(tiny_bert, tmp_path, privacy, keys, rounds=2, head_fit="prototypes")
    first, second = run.metrics["rounds"]
    assert first["accepted"] == 3 and second["accepted"] == 3 and first["accuracy"] is not None
    schema, mean = _statistic_mean(run, [101, 102, 103], tmp_path, weighted=True)
    weight, bias = head_specs(schema)
    fitted = _state(run.out, 1)
    present = mean.norm(dim=1) > 0
    assert present.sum() >= 2  # the tiny fleet's data has several classes
    assert torch.allclose(fitted[weight.name][present].double().norm(dim=1), torch.tensor(PROTOTYPE_SCALE).double())
    assert not fitted[weight.name][~present].any() and not fitted[bias.name].any()
    assert _row_cosines(fitted[weight.name][present], mean[present]).min() > (0.9999 if privacy else 1 - 1e-6)
    assert _max_difference(_state(run.out, 2), fitted) > 0  # round 2 trained the head


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_a_private_prototype_round_releases_the_noised_mean_of_clipped_class_means(
    mode: str, tiny_bert: Path, tmp_path: Path, server_keys: KeyFiles
) -> None:
    """Under DP each device weighs 1 and its statistic is clipped like any delta (here C = 1 ≥ every statistic's
    norm): the head is the unweighted mean's direction plus noise of std z·C/m per value; ε is accounted."""
    from fedadapt.train.prototypes import head_specs

    dp = {"mode": mode, "noise-multiplier": 0.01, "clip": 1.0, "delta": 1e-3}
    secure = {**PRIVACY_SECAGG, "clipping-range": 2.0, "dp": dp}  # room for the devices' noise shares
    privacy = secure if mode == "distributed" else {"mode": "none", "dp": dp}
    run = _shared_run(tiny_bert, tmp_path, privacy, server_keys, rounds=1, head_fit="prototypes")
    record = run.metrics["rounds"][0]
    assert record["accepted"] == 3 and record["epsilon"] > 0
    schema, mean = _statistic_mean(run, [101, 102, 103], tmp_path, weighted=False)
    assert mean.norm(dim=1).max() < 1.0  # no statistic was clipped: C = 1 bounds a class mean's row
    fitted = _state(run.out, 1)[head_specs(schema)[0].name]
    present = mean.norm(dim=1) > 0
    cosines = _row_cosines(fitted[present], mean[present])
    assert cosines.min() > 0.97  # noise std 0.01 / 3 per value against rows of norm ~0.3
    assert cosines.min() < 1 - 1e-7  # but noise there is
