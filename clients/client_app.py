"""The Flower ClientApp: a thin layer over ``fedadapt.fleet`` (one device's round) and ``clients.secure``."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from clients.secure import Device, bytes_array, payload_bytes, run_stage
from fedadapt import protocol
from fedadapt.fleet import FleetRun, empty_client_round, evaluate_client, fleet_run_from_config, run_client_round
from fedadapt.privacy import PrivacyConfig
from fedadapt.resources import process_age_seconds
from fedadapt.transport import ClientSealer

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # inside the FAB Flower unpacks, or the checkout
PARTITION_ID = "partition-id"  # node config key Flower's simulation sets for each virtual device
STATE_DIR = "state-dir"  # optional node config key: where a real device keeps its personal part
DATA_PATH = "data-path"  # optional node config key: the device's own data file (else its partition of the scenario's)
IDENTITY_KEY = "identity-key"  # node config key (secagg+): the device's OpenSSH P-384 private key, an absolute path
ROSTER = "roster"  # node config key (secagg+): the device keys it trusts as neighbours, an absolute path
DEVICE_ROOT_ENV = "FEDADAPT_DEVICE_ROOT"  # simulations: <root>/device-<partition-id>/identity.key, <root>/roster.pub

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the device's data from the global adapter received; reply with the delta only.

    Under secure aggregation the server sends four stage messages per round instead (``clients.secure``).
    """
    start = time.perf_counter()
    run = fleet_run_from_config(context.run_config, PROJECT_ROOT)
    config = msg.content.config_records[protocol.CONFIG]
    sealer = _sealer(run.scenario.privacy, context.run_id, context.node_id, run.server_public_key)
    if protocol.SECAGG_STAGE in config:
        return run_stage(msg, context, run, sealer, _device(run, context))
    server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[arg-type]
    if run.empty_clients:
        reply = empty_client_round(run.scenario, _partition_id(context), _data_path(context))
    else:
        global_blob = payload_bytes(msg, protocol.ADAPTER_STATE)
        reply = run_client_round(
            run.scenario,
            _partition_id(context),
            global_blob,
            _state_dir(run, context),
            server_round,
            _data_path(context),
        )
    delta = sealer.seal_delta(reply.delta_blob, reply.num_examples, server_round, reply.schema_id)
    metrics: dict[str, MetricRecordValues] = dict(reply.metrics)
    if sealer.server_public is None:  # sealed modes carry the FedAvg weight inside the envelope instead
        metrics[protocol.NUM_EXAMPLES] = reply.num_examples
    # The device's cost of this message: its own work, and its whole process's life (in deployment a
    # fresh process per message, so this adds the process start and imports); the server's figures
    # subtract these to find Flower's own message latency.
    metrics["client-seconds"] = time.perf_counter() - start
    age = process_age_seconds()
    if age is not None:
        metrics["process-seconds"] = age
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({protocol.ADAPTER_DELTA: bytes_array(delta)}),
            protocol.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the device's model (global shared part + its personal part) on its local test split."""
    run = fleet_run_from_config(context.run_config, PROJECT_ROOT)
    global_blob = payload_bytes(msg, protocol.ADAPTER_STATE)
    scores = evaluate_client(
        run.scenario, _partition_id(context), global_blob, _state_dir(run, context), _data_path(context)
    )
    metrics: dict[str, MetricRecordValues] = {**scores}
    return Message(content=RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=msg)


@functools.lru_cache(maxsize=8)
def _sealer(privacy: PrivacyConfig, run_id: int, node_id: int, public_key: str) -> ClientSealer:
    # Parsing the key (maybe reading server.pub) once per run and node, not once per message.
    return ClientSealer.from_config(privacy, run_id, node_id, public_key)


def _device(run: FleetRun, context: Context) -> Device:
    """The device's own settings; identity files from node config, else from ``FEDADAPT_DEVICE_ROOT``."""
    partition_id = _partition_id(context)
    key, roster = context.node_config.get(IDENTITY_KEY), context.node_config.get(ROSTER)
    root = os.environ.get(DEVICE_ROOT_ENV)
    # Flower's simulation cannot give nodes extra node config: the runner sets the environment instead.
    key_path = Path(str(key)) if key else (Path(root) / f"device-{partition_id}" / "identity.key" if root else None)
    roster_path = Path(str(roster)) if roster else (Path(root) / "roster.pub" if root else None)
    return Device(partition_id, _state_dir(run, context), _data_path(context), key_path, roster_path)


def _partition_id(context: Context) -> int:
    return int(context.node_config[PARTITION_ID])


def _data_path(context: Context) -> Path | None:
    configured = context.node_config.get(DATA_PATH)
    return Path(str(configured)) if configured else None


def _state_dir(run: FleetRun, context: Context) -> Path:
    configured = context.node_config.get(STATE_DIR)
    return Path(str(configured)) if configured else run.state_dir
