"""benchmarks/dp_fleet.py without a run: its rows' scenarios, its independent ε and its cost columns."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import dp_fleet  # noqa: E402

from fedadapt.fleet.scenario_file import load_scenario  # noqa: E402
from fedadapt.privacy.dp.accounting import Accountant  # noqa: E402


def _base():  # type: ignore[no-untyped-def]
    return load_scenario(dp_fleet.SCENARIO)


def test_every_row_differs_from_the_scenario_in_its_privacy_only(tmp_path: Path) -> None:
    base = _base()
    assert base.num_clients >= 500 and base.privacy.dp is not None
    for name in dp_fleet.ROWS:
        row = dp_fleet.parse_row(name)
        scenario = dp_fleet.row_scenario(base, row)
        dp_fleet.write_row_scenario(scenario, tmp_path / "scenarios" / f"{name}.toml")  # reads back the same
        same = dataclasses.replace(scenario, name=base.name, privacy=base.privacy)
        assert same == base
        assert scenario.privacy.mode == dp_fleet.MODES[row.mode]
        if math.isinf(row.epsilon):
            assert scenario.privacy.dp is None
        else:
            dp = scenario.privacy.dp
            assert dp is not None and (dp.mode, dp.target_epsilon, dp.noise_multiplier) == (row.mode, row.epsilon, None)
            assert dp.clip == base.privacy.dp.clip


def test_a_distributed_rows_secagg_range_holds_its_noised_values() -> None:
    base = _base()
    scenario = dp_fleet.row_scenario(base, dp_fleet.parse_row("distributed-1"))
    dp = scenario.privacy.dp
    from fedadapt.privacy.dp.plan import plan_dp

    plan = plan_dp(dp, base.num_clients, base.sample_size, base.rounds)
    share = plan.delta_noise_multiplier * dp.initial_clip_norm / math.sqrt(base.sample_size)
    assert scenario.privacy.clipping_range >= dp.initial_clip_norm + 7.9 * share


def test_the_direct_epsilon_is_the_accountants_for_the_recorded_rounds() -> None:
    entries = [
        {"noise_multiplier": 1.3, "population": 1000, "sample_size": 100, "accounted": True},
        {"noise_multiplier": 1.3, "population": 1000, "sample_size": 100, "accounted": False},  # nothing released
        {"noise_multiplier": 1.1, "population": 998, "sample_size": 100, "accounted": True},
    ]
    accountant = Accountant("fixed-size", 1e-3)
    accountant.record_round(1.3, 1000, 100)
    expected = accountant.record_round(1.1, 998, 100)
    assert dp_fleet.direct_epsilon(entries, 1e-3) == pytest.approx(expected, rel=1e-9)
    assert dp_fleet.direct_epsilon([], 1e-3) is None


def test_costs_are_against_the_no_dp_row_of_the_same_privacy_mode() -> None:
    rows = {
        "central-inf": {"mode": "central", "target_epsilon": None, "final_accuracy": 0.90, "round_seconds": 10.0},
        "central-8": {"mode": "central", "target_epsilon": 8.0, "final_accuracy": 0.88, "round_seconds": 10.4},
        "distributed-inf": {"mode": "distributed", "target_epsilon": None, "final_accuracy": 0.9, "round_seconds": 20},
        "distributed-8": {"mode": "distributed", "target_epsilon": 8.0, "final_accuracy": 0.80, "round_seconds": 22},
    }
    dp_fleet.add_costs(rows)  # type: ignore[arg-type]
    assert rows["central-8"]["accuracy_cost"] == pytest.approx(0.02)
    assert rows["central-8"]["time_cost"] == pytest.approx(0.04)
    assert rows["distributed-8"]["time_cost"] == pytest.approx(0.10)
    work = {"server_central": 0.1, "device_distributed": 0.001, "accountant": 0.1, "sample_size": 100}  # 1%, 1%
    goals = "\n".join(dp_fleet.goal_lines(rows, work))  # type: ignore[arg-type]
    assert "central, ε = 8: accuracy within 3 points: **met**" in goals
    assert "distributed, ε = 8: accuracy within 3 points: **MISSED**" in goals
    assert "central: DP adds ≤ 5% to round time: **met** (DP's own work +1.0% of the no-DP round" in goals
    assert "distributed: DP adds ≤ 5% to round time: **met** (DP's own work +1.0%" in goals  # not the wall's +10%
    work["device_distributed"] = 0.02  # 100 * 20 ms + 0.1 s over 20 s
    assert "distributed: DP adds ≤ 5% to round time: **MISSED**" in "\n".join(dp_fleet.goal_lines(rows, work))  # type: ignore[arg-type]
