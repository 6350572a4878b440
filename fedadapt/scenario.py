"""Fleet scenarios: one TOML file of kebab-case keys, parsed into a typed ``ScenarioConfig``.

A scenario names the data, how it is split over clients, the adapter method, the federated
schedule and the faults to simulate (crashing and straggling devices, device tiers with
different step budgets, and ``scripted-faults`` at set rounds for fault drills). Keys are flat,
but for the ``[privacy]`` table (``fedadapt.privacy``) and the list of scripted faults.
Unknown keys and values of the wrong type are refused with the list of allowed keys, before
anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedadapt.errors import ConfigError
from fedadapt.privacy import PRIVACY_KEYS, PrivacyConfig

SCHEMES = ("iid", "dirichlet", "natural")
FAULT_KINDS = ("crash", "stall")
COMPRESSIONS = ("none", "fp16", "int8")
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class ScriptedFault:
    """A fault at a set place: client ``client`` suffers ``fault`` in round ``round`` (fault drills, tests).

    ``crash``: the device fails after training, before anything is saved or sent; ``stall``: it answers
    only after the round timeout. TOML: ``scripted-faults = [{round = 2, client = 1, fault = "stall"}]``.
    """

    round: int
    client: int
    fault: str

    def __post_init__(self) -> None:
        _check_positive_int("a scripted fault's round", self.round)
        if isinstance(self.client, bool) or not isinstance(self.client, int) or self.client < 0:
            raise ConfigError(f"a scripted fault's client must be a partition id >= 0, got {self.client!r}")
        _check_choice("a scripted fault's fault", self.fault, FAULT_KINDS)


SCRIPTED_FAULT_KEYS = tuple(f.name for f in dataclasses.fields(ScriptedFault))


@dataclass(frozen=True)
class ScenarioConfig:
    """One fleet scenario. TOML keys are these field names in kebab-case (``num-clients``)."""

    name: str = "fleet"
    data: str = SYNTHETIC  # 'synthetic' or a path load_text_dataset reads
    backbone: str | None = None  # None: the packaged MiniLM-L6
    text_column: str | None = None
    label_column: str | None = None
    labels: str | None = None  # a JSON list of label names: the label map, so devices with own data need no more
    max_examples: int | None = None  # cap on training examples before partitioning (seeded sample)
    examples_per_user: int = 80  # synthetic data only: messages per simulated user
    server_test_examples: int | None = None  # seeded cap on the server's test split (central evaluation)
    partition: str = "iid"  # iid | dirichlet | natural (one client per user id)
    num_clients: int = 4
    alpha: float = 0.5  # Dirichlet concentration (dirichlet only)
    test_fraction: float = 0.2  # of each client's examples held out as its local test split
    method: str = "lora"
    rank: int | None = None  # the method's size field (LoRA rank, bottleneck, virtual tokens)
    personal_head: bool = False  # the head stays on the device (FedPer); only the adapter is averaged
    eval_before_training: bool = False  # clients also score the global model they received (accuracy-before)
    rounds: int = 3
    clients_per_round: int | None = None  # None: every client, every round
    min_clients: int = 1  # fewer accepted deltas than this: the round leaves the global state as it was
    local_epochs: int = 1
    local_max_steps: int | None = None  # overrides local_epochs
    tier_steps: tuple[int, ...] = ()  # device tiers: client p makes tier_steps[p % len] steps per round
    batch_size: int = 16
    learning_rate: float = 2e-3
    mask_absent_labels: bool = False  # local softmax over the client's own labels only (label skew)
    head_learning_rate: float = 5e-2
    max_length: int = 64
    compression: str = "fp16"  # of the uploaded deltas: none | fp16 | int8
    server_lr: float = 1.0
    max_delta_norm: float | None = None  # reject deltas with a larger global L2 norm
    # The most examples one client's delta may weigh in FedAvg: bounds what one (lying) client can pull the mean
    # by. Devices with more weigh as this many; a reply claiming more is rejected.
    max_examples_per_client: int = 10_000
    full_model: bool = False  # also run ordinary full-model FedAvg on the same scenario, for comparison
    full_model_learning_rate: float = 5e-5  # backbone learning rate of that full-model run
    target_accuracy: float | None = None  # compare time to this accuracy; None: the lower of the two runs' best
    seed: int = 0
    device: str = "auto"
    client_cpus: int = 1  # simulation: CPUs each virtual client reserves (Ray: an integer)
    client_gpus: float = 0.0  # simulation: GPU share each virtual client reserves
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    node_timeout: float = 120.0  # seconds the server waits for enough clients to connect
    rejoin_timeout: float = 30.0  # later rounds: seconds to wait for lost clients before going on with fewer
    dropout_fraction: float = 0.0  # simulated faults: share of sampled clients that crash each round
    straggler_fraction: float = 0.0  # share of sampled clients that reply only after the round timeout
    scripted_faults: tuple[ScriptedFault, ...] = ()  # faults at set rounds and clients, beside the drawn ones
    server_proxy_data: str | None = None  # labelled data the server trains on (warm start, fine-tuning)
    server_warmup_epochs: int = 0  # epochs on the proxy data before round 1
    server_finetune_epochs: int = 0  # epochs on the proxy data after each round's aggregation (off by default)
    server_device: str = "auto"  # the server's training and central evaluation: auto | cpu | cuda[:N]
    privacy: PrivacyConfig = PrivacyConfig()  # the [privacy] table: none | aead | secagg+ and SecAgg+ parameters

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        _check_choice("partition", self.partition, SCHEMES)
        _check_choice("compression", self.compression, COMPRESSIONS)
        positive = (
            *("num_clients", "rounds", "local_epochs", "batch_size", "max_length", "client_cpus", "min_clients"),
            "max_examples_per_client",
        )
        for name in (*positive, "examples_per_user"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_examples", "server_test_examples", "clients_per_round", "local_max_steps", "rank"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round ({self.clients_per_round}) cannot exceed num_clients ({self.num_clients})"
            )
        if self.min_clients > self.sample_size:
            raise ConfigError(
                f"min_clients ({self.min_clients}) cannot exceed the clients sampled per round ({self.sample_size})"
            )
        for steps in self.tier_steps:
            _check_positive_int("every tier_steps entry", steps)
        rates = ("alpha", "learning_rate", "head_learning_rate", "full_model_learning_rate", "server_lr")
        for name in (*rates, "round_timeout", "node_timeout", "rejoin_timeout"):
            _check_positive_float(name, getattr(self, name))
        if self.target_accuracy is not None:
            _check_fraction("target_accuracy", self.target_accuracy)
        for name in ("dropout_fraction", "straggler_fraction"):
            _check_fraction(name, getattr(self, name))
        if self.dropout_fraction + self.straggler_fraction > 1.0:
            raise ConfigError(
                f"dropout_fraction + straggler_fraction must be at most 1, got "
                f"{self.dropout_fraction} + {self.straggler_fraction}"
            )
        for fault in self.scripted_faults:
            if not isinstance(fault, ScriptedFault):
                raise ConfigError(f"scripted_faults must hold ScriptedFault entries, got {fault!r}")
            if fault.client >= self.num_clients:
                raise ConfigError(
                    f"a scripted fault names client {fault.client}, but the scenario has {self.num_clients} "
                    f"clients (partition ids 0..{self.num_clients - 1})"
                )
        if self.max_delta_norm is not None:
            _check_positive_float("max_delta_norm", self.max_delta_norm)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        if isinstance(self.client_gpus, bool) or not isinstance(self.client_gpus, int | float) or self.client_gpus < 0:
            raise ConfigError(f"client_gpus must be a number >= 0, got {self.client_gpus!r}")
        for name in ("server_warmup_epochs", "server_finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if (self.server_warmup_epochs or self.server_finetune_epochs) and not self.server_proxy_data:
            raise ConfigError(
                "server-warmup-epochs and server-finetune-epochs train on server-proxy-data: name a labelled "
                "CSV/JSON/JSONL file or folder the server holds"
            )
        if not isinstance(self.privacy, PrivacyConfig):
            raise ConfigError(f"privacy must be a PrivacyConfig, got {type(self.privacy).__name__}")
        self.privacy.check_fleet(self.sample_size)

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


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")


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
        if name == "privacy":
            values[name] = _privacy(value, where)
        elif name == "scripted_faults":
            values[name] = _scripted_faults(value, where)
        else:
            values[name] = _coerce(key, value, types[name])
    scenario = ScenarioConfig(**values)
    _check_method(scenario)
    return scenario


def _privacy(table: Any, where: str) -> PrivacyConfig:
    """The ``[privacy]`` table: known keys only, numbers as in the rest of the scenario."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: 'privacy' must be a table, e.g. [privacy] mode = \"secagg+\", got {table!r}")
    unknown = sorted(k for k in table if k not in PRIVACY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: [privacy] has unknown keys {unknown}; allowed keys are: {', '.join(PRIVACY_KEYS)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(PrivacyConfig)}
    values = {
        key.replace("-", "_"): _coerce(f"privacy.{key}", value, types[key.replace("-", "_")])
        for key, value in table.items()
    }
    return PrivacyConfig(**values)


def _scripted_faults(entries: Any, where: str) -> tuple[ScriptedFault, ...]:
    """``scripted-faults``: a list of inline tables with exactly the keys round, client and fault."""
    example = '[{round = 2, client = 1, fault = "stall"}]'
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: scripted-faults must be a list of tables, e.g. {example}, got {entries!r}")
    faults = []
    for entry in entries:
        if not isinstance(entry, Mapping) or sorted(entry) != sorted(SCRIPTED_FAULT_KEYS):
            raise ConfigError(
                f"{where}: each scripted fault is a table with the keys {', '.join(SCRIPTED_FAULT_KEYS)}, "
                f"e.g. {example}; got {entry!r}"
            )
        faults.append(ScriptedFault(**entry))
    return tuple(faults)


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """TOML gives int for ``alpha = 1``; accept that for floats, refuse every other mismatch."""
    if annotation.startswith("tuple[int"):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"scenario key {key!r} must be a list of integers, e.g. [5, 20, 50], got {value!r}")
        return tuple(value)
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
    for key in ("data", "backbone", "labels", "server-proxy-data"):
        value = resolved.get(key)
        if isinstance(value, str) and value != SYNTHETIC and not Path(value).expanduser().is_absolute():
            candidate = folder / value
            if candidate.exists():
                resolved[key] = str(candidate.resolve())
    return resolved


def with_overrides(scenario: ScenarioConfig, **changes: Any) -> ScenarioConfig:
    """A copy with some fields changed (``None`` values are ignored), validated again."""
    return dataclasses.replace(scenario, **{k: v for k, v in changes.items() if v is not None})


FULL_MODEL_METHOD = "full"


def full_model_variant(scenario: ScenarioConfig) -> ScenarioConfig:
    """The same scenario as ordinary full-model FedAvg: every backbone weight trained and sent as fp32.

    Data, partition, schedule, seeds and faults stay the same, so the two runs differ only in
    what is trained and sent; the backbone trains at ``full_model_learning_rate`` (adapter learning
    rates would wreck a pretrained backbone) and the head at the scenario's head learning rate.
    """
    return dataclasses.replace(
        scenario,
        name=f"{scenario.name}-full-model",
        method=FULL_MODEL_METHOD,
        rank=None,
        compression="none",
        learning_rate=scenario.full_model_learning_rate,
        full_model=False,
        privacy=PrivacyConfig(),  # the baseline is ordinary FedAvg: plain deltas
    )


def local_step_budget(scenario: ScenarioConfig, partition_id: int) -> int | None:
    """Optimizer steps client ``partition_id`` makes per round: its tier's budget, else ``local_max_steps``."""
    if scenario.tier_steps:
        return scenario.tier_steps[partition_id % len(scenario.tier_steps)]
    return scenario.local_max_steps
