"""The Flower ClientApp: a thin layer over ``fedadapt.fleet.run_client_round`` (one device's round)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from fedadapt import protocol
from fedadapt.fleet import FleetRun, empty_client_round, evaluate_client, fleet_run_from_config, run_client_round

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # inside the FAB Flower unpacks, or the checkout
PARTITION_ID = "partition-id"  # node config key Flower's simulation sets for each virtual device
STATE_DIR = "state-dir"  # optional node config key: where a real device keeps its personal part

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the device's data from the global adapter received; reply with the delta only."""
    run = fleet_run_from_config(context.run_config, PROJECT_ROOT)
    server_round = int(msg.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])  # type: ignore[arg-type]
    if run.empty_clients:
        reply = empty_client_round(run.scenario, _partition_id(context))
    else:
        reply = run_client_round(
            run.scenario, _partition_id(context), _global_blob(msg), _state_dir(run, context), server_round
        )
    delta = np.frombuffer(reply.delta_blob, dtype=np.uint8)  # bytes travel as a uint8 array (np.save format)
    metrics: dict[str, MetricRecordValues] = {protocol.NUM_EXAMPLES: reply.num_examples, **reply.metrics}
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({protocol.ADAPTER_DELTA: Array(delta)}),
            protocol.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the device's model (global shared part + its personal part) on its local test split."""
    run = fleet_run_from_config(context.run_config, PROJECT_ROOT)
    scores = evaluate_client(run.scenario, _partition_id(context), _global_blob(msg), _state_dir(run, context))
    metrics: dict[str, MetricRecordValues] = {**scores}
    return Message(content=RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=msg)


def _global_blob(msg: Message) -> bytes:
    return msg.content.array_records[protocol.ARRAYS][protocol.ADAPTER_STATE].numpy().tobytes()


def _partition_id(context: Context) -> int:
    return int(context.node_config[PARTITION_ID])


def _state_dir(run: FleetRun, context: Context) -> Path:
    configured = context.node_config.get(STATE_DIR)
    return Path(str(configured)) if configured else run.state_dir
