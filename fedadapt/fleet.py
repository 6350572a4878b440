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
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedadapt.errors import ConfigError, DataError, FedAdaptError

if TYPE_CHECKING:
    from fedadapt.baseline import Splits
    from fedadapt.batching import EncodedTexts
    from fedadapt.data import LabelMap, TextDataset
    from fedadapt.model import AdapterModel
    from fedadapt.partition import ClientSplit
    from fedadapt.state import State
    from fedadapt.train import EvalResult, TrainConfig

logger = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "natural")
COMPRESSIONS = ("none", "fp16", "int8")
SYNTHETIC = "synthetic"
PERSONAL_FILE = "client-{partition_id}.safetensors"


@dataclass(frozen=True)
class ScenarioConfig:
    """One fleet scenario. TOML keys are these field names in kebab-case (``num-clients``)."""

    name: str = "fleet"
    data: str = SYNTHETIC  # 'synthetic' or a path load_text_dataset reads
    backbone: str | None = None  # None: the packaged MiniLM-L6
    text_column: str | None = None
    label_column: str | None = None
    max_examples: int | None = None  # cap on training examples before partitioning (seeded sample)
    partition: str = "iid"  # iid | dirichlet | natural (one client per user id)
    num_clients: int = 4
    alpha: float = 0.5  # Dirichlet concentration (dirichlet only)
    test_fraction: float = 0.2  # of each client's examples held out as its local test split
    method: str = "lora"
    rank: int | None = None  # the method's size field (LoRA rank, bottleneck, virtual tokens)
    personal_head: bool = False  # the head stays on the device (FedPer); only the adapter is averaged
    rounds: int = 3
    clients_per_round: int | None = None  # None: every client, every round
    local_epochs: int = 1
    local_max_steps: int | None = None  # overrides local_epochs
    batch_size: int = 16
    learning_rate: float = 2e-3
    head_learning_rate: float = 5e-2
    max_length: int = 64
    compression: str = "fp16"  # of the uploaded deltas: none | fp16 | int8
    server_lr: float = 1.0
    max_delta_norm: float | None = None  # reject deltas with a larger global L2 norm
    seed: int = 0
    device: str = "auto"
    client_cpus: int = 1  # simulation: CPUs each virtual client reserves (Ray: an integer)
    client_gpus: float = 0.0  # simulation: GPU share each virtual client reserves
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    node_timeout: float = 120.0  # seconds the server waits for enough clients to connect

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        _check_choice("partition", self.partition, SCHEMES)
        _check_choice("compression", self.compression, COMPRESSIONS)
        for name in ("num_clients", "rounds", "local_epochs", "batch_size", "max_length", "client_cpus"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_examples", "clients_per_round", "local_max_steps", "rank"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round ({self.clients_per_round}) cannot exceed num_clients ({self.num_clients})"
            )
        for name in ("alpha", "learning_rate", "head_learning_rate", "server_lr", "round_timeout", "node_timeout"):
            _check_positive_float(name, getattr(self, name))
        if self.max_delta_norm is not None:
            _check_positive_float("max_delta_norm", self.max_delta_norm)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        if isinstance(self.client_gpus, bool) or not isinstance(self.client_gpus, int | float) or self.client_gpus < 0:
            raise ConfigError(f"client_gpus must be a number >= 0, got {self.client_gpus!r}")

    @property
    def sample_size(self) -> int:
        """Clients sampled per round."""
        return self.clients_per_round or self.num_clients


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


SCENARIO_KEYS: tuple[str, ...] = tuple(f.name.replace("_", "-") for f in dataclasses.fields(ScenarioConfig))


def scenario_from_dict(data: Mapping[str, Any], where: str = "scenario") -> ScenarioConfig:
    """A scenario from kebab-case keys; unknown keys and values of the wrong type raise ConfigError."""
    unknown = sorted(k for k in data if k not in SCENARIO_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; allowed keys are: {', '.join(SCENARIO_KEYS)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(ScenarioConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        values[name] = _coerce(key, value, types[name])
    scenario = ScenarioConfig(**values)
    _check_method(scenario)
    return scenario


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """TOML gives int for ``alpha = 1``; accept that for floats, refuse every other mismatch."""
    if "float" in annotation and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"str": str, "int": int, "float": float, "bool": bool}
    allowed = tuple(t for name, t in expected.items() if name in annotation)
    wrong_bool = isinstance(value, bool) and bool not in allowed
    if not isinstance(value, allowed) or wrong_bool:
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"scenario key {key!r} must be a {names}, got {value!r}")
    return value


def _check_method(scenario: ScenarioConfig) -> None:
    from fedadapt.methods import make_method_config

    make_method_config(scenario.method, size=scenario.rank)


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Read a scenario TOML file (flat kebab-case keys)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"scenario file {file} does not exist")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"scenario file {file} is not valid TOML: {err}") from err
    return scenario_from_dict(_relative_to(data, file.resolve().parent), where=f"scenario file {file}")


def _relative_to(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative ``data`` and ``backbone`` paths are the scenario file's; the apps run in other folders."""
    resolved = dict(data)
    for key in ("data", "backbone"):
        value = resolved.get(key)
        if isinstance(value, str) and value != SYNTHETIC and not Path(value).expanduser().is_absolute():
            candidate = folder / value
            if candidate.exists():
                resolved[key] = str(candidate.resolve())
    return resolved


def with_overrides(scenario: ScenarioConfig, **changes: Any) -> ScenarioConfig:
    """A copy with some fields changed (``None`` values are ignored), validated again."""
    return dataclasses.replace(scenario, **{k: v for k, v in changes.items() if v is not None})


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
    *("data", "text_column", "label_column", "max_examples"),
    *("partition", "num_clients", "alpha", "test_fraction", "seed"),
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
    return FleetData(splits=splits, clients=tuple(partition_dataset(splits.train, partition)))


def _synthetic_splits(scenario: ScenarioConfig) -> Splits:
    """The synthetic task with one user per client when partitioned naturally; 20% held out for the server."""
    import torch

    from fedadapt.baseline import Splits
    from fedadapt.data import LabelMap
    from fedadapt.synthetic import SyntheticConfig, make_synthetic_dataset

    users = scenario.num_clients if scenario.partition == "natural" else SyntheticConfig.num_users
    data = make_synthetic_dataset(SyntheticConfig(num_users=users, seed=scenario.seed))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(scenario.seed)).tolist()
    num_test = max(1, round(0.2 * len(data)))
    train, test = data.subset(sorted(order[num_test:])), data.subset(sorted(order[:num_test]))
    if scenario.max_examples is not None and scenario.max_examples < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(scenario.seed))
        train = train.subset(sorted(keep[: scenario.max_examples].tolist()))
    return Splits(train=train, test=test, labels=LabelMap.from_labels(data.labels, source=data.source))


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


def train_config(scenario: ScenarioConfig, seed: int) -> TrainConfig:
    """Local training settings of a round."""
    from fedadapt.train import TrainConfig

    return TrainConfig(
        epochs=scenario.local_epochs,
        max_steps=scenario.local_max_steps,
        batch_size=scenario.batch_size,
        learning_rate=scenario.learning_rate,
        head_learning_rate=scenario.head_learning_rate,
        max_length=scenario.max_length,
        seed=seed,
        device=scenario.device,
    )


def encode_split(model: AdapterModel, data: TextDataset, labels: LabelMap, max_length: int) -> EncodedTexts:
    """Token ids and class ids of a TextDataset under the global label map, with ``model``'s tokenizer."""
    from fedadapt.batching import encode_dataset

    return encode_dataset(model.backbone.tokenizer, data, labels, max_length)


# --- one device's round -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientReply:
    """What a device sends back: the serialized shared-part delta, its weight and scalar metrics."""

    delta_blob: bytes
    num_examples: int
    metrics: dict[str, float | int]


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


def run_client_round(
    scenario: ScenarioConfig,
    partition_id: int,
    global_blob: bytes,
    state_dir: Path,
    server_round: int = 0,
) -> ClientReply:
    """One device's round: global shared state in, shared-part delta out; the personal part stays on disk."""
    from fedadapt.serialize import serialize_state
    from fedadapt.state import compute_delta
    from fedadapt.train import evaluate, train_adapter

    fleet = load_fleet_data(scenario)
    split = client_split(scenario, partition_id)
    model = _prepare_model(scenario, fleet, global_blob, state_dir, partition_id)
    global_shared = model.state("shared")
    train_set = encode_split(model, split.train, fleet.labels, scenario.max_length)
    test_set = encode_split(model, split.test, fleet.labels, scenario.max_length)
    if len(train_set) == 0:
        raise DataError(f"client {partition_id} has no training examples")
    before = _evaluate_or_none(evaluate, model, test_set, scenario.device)
    result = train_adapter(model, train_set, train_config(scenario, _round_seed(scenario, server_round, partition_id)))
    after = _evaluate_or_none(evaluate, model, test_set, scenario.device)
    delta = compute_delta(model.state("shared"), global_shared)
    blob = serialize_state(delta, model.schema, "shared", scenario.compression)  # type: ignore[arg-type]
    if scenario.personal_head:
        _save_personal(model, state_dir, partition_id)
    metrics: dict[str, float | int] = {
        "partition-id": partition_id,
        "train-loss": result.final_loss,
        "train-steps": result.steps,
        "train-seconds": result.seconds,
        "test-examples": len(test_set),
    }
    if before is not None and after is not None:
        metrics |= {"accuracy-before": before.accuracy, "accuracy": after.accuracy, "loss": after.loss}
    return ClientReply(delta_blob=blob, num_examples=len(train_set), metrics=metrics)


def evaluate_client(
    scenario: ScenarioConfig, partition_id: int, global_blob: bytes, state_dir: Path
) -> dict[str, float | int]:
    """The device's model (global shared part + its own personal part) on its local test split; no training."""
    from fedadapt.train import evaluate

    fleet = load_fleet_data(scenario)
    split = client_split(scenario, partition_id)
    model = _prepare_model(scenario, fleet, global_blob, state_dir, partition_id)
    scores = _evaluate_or_none(
        evaluate, model, encode_split(model, split.test, fleet.labels, scenario.max_length), scenario.device
    )
    metrics: dict[str, float | int] = {"partition-id": partition_id, "test-examples": len(split.test)}
    if scores is not None:
        metrics |= {"accuracy": scores.accuracy, "loss": scores.loss}
    return metrics


def _prepare_model(
    scenario: ScenarioConfig, fleet: FleetData, global_blob: bytes, state_dir: Path, partition_id: int
) -> AdapterModel:
    """The process's cached model with the received shared state and this device's personal part loaded."""
    from fedadapt.serialize import deserialize_state

    cached = _cached_model(_only(scenario, _MODEL_FIELDS), fleet.labels.names)
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
    from fedadapt.folder import write_bytes_atomic
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
RUN_RESUME = "resume"  # continue from the latest checkpoint in out-dir
RUN_CLIENT_STATE_DIR = "client-state-dir"  # where devices keep their personal parts; '': <out-dir>/clients
RUN_KEYS = (RUN_SCENARIO, RUN_OUT_DIR, RUN_NUM_ROUNDS, RUN_RESUME, RUN_CLIENT_STATE_DIR)
CLIENT_STATE_FOLDER = "clients"


@dataclass(frozen=True)
class FleetRun:
    """One run of a scenario: the scenario (with overrides applied) and where its files go."""

    scenario: ScenarioConfig
    out_dir: Path
    resume: bool = False
    client_state_dir: Path | None = None

    @property
    def state_dir(self) -> Path:
        """Where simulated devices keep their personal parts."""
        return self.client_state_dir or self.out_dir / CLIENT_STATE_FOLDER


def fleet_run_from_config(run_config: Mapping[str, Any], project_root: Path) -> FleetRun:
    """Parse the apps' run config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides)."""
    unknown = sorted(k for k in run_config if k not in RUN_KEYS)
    if unknown:
        raise ConfigError(f"run config has unknown keys {unknown}; allowed keys are: {', '.join(RUN_KEYS)}")
    scenario_path = _resolve(str(run_config.get(RUN_SCENARIO, "")), project_root, RUN_SCENARIO)
    out_dir = _resolve(str(run_config.get(RUN_OUT_DIR, "")), Path.cwd(), RUN_OUT_DIR)
    rounds = run_config.get(RUN_NUM_ROUNDS, 0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"{RUN_NUM_ROUNDS} must be a non-negative integer, got {rounds!r}")
    resume = run_config.get(RUN_RESUME, False)
    if not isinstance(resume, bool):
        raise ConfigError(f"{RUN_RESUME} must be true or false, got {resume!r}")
    state = str(run_config.get(RUN_CLIENT_STATE_DIR, ""))
    return FleetRun(
        scenario=with_overrides(load_scenario(scenario_path), rounds=rounds or None),
        out_dir=out_dir,
        resume=resume,
        client_state_dir=_resolve(state, Path.cwd(), RUN_CLIENT_STATE_DIR) if state else None,
    )


def _resolve(value: str, base: Path, key: str) -> Path:
    if not value:
        raise ConfigError(f"run config needs {key!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
