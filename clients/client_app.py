"""The Flower ClientApp: a thin layer over ``fedadapt.fleet.device_round`` (a device's round) and ``clients.secure``."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from clients.device import Device, device_from_config, enforce_privacy_policy, warn_about_device_paths
from clients.secure import bytes_array, message_round, payload_bytes, run_stage
from fedadapt.errors import ConfigError
from fedadapt.fleet import protocol
from fedadapt.fleet.resources import process_age_seconds
from fedadapt.fleet.run_config import fleet_run_from_config
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.transport import ClientSealer

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # inside the FAB Flower unpacks, or the checkout

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the device's data from the global adapter received; reply with the delta only.

    Under secure aggregation the server sends four stage messages per round instead (``clients.secure``).
    """
    start = time.perf_counter()
    run = fleet_run_from_config(context.run_config, PROJECT_ROOT)
    device = _device(context)
    enforce_privacy_policy(device, run.scenario.privacy)
    config = msg.content.config_records[protocol.CONFIG]
    sealer = _sealer(run.scenario.privacy, context.run_id, context.node_id, run.server_public_key)
    if protocol.SECAGG_STAGE in config:
        return run_stage(msg, context, run, sealer, device)
    server_round = message_round(config, ConfigError)
    # Imported here, after the SecAgg+ stages returned: the round loads torch, which their key exchange never needs.
    # Timed: in a fresh process this is most of its start-up (torch, transformers, PEFT), in a warm one little.
    imports = time.perf_counter()
    from fedadapt.fleet.device_round import empty_client_round, run_client_round

    import_seconds = time.perf_counter() - imports

    if run.empty_clients:
        reply = empty_client_round(device.in_scenario(run.scenario))
    else:
        global_blob = payload_bytes(msg, protocol.ADAPTER_STATE)
        reply = run_client_round(device.in_scenario(run.scenario), global_blob, server_round)
    delta = sealer.seal_delta(reply.delta_blob, reply.num_examples, server_round, reply.schema_id)
    metrics: dict[str, MetricRecordValues] = dict(reply.metrics)
    if sealer.server_public is None:  # sealed modes carry the FedAvg weight inside the envelope instead
        metrics[protocol.NUM_EXAMPLES] = reply.num_examples
    # The device's cost of this message: its own work (with the imports it needed), and its whole process's
    # life (in deployment a fresh process per message, so this adds the process start); the server's figures
    # subtract these to find Flower's own message latency.
    metrics["client-seconds"] = time.perf_counter() - start
    metrics["import-seconds"] = import_seconds  # part of client-seconds: what the message spent importing
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
    from fedadapt.fleet.device_round import evaluate_client  # loads torch: see train

    run = fleet_run_from_config(context.run_config, PROJECT_ROOT)
    device = _device(context)
    global_blob = payload_bytes(msg, protocol.ADAPTER_STATE)
    scores = evaluate_client(device.in_scenario(run.scenario), global_blob)
    metrics: dict[str, MetricRecordValues] = {**scores}
    return Message(content=RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=msg)


@functools.lru_cache(maxsize=8)
def _sealer(privacy: PrivacyConfig, run_id: int, node_id: int, public_key: str) -> ClientSealer:
    # Parsing the key (maybe reading server.pub) once per run and node, not once per message.
    return ClientSealer.from_config(privacy, run_id, node_id, public_key)


def _device(context: Context) -> Device:
    """This device, from its own node config; paths the run config names for devices are ignored."""
    warn_about_device_paths(context.run_config)
    return device_from_config(context.node_config)
