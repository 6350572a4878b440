"""A device's data and files: its split, kept in its state folder so later messages skip loading and partitioning.

In deployment Flower starts a fresh ClientApp process for every message. Without this file each
process loads the scenario's whole dataset, imports the partitioner stack (flwr-datasets pulls in
pandas, matplotlib and seaborn: about 300 MiB and seconds of CPU) and partitions everything again
to find the device's own rows. The device instead keeps its label map and its train/test split in
``<state folder>/data-<partition id>.json``, keyed by the scenario's data settings and by the size
and modification time of every data file: change either and the split is computed afresh. The
file holds only the device's own examples, beside its personal part (``client-<partition id>.safetensors``)
and its frozen-prefix cache (``prefix-cache-<partition id>/``, ``fedadapt.fleet.device_cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedadapt import jsonsafe
from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.config_values import expand_user
from fedadapt.data.dataset import TextDataset
from fedadapt.data.label_map import LabelMap
from fedadapt.data.partition import ClientSplit
from fedadapt.data.readers import MAX_DATA_FILE_BYTES
from fedadapt.errors import ConfigError, DataError, FedAdaptError
from fedadapt.fleet.data import DATA_FIELDS, client_split, device_split, scenario_labels
from fedadapt.fleet.scenario import ScenarioConfig

logger = logging.getLogger(__name__)

DATA_FILE = "data-{partition_id}.json"
PERSONAL_FILE = "client-{partition_id}.safetensors"
PREFIX_CACHE_DIR = "prefix-cache-{partition_id}"
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20  # fedadapt.train.prefix_store.DEFAULT_MAX_BYTES (this module loads no torch)
PREFIX_CACHE_DTYPES = ("float16", "float32")
FORMAT = 1  # bump when the file's layout changes: older files are then recomputed
FILE_KEYS = ("data", "labels")  # scenario fields that name files whose contents the split depends on
# The file holds a share of one data file (at most MAX_DATA_FILE_BYTES) and its indices: the same cap fits it.
# {"train": {"texts": [...]}} is 3 levels deep; anything deeper is not a file this module wrote.
_FILE_DEPTH = 4


@dataclass(frozen=True)
class PrefixCacheSettings:
    """How a device keeps its frozen-prefix states (``fedadapt.fleet.device_cache``): a device's own setting."""

    enabled: bool = True  # False: every epoch runs the whole model (the reference the cache is checked against)
    max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES  # the cache folder's cap; 0: states serve one round, from memory
    dtype: str = "float16"  # float32: bit for bit what the model computes, twice the bytes

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ConfigError(f"the prefix cache's max_bytes must be an integer >= 0, got {self.max_bytes!r}")
        if self.dtype not in PREFIX_CACHE_DTYPES:
            raise ConfigError(f"the prefix cache's dtype must be one of {PREFIX_CACHE_DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class DeviceContext:
    """One device of a scenario's fleet: its partition, the folder it keeps its files in, its own data file.

    Every step of a device's round takes it; what changes per message (the global state, the round
    number) is passed beside it.
    """

    scenario: ScenarioConfig
    partition_id: int
    state_dir: Path  # its personal part and its kept split
    data_path: Path | None = None  # the device's own data file; None: its partition of the scenario's data
    prefix_cache: PrefixCacheSettings = PrefixCacheSettings()

    @property
    def personal_path(self) -> Path:
        """Where this device keeps its personal part."""
        return personal_path(self.state_dir, self.partition_id)

    @property
    def prefix_cache_dir(self) -> Path:
        """Where this device keeps its frozen-prefix states."""
        return Path(self.state_dir) / PREFIX_CACHE_DIR.format(partition_id=self.partition_id)


def device_data(device: DeviceContext) -> tuple[LabelMap, ClientSplit]:
    """The scenario's label map and the device's split, kept in its state folder between messages.

    A device with its own file (``data_path``) reads that each time and keeps nothing.
    """
    scenario, partition_id = device.scenario, device.partition_id
    if device.data_path is not None:
        return scenario_labels(scenario), device_split(scenario, partition_id, device.data_path)

    def compute() -> tuple[LabelMap, ClientSplit]:
        return scenario_labels(scenario), client_split(scenario, partition_id)

    fields = {name: getattr(scenario, name) for name in DATA_FIELDS}
    return cached_device_data(fields, partition_id, device.state_dir, compute)


def personal_path(state_dir: Path, partition_id: int) -> Path:
    """Where device ``partition_id`` keeps its personal part."""
    return Path(state_dir) / PERSONAL_FILE.format(partition_id=partition_id)


def device_data_path(state_dir: Path, partition_id: int) -> Path:
    """Where device ``partition_id`` keeps its split."""
    return Path(state_dir) / DATA_FILE.format(partition_id=partition_id)


def cached_device_data(
    data_fields: Mapping[str, Any],
    partition_id: int,
    state_dir: Path,
    compute: Callable[[], tuple[LabelMap, ClientSplit]],
) -> tuple[LabelMap, ClientSplit]:
    """The device's label map and split: from its state folder when still valid, else ``compute()``d and kept.

    ``data_fields`` are the scenario settings the split depends on (data path, partitioning, seed...).
    """
    path = device_data_path(state_dir, partition_id)
    key = data_key(data_fields, partition_id)
    kept = _read(path, key, partition_id)
    if kept is not None:
        return kept
    labels, split = compute()
    record = {"format": FORMAT, "key": key, "labels": list(labels.names), "label_source": labels.source}
    record |= {
        "train": _dataset_json(split.train, split.train_indices),
        "test": _dataset_json(split.test, split.test_indices),
    }
    write_bytes_atomic(path, json.dumps(record).encode())
    return labels, split


def data_key(data_fields: Mapping[str, Any], partition_id: int) -> str:
    """A digest of everything the device's split depends on, data files' sizes and times included."""
    files = {name: _fingerprint(data_fields.get(name)) for name in FILE_KEYS}
    content = {"format": FORMAT, "partition": partition_id, "fields": dict(data_fields), "files": files}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(location: Any) -> list[tuple[str, int, int]] | None:
    """(name, size, mtime_ns) of a data file, or of every file below a data folder; None for no file."""
    if not isinstance(location, str):
        return None
    path = expand_user(location, "the data path", DataError)
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        return [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in found]
    return None  # 'synthetic', or a hub id: the fields alone name it


def _read(path: Path, key: str, partition_id: int) -> tuple[LabelMap, ClientSplit] | None:
    if not path.is_file():
        return None
    try:
        record = jsonsafe.load_file(path, max_bytes=MAX_DATA_FILE_BYTES, max_depth=_FILE_DEPTH)
        if not isinstance(record, dict):
            raise ValueError(f"a {type(record).__name__}, not the JSON object this module writes")
        if record.get("format") != FORMAT or record.get("key") != key:
            logger.info("%s was made for other data or settings: splitting the data again", path)
            return None
        labels = LabelMap(tuple(record["labels"]), source=record["label_source"])
        split = ClientSplit(
            client_id=partition_id,
            train=_dataset(record["train"]),
            test=_dataset(record["test"]),
            train_indices=tuple(record["train"]["indices"]),
            test_indices=tuple(record["test"]["indices"]),
        )
    except (OSError, ValueError, KeyError, TypeError, FedAdaptError) as err:
        logger.warning("%s is unreadable (%s): splitting the data again", path, err)
        return None
    return labels, split


def _dataset_json(data: TextDataset, indices: tuple[int, ...]) -> dict[str, Any]:
    user_ids = None if data.user_ids is None else list(data.user_ids)
    return {
        "texts": list(data.texts),
        "labels": list(data.labels),
        "user_ids": user_ids,
        "source": data.source,
        "indices": list(indices),
    }


def _dataset(record: Mapping[str, Any]) -> TextDataset:
    user_ids = record["user_ids"]
    return TextDataset(
        texts=tuple(record["texts"]),
        labels=tuple(record["labels"]),
        user_ids=None if user_ids is None else tuple(user_ids),
        source=record["source"],
    )
