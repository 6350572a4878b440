"""Fleet scenarios and one device's round on a tiny BERT (no Flower)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_scenario

from fedadapt.delta.serialize import deserialize_state, read_metadata, serialize_state
from fedadapt.errors import ConfigError
from fedadapt.fleet import device_round
from fedadapt.fleet.build import build_model
from fedadapt.fleet.data import load_fleet_data
from fedadapt.fleet.device_data import DeviceContext, device_data_path, personal_path
from fedadapt.fleet.device_round import ClientReply, empty_client_round, run_client_round
from fedadapt.fleet.run_config import fleet_run_from_config
from fedadapt.fleet.scenario import SCENARIO_KEYS, ScenarioConfig, scenario_from_dict
from fedadapt.fleet.scenario_file import load_scenario
from fedadapt.model.adapter_model import AdapterModel

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _global(scenario: ScenarioConfig) -> tuple[AdapterModel, bytes]:
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    return model, serialize_state(model.state("shared"), model.schema, "shared", "none")


def _decode(model: AdapterModel, reply: ClientReply) -> dict[str, torch.Tensor]:
    return deserialize_state(reply.delta_blob, model.schema, "shared")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    # Compare tensors, not blobs: safetensors does not keep the header's metadata order.
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


# --- scenario files -----------------------------------------------------------------------------------------------


def test_load_scenario_maps_kebab_keys_and_resolves_paths_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text,label\na,x\nb,y\n")
    file = tmp_path / "s.toml"
    file.write_text(
        'name = "s"\ndata = "data.csv"\nnum-clients = 2\nclients-per-round = 1\nalpha = 1\n'
        'personal-head = true\ncompression = "int8"\nrank = 4\n'
    )
    scenario = load_scenario(file)
    assert scenario.num_clients == 2 and scenario.clients_per_round == 1 and scenario.sample_size == 1
    assert scenario.alpha == 1.0 and isinstance(scenario.alpha, float)
    assert scenario.personal_head and scenario.compression == "int8"
    assert scenario.data == str((tmp_path / "data.csv").resolve())


def test_unknown_key_names_every_allowed_key(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text("num-clients = 2\nnum_rounds = 3\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['num_rounds'\]") as caught:
        load_scenario(file)
    assert all(key in str(caught.value) for key in SCENARIO_KEYS)
    assert "clients-per-round" in SCENARIO_KEYS and "personal-head" in SCENARIO_KEYS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num-clients": "4"}, "must be a int"),
        ({"personal-head": 1}, "must be a bool"),
        ({"rounds": True}, "must be a int"),
        ({"compression": "zip"}, "compression must be one of"),
        ({"partition": "random"}, "partition must be one of"),
        ({"num-clients": 2, "clients-per-round": 3}, "cannot exceed num-clients"),
        ({"rounds": 0}, r"'rounds' must be an integer in \[1, 100000\], got 0"),
        ({"method": "nope"}, "unknown method"),
        ({"method": "bitfit", "rank": 4}, "no rank or size"),
        ({"test-fraction": 1.0}, r"'test-fraction' must be a finite number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_values_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scenario_from_dict(data)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_scenario(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(tmp_path / "bad.toml")


def test_shipped_scenarios_load() -> None:
    for file in sorted((PROJECT_ROOT / "simulations").glob("*.toml")):
        scenario = load_scenario(file)
        assert scenario.num_clients >= scenario.sample_size, file


def test_run_config_resolves_the_scenario_against_the_project(tmp_path: Path) -> None:
    run = fleet_run_from_config(
        {"scenario": "simulations/quickstart.toml", "out-dir": str(tmp_path), "num-rounds": 7, "resume": True},
        PROJECT_ROOT,
    )
    assert run.scenario.name == "quickstart" and run.scenario.rounds == 7
    assert run.resume and run.out_dir == tmp_path and run.keys_dir == tmp_path / "keys"
    unchanged = fleet_run_from_config({"scenario": "simulations/quickstart.toml", "out-dir": "x"}, PROJECT_ROOT)
    assert unchanged.scenario.rounds == load_scenario(PROJECT_ROOT / "simulations/quickstart.toml").rounds
    with pytest.raises(ConfigError, match="unknown keys"):
        fleet_run_from_config({"scenario": "s.toml", "out-dir": "x", "rounds": 2}, PROJECT_ROOT)


# --- data ---------------------------------------------------------------------------------------------------------


def test_synthetic_natural_partition_gives_one_client_per_user(tiny_bert: Path) -> None:
    data = load_fleet_data(tiny_scenario(tiny_bert, partition="natural", num_clients=3))
    assert len(data.clients) == 3
    users = [set(client.train.user_ids or ()) for client in data.clients]
    assert all(len(u) == 1 for u in users) and len(set.union(*users)) == 3
    assert len(data.labels) == 6 and len(data.splits.test) > 0


# --- one device's round -------------------------------------------------------------------------------------------


def test_client_round_sends_only_the_shared_delta(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert, personal_head=True, compression="fp16")
    model, blob = _global(scenario)
    reply = run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=1)
    delta = deserialize_state(reply.delta_blob, model.schema, "shared")
    assert list(delta) == [s.name for s in model.schema.specs("shared")]
    assert not set(delta) & set(model.frozen.params)  # no backbone tensor
    assert not any(s.role == "head" for s in model.schema.specs("shared"))  # the head is personal
    assert read_metadata(reply.delta_blob)["compression"] == "fp16"
    assert any(bool(t.abs().sum() > 0) for t in delta.values())
    assert reply.num_examples == len(load_fleet_data(scenario).clients[1].train)
    assert reply.metrics["partition-id"] == 1 and reply.metrics["train-steps"] == 2
    assert 0.0 <= reply.metrics["accuracy"] <= 1.0


def test_a_device_with_more_examples_than_the_limit_reports_the_limit(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert, max_examples_per_client=3)
    _, blob = _global(scenario)
    assert len(load_fleet_data(scenario).clients[1].train) > 3
    assert run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=1).num_examples == 3
    assert empty_client_round(DeviceContext(scenario, 1, tmp_path)).num_examples == 3


def test_personal_head_is_kept_on_disk_and_restored_next_round(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = tiny_scenario(tiny_bert, personal_head=True)
    model, blob = _global(scenario)
    run_client_round(DeviceContext(scenario, 0, tmp_path), blob, server_round=1)
    saved = deserialize_state(personal_path(tmp_path, 0).read_bytes(), model.schema, "personal")
    assert saved and all(spec.role == "head" for spec in model.schema.specs("personal"))
    run_client_round(DeviceContext(scenario, 2, tmp_path), blob, server_round=1)  # the process serves another device
    seen: list[dict[str, torch.Tensor]] = []
    original = device_round.train_on_device

    def spy(device: DeviceContext, model: AdapterModel, *args: Any, **kwargs: Any) -> Any:
        seen.append(model.state("personal"))  # what the device starts round 2 from
        return original(device, model, *args, **kwargs)

    monkeypatch.setattr(device_round, "train_on_device", spy)
    run_client_round(DeviceContext(scenario, 0, tmp_path), blob, server_round=2)
    for name, tensor in saved.items():
        assert torch.equal(seen[0][name], tensor), name
    after = deserialize_state(personal_path(tmp_path, 0).read_bytes(), model.schema, "personal")
    assert any(not torch.equal(after[n], saved[n]) for n in saved)  # trained again and saved again


def test_a_device_without_a_personal_part_starts_from_the_initial_head(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert, personal_head=True)
    model, blob = _global(scenario)
    run_client_round(DeviceContext(scenario, 0, tmp_path / "a"), blob, server_round=1)
    first = run_client_round(DeviceContext(scenario, 1, tmp_path / "a"), blob, server_round=1)
    fresh = run_client_round(DeviceContext(scenario, 1, tmp_path / "b"), blob, server_round=1)
    assert _equal(_decode(model, first), _decode(model, fresh))  # client 0's head did not leak into client 1


def test_shared_head_travels_in_the_delta_and_nothing_is_written(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert, personal_head=False, compression="int8")
    model, blob = _global(scenario)
    reply = run_client_round(DeviceContext(scenario, 2, tmp_path), blob, server_round=1)
    delta = deserialize_state(reply.delta_blob, model.schema, "shared")
    assert any(s.role == "head" for s in model.schema.specs("shared")) and set(delta) == set(model.state("shared"))
    # No personal part is written; only the device's own split, kept for its next message.
    assert [p.name for p in tmp_path.iterdir()] == [device_data_path(tmp_path, 2).name]


def test_same_round_same_delta_and_rounds_differ(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert, compression="none")
    model, blob = _global(scenario)
    device = DeviceContext(scenario, 0, tmp_path)
    one, again, other = (run_client_round(device, blob, server_round=r) for r in (1, 1, 2))
    assert _equal(_decode(model, one), _decode(model, again))
    assert not _equal(_decode(model, one), _decode(model, other))


def test_wrong_partition_id_and_foreign_blob_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert)
    _, blob = _global(scenario)
    with pytest.raises(ConfigError, match="partition id"):
        run_client_round(DeviceContext(scenario, 3, tmp_path), blob)
    other, _ = _global(dataclasses.replace(scenario, rank=2))
    foreign = serialize_state(other.state("shared"), other.schema, "shared", "none")
    with pytest.raises(ValueError, match="schema"):
        run_client_round(DeviceContext(scenario, 0, tmp_path), foreign)


def test_personal_file_of_another_scenario_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert, personal_head=True)
    _, blob = _global(scenario)
    personal_path(tmp_path, 0).write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="another scenario"):
        run_client_round(DeviceContext(scenario, 0, tmp_path), blob)


def test_the_fleet_stage_does_not_import_flower() -> None:
    sources = sorted((PROJECT_ROOT / "fedadapt" / "fleet").glob("*.py"))
    assert len(sources) >= 8  # the stage's modules, not an empty folder
    for source in sources:
        text = source.read_text()
        assert "import flwr" not in text and "from flwr" not in text, source


def test_scoring_the_received_model_before_training_is_opt_in(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert)
    _, blob = _global(scenario)
    plain = run_client_round(DeviceContext(scenario, 0, tmp_path), blob, server_round=1).metrics
    assert "accuracy-before" not in plain and 0.0 <= plain["accuracy"] <= 1.0
    asked = dataclasses.replace(scenario, eval_before_training=True)
    both = run_client_round(DeviceContext(asked, 0, tmp_path), blob, server_round=1).metrics
    assert 0.0 <= both["accuracy-before"] <= 1.0 and both["accuracy"] == plain["accuracy"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_leave_room_for_the_text(tiny_bert: Path, method: str) -> None:
    """Prompt/prefix tuning put 20 virtual tokens before the text: a long text is cut to what still fits."""
    from fedadapt.data.dataset import TextDataset
    from fedadapt.data.label_map import LabelMap
    from fedadapt.fleet.build import encode_split
    from fedadapt.train.loop import evaluate

    scenario = tiny_scenario(tiny_bert, method=method, rank=20, max_length=64)
    model = build_model(scenario, ("a", "b"))
    assert model.max_text_tokens == 64 - 20  # the tiny BERT has 64 positions
    long_text = " ".join(["my card payment was declined again"] * 20)
    data = TextDataset(texts=(long_text, "short one"), labels=("a", "b"), source="test")
    encoded = encode_split(model, data, LabelMap.from_labels(("a", "b")), scenario.max_length)
    assert max(len(ids) for ids in encoded.input_ids) == 44
    assert evaluate(model, encoded, device="cpu").examples == 2  # no position overflow


# --- a device's own data -------------------------------------------------------------------------------------


def _own_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_a_device_trains_on_its_own_file_with_the_scenarios_labels(tiny_bert: Path, tmp_path: Path) -> None:
    from fedadapt.fleet.data import device_split, scenario_labels

    scenario = tiny_scenario(tiny_bert)
    names = scenario_labels(scenario).names
    rows = [(f"my own message number {i} about {names[i % 2]}", names[i % 2]) for i in range(20)]
    own = _own_csv(tmp_path / "mine.csv", rows)
    split = device_split(scenario, 7, own)
    assert (len(split.train), len(split.test)) == (16, 4)  # test-fraction 0.2, seeded
    assert set(split.train.labels) | set(split.test.labels) <= set(names[:2])
    assert device_split(scenario, 7, own).test.texts == split.test.texts  # the same hold-out every time
    _, blob = _global(scenario)
    reply = run_client_round(DeviceContext(scenario, 1, tmp_path / "state", own), blob, server_round=1)
    assert reply.num_examples == 16 != len(load_fleet_data(scenario).clients[1].train)
    assert reply.metrics["test-examples"] == 4


def test_a_device_file_with_labels_the_scenario_lacks_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    from fedadapt.errors import DataError
    from fedadapt.fleet.data import device_split

    own = _own_csv(tmp_path / "mine.csv", [("hello", "no-such-intent"), ("bye", "another-unknown")] * 3)
    with pytest.raises(DataError, match="labels the scenario does not know.*no-such-intent"):
        device_split(tiny_scenario(tiny_bert), 0, own)


def test_a_labels_file_fixes_the_label_map_without_the_scenarios_data(tiny_bert: Path, tmp_path: Path) -> None:
    """A device with its own data and the scenario's labels file never reads the scenario's data set."""
    import json

    from fedadapt.fleet.data import device_split, scenario_labels

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["refund", "card_lost", "greeting"]))
    scenario = tiny_scenario(tiny_bert, data=str(tmp_path / "not-on-this-device.csv"), labels=str(labels))
    assert scenario_labels(scenario).names == ("refund", "card_lost", "greeting")  # the file's order
    own = _own_csv(tmp_path / "mine.csv", [("where is my money", "refund"), ("lost my card", "card_lost")] * 5)
    split = device_split(scenario, 0, own)
    assert len(split.train) + len(split.test) == 10
