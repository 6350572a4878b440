"""A scenario's data: loaded, a server test split held out, the rest partitioned over the clients.

``load_fleet_data`` is cached per process (a simulation worker serves many clients); a device's
own split comes from ``client_split`` (its partition) or ``device_split`` (its partition, or
its own file), and every device labels with the scenario's one label map (``scenario_labels``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from fedadapt.data.label_map import LabelMap
from fedadapt.data.partition import ClientSplit, PartitionConfig, partition_dataset
from fedadapt.data.readers import load_text_dataset
from fedadapt.data.splits import DataConfig, Splits, load_splits
from fedadapt.data.synthetic import SYNTHETIC, SyntheticConfig, make_synthetic_dataset
from fedadapt.errors import ConfigError, DataError
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.fleet.variants import only_fields

# The scenario fields a client's split depends on: the data cache's key, here and in a device's state folder.
DATA_FIELDS = (
    *("data", "text_column", "label_column", "max_examples", "examples_per_user", "server_test_examples"),
    *("partition", "num_clients", "alpha", "test_fraction", "seed", "labels"),
)


@dataclass(frozen=True)
class FleetData:
    """The scenario's global label map, the held-out server test split, and every client's split."""

    splits: Splits
    clients: tuple[ClientSplit, ...]

    @property
    def labels(self) -> LabelMap:
        return self.splits.labels


def load_fleet_data(scenario: ScenarioConfig) -> FleetData:
    """Load, hold out a server test split, and partition the rest over the clients (cached per process)."""
    return _load_fleet_data(only_fields(scenario, DATA_FIELDS))


@functools.lru_cache(maxsize=2)
def _load_fleet_data(scenario: ScenarioConfig) -> FleetData:
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
    users = scenario.num_clients if scenario.partition == "natural" else SyntheticConfig.num_users
    data = make_synthetic_dataset(
        SyntheticConfig(num_users=users, examples_per_user=scenario.examples_per_user, seed=scenario.seed)
    )
    train, test = data.split_off(0.2, scenario.seed)
    labels = LabelMap.from_labels(data.labels, source=data.source)
    return Splits(train=train.sample(scenario.max_examples, scenario.seed), test=test, labels=labels)


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


def scenario_labels(scenario: ScenarioConfig) -> LabelMap:
    """The scenario's global label map: from its ``labels`` file when it names one, else from its data."""
    if scenario.labels:
        return _label_file(scenario.labels)
    return load_fleet_data(scenario).labels


@functools.lru_cache(maxsize=4)
def _label_file(path: str) -> LabelMap:
    return LabelMap.from_file(path)
