"""One device's local round, without Flower: global shared state in, serialized shared-part delta out.

``run_client_round`` is everything a device does in one round: load the global shared state it
received, restore its personal part from disk, train locally, and return only the serialized
shared-part delta with its example count and metrics; the personal part goes back to disk.
Backbone weights, personal state and data never leave the function. Every step takes the device
(``DeviceContext``: scenario, partition, state folder, own data file) and what the message brings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.data.batching import EncodedTexts
from fedadapt.data.label_map import LabelMap
from fedadapt.delta.serialize import deserialize_state, serialize_state
from fedadapt.delta.state import AdapterSchema, State, compute_delta
from fedadapt.errors import DataError, FedAdaptError
from fedadapt.fleet.build import cached_model, encode_split, train_config
from fedadapt.fleet.data import device_split, scenario_labels
from fedadapt.fleet.device_cache import train_on_device
from fedadapt.fleet.device_data import DeviceContext, device_data
from fedadapt.fleet.faults import SimulatedDeviceFailure, device_fault, stall_seconds
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.train.loop import EvalResult, evaluate
from fedadapt.train.prototypes import class_mean_statistic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalUpdate:
    """A device's round before it is sent: the shared-part delta, its weight and scalar metrics."""

    delta: State = field(repr=False)
    schema: AdapterSchema = field(repr=False)
    num_examples: int
    metrics: dict[str, float | int]


@dataclass(frozen=True)
class ClientReply:
    """What a device sends back in a plain round: the serialized shared-part delta, its weight and metrics."""

    delta_blob: bytes
    num_examples: int
    metrics: dict[str, float | int]
    schema_id: str = ""


def run_client_round(device: DeviceContext, global_blob: bytes, server_round: int = 0) -> ClientReply:
    """One device's round: global shared state in, serialized shared-part delta out."""
    return serialize_update(train_client_update(device, global_blob, server_round), device.scenario)


def serialize_update(update: LocalUpdate, scenario: ScenarioConfig) -> ClientReply:
    """The update as the bytes a plain round sends (compressed as the scenario says)."""
    blob = serialize_state(update.delta, update.schema, "shared", scenario.compression)  # type: ignore[arg-type]
    return ClientReply(blob, update.num_examples, update.metrics, update.schema.schema_id)


def train_client_update(device: DeviceContext, global_blob: bytes, server_round: int = 0) -> LocalUpdate:
    """Load the global shared state, restore the personal part, train locally; the personal part stays on disk.

    The device trains on its partition of the scenario's data, or on its own file (``device.data_path``);
    the frozen lower layers, if the method leaves any, from its prefix cache (``fedadapt.fleet.device_cache``).
    """
    scenario, partition_id = device.scenario, device.partition_id
    labels, split = device_data(device)
    # Whether the device picks up its own personal part (a device back after a crash must) or starts one.
    restored = scenario.personal_head and device.personal_path.is_file()
    model = _prepare_model(device, labels, global_blob)
    global_shared = model.state("shared")
    train_set = encode_split(model, split.train, labels, scenario.max_length)
    test_set = encode_split(model, split.test, labels, scenario.max_length)
    if len(train_set) == 0:
        raise DataError(f"client {partition_id} has no training examples")
    # Scoring the received global model too costs a forward pass per round: only when asked.
    before = _evaluate_or_none(model, test_set, scenario.device) if scenario.eval_before_training else None
    if scenario.prototype_round(server_round):
        # No training: the device's class-mean statistic stands in for its delta (fedadapt.train.prototypes).
        started = time.perf_counter()
        delta = class_mean_statistic(model, train_set, scenario.batch_size, scenario.device)
        work: dict[str, float | int] = {
            "prototype-examples": len(train_set),
            "train-seconds": time.perf_counter() - started,
        }
        after = None  # the received head is not what this round makes: nothing to score
    else:
        config = train_config(scenario, _round_seed(device, server_round), partition_id)
        result, cache_metrics = train_on_device(device, model, split.train.texts, train_set, config)
        work = {"train-loss": result.final_loss, "train-steps": result.steps, "train-seconds": result.seconds}
        work |= cache_metrics
        after = _evaluate_or_none(model, test_set, scenario.device)
        delta = compute_delta(model.state("shared"), global_shared)
    fault = device_fault(scenario, server_round, partition_id)
    if fault == "crash":  # after training, before anything is saved or sent: the round's work is lost
        raise SimulatedDeviceFailure(f"client {partition_id} crashed in round {server_round} (a simulated fault)")
    if scenario.personal_head:
        _save_personal(model, device)
    if fault == "stall":
        logger.info("client %d straggles in round %d: replying after the round timeout", partition_id, server_round)
        time.sleep(stall_seconds(scenario))
    metrics: dict[str, float | int] = {"partition-id": partition_id, **work, "test-examples": len(test_set)}
    if scenario.personal_head:
        metrics["personal-restored"] = int(restored)
    if scenario.tier_steps:
        metrics["tier"] = partition_id % len(scenario.tier_steps)
    if after is not None:
        metrics |= {"accuracy": after.accuracy, "loss": after.loss}
    if before is not None:
        metrics["accuracy-before"] = before.accuracy
    return LocalUpdate(delta, model.schema, fedavg_weight(scenario, len(train_set)), metrics)


def empty_client_round(device: DeviceContext) -> ClientReply:
    """A device that does no work: an all-zero delta at once (benchmarks measure Flower's own round cost)."""
    return serialize_update(empty_client_update(device), device.scenario)


def empty_client_update(device: DeviceContext) -> LocalUpdate:
    """An all-zero delta with the client's real example count, without training."""
    scenario = device.scenario
    model = cached_model(scenario, scenario_labels(scenario).names).model
    zeros = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in model.schema.specs("shared")}
    num_examples = max(1, len(device_split(scenario, device.partition_id, device.data_path).train))
    metrics: dict[str, float | int] = {"partition-id": device.partition_id}
    return LocalUpdate(zeros, model.schema, fedavg_weight(scenario, num_examples), metrics)


def fedavg_weight(scenario: ScenarioConfig, num_examples: int) -> int:
    """The example count a device reports: its own, capped at ``max-examples-per-client``.

    The server rejects a reply claiming more, so an honest device with more data weighs as the limit.
    """
    return min(num_examples, scenario.max_examples_per_client)


def evaluate_client(device: DeviceContext, global_blob: bytes) -> dict[str, float | int]:
    """The device's model (global shared part + its own personal part) on its local test split; no training."""
    scenario = device.scenario
    labels, split = device_data(device)
    model = _prepare_model(device, labels, global_blob)
    scores = _evaluate_or_none(model, encode_split(model, split.test, labels, scenario.max_length), scenario.device)
    metrics: dict[str, float | int] = {"partition-id": device.partition_id, "test-examples": len(split.test)}
    if scores is not None:
        metrics |= {"accuracy": scores.accuracy, "loss": scores.loss}
    return metrics


def _prepare_model(device: DeviceContext, labels: LabelMap, global_blob: bytes) -> AdapterModel:
    """The process's cached model with the received shared state and this device's personal part loaded."""
    cached = cached_model(device.scenario, labels.names)
    model = cached.model
    model.load_state(deserialize_state(global_blob, model.schema, "shared"), "shared")
    if cached.initial_personal:
        model.load_state(_restore_personal(model, device) or cached.initial_personal, "personal")
    return model


def _restore_personal(model: AdapterModel, device: DeviceContext) -> State | None:
    path = device.personal_path
    if not path.is_file():
        return None
    try:
        return deserialize_state(path.read_bytes(), model.schema, "personal")
    except FedAdaptError as err:
        raise type(err)(f"{path}: {err} (this state folder belongs to another scenario; use a fresh one)") from err


def _save_personal(model: AdapterModel, device: DeviceContext) -> None:
    blob = serialize_state(model.state("personal"), model.schema, "personal", "none")
    write_bytes_atomic(device.personal_path, blob)


def _evaluate_or_none(model: AdapterModel, data: EncodedTexts, device: str) -> EvalResult | None:
    return evaluate(model, data, device=device) if len(data) else None


def _round_seed(device: DeviceContext, server_round: int) -> int:
    """A distinct, reproducible local seed per (scenario seed, round, client)."""
    return (device.scenario.seed * 1_000_003 + server_round * 10_007 + device.partition_id) % (2**31)
