"""Seeded client partitions: reproducible, disjoint, covering, and as non-IID as asked."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import replace

import pytest

from fedadapt.data.dataset import TextDataset
from fedadapt.data.partition import ClientSplit, PartitionConfig, partition_dataset
from fedadapt.data.synthetic import SyntheticConfig, make_synthetic_dataset
from fedadapt.errors import ConfigError, DataError

DATA = make_synthetic_dataset(SyntheticConfig(num_users=8, examples_per_user=80))
# Labels in blocks, so an unshuffled split would be visibly non-IID.
BLOCKS = TextDataset(
    texts=tuple(f"example {i}" for i in range(600)), labels=tuple(f"l{i // 60}" for i in range(600)), source="blocks"
)


def _mean_distinct_labels(clients: list[ClientSplit]) -> float:
    return sum(len(set(c.train.labels + c.test.labels)) for c in clients) / len(clients)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_same_seed_same_partitions(scheme: str) -> None:
    config = PartitionConfig(scheme=scheme, num_partitions=8)  # type: ignore[arg-type]
    assert partition_dataset(DATA, config) == partition_dataset(DATA, config)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_other_seed_other_partitions(scheme: str) -> None:
    config = PartitionConfig(scheme=scheme, num_partitions=8)  # type: ignore[arg-type]
    first = partition_dataset(DATA, config)
    second = partition_dataset(DATA, replace(config, seed=1))
    assert [c.train_indices for c in first] != [c.train_indices for c in second]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_every_example_in_exactly_one_client_split(scheme: str) -> None:
    clients = partition_dataset(DATA, PartitionConfig(scheme=scheme, num_partitions=8))  # type: ignore[arg-type]
    rows = [row for c in clients for row in c.train_indices + c.test_indices]
    assert sorted(rows) == list(range(len(DATA)))
    for client in clients:
        assert client.train == DATA.subset(client.train_indices, source=client.train.source)
        assert client.test == DATA.subset(client.test_indices, source=client.test.source)
        assert len(client.train) > 0 and len(client.test) > 0
        assert abs(len(client.test) - 0.2 * (len(client.train) + len(client.test))) <= 1
    assert [c.client_id for c in clients] == list(range(8))


def test_iid_shuffles_before_sharding() -> None:
    clients = partition_dataset(BLOCKS, PartitionConfig(scheme="iid", num_partitions=10))
    assert [len(c.train) + len(c.test) for c in clients] == [60] * 10
    assert _mean_distinct_labels(clients) > 8


def test_small_alpha_dirichlet_skews_labels() -> None:
    iid = partition_dataset(BLOCKS, PartitionConfig(scheme="iid", num_partitions=10))
    skewed = partition_dataset(BLOCKS, PartitionConfig(scheme="dirichlet", num_partitions=10, alpha=0.1))
    assert _mean_distinct_labels(skewed) < _mean_distinct_labels(iid) - 3
    assert sorted(row for c in skewed for row in c.train_indices + c.test_indices) == list(range(600))


def test_natural_partition_is_one_client_per_user() -> None:
    clients = partition_dataset(DATA, PartitionConfig(scheme="natural", num_partitions=8))
    owners = []
    for client in clients:
        assert client.train.user_ids is not None and client.test.user_ids is not None
        users = set(client.train.user_ids) | set(client.test.user_ids)
        assert len(users) == 1
        owners.append(users.pop())
        assert len(client.train) + len(client.test) == 80
    assert owners == sorted(set(DATA.user_ids or ()))


def test_natural_partition_needs_one_partition_per_user() -> None:
    with pytest.raises(DataError, match="has 8 users, so num_partitions must be 8, got 4"):
        partition_dataset(DATA, PartitionConfig(scheme="natural", num_partitions=4))
    with pytest.raises(DataError, match="needs user ids, and blocks has none"):
        partition_dataset(BLOCKS, PartitionConfig(scheme="natural", num_partitions=4))


def test_impossible_dirichlet_suggests_a_larger_alpha() -> None:
    config = PartitionConfig(scheme="dirichlet", num_partitions=20, alpha=0.01, min_partition_size=25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the partitioner's retry warnings are logged, not raised
        with pytest.raises(DataError, match="Use a larger alpha, fewer partitions or a smaller min_partition_size"):
            partition_dataset(BLOCKS, config)


def test_more_partitions_than_examples() -> None:
    tiny = BLOCKS.subset(range(5))
    with pytest.raises(DataError, match="has 5 examples, fewer than the 8 partitions"):
        partition_dataset(tiny, PartitionConfig(scheme="iid", num_partitions=8))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scheme", "shards", "scheme must be one of"),
        ("num_partitions", 0, "num_partitions must be a positive integer"),
        ("alpha", 0.0, "alpha must be positive"),
        ("test_fraction", 1.0, r"test_fraction must be in \[0, 1\)"),
        ("min_partition_size", 0, "min_partition_size must be a positive integer"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PartitionConfig(**{field: value})  # type: ignore[arg-type]


def test_importing_the_data_modules_does_not_import_flower() -> None:
    code = (
        "import sys, fedadapt, fedadapt.data.readers, fedadapt.data.partition, fedadapt.data.synthetic; "
        "print('flwr' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
