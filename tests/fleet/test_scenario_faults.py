"""Scenario keys for faults, tiers and the full-model baseline; simulated device faults; tiers in a device's round."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_scenario

from fedadapt.data.synthetic import SYNTHETIC
from fedadapt.delta.serialize import deserialize_state, serialize_state
from fedadapt.errors import ConfigError
from fedadapt.fleet import device_round
from fedadapt.fleet.build import build_model, train_config
from fedadapt.fleet.data import DATA_FIELDS, load_fleet_data
from fedadapt.fleet.device_data import DeviceContext, device_data_path, personal_path
from fedadapt.fleet.device_round import empty_client_round, run_client_round
from fedadapt.fleet.faults import STALL_MARGIN_SECONDS, SimulatedDeviceFailure, device_fault, stall_seconds
from fedadapt.fleet.run_config import fleet_run_from_config
from fedadapt.fleet.scenario import ScenarioConfig, ScriptedFault, scenario_from_dict
from fedadapt.fleet.scenario_file import load_scenario
from fedadapt.fleet.variants import full_model_variant, local_step_budget, only_fields

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PAIRS = [(r, p) for r in range(1, 41) for p in range(50)]  # 2000 (round, client) pairs


def _global_blob(scenario: ScenarioConfig) -> bytes:
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    return serialize_state(model.state("shared"), model.schema, "shared", "none")


def _faults(scenario: ScenarioConfig) -> list[str | None]:
    return [device_fault(scenario, r, p) for r, p in PAIRS]


def _first(scenario: ScenarioConfig, fault: str, partition_id: int) -> int:
    """The first round in which client ``partition_id`` suffers ``fault``."""
    return next(r for r in range(1, 200) if device_fault(scenario, r, partition_id) == fault)


# --- scenario keys ------------------------------------------------------------------------------------------------


def test_tier_steps_from_a_toml_list_become_a_tuple(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text('name = "s"\ntier-steps = [4, 12, 36]\n')
    scenario = load_scenario(file)
    assert scenario.tier_steps == (4, 12, 36) and isinstance(scenario.tier_steps, tuple)
    assert scenario_from_dict({}).tier_steps == ()
    hash(scenario)  # frozen and hashable: scenarios are cache keys


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([4, "12"], r"'tier-steps' must be a list of integers"),
        ([4, 1.5], r"'tier-steps' must be a list of integers"),
        ([True, 2], r"'tier-steps' must be a list of integers"),
        (4, r"'tier-steps' must be a list of integers"),
        ("4, 12", r"'tier-steps' must be a list of integers"),
        ([4, 0], r"'tier-steps\[1\]' must be an integer in \[1, 1000000\], got 0"),
        ([-3], r"'tier-steps\[0\]' must be an integer in \[1, 1000000\], got -3"),
    ],
)
def test_bad_tier_steps_are_refused(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scenario_from_dict({"tier-steps": value})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dropout-fraction": -0.1}, r"'dropout-fraction' must be a finite number in \[0, 1\], got -0.1"),
        ({"dropout-fraction": 2}, r"'dropout-fraction' must be a finite number in \[0, 1\], got 2.0"),
        ({"straggler-fraction": 1.01}, r"'straggler-fraction' must be a finite number in \[0, 1\]"),
        ({"straggler-fraction": -1e-9}, r"'straggler-fraction' must be a finite number in \[0, 1\]"),
        ({"dropout-fraction": 0.6, "straggler-fraction": 0.5}, r"dropout-fraction \+ straggler-fraction"),
        ({"dropout-fraction": True}, r"'dropout-fraction' must be a float"),
        ({"num-clients": 4, "clients-per-round": 2, "min-clients": 3}, r"min-clients \(3\) cannot exceed .*\(2\)"),
        ({"num-clients": 4, "min-clients": 5}, r"min-clients \(5\) cannot exceed .*\(4\)"),
        ({"min-clients": 0}, r"'min-clients' must be an integer in \[1, 100000\], got 0"),
        ({"target-accuracy": 1.5}, r"'target-accuracy' must be a finite number in \[0, 1\], got 1.5"),
        ({"target-accuracy": -0.2}, r"'target-accuracy' must be a finite number in \[0, 1\]"),
        ({"examples-per-user": 0}, r"'examples-per-user' must be an integer in \[1, 100000\]"),
        ({"server-test-examples": 0}, r"'server-test-examples' must be an integer in \[1, 100000000\]"),
        ({"full-model": 1}, r"'full-model' must be a bool"),
        ({"full-model-learning-rate": 0}, r"'full-model-learning-rate' must be a finite number in \(0, 10\]"),
        ({"method": "full", "rank": 4}, r"no rank or size"),
    ],
)
def test_bad_fault_and_comparison_values_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scenario_from_dict(data)


def test_edge_values_are_accepted() -> None:
    scenario = scenario_from_dict(
        {"dropout-fraction": 0.4, "straggler-fraction": 0.6, "target-accuracy": 1, "min-clients": 4}
    )
    assert scenario.dropout_fraction + scenario.straggler_fraction == 1.0
    assert scenario.target_accuracy == 1.0 and isinstance(scenario.target_accuracy, float)
    assert scenario.min_clients == scenario.sample_size == 4


def test_every_shipped_scenario_loads_and_is_named_after_its_file() -> None:
    files = sorted((PROJECT_ROOT / "simulations").glob("*.toml"))
    assert {
        "quickstart",
        "dropouts",
        "device-tiers",
        "fleet-1000",
        "banking77-dirichlet",
        "banking77-lora-baseline",
    } <= {f.stem for f in files}
    for file in files:
        scenario = load_scenario(file)
        assert scenario.name == file.stem, file
        assert scenario.min_clients <= scenario.sample_size, file
        if scenario.data != SYNTHETIC:  # resolved against the file only when the folder exists
            assert Path(scenario.data).is_absolute() and Path(scenario.data).exists(), (file, scenario.data)
    assert load_scenario(PROJECT_ROOT / "simulations/device-tiers.toml").tier_steps == (4, 12, 36)
    dropouts = load_scenario(PROJECT_ROOT / "simulations/dropouts.toml")
    assert (dropouts.dropout_fraction, dropouts.straggler_fraction, dropouts.min_clients) == (0.2, 0.15, 2)
    baseline = load_scenario(PROJECT_ROOT / "simulations/banking77-lora-baseline.toml")
    assert baseline.full_model and baseline.full_model_learning_rate == 1e-4
    recipe = load_scenario(PROJECT_ROOT / "simulations/banking77-dirichlet.toml")
    assert recipe.head_warmup_rounds == 3 and recipe.method_settings == (("drop_layers", 4),)
    assert {f: getattr(recipe, f) for f in DATA_FIELDS} == {f: getattr(baseline, f) for f in DATA_FIELDS}


def test_full_model_variant_changes_only_what_is_trained_and_sent() -> None:
    scenario = ScenarioConfig(
        name="s",
        num_clients=6,
        clients_per_round=4,
        partition="dirichlet",
        alpha=0.3,
        method="lora",
        rank=8,
        compression="int8",
        learning_rate=3e-3,
        full_model=True,
        full_model_learning_rate=7e-5,
        dropout_fraction=0.25,
        straggler_fraction=0.1,
        tier_steps=(2, 5),
        rounds=6,
        seed=11,
        personal_head=True,
    )
    full = full_model_variant(scenario)
    assert full.method == "full" and full.rank is None and full.compression == "none"
    assert full.learning_rate == 7e-5 and full.full_model is False
    assert full.name == "s-full-model"
    changed = {"name", "method", "rank", "compression", "learning_rate", "full_model"}
    for f in dataclasses.fields(ScenarioConfig):
        if f.name not in changed:
            assert getattr(full, f.name) == getattr(scenario, f.name), f.name
    assert full.head_learning_rate == scenario.head_learning_rate
    assert only_fields(full, DATA_FIELDS) == only_fields(scenario, DATA_FIELDS)  # same data, same split


def test_local_step_budget_follows_the_tiers() -> None:
    tiered = ScenarioConfig(tier_steps=(4, 12, 36), local_max_steps=99)
    assert [local_step_budget(tiered, p) for p in range(7)] == [4, 12, 36, 4, 12, 36, 4]
    assert local_step_budget(ScenarioConfig(local_max_steps=7), 5) == 7
    assert local_step_budget(ScenarioConfig(), 0) is None
    assert train_config(tiered, seed=0, partition_id=2).max_steps == 36
    assert train_config(tiered, seed=0).max_steps == 99  # no client: the scenario's own budget


# --- simulated faults ---------------------------------------------------------------------------------------------


def test_device_fault_is_deterministic() -> None:
    first = _faults(ScenarioConfig(dropout_fraction=0.3, straggler_fraction=0.2, seed=5))
    again = _faults(ScenarioConfig(dropout_fraction=0.3, straggler_fraction=0.2, seed=5))
    assert first == again
    assert {"crash", "stall", None} == set(first)


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_device_fault_does_not_depend_on_the_process(hash_seed: str) -> None:
    code = (
        "from fedadapt.fleet.faults import device_fault; from fedadapt.fleet.scenario import ScenarioConfig; "
        "s = ScenarioConfig(dropout_fraction=0.3, straggler_fraction=0.2, seed=5); "
        "print([device_fault(s, r, p) for r in range(1, 6) for p in range(20)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    scenario = ScenarioConfig(dropout_fraction=0.3, straggler_fraction=0.2, seed=5)
    assert out.strip() == repr([device_fault(scenario, r, p) for r in range(1, 6) for p in range(20)])


def test_fault_shares_match_the_fractions() -> None:
    faults = _faults(ScenarioConfig(dropout_fraction=0.3, straggler_fraction=0.15))
    assert len(faults) == 2000
    assert abs(faults.count("crash") / 2000 - 0.3) <= 0.04
    assert abs(faults.count("stall") / 2000 - 0.15) <= 0.04
    stalls_only = _faults(ScenarioConfig(straggler_fraction=0.25))
    assert stalls_only.count("crash") == 0 and abs(stalls_only.count("stall") / 2000 - 0.25) <= 0.04


def test_no_faults_without_fractions_and_all_faults_at_one() -> None:
    assert set(_faults(ScenarioConfig(seed=3))) == {None}
    assert set(_faults(ScenarioConfig(dropout_fraction=1.0))) == {"crash"}
    assert set(_faults(ScenarioConfig(straggler_fraction=1.0))) == {"stall"}


def test_different_seeds_give_different_patterns() -> None:
    one = _faults(ScenarioConfig(dropout_fraction=0.3, seed=0))
    two = _faults(ScenarioConfig(dropout_fraction=0.3, seed=1))
    assert one != two
    differing = sum(a != b for a, b in zip(one, two, strict=True))
    assert differing > 400  # independent draws: about 2·0.3·0.7 = 42% of pairs differ


def test_faults_depend_on_round_and_client() -> None:
    scenario = ScenarioConfig(dropout_fraction=0.5)
    by_client = [device_fault(scenario, 1, p) for p in range(40)]
    by_round = [device_fault(scenario, r, 0) for r in range(1, 41)]
    assert len(set(by_client)) == 2 and len(set(by_round)) == 2


def test_stall_outlasts_the_round_timeout() -> None:
    assert stall_seconds(ScenarioConfig(round_timeout=60)) == 60 + STALL_MARGIN_SECONDS
    assert stall_seconds(ScenarioConfig()) > ScenarioConfig().round_timeout


def test_scripted_faults_from_toml_hit_exactly_their_round_and_client(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text(
        'name = "s"\nnum-clients = 3\nstraggler-fraction = 0.0\n'
        'scripted-faults = [{round = 2, client = 1, fault = "stall"}, {round = 3, client = 0, fault = "crash"}]\n'
    )
    scenario = load_scenario(file)
    assert scenario.scripted_faults == (ScriptedFault(2, 1, "stall"), ScriptedFault(3, 0, "crash"))
    hits = {(r, p): device_fault(scenario, r, p) for r in range(1, 6) for p in range(3)}
    assert {k: v for k, v in hits.items() if v} == {(2, 1): "stall", (3, 0): "crash"}
    # A scripted fault wins over a drawn one in its own place only.
    drawn = dataclasses.replace(scenario, dropout_fraction=1.0)
    assert device_fault(drawn, 2, 1) == "stall" and device_fault(drawn, 2, 0) == "crash"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{round = 2, client = 1, fault = "stall"}', "must be a list of tables"),
        ("[{round = 2, client = 1}]", "with the keys round, client, fault"),
        ('[{round = 2, client = 1, fault = "stall", extra = 1}]', "with the keys round, client, fault"),
        (
            '[{round = 0, client = 1, fault = "stall"}]',
            r"'scripted-faults.round' must be an integer in \[1, 100000\]",
        ),
        (
            '[{round = 1, client = -1, fault = "stall"}]',
            r"'scripted-faults.client' must be .* got -1",
        ),
        ('[{round = 1, client = 1, fault = "slow"}]', "fault must be one of"),
        ('[{round = 1, client = 3, fault = "crash"}]', "the scenario has 3 clients"),
    ],
)
def test_bad_scripted_faults_are_refused(tmp_path: Path, value: str, message: str) -> None:
    file = tmp_path / "s.toml"
    file.write_text(f'name = "s"\nnum-clients = 3\nscripted-faults = {value}\n')
    with pytest.raises(ConfigError, match=message):
        load_scenario(file)


# --- one device's round with faults and tiers -----------------------------------------------------------------------


def test_a_crashing_client_raises_and_saves_nothing(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = tiny_scenario(tiny_bert, personal_head=True, dropout_fraction=0.5)
    server_round = _first(scenario, "crash", 1)
    slept: list[float] = []
    monkeypatch.setattr(device_round.time, "sleep", slept.append)
    blob = _global_blob(scenario)
    with pytest.raises(SimulatedDeviceFailure, match=f"client 1 crashed in round {server_round}"):
        run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=server_round)
    # Nothing of the round is saved: only the device's own split, kept from before training.
    assert not personal_path(tmp_path, 1).exists()
    assert [p.name for p in tmp_path.iterdir()] == [device_data_path(tmp_path, 1).name]
    assert slept == []
    healthy = next(r for r in range(1, 200) if device_fault(scenario, r, 1) is None)
    run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=healthy)
    assert personal_path(tmp_path, 1).is_file()  # the same device in a round without a fault saves its part


def test_a_straggler_sleeps_past_the_timeout_then_replies(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = tiny_scenario(tiny_bert, straggler_fraction=0.5, round_timeout=30.0)
    server_round = _first(scenario, "stall", 2)
    slept: list[float] = []
    monkeypatch.setattr(device_round.time, "sleep", slept.append)
    reply = run_client_round(DeviceContext(scenario, 2, tmp_path), _global_blob(scenario), server_round=server_round)
    assert slept == [stall_seconds(scenario)] == [30.0 + STALL_MARGIN_SECONDS]
    assert reply.metrics["partition-id"] == 2 and reply.metrics["train-steps"] == 2
    assert reply.num_examples == len(load_fleet_data(scenario).clients[2].train)
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    delta = deserialize_state(reply.delta_blob, model.schema, "shared")
    assert any(bool(t.abs().sum() > 0) for t in delta.values())


def test_a_scripted_stall_sleeps_in_its_round_only_and_the_device_keeps_its_personal_part(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = ScriptedFault(round=2, client=1, fault="stall")
    scenario = tiny_scenario(tiny_bert, personal_head=True, round_timeout=20.0, scripted_faults=(fault,))
    slept: list[float] = []
    monkeypatch.setattr(device_round.time, "sleep", slept.append)
    blob = _global_blob(scenario)
    first = run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=1)
    assert slept == [] and first.metrics["personal-restored"] == 0  # a new device starts its personal part
    saved = personal_path(tmp_path, 1).read_bytes()
    second = run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=2)
    assert slept == [20.0 + STALL_MARGIN_SECONDS]
    assert second.metrics["personal-restored"] == 1 and personal_path(tmp_path, 1).read_bytes() != saved
    run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=3)
    assert len(slept) == 1


def test_tiers_set_each_clients_step_budget(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert, tier_steps=(1, 3))
    blob = _global_blob(scenario)
    first = run_client_round(DeviceContext(scenario, 0, tmp_path), blob, server_round=1)
    second = run_client_round(DeviceContext(scenario, 1, tmp_path), blob, server_round=1)
    third = run_client_round(DeviceContext(scenario, 2, tmp_path), blob, server_round=1)
    assert (first.metrics["train-steps"], first.metrics["tier"]) == (1, 0)
    assert (second.metrics["train-steps"], second.metrics["tier"]) == (3, 1)
    assert (third.metrics["train-steps"], third.metrics["tier"]) == (1, 0)
    untiered = run_client_round(DeviceContext(tiny_scenario(tiny_bert), 1, tmp_path), blob, server_round=1)
    assert untiered.metrics["train-steps"] == 2 and "tier" not in untiered.metrics


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_empty_client_round_sends_zeros_of_the_schema(tiny_bert: Path, tmp_path: Path, compression: str) -> None:
    scenario = tiny_scenario(tiny_bert, compression=compression)
    reply = empty_client_round(DeviceContext(scenario, 1, tmp_path))
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    delta = deserialize_state(reply.delta_blob, model.schema, "shared")
    specs = model.schema.specs("shared")
    assert list(delta) == [s.name for s in specs] and specs
    for spec in specs:
        assert tuple(delta[spec.name].shape) == tuple(spec.shape), spec.name
        assert torch.count_nonzero(delta[spec.name]) == 0, spec.name
    assert reply.num_examples == len(load_fleet_data(scenario).clients[1].train) > 0
    assert reply.metrics["partition-id"] == 1


# --- run config and data sizes ------------------------------------------------------------------------------------


def test_run_config_full_model_runs_the_full_variant(tmp_path: Path) -> None:
    base = {"scenario": "simulations/quickstart.toml", "out-dir": str(tmp_path)}
    run = fleet_run_from_config({**base, "full-model": True}, PROJECT_ROOT)
    plain = fleet_run_from_config(base, PROJECT_ROOT)
    assert run.scenario.method == "full" and run.scenario.rank is None and run.scenario.compression == "none"
    assert run.scenario == full_model_variant(plain.scenario)
    assert plain.scenario.method == "lora" and not plain.empty_clients
    assert fleet_run_from_config({**base, "full-model": False}, PROJECT_ROOT).scenario == plain.scenario
    assert fleet_run_from_config({**base, "empty-clients": True}, PROJECT_ROOT).empty_clients


@pytest.mark.parametrize("key", ["full-model", "empty-clients"])
@pytest.mark.parametrize("value", ["true", 1, None])
def test_run_config_flags_must_be_bools(tmp_path: Path, key: str, value: object) -> None:
    config = {"scenario": "simulations/quickstart.toml", "out-dir": str(tmp_path), key: value}
    with pytest.raises(ConfigError, match=f"{key} must be true or false"):
        fleet_run_from_config(config, PROJECT_ROOT)


def test_server_test_examples_caps_the_server_test_split(tiny_bert: Path) -> None:
    uncapped = load_fleet_data(tiny_scenario(tiny_bert)).splits.test
    assert len(uncapped) == round(0.2 * 8 * 80)
    capped = load_fleet_data(tiny_scenario(tiny_bert, server_test_examples=20)).splits.test
    assert len(capped) == 20
    assert set(capped.texts) <= set(uncapped.texts)
    again = load_fleet_data(tiny_scenario(tiny_bert, server_test_examples=20, name="other")).splits.test
    assert list(again.texts) == list(capped.texts)  # seeded sample
    big = load_fleet_data(tiny_scenario(tiny_bert, server_test_examples=10_000)).splits.test
    assert len(big) == len(uncapped)
    clients = load_fleet_data(tiny_scenario(tiny_bert, server_test_examples=20)).clients
    assert [len(c.train) for c in clients] == [len(c.train) for c in load_fleet_data(tiny_scenario(tiny_bert)).clients]


def test_examples_per_user_sets_the_synthetic_data_size(tiny_bert: Path) -> None:
    def total(scenario: ScenarioConfig) -> int:
        data = load_fleet_data(scenario)
        return len(data.splits.train) + len(data.splits.test)

    assert total(tiny_scenario(tiny_bert)) == 8 * 80
    assert total(tiny_scenario(tiny_bert, examples_per_user=10)) == 8 * 10
    natural = load_fleet_data(tiny_scenario(tiny_bert, examples_per_user=15, partition="natural"))
    assert len(natural.splits.train) + len(natural.splits.test) == 3 * 15
