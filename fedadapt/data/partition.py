"""Splitting a data set into seeded client partitions (Flower Datasets partitioners), each with a local test set."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedadapt.data.dataset import TextDataset
from fedadapt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

logger = logging.getLogger(__name__)

Scheme = Literal["iid", "dirichlet", "natural"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "natural")


@dataclass(frozen=True)
class PartitionConfig:
    """How to split data over clients.

    ``iid`` deals shuffled examples out evenly; ``dirichlet`` gives each client a label mix
    drawn from Dirichlet(``alpha``) per label (smaller alpha, more skew; ``min_partition_size``
    examples at least); ``natural`` makes one client per user id. Each client's examples are
    then split into local train and test (``test_fraction``), seeded by ``seed``.
    """

    scheme: Scheme = "iid"
    num_partitions: int = 8
    alpha: float = 0.5
    seed: int = 0
    test_fraction: float = 0.2
    min_partition_size: int = 10

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.num_partitions < 1:
            raise ConfigError(f"num_partitions must be a positive integer, got {self.num_partitions!r}")
        if self.alpha <= 0.0:
            raise ConfigError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        if self.min_partition_size < 1:
            raise ConfigError(f"min_partition_size must be a positive integer, got {self.min_partition_size!r}")


@dataclass(frozen=True)
class ClientSplit:
    """One client's local train and test data, with their row numbers in the partitioned data set."""

    client_id: int
    train: TextDataset
    test: TextDataset
    train_indices: tuple[int, ...]
    test_indices: tuple[int, ...]


def partition_dataset(data: TextDataset, config: PartitionConfig) -> list[ClientSplit]:
    """Split ``data`` over ``config.num_partitions`` clients; the same config gives the same split.

    Natural partitions are ordered by sorted user id (client 0 is the smallest id).
    """
    import datasets  # about a second (pyarrow, pandas): only when partitioning, never for a device's kept split

    order = list(range(len(data)))
    if config.scheme == "iid":
        # IidPartitioner deals out contiguous shards, so shuffle first.
        order = np.random.default_rng(config.seed).permutation(len(data)).tolist()
    columns: dict[str, list[int] | list[str]] = {"row": order, "label": [data.labels[i] for i in order]}
    if data.user_ids is not None:
        columns["user_id"] = [data.user_ids[i] for i in order]
    table = datasets.Dataset.from_dict(columns)
    partitioner = _make_partitioner(data, config)
    partitioner.dataset = table
    rows = _partition_rows(partitioner, data, config)
    return [_split_client(data, client_id, client_rows, config) for client_id, client_rows in enumerate(rows)]


def _make_partitioner(data: TextDataset, config: PartitionConfig) -> Partitioner:
    # Imported here: flwr_datasets is heavy, and `import fedadapt` must stay light.
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if len(data) < config.num_partitions:
        raise DataError(
            f"{data.source or 'the data'} has {len(data)} examples, fewer than the "
            f"{config.num_partitions} partitions asked for: use fewer partitions"
        )
    if config.scheme == "iid":
        return IidPartitioner(num_partitions=config.num_partitions)
    if config.scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=config.num_partitions,
            partition_by="label",
            alpha=config.alpha,
            min_partition_size=config.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=config.seed,
        )
    users = sorted(set(data.user_ids)) if data.user_ids is not None else []
    if not users:
        raise DataError(f"natural partitioning needs user ids, and {data.source or 'the data'} has none")
    if len(users) != config.num_partitions:
        raise DataError(
            f"natural partitioning makes one client per user: {data.source or 'the data'} has {len(users)} "
            f"users, so num_partitions must be {len(users)}, got {config.num_partitions}"
        )
    return NaturalIdPartitioner(partition_by="user_id")


def _partition_rows(partitioner: Partitioner, data: TextDataset, config: PartitionConfig) -> list[list[int]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rows = [list(partitioner.load_partition(k)["row"]) for k in range(config.num_partitions)]
        except ValueError as err:
            if config.scheme != "dirichlet":
                raise DataError(f"could not partition {data.source or 'the data'} ({config.scheme}): {err}") from err
            raise DataError(
                f"could not split {data.source or 'the data'} ({len(data)} examples) into "
                f"{config.num_partitions} Dirichlet partitions of at least {config.min_partition_size} "
                f"examples with alpha={config.alpha}: {err} Use a larger alpha, fewer partitions or a smaller "
                "min_partition_size."
            ) from err
    for warning in caught:
        logger.debug("partitioner: %s", warning.message)
    empty = [k for k, client_rows in enumerate(rows) if not client_rows]
    if empty:
        raise DataError(f"partitions {empty} of {data.source or 'the data'} are empty: use fewer partitions")
    return rows


def _split_client(data: TextDataset, client_id: int, rows: list[int], config: PartitionConfig) -> ClientSplit:
    rng = np.random.default_rng([config.seed, client_id])
    order = [rows[i] for i in rng.permutation(len(rows))]
    num_test = _num_test(len(rows), config.test_fraction)
    test_rows = tuple(sorted(order[:num_test]))
    train_rows = tuple(sorted(order[num_test:]))
    source = data.source or "data"
    return ClientSplit(
        client_id=client_id,
        train=data.subset(train_rows, source=f"{source} [client {client_id} train]"),
        test=data.subset(test_rows, source=f"{source} [client {client_id} test]"),
        train_indices=train_rows,
        test_indices=test_rows,
    )


def _num_test(size: int, test_fraction: float) -> int:
    """Test examples of a client: the fraction, rounded, but at least one and never all."""
    if test_fraction == 0.0 or size < 2:
        return 0
    return min(max(round(size * test_fraction), 1), size - 1)
