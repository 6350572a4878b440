"""A device's split kept in its state folder (fedadapt.fleet.device_data): reused while valid, recomputed otherwise."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from helpers import tiny_scenario

from fedadapt.delta.serialize import deserialize_state, serialize_state
from fedadapt.fleet.build import build_model
from fedadapt.fleet.data import DATA_FIELDS, client_split, load_fleet_data
from fedadapt.fleet.device_data import DeviceContext, cached_device_data, device_data, device_data_path
from fedadapt.fleet.device_round import run_client_round
from fedadapt.fleet.scenario import ScenarioConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CSV = "text,label\n" + "".join(f"message {i} about {'cards' if i % 2 else 'loans'},{'card' if i % 2 else 'loan'}\n"
                               for i in range(60))  # fmt: skip


def _fields(scenario: ScenarioConfig) -> dict[str, object]:
    return {name: getattr(scenario, name) for name in DATA_FIELDS}


def _counting(scenario: ScenarioConfig, partition_id: int, calls: list[int]):  # type: ignore[no-untyped-def]
    def compute():  # type: ignore[no-untyped-def]
        calls.append(partition_id)
        return load_fleet_data(scenario).labels, client_split(scenario, partition_id)

    return compute


def test_the_split_is_kept_and_reused_exactly(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert)
    calls: list[int] = []
    first = cached_device_data(_fields(scenario), 1, tmp_path, _counting(scenario, 1, calls))
    again = cached_device_data(_fields(scenario), 1, tmp_path, _counting(scenario, 1, calls))
    assert calls == [1] and device_data_path(tmp_path, 1).is_file()
    assert again == first  # labels, texts, user ids, sources and row numbers, through JSON and back
    assert again[1] == client_split(scenario, 1) and again[0].names == load_fleet_data(scenario).labels.names
    cached_device_data(_fields(scenario), 2, tmp_path, _counting(scenario, 2, calls))
    assert calls == [1, 2]  # each device its own file


def test_other_settings_or_changed_data_files_are_split_again(tiny_bert: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text(CSV)
    scenario = tiny_scenario(tiny_bert, data=str(data), partition="iid", num_clients=2)
    calls: list[int] = []
    state = tmp_path / "state"
    cached_device_data(_fields(scenario), 0, state, _counting(scenario, 0, calls))
    reseeded = dataclasses.replace(scenario, seed=scenario.seed + 1)
    cached_device_data(_fields(reseeded), 0, state, _counting(reseeded, 0, calls))
    assert len(calls) == 2
    cached_device_data(_fields(reseeded), 0, state, _counting(reseeded, 0, calls))
    assert len(calls) == 2  # the file now holds the reseeded split
    data.write_text(CSV + "one more message,card\n")
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    cached_device_data(_fields(reseeded), 0, state, _counting(reseeded, 0, calls))
    assert len(calls) == 3  # the data file changed


@pytest.mark.parametrize("damage", ["{not json", '{"format": 1, "key": "x"}', ""])
def test_an_unreadable_or_foreign_file_is_recomputed_and_replaced(tiny_bert: Path, tmp_path: Path, damage: str) -> None:
    scenario = tiny_scenario(tiny_bert)
    calls: list[int] = []
    path = device_data_path(tmp_path, 0)
    cached_device_data(_fields(scenario), 0, tmp_path, _counting(scenario, 0, calls))
    key = json.loads(path.read_text())["key"]
    path.write_text(damage if damage else json.dumps({"format": 1, "key": key, "labels": []}))
    labels, split = cached_device_data(_fields(scenario), 0, tmp_path, _counting(scenario, 0, calls))
    assert calls == [0, 0] and split == client_split(scenario, 0)
    assert json.loads(path.read_text())["key"] == key  # rewritten whole


def test_a_device_keeps_its_partition_and_nothing_of_its_own_file(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert)
    own = tmp_path / "own.csv"
    own.write_text("text,label\n" + "".join(f"hi {i},{load_fleet_data(scenario).labels.names[0]}\n" for i in range(8)))
    _, split = device_data(DeviceContext(scenario, 0, tmp_path / "state", own))
    assert len(split.train) + len(split.test) == 8 and not (tmp_path / "state").exists()
    assert device_data(DeviceContext(scenario, 0, tmp_path / "kept"))[1] == client_split(scenario, 0)
    assert device_data_path(tmp_path / "kept", 0).is_file()


def test_rounds_from_the_kept_split_train_exactly_as_from_the_data(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert)
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    blob = serialize_state(model.state("shared"), model.schema, "shared", "none")
    fresh = run_client_round(DeviceContext(scenario, 2, tmp_path / "a"), blob, server_round=1)
    assert device_data_path(tmp_path / "a", 2).is_file()
    kept = run_client_round(DeviceContext(scenario, 2, tmp_path / "a"), blob, server_round=1)
    assert kept.num_examples == fresh.num_examples and kept.metrics == fresh.metrics | {"train-seconds": ANY}
    kept_delta = deserialize_state(kept.delta_blob, model.schema, "shared")
    fresh_delta = deserialize_state(fresh.delta_blob, model.schema, "shared")
    assert all(torch.equal(kept_delta[name], tensor) for name, tensor in fresh_delta.items())


def test_a_fresh_process_with_a_kept_split_never_imports_the_partitioner(tiny_bert: Path, tmp_path: Path) -> None:
    code = f"""
import sys
sys.path.insert(0, {str(PROJECT_ROOT / "tests")!r})
from pathlib import Path
from helpers import tiny_scenario
from fedadapt.fleet.build import build_model
from fedadapt.fleet.device_data import DeviceContext, device_data
scenario = tiny_scenario(Path({str(tiny_bert)!r}))
labels, split = device_data(DeviceContext(scenario, 1, Path({str(tmp_path)!r})))
print(len(split.train), "flwr_datasets" in sys.modules, "datasets" in sys.modules)
"""
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    ).stdout.split()
    first, second = run(), run()
    assert first[1:] == ["True", "True"]  # the first message partitions the data
    assert second[0] == first[0] and second[1:] == ["False", "False"]  # later ones read their own file
