"""Client-level DP in the server's round loop (issue 22): clipped, noised sums; ε every round; the budget stop.

Runs the real ServerApp and ClientApp in this process (tests/server_harness.py) on the tiny BERT. The ε the run
reports is checked against ``dp_accounting`` called here directly, for the run's recorded (z, n, m).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from server_harness import (
    InProcessGrid,
    run_server,
    server_run_config,
    server_scenario_file,
    task_identity,  # noqa: F401  (autouse: messages need Flower's task identity)
)

from fedadapt.aggregate.dp_rounds import DpRounds, DpSum
from fedadapt.aggregate.validation import CheckedDelta
from fedadapt.delta.state import AdapterSchema, TensorSpec
from fedadapt.errors import AccountantStateError, ConfigError
from fedadapt.fleet.scenario import scenario_from_dict
from fedadapt.privacy.dp.config import DpConfig
from fedadapt.privacy.keys import generate_server_keys

DP = {"mode": "central", "noise-multiplier": 1.0, "clip": 0.05, "delta": 1e-3}


def independent_epsilon(rounds: int, z: float, n: int, m: int, delta: float) -> float:
    """ε of ``rounds`` rounds of m-of-n sampling without replacement, Gaussian noise std z·C on a sum of deltas of
    norm ≤ C, from dp_accounting directly: replace-one neighbours move the sum by up to 2C (multiplier z / 2)."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2))
    return float(accountant.compose(event, rounds).get_epsilon(delta))


def dp_run(tmp_path: Path, tiny_bert: Path, name: str, dp: dict[str, Any], **extra: Any) -> dict[str, Any]:
    folder = tmp_path / name
    scenario = server_scenario_file(folder, tiny_bert, privacy={"mode": "none", "dp": dp}, **extra)
    return run_server(InProcessGrid(3, server_run_config(scenario, folder / "run")))


def test_every_round_reports_the_epsilon_dp_accounting_computes_for_it(tiny_bert: Path, tmp_path: Path) -> None:
    metrics = dp_run(tmp_path, tiny_bert, "run", DP, rounds=3)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for count, record in enumerate(rounds, start=1):
        entry = record["dp"]
        assert (entry["population"], entry["sample_size"], entry["noise_multiplier"]) == (3, 2, 1.0)
        assert record["epsilon"] == entry["epsilon"]
        assert record["epsilon"] == pytest.approx(independent_epsilon(count, 1.0, 3, 2, 1e-3), rel=1e-9)
        assert entry["clipped"] <= record["accepted"] == 2
    assert rounds[0]["epsilon"] < rounds[1]["epsilon"] < rounds[2]["epsilon"]
    summary = metrics["summary"]
    assert summary["epsilon"] == rounds[-1]["epsilon"] and summary["delta"] == 1e-3 and summary["dp_rounds"] == 3
    assert metrics["scenario"]["privacy"]["dp"]["mode"] == "central"


def test_a_run_stops_at_the_last_round_within_max_epsilon_and_keeps_its_checkpoint(
    tiny_bert: Path, tmp_path: Path
) -> None:
    two = independent_epsilon(2, 1.0, 3, 2, 1e-3)
    budget = (two + independent_epsilon(3, 1.0, 3, 2, 1e-3)) / 2  # room for 2 rounds, not 3
    metrics = dp_run(tmp_path, tiny_bert, "run", DP | {"max-epsilon": budget}, rounds=5)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["complete"] and "max-epsilon" in metrics["summary"]["stopped"]
    assert metrics["summary"]["epsilon"] == pytest.approx(two, rel=1e-9) and metrics["summary"]["epsilon"] <= budget
    run = tmp_path / "run" / "run"
    assert (run / "final_adapter").is_dir() and sorted(p.name for p in run.glob("checkpoints/*"))


def test_a_resumed_run_reports_the_epsilon_of_one_run(tiny_bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    scenario = server_scenario_file(folder, tiny_bert, privacy={"mode": "none", "dp": DP}, rounds=3)
    run_server(InProcessGrid(3, server_run_config(scenario, folder / "run", **{"num-rounds": 2})))
    resumed = run_server(InProcessGrid(3, server_run_config(scenario, folder / "run", resume=True)))
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][-1]["epsilon"] == pytest.approx(independent_epsilon(3, 1.0, 3, 2, 1e-3), rel=1e-9)


def test_dp_composes_with_sealed_deltas_and_an_adaptive_clip_moves(tiny_bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "aead"
    adaptive = {
        "mode": "central",
        "noise-multiplier": 0.5,
        "delta": 1e-3,
        "clip": "adaptive",
        "initial-clip": 1e-4,  # far below every delta's norm: each round clips both devices, so C must grow
        "clipped-count-stddev": 0.5,
        "clip-learning-rate": 0.5,
    }
    scenario = server_scenario_file(folder, tiny_bert, privacy={"mode": "aead", "dp": adaptive}, rounds=3)
    keys = generate_server_keys(folder / "keys")
    sealed = {"server-key": str(keys.private_path), "server-public-key": str(keys.public_path)}
    metrics = run_server(InProcessGrid(3, server_run_config(scenario, folder / "run", **sealed)))
    assert metrics["privacy"] == "aead"
    clips = [r["dp"]["clip"] for r in metrics["rounds"]]
    assert clips[0] == 1e-4 and all(r["dp"]["next_clip"] > 0 for r in metrics["rounds"])
    assert metrics["rounds"][-1]["dp"]["next_clip"] > clips[0]  # pushed up by clipped devices (noise aside)
    assert all(r["accepted"] == 2 for r in metrics["rounds"])


def schema() -> AdapterSchema:
    tensors = (
        TensorSpec("a", (40, 50), "float32", "shared", "adapter"),
        TensorSpec("b", (7,), "float32", "shared", "head"),
    )
    return AdapterSchema({"name": "test"}, "fingerprint", tensors)


def test_the_dp_sum_clips_every_delta_counts_each_device_once_and_adds_calibrated_noise() -> None:
    rounds = DpRounds(DpConfig(noise_multiplier=2.0, clip=0.5, delta=1e-3), 50, 10, 4, seed=7)
    total = rounds.central_sum(schema(), sampled=10)
    total.noise_std = 1e-12  # the clipped sum alone first (noise far below the tolerance)
    big = {"a": torch.full((40, 50), 3.0), "b": torch.zeros(7)}
    small = {"a": torch.full((40, 50), 1e-4), "b": torch.zeros(7)}
    total.add(CheckedDelta(big, norm=0.0, clipped=False), num_examples=1000)
    total.add(CheckedDelta(small, norm=0.0, clipped=False), num_examples=1)
    assert total.clipped_bits == [True, False] and total.num_examples == 2  # claimed counts ignored
    mean = total.result()
    expected = (3.0 * 0.5 / float(np.sqrt(2000 * 9.0)) + 1e-4) / 10  # big scaled to norm C, /m (fixed denominator)
    assert float(mean["a"][0, 0]) == pytest.approx(expected, rel=1e-6)

    noisy = DpSum(schema(), clip=0.5, noise_std=1.0, denominator=10, rng=np.random.default_rng(1))
    noisy.add(CheckedDelta({"a": torch.zeros(40, 50), "b": torch.zeros(7)}, norm=0.0, clipped=False), 1)
    draws = torch.cat([t.flatten() for t in noisy.result().values()]).double() * 10
    assert float(draws.std()) == pytest.approx(1.0, rel=0.03) and abs(float(draws.mean())) < 0.1


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"mode": "aead", "dp": {"mode": "distributed", "noise-multiplier": 1.0}}, 'needs mode = "secagg+"'),
        ({"mode": "none", "dp": {"mode": "central", "noise-multiplier": 1.0, "sampling": "poisson"}}, "fixed-size"),
        ({"mode": "none", "dp": {"mode": "central"}}, "exactly one of noise-multiplier"),
        ({"mode": "none", "dp": {"noise-multiplier": 1.0, "clips": 1.0}}, "unknown keys ['clips']"),
    ],
)
def test_dp_configurations_that_cannot_hold_are_refused_with_what_to_do(privacy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        scenario_from_dict({"num-clients": 20, "privacy": privacy})
    assert message in str(caught.value)


def test_distributed_dp_under_secagg_is_accepted() -> None:
    privacy = {"mode": "secagg+", "num-shares": 3, "dp": {"mode": "distributed", "noise-multiplier": 1.0}}
    assert scenario_from_dict({"num-clients": 20, "clients-per-round": 5, "privacy": privacy}).privacy.dp is not None


def test_the_default_delta_is_refused_for_a_fleet_too_small_for_it() -> None:
    with pytest.raises(ConfigError, match="set delta yourself"):
        DpRounds(DpConfig(noise_multiplier=1.0), population=5, sample_size=4, rounds=2)
    assert json.dumps(DpRounds(DpConfig(noise_multiplier=1.0), 20, 5, 2).summary())  # 1/20^1.1 = 0.037 is fine


# --- what an adversarial review found (each test fails on the code before its fix) ------------------------------


def test_dp_with_a_head_warmup_is_refused_its_two_runs_would_split_epsilon() -> None:
    privacy = {"mode": "none", "dp": {"noise-multiplier": 1.0, "delta": 1e-3}}
    with pytest.raises(ConfigError, match="head-warmup-rounds"):
        scenario_from_dict({"num-clients": 20, "rounds": 5, "head-warmup-rounds": 2, "privacy": privacy})


def test_under_distributed_dp_the_run_config_cannot_shrink_the_devices_noise(tmp_path: Path) -> None:
    from fedadapt.fleet.run_config import fleet_run_from_config

    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "s"\ndata = "synthetic"\nnum-clients = 20\nrounds = 50\nclients-per-round = 5\n'
        '[privacy]\nmode = "secagg+"\n[privacy.dp]\nmode = "distributed"\ntarget-epsilon = 3.0\n'
    )
    base = {"scenario": str(scenario), "out-dir": str(tmp_path / "run")}
    assert fleet_run_from_config(base, tmp_path).scenario.rounds == 50
    for override in ({"num-rounds": 1}, {"clients-per-round": 20}):
        with pytest.raises(ConfigError, match="may not change"):
            fleet_run_from_config(base | override, tmp_path)
    assert fleet_run_from_config(base | {"num-rounds": 50}, tmp_path).scenario.rounds == 50  # the same: fine


def test_a_distributed_round_is_priced_at_its_fewest_shares_before_it_starts() -> None:
    config = DpConfig(mode="distributed", noise_multiplier=3.0, clip=1.0, delta=1e-3, max_epsilon=5.0)
    rounds = DpRounds(config, 100, 10, 20, seed=0)
    spent = 0
    while not rounds.exceeds_budget(100, 10, min_survivors=6):
        rounds.finish_round(100, 10, aggregated=True, survivors=6)  # every round ends with 6 of 10 shares
        spent += 1
    assert spent > 1 and rounds.epsilon <= 5.0  # never over budget, even with the shortfall


def test_a_resume_under_another_delta_is_refused() -> None:
    config = DpConfig(noise_multiplier=1.0, clip=1.0, delta=1e-3)
    first = DpRounds(config, 100, 10, 5, seed=0)
    history = [{"round": 1, "dp": first.finish_round(100, 10, aggregated=True, clipped_bits=[False])}]
    other = DpRounds(DpConfig(noise_multiplier=1.0, clip=1.0, delta=1e-5), 100, 10, 5, seed=0)
    with pytest.raises(AccountantStateError, match="would mix two accountings"):
        other.resume(history)
    same = DpRounds(config, 100, 10, 5, seed=0)
    same.resume(history)
    assert same.epsilon == first.epsilon


def test_secure_aggregation_limits_the_clip_to_what_its_clipping_range_carries() -> None:
    distributed = DpConfig(mode="distributed", noise_multiplier=1.0, clip=0.5, delta=1e-3)
    with pytest.raises(ConfigError, match="raise it to at least"):
        DpRounds(distributed, 100, 10, 5, seed=0).secure(0.5, 2 / 65536, 1000)  # C + the shares' tails > 0.5
    adaptive = DpConfig(
        mode="central", noise_multiplier=1.0, clip="adaptive", initial_clip=0.5, clipped_count_stddev=5.0, delta=1e-3
    )
    rounds = DpRounds(adaptive, 100, 10, 5, seed=0)
    rounds.secure(1.0, 2 / 65536, 1000)
    rounds.finish_round(100, 10, aggregated=True, unclipped=0.0)  # everyone clipped: C wants to grow
    rounds.finish_round(100, 10, aggregated=True, unclipped=0.0)
    assert rounds.clip <= 1.0 == rounds.max_clip
