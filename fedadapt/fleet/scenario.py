"""Fleet scenarios: one TOML file of kebab-case keys, parsed into a typed ``ScenarioConfig``.

A scenario names the data, how it is split over clients, the adapter method, the federated
schedule, the server optimizer and the faults to simulate (crashing and straggling devices, device
tiers with different step budgets, and ``scripted-faults`` at set rounds for fault drills). Keys are
flat, but for the ``[privacy]`` table (``fedadapt.privacy.config``), the ``[method-settings]`` table
(``fedadapt.fleet.method_settings``) and the list of scripted faults.
Unknown keys and values of the wrong type are refused with the list of allowed keys, before
anything starts; every number must lie in its range in ``SCENARIO_BOUNDS`` (documented in
simulations/README.md), so no value sizes an absurd allocation, loop or sleep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedadapt.aggregate.server_optimizer_config import SERVER_OPTIMIZERS, ServerOptConfig
from fedadapt.config_values import Bound
from fedadapt.data.synthetic import SYNTHETIC
from fedadapt.errors import ConfigError
from fedadapt.fleet.method_settings import METHOD_SETTING_BOUNDS, Settings, check_method_settings, read_method_settings
from fedadapt.methods import METHODS, MethodConfig, make_method_config
from fedadapt.methods.head import HeadConfig
from fedadapt.privacy.config import PRIVACY_KEYS, PrivacyConfig
from fedadapt.privacy.dp.config import dp_config_from_table

SCHEMES = ("iid", "dirichlet", "natural")


FAULT_KINDS = ("crash", "stall")


COMPRESSIONS = ("none", "fp16", "int8")


HEAD_FITS = ("trained", "prototypes")  # how the global head starts: trained by the rounds, or fitted in round 1


PROTOTYPE_BASES = ("none", "label-names")  # the public subspace a prototype head is projected onto (train.prototypes)


MAX_CLIENTS = 100_000


MAX_ROUNDS = 100_000


DAY_SECONDS = 86_400.0


# The range of every numeric scenario key (kebab-case, as in TOML). Upper ends are generous for real fleets
# (fleet-1000.toml is a hundredth of MAX_CLIENTS) but keep every allocation, loop and sleep they size sane:
# timeouts end at a day, so round-timeout + the straggler margin is a valid time.sleep and deadline.
# ``tier-steps`` bounds each entry; ``scripted-faults.round`` and ``.client`` each fault's fields.
SCENARIO_BOUNDS: dict[str, Bound] = {
    "max-examples": Bound("int", 1, 100_000_000),
    "examples-per-user": Bound("int", 1, 100_000),
    "server-test-examples": Bound("int", 1, 100_000_000),
    "num-clients": Bound("int", 1, MAX_CLIENTS),
    "alpha": Bound("float", 0, 1e6, low_open=True),
    "test-fraction": Bound("float", 0, 1, high_open=True),
    "rank": Bound("int", 1, 4096),
    "rounds": Bound("int", 1, MAX_ROUNDS),
    "clients-per-round": Bound("int", 1, MAX_CLIENTS),
    "min-clients": Bound("int", 1, MAX_CLIENTS),
    "local-epochs": Bound("int", 1, 1000),
    "local-max-steps": Bound("int", 1, 1_000_000),
    "tier-steps": Bound("int", 1, 1_000_000),
    "batch-size": Bound("int", 1, 4096),
    "learning-rate": Bound("float", 0, 10, low_open=True),
    "head-learning-rate": Bound("float", 0, 10, low_open=True),
    "max-length": Bound("int", 1, 8192),
    "server-lr": Bound("float", 0, 100, low_open=True),
    "server-momentum": Bound("float", 0, 1, high_open=True),
    "server-beta1": Bound("float", 0, 1, high_open=True),
    "server-beta2": Bound("float", 0, 1, high_open=True),
    "server-tau": Bound("float", 0, 1, low_open=True),
    "max-delta-norm": Bound("float", 0, 1e9, low_open=True),
    "max-examples-per-client": Bound("int", 1, 1_000_000_000),
    "full-model-learning-rate": Bound("float", 0, 10, low_open=True),
    "target-accuracy": Bound("float", 0, 1),
    "seed": Bound("int", 0, 2**32 - 1),
    "client-cpus": Bound("int", 1, 1024),
    "client-gpus": Bound("float", 0, 64),
    "round-timeout": Bound("float", 0, DAY_SECONDS, low_open=True),
    "node-timeout": Bound("float", 0, DAY_SECONDS, low_open=True),
    "rejoin-timeout": Bound("float", 0, DAY_SECONDS, low_open=True),
    "dropout-fraction": Bound("float", 0, 1),
    "straggler-fraction": Bound("float", 0, 1),
    "server-warmup-epochs": Bound("int", 0, 1000),
    "server-finetune-epochs": Bound("int", 0, 1000),
    "head-warmup-rounds": Bound("int", 0, MAX_ROUNDS - 1),
    "scripted-faults.round": Bound("int", 1, MAX_ROUNDS),
    "scripted-faults.client": Bound("int", 0, MAX_CLIENTS - 1),
    **{f"method-settings.{key}": bound for key, bound in METHOD_SETTING_BOUNDS.items()},
}


# The server optimizer's settings: scenario key -> its field in the optimizer's config (fedadapt.aggregate).
SERVER_OPTIMIZER_SETTINGS = {
    "server_momentum": "momentum",
    "server_beta1": "beta1",
    "server_beta2": "beta2",
    "server_tau": "tau",
}


MAX_TIERS = 1000  # entries of tier-steps


MAX_SCRIPTED_FAULTS = 10_000  # entries of scripted-faults


# Synthetic data builds num-clients x examples-per-user messages (about 5 s and 200 MB per million).
MAX_SYNTHETIC_MESSAGES = 1_000_000


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
        for name in ("round", "client"):
            key = f"scripted-faults.{name}"
            SCENARIO_BOUNDS[key].check(key, getattr(self, name))
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
    method_settings: Settings = ()  # the [method-settings] table: the method's own fields (drop_layers=3)
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
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi (fedadapt.aggregate.server_optimizers)
    server_lr: float | None = None  # None: the optimizer's (fedavg and fedavgm 1.0, fedadam and fedyogi 0.01)
    server_momentum: float | None = None  # fedavgm (default 0.9)
    server_beta1: float | None = None  # fedadam, fedyogi (default 0.9)
    server_beta2: float | None = None  # fedadam, fedyogi (default 0.99)
    server_tau: float | None = None  # fedadam, fedyogi (default 1e-3)
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
    initial_head: str | None = None  # an adapter folder whose head starts the global head (a head warm start)
    head_warmup_rounds: int = 0  # the first N of ``rounds`` train only the head (fleet.variants.head_warmup_variant)
    head_fit: str = "trained"  # "prototypes": round 1 fits the global head from class prototypes (train.prototypes)
    prototype_basis: str = "none"  # "label-names": the prototype head is projected onto the names' public span
    privacy: PrivacyConfig = PrivacyConfig()  # the [privacy] table: none | aead | secagg+ and SecAgg+ parameters

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        _check_choice("partition", self.partition, SCHEMES)
        _check_choice("compression", self.compression, COMPRESSIONS)
        _check_choice("server-optimizer", self.server_optimizer, tuple(SERVER_OPTIMIZERS))
        self._check_bounds()
        check_method_settings(self.method_settings, self.method)
        self.server_optimizer_config()  # a setting of another optimizer, or a value it refuses: refused now
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round ({self.clients_per_round}) cannot exceed num-clients ({self.num_clients})"
            )
        if self.min_clients > self.sample_size:
            raise ConfigError(
                f"min-clients ({self.min_clients}) cannot exceed the clients sampled per round ({self.sample_size})"
            )
        if self.dropout_fraction + self.straggler_fraction > 1.0:
            raise ConfigError(
                f"dropout-fraction + straggler-fraction must be at most 1, got "
                f"{self.dropout_fraction} + {self.straggler_fraction}"
            )
        for fault in self.scripted_faults:
            if fault.client >= self.num_clients:
                raise ConfigError(
                    f"a scripted fault names client {fault.client}, but the scenario has {self.num_clients} "
                    f"clients (partition ids 0..{self.num_clients - 1})"
                )
        if self.data == SYNTHETIC and self.num_clients * self.examples_per_user > MAX_SYNTHETIC_MESSAGES:
            raise ConfigError(
                f"synthetic data would build num-clients x examples-per-user = {self.num_clients} x "
                f"{self.examples_per_user} = {self.num_clients * self.examples_per_user} messages, more than the "
                f"{MAX_SYNTHETIC_MESSAGES} allowed: lower one of them"
            )
        if (self.server_warmup_epochs or self.server_finetune_epochs) and not self.server_proxy_data:
            raise ConfigError(
                "server-warmup-epochs and server-finetune-epochs train on server-proxy-data: name a labelled "
                "CSV/JSON/JSONL file or folder the server holds"
            )
        if self.initial_head is not None and self.personal_head:
            raise ConfigError(
                "initial-head starts the global head, but with personal-head = true the head is each device's own: "
                "drop one of them"
            )
        if self.head_warmup_rounds:
            self._check_head_warmup()
        _check_choice("head-fit", self.head_fit, HEAD_FITS)
        _check_choice("prototype-basis", self.prototype_basis, PROTOTYPE_BASES)
        if self.head_fit == "prototypes":
            self._check_prototype_head()
        if not isinstance(self.privacy, PrivacyConfig):
            raise ConfigError(f"privacy must be a PrivacyConfig, got {type(self.privacy).__name__}")
        self.privacy.check_fleet(self.sample_size)
        if self.privacy.dp is not None and self.head_warmup_rounds:
            # The warm-up runs as its own run: two accountants whose ε nobody adds up would under-report ε.
            raise ConfigError(
                f"head-warmup-rounds ({self.head_warmup_rounds}) with [privacy.dp] would account the warm-up and "
                "the rest as two runs and report only the second's ε; set head-warmup-rounds = 0 (or train the "
                "head in the DP run itself)"
            )

    def _check_head_warmup(self) -> None:
        """A head warm-up needs rounds after it and an adapter to warm the head up for."""
        if self.head_warmup_rounds >= self.rounds:
            raise ConfigError(
                f"head-warmup-rounds ({self.head_warmup_rounds}) counts among the {self.rounds} rounds and must "
                f"leave at least one for the adapter: lower it or raise rounds"
            )
        refused = {
            'method = "head"': self.method == "head",  # the whole run already trains only the head
            "personal-head = true": self.personal_head,  # no global head to warm up
            "initial-head": self.initial_head is not None,  # the warm-up makes the initial head
        }
        for setting, present in refused.items():
            if present:
                raise ConfigError(
                    f"head-warmup-rounds trains the global head before the adapter; it does not go with {setting}: "
                    "drop one of them"
                )

    def _check_prototype_head(self) -> None:
        """A prototype round fits the one global head, in round 1, from what devices send instead of training."""
        refused = {
            "personal-head = true": self.personal_head,  # no global head to fit
            "initial-head": self.initial_head is not None,  # round 1 would overwrite it
            "head-warmup-rounds": bool(self.head_warmup_rounds),  # two ways of starting the head
            "server-warmup-epochs": bool(self.server_warmup_epochs),  # trained, then overwritten in round 1
        }
        for setting, present in refused.items():
            if present:
                raise ConfigError(
                    f'head-fit = "prototypes" fits the global head in round 1; it does not go with {setting}: '
                    "drop one of them"
                )

    def prototype_round(self, server_round: int) -> bool:
        """Whether devices send class-mean statistics this round instead of training (round 1 of head-fit)."""
        return self.head_fit == "prototypes" and server_round == 1

    @property
    def sample_size(self) -> int:
        """Clients sampled per round."""
        return self.clients_per_round or self.num_clients

    def method_config(self) -> MethodConfig:
        """The adapter method's config: ``method``, its size ``rank`` and the ``[method-settings]`` table."""
        settings = dict(self.method_settings)
        size_field = METHODS[self.method].size_field if self.method in METHODS else None
        if self.rank is not None and size_field is not None and size_field in settings:
            raise ConfigError(
                f"the scenario sets the size of {self.method!r} twice, with 'rank' and with [method-settings] "
                f"{size_field.replace('_', '-')}: keep one"
            )
        return make_method_config(self.method, size=self.rank, **settings)

    def server_optimizer_config(self) -> ServerOptConfig:
        """The server optimizer ``server-optimizer`` names, with the ``server-*`` settings the scenario sets."""
        config_class = SERVER_OPTIMIZERS[self.server_optimizer]
        fields = {f.name for f in dataclasses.fields(config_class)}
        settings: dict[str, float] = {} if self.server_lr is None else {"server_lr": self.server_lr}
        for name, field in SERVER_OPTIMIZER_SETTINGS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if field not in fields:
                users = sorted(
                    kind for kind, c in SERVER_OPTIMIZERS.items() if field in {f.name for f in dataclasses.fields(c)}
                )
                raise ConfigError(
                    f"scenario key {name.replace('_', '-')!r} is a setting of server-optimizer {' and '.join(users)}, "
                    f"not of {self.server_optimizer!r}: drop it, or choose one of those"
                )
            settings[field] = value
        return config_class(**settings)

    def _check_bounds(self) -> None:
        """Every numeric field in its SCENARIO_BOUNDS range (None means unset where the field allows it)."""
        for field in dataclasses.fields(self):
            key = field.name.replace("_", "-")
            value = getattr(self, field.name)
            if key not in SCENARIO_BOUNDS or value is None:
                continue
            if key == "tier-steps":
                _check_list_length(key, value, MAX_TIERS)
                for index, steps in enumerate(value):
                    SCENARIO_BOUNDS[key].check(f"{key}[{index}]", steps)
            else:
                SCENARIO_BOUNDS[key].check(key, value)
        _check_list_length("scripted-faults", self.scripted_faults, MAX_SCRIPTED_FAULTS)
        for fault in self.scripted_faults:
            if not isinstance(fault, ScriptedFault):
                raise ConfigError(f"scripted_faults must hold ScriptedFault entries, got {fault!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def _check_list_length(key: str, value: object, most: int) -> None:
    if not isinstance(value, tuple | list):
        raise ConfigError(f"scenario key {key!r} must be a list, got {value!r}")
    if len(value) > most:
        raise ConfigError(f"scenario key {key!r} may hold at most {most} entries, got {len(value)}")


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
        elif name == "method_settings":
            values[name] = read_method_settings(value, str(data.get("method", ScenarioConfig.method)), where)
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
        if key != "dp"
    }
    if "dp" in table:
        values["dp"] = dp_config_from_table(table["dp"], where)
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
    scenario.method_config()
    if scenario.personal_head and scenario.method == HeadConfig.name:
        raise ConfigError(
            "method 'head' trains the head alone: with personal-head = true no device would share anything; "
            "drop personal-head, or choose a method with an adapter"
        )
