"""Fleet scenarios (TOML) and one device's local round: the library side of the simulation, without Flower.

A scenario names the data, how it is split over clients, the adapter method and the federated
schedule. ``run_client_round`` is everything a device does in one round: load the global shared
state it received, restore its personal part from disk, train locally, and return only the
serialized shared-part delta with its example count and metrics; the personal part goes back
to disk. Backbone weights, personal state and data never leave the function.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedadapt.errors import ConfigError, DataError, FedAdaptError
from fedadapt.faults import SimulatedDeviceFailure, device_fault, stall_seconds
from fedadapt.scenario import (
    SYNTHETIC,
    ScenarioConfig,
    full_model_variant,
    load_scenario,
    with_overrides,
)
from fedadapt.user_paths import expand_user

if TYPE_CHECKING:
    from fedadapt.baseline import Splits
    from fedadapt.batching import EncodedTexts
    from fedadapt.data import LabelMap, TextDataset
    from fedadapt.model import AdapterModel
    from fedadapt.partition import ClientSplit
    from fedadapt.state import AdapterSchema, State
    from fedadapt.train import EvalResult, TrainConfig

logger = logging.getLogger(__name__)

PERSONAL_FILE = "client-{partition_id}.safetensors"

# --- data and model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetData:
    """The scenario's global label map, the held-out server test split, and every client's split."""

    splits: Splits
    clients: tuple[ClientSplit, ...]

    @property
    def labels(self) -> LabelMap:
        return self.splits.labels


_DATA_FIELDS = (
    *("data", "text_column", "label_column", "max_examples", "examples_per_user", "server_test_examples"),
    *("partition", "num_clients", "alpha", "test_fraction", "seed", "labels"),
)
_MODEL_FIELDS = ("backbone", "method", "rank", "personal_head", "seed")


def _only(scenario: ScenarioConfig, names: tuple[str, ...]) -> ScenarioConfig:
    """The scenario with every field but ``names`` at its default: a cache key that ignores the others."""
    return ScenarioConfig(**{name: getattr(scenario, name) for name in names})


def load_fleet_data(scenario: ScenarioConfig) -> FleetData:
    """Load, hold out a server test split, and partition the rest over the clients (cached per process)."""
    return _load_fleet_data(_only(scenario, _DATA_FIELDS))


@functools.lru_cache(maxsize=2)
def _load_fleet_data(scenario: ScenarioConfig) -> FleetData:
    from fedadapt.baseline import DataConfig, load_splits
    from fedadapt.partition import PartitionConfig, partition_dataset

    if scenario.data == SYNTHETIC:
        splits = _synthetic_splits(scenario)
    else:
        splits = load_splits(
            DataConfig(
                path=scenario.data,
                text_column=scenario.text_column,
                label_column=scenario.label_column,
                max_examples=scenario.max_examples,
                seed=scenario.seed,
            )
        )
    partition = PartitionConfig(
        scheme=scenario.partition,  # type: ignore[arg-type]  # checked in ScenarioConfig
        num_partitions=scenario.num_clients,
        alpha=scenario.alpha,
        seed=scenario.seed,
        test_fraction=scenario.test_fraction,
        min_partition_size=min(10, max(1, len(splits.train) // (2 * scenario.num_clients))),
    )
    if scenario.labels:
        declared = _label_file(scenario.labels)
        unknown = sorted(set(splits.train.labels) - set(declared.names))
        if unknown:
            raise DataError(f"the scenario's data has labels its labels file {scenario.labels} lacks: {unknown[:5]}")
        splits = dataclasses.replace(splits, labels=declared)
    clients = tuple(partition_dataset(splits.train, partition))
    # Central evaluation runs every round: a seeded sample of the server's test split keeps it affordable.
    test = splits.test.sample(scenario.server_test_examples, scenario.seed)
    return FleetData(splits=dataclasses.replace(splits, test=test), clients=clients)


def _synthetic_splits(scenario: ScenarioConfig) -> Splits:
    """The synthetic task with one user per client when partitioned naturally; 20% held out for the server."""
    from fedadapt.baseline import Splits
    from fedadapt.data import LabelMap
    from fedadapt.synthetic import SyntheticConfig, make_synthetic_dataset

    users = scenario.num_clients if scenario.partition == "natural" else SyntheticConfig.num_users
    data = make_synthetic_dataset(
        SyntheticConfig(num_users=users, examples_per_user=scenario.examples_per_user, seed=scenario.seed)
    )
    train, test = data.split_off(0.2, scenario.seed)
    labels = LabelMap.from_labels(data.labels, source=data.source)
    return Splits(train=train.sample(scenario.max_examples, scenario.seed), test=test, labels=labels)


@dataclass(frozen=True)
class FleetModel:
    """A model built for a scenario and its personal part as initialized (for devices without one on disk)."""

    model: AdapterModel
    initial_personal: State = field(repr=False)


def build_model(scenario: ScenarioConfig, labels: tuple[str, ...]) -> AdapterModel:
    """The scenario's frozen backbone + method + head; the same scenario gives the same schema everywhere."""
    import torch

    from fedadapt.backbone import DEFAULT_BACKBONE, BackboneConfig, load_backbone
    from fedadapt.methods import make_method_config
    from fedadapt.model import AdapterModel, StateSplit

    loaded = load_backbone(
        BackboneConfig(name_or_path=scenario.backbone or DEFAULT_BACKBONE, num_labels=len(labels), seed=scenario.seed)
    )
    split = StateSplit(personal=("head",) if scenario.personal_head else ())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(scenario.seed)  # the adapter's initial values (e.g. LoRA's A): same seed, same start
        return AdapterModel(loaded, make_method_config(scenario.method, size=scenario.rank), split, labels)


@functools.lru_cache(maxsize=1)
def _cached_model(scenario: ScenarioConfig, labels: tuple[str, ...]) -> FleetModel:
    # One model per process: simulation workers serve many clients, each call reloads every trainable tensor.
    model = build_model(scenario, labels)
    return FleetModel(model=model, initial_personal=model.state("personal"))


def train_config(scenario: ScenarioConfig, seed: int, partition_id: int | None = None) -> TrainConfig:
    """Local training settings of a round (client ``partition_id``'s tier sets its step budget)."""
    from fedadapt.scenario import local_step_budget
    from fedadapt.train import TrainConfig

    return TrainConfig(
        epochs=scenario.local_epochs,
        max_steps=scenario.local_max_steps if partition_id is None else local_step_budget(scenario, partition_id),
        batch_size=scenario.batch_size,
        learning_rate=scenario.learning_rate,
        head_learning_rate=scenario.head_learning_rate,
        max_length=scenario.max_length,
        seed=seed,
        device=scenario.device,
        mask_absent_labels=scenario.mask_absent_labels,
    )


def encode_split(model: AdapterModel, data: TextDataset, labels: LabelMap, max_length: int) -> EncodedTexts:
    """Token ids and class ids of a TextDataset under the global label map, with ``model``'s tokenizer."""
    from fedadapt.batching import encode_dataset

    # Prompt and prefix tuning put virtual tokens before the text: they take positions too.
    return encode_dataset(model.backbone.tokenizer, data, labels, min(max_length, model.max_text_tokens))


# --- one device's round -----------------------------------------------------------------------------------------


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


def personal_path(state_dir: Path, partition_id: int) -> Path:
    """Where device ``partition_id`` keeps its personal part."""
    return Path(state_dir) / PERSONAL_FILE.format(partition_id=partition_id)


def client_split(scenario: ScenarioConfig, partition_id: int) -> ClientSplit:
    """Client ``partition_id``'s local train and test data."""
    clients = load_fleet_data(scenario).clients
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < len(clients):
        raise ConfigError(
            f"partition id must be in [0, {len(clients)}) for scenario {scenario.name!r}, got {partition_id!r}"
        )
    return clients[partition_id]


def device_split(scenario: ScenarioConfig, partition_id: int, data_path: Path | None = None) -> ClientSplit:
    """The device's train and test data: its partition of the scenario's data, or its own file.

    A device's own file is read with the scenario's column names, and a seeded ``test-fraction``
    of it is held out as its test split. Its labels must all be in the scenario's label map.
    """
    if data_path is None:
        return client_split(scenario, partition_id)
    from fedadapt.data import load_text_dataset
    from fedadapt.partition import ClientSplit

    data = load_text_dataset(data_path, text_column=scenario.text_column, label_column=scenario.label_column)
    known = set(scenario_labels(scenario).names)
    unknown = sorted(set(data.labels) - known)
    if unknown:
        raise DataError(
            f"{data_path} has labels the scenario does not know: {unknown[:5]}; the scenario's are "
            f"{sorted(known)[:10]}{' ...' if len(known) > 10 else ''}"
        )
    train, test = (
        data.split_off(scenario.test_fraction, scenario.seed) if scenario.test_fraction else (data, data.subset([]))
    )
    return ClientSplit(client_id=partition_id, train=train, test=test, train_indices=(), test_indices=())


def device_data(
    scenario: ScenarioConfig, partition_id: int, data_path: Path | None = None, state_dir: Path | None = None
) -> tuple[LabelMap, ClientSplit]:
    """The scenario's label map and the device's split, kept in its state folder between messages.

    A device with its own file (``data_path``) reads that; without a state folder nothing is kept.
    """
    if data_path is not None or state_dir is None:
        return scenario_labels(scenario), device_split(scenario, partition_id, data_path)
    from fedadapt.device_data import cached_device_data

    fields = {name: getattr(scenario, name) for name in _DATA_FIELDS}
    return cached_device_data(
        fields, partition_id, state_dir, lambda: (scenario_labels(scenario), client_split(scenario, partition_id))
    )


def scenario_labels(scenario: ScenarioConfig) -> LabelMap:
    """The scenario's global label map: from its ``labels`` file when it names one, else from its data."""
    if scenario.labels:
        return _label_file(scenario.labels)
    return load_fleet_data(scenario).labels


@functools.lru_cache(maxsize=4)
def _label_file(path: str) -> LabelMap:
    from fedadapt.data import LabelMap

    return LabelMap.from_file(path)


def run_client_round(
    scenario: ScenarioConfig,
    partition_id: int,
    global_blob: bytes,
    state_dir: Path,
    server_round: int = 0,
    data_path: Path | None = None,
) -> ClientReply:
    """One device's round: global shared state in, serialized shared-part delta out."""
    update = train_client_update(scenario, partition_id, global_blob, state_dir, server_round, data_path)
    return serialize_update(update, scenario)


def serialize_update(update: LocalUpdate, scenario: ScenarioConfig) -> ClientReply:
    """The update as the bytes a plain round sends (compressed as the scenario says)."""
    from fedadapt.serialize import serialize_state

    blob = serialize_state(update.delta, update.schema, "shared", scenario.compression)  # type: ignore[arg-type]
    return ClientReply(blob, update.num_examples, update.metrics, update.schema.schema_id)


def train_client_update(
    scenario: ScenarioConfig,
    partition_id: int,
    global_blob: bytes,
    state_dir: Path,
    server_round: int = 0,
    data_path: Path | None = None,
) -> LocalUpdate:
    """Load the global shared state, restore the personal part, train locally; the personal part stays on disk.

    The device trains on its partition of the scenario's data, or on its own file at ``data_path``.
    """
    from fedadapt.state import compute_delta
    from fedadapt.train import evaluate, train_adapter

    labels, split = device_data(scenario, partition_id, data_path, state_dir)
    # Whether the device picks up its own personal part (a device back after a crash must) or starts one.
    restored = scenario.personal_head and personal_path(state_dir, partition_id).is_file()
    model = _prepare_model(scenario, labels, global_blob, state_dir, partition_id)
    global_shared = model.state("shared")
    train_set = encode_split(model, split.train, labels, scenario.max_length)
    test_set = encode_split(model, split.test, labels, scenario.max_length)
    if len(train_set) == 0:
        raise DataError(f"client {partition_id} has no training examples")
    # Scoring the received global model too costs a forward pass per round: only when asked.
    before = _evaluate_or_none(evaluate, model, test_set, scenario.device) if scenario.eval_before_training else None
    seed = _round_seed(scenario, server_round, partition_id)
    result = train_adapter(model, train_set, train_config(scenario, seed, partition_id))
    after = _evaluate_or_none(evaluate, model, test_set, scenario.device)
    fault = device_fault(scenario, server_round, partition_id)
    if fault == "crash":  # after training, before anything is saved or sent: the round's work is lost
        raise SimulatedDeviceFailure(f"client {partition_id} crashed in round {server_round} (a simulated fault)")
    delta = compute_delta(model.state("shared"), global_shared)
    if scenario.personal_head:
        _save_personal(model, state_dir, partition_id)
    if fault == "stall":
        logger.info("client %d straggles in round %d: replying after the round timeout", partition_id, server_round)
        time.sleep(stall_seconds(scenario))
    metrics: dict[str, float | int] = {
        "partition-id": partition_id,
        "train-loss": result.final_loss,
        "train-steps": result.steps,
        "train-seconds": result.seconds,
        "test-examples": len(test_set),
    }
    if scenario.personal_head:
        metrics["personal-restored"] = int(restored)
    if scenario.tier_steps:
        metrics["tier"] = partition_id % len(scenario.tier_steps)
    if after is not None:
        metrics |= {"accuracy": after.accuracy, "loss": after.loss}
    if before is not None:
        metrics["accuracy-before"] = before.accuracy
    return LocalUpdate(delta, model.schema, fedavg_weight(scenario, len(train_set)), metrics)


def empty_client_round(scenario: ScenarioConfig, partition_id: int, data_path: Path | None = None) -> ClientReply:
    """A device that does no work: an all-zero delta at once (benchmarks measure Flower's own round cost)."""
    return serialize_update(empty_client_update(scenario, partition_id, data_path), scenario)


def empty_client_update(scenario: ScenarioConfig, partition_id: int, data_path: Path | None = None) -> LocalUpdate:
    """An all-zero delta with the client's real example count, without training."""
    import torch

    model = _cached_model(_only(scenario, _MODEL_FIELDS), scenario_labels(scenario).names).model
    zeros = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in model.schema.specs("shared")}
    num_examples = max(1, len(device_split(scenario, partition_id, data_path).train))
    return LocalUpdate(zeros, model.schema, fedavg_weight(scenario, num_examples), {"partition-id": partition_id})


def fedavg_weight(scenario: ScenarioConfig, num_examples: int) -> int:
    """The example count a device reports: its own, capped at ``max-examples-per-client``.

    The server rejects a reply claiming more, so an honest device with more data weighs as the limit.
    """
    return min(num_examples, scenario.max_examples_per_client)


def evaluate_client(
    scenario: ScenarioConfig, partition_id: int, global_blob: bytes, state_dir: Path, data_path: Path | None = None
) -> dict[str, float | int]:
    """The device's model (global shared part + its own personal part) on its local test split; no training."""
    from fedadapt.train import evaluate

    labels, split = device_data(scenario, partition_id, data_path, state_dir)
    model = _prepare_model(scenario, labels, global_blob, state_dir, partition_id)
    scores = _evaluate_or_none(
        evaluate, model, encode_split(model, split.test, labels, scenario.max_length), scenario.device
    )
    metrics: dict[str, float | int] = {"partition-id": partition_id, "test-examples": len(split.test)}
    if scores is not None:
        metrics |= {"accuracy": scores.accuracy, "loss": scores.loss}
    return metrics


def _prepare_model(
    scenario: ScenarioConfig, labels: LabelMap, global_blob: bytes, state_dir: Path, partition_id: int
) -> AdapterModel:
    """The process's cached model with the received shared state and this device's personal part loaded."""
    from fedadapt.serialize import deserialize_state

    cached = _cached_model(_only(scenario, _MODEL_FIELDS), labels.names)
    model = cached.model
    model.load_state(deserialize_state(global_blob, model.schema, "shared"), "shared")
    if cached.initial_personal:
        model.load_state(_restore_personal(model, state_dir, partition_id) or cached.initial_personal, "personal")
    return model


def _restore_personal(model: AdapterModel, state_dir: Path, partition_id: int) -> State | None:
    from fedadapt.serialize import deserialize_state

    path = personal_path(state_dir, partition_id)
    if not path.is_file():
        return None
    try:
        return deserialize_state(path.read_bytes(), model.schema, "personal")
    except FedAdaptError as err:
        raise type(err)(f"{path}: {err} (this state folder belongs to another scenario; use a fresh one)") from err


def _save_personal(model: AdapterModel, state_dir: Path, partition_id: int) -> None:
    from fedadapt.atomic_files import write_bytes_atomic
    from fedadapt.serialize import serialize_state

    blob = serialize_state(model.state("personal"), model.schema, "personal", "none")
    write_bytes_atomic(personal_path(state_dir, partition_id), blob)


def _evaluate_or_none(evaluate: Any, model: AdapterModel, data: EncodedTexts, device: str) -> EvalResult | None:
    return evaluate(model, data, device=device) if len(data) else None


def _round_seed(scenario: ScenarioConfig, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible local seed per (scenario seed, round, client)."""
    return (scenario.seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


# --- the run configuration the apps receive ----------------------------------------------------------------------

RUN_SCENARIO = "scenario"  # scenario TOML; relative paths are resolved against the project folder
RUN_OUT_DIR = "out-dir"  # where the server writes checkpoints, metrics.json and final_adapter/
RUN_NUM_ROUNDS = "num-rounds"  # 0: the scenario's rounds
RUN_CLIENTS_PER_ROUND = "clients-per-round"  # 0: the scenario's; fedadapt serve lowers it to the nodes it starts
RUN_RESUME = "resume"  # continue from the latest checkpoint in out-dir
RUN_CLIENT_STATE_DIR = "client-state-dir"  # obsolete: devices ignore it (their folders are theirs to choose)
RUN_FULL_MODEL = "full-model"  # run the scenario's full-model FedAvg variant instead
RUN_EMPTY_CLIENTS = "empty-clients"  # benchmarks: clients reply at once with a zero delta
RUN_SERVER_KEY = "server-key"  # the server's X25519 private key file (privacy modes aead and secagg+)
RUN_SERVER_PUBLIC_KEY = "server-public-key"  # its public key for the clients: 64 hex characters or server.pub's path
RUN_ACCEPT_UNVERIFIED = "accept-unverified-checkpoints"  # resume from checkpoints the server cannot authenticate
RUN_KEYS = (
    *(RUN_SCENARIO, RUN_OUT_DIR, RUN_NUM_ROUNDS, RUN_CLIENTS_PER_ROUND, RUN_RESUME, RUN_CLIENT_STATE_DIR),
    *(RUN_FULL_MODEL, RUN_EMPTY_CLIENTS, RUN_SERVER_KEY, RUN_SERVER_PUBLIC_KEY, RUN_ACCEPT_UNVERIFIED),
)
CLIENT_STATE_FOLDER = "clients"
KEYS_FOLDER = "keys"  # <out>/keys: the server's private keys (envelope key pair, checkpoint key)


@dataclass(frozen=True)
class FleetRun:
    """One run of a scenario: the scenario (with overrides applied) and where its files go."""

    scenario: ScenarioConfig
    out_dir: Path
    resume: bool = False
    empty_clients: bool = False
    server_key: Path | None = None  # only the server reads it
    server_public_key: str = ""
    accept_unverified_checkpoints: bool = False  # resume even from checkpoints that fail authentication

    @property
    def keys_dir(self) -> Path:
        """The server's key folder (its checkpoint key lives there)."""
        return self.out_dir / KEYS_FOLDER


def fleet_run_from_config(run_config: Mapping[str, Any], project_root: Path) -> FleetRun:
    """Parse the apps' run config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides)."""
    unknown = sorted(k for k in run_config if k not in RUN_KEYS)
    if unknown:
        raise ConfigError(f"run config has unknown keys {unknown}; allowed keys are: {', '.join(RUN_KEYS)}")
    scenario_path = _resolve(str(run_config.get(RUN_SCENARIO, "")), project_root, RUN_SCENARIO)
    out_dir = _resolve(str(run_config.get(RUN_OUT_DIR, "")), Path.cwd(), RUN_OUT_DIR)
    rounds, per_round = (_count(run_config, key) for key in (RUN_NUM_ROUNDS, RUN_CLIENTS_PER_ROUND))
    resume, full_model, empty, accept_unverified = (
        _flag(run_config, key) for key in (RUN_RESUME, RUN_FULL_MODEL, RUN_EMPTY_CLIENTS, RUN_ACCEPT_UNVERIFIED)
    )
    server_key = str(run_config.get(RUN_SERVER_KEY, ""))
    scenario = with_overrides(load_scenario(scenario_path), rounds=rounds or None, clients_per_round=per_round or None)
    return FleetRun(
        scenario=full_model_variant(scenario) if full_model else scenario,
        out_dir=out_dir,
        resume=resume,
        empty_clients=empty,
        server_key=_resolve(server_key, Path.cwd(), RUN_SERVER_KEY) if server_key else None,
        server_public_key=str(run_config.get(RUN_SERVER_PUBLIC_KEY, "")),
        accept_unverified_checkpoints=accept_unverified,
    )


def _count(run_config: Mapping[str, Any], key: str) -> int:
    value = run_config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _flag(run_config: Mapping[str, Any], key: str) -> bool:
    value = run_config.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _resolve(value: str, base: Path, key: str) -> Path:
    if not value:
        raise ConfigError(f"run config needs {key!r}")
    path = expand_user(value, f"run config {key!r}")
    return path if path.is_absolute() else (base / path).resolve()
