"""benchmarks/federated_recipe.py's figures, read from metrics.json records as the server writes them (no run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import federated_recipe as recipe  # noqa: E402
import fleet_bench  # noqa: E402

from fedadapt.fleet.scenario_file import load_scenario  # noqa: E402
from simulations.report import chain_rounds  # noqa: E402


def _round(number: int, seconds: float, accuracy: float | None, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "round": number,
        "seconds": seconds,
        "accuracy": accuracy,
        "bytes_up": 100 * len(devices),
        "uploads": len(devices),
        "server_peak_rss_mb": 500.0 + number,
        "client_results": devices,
    }


def _device(train: float, cache: float | None = None, message: float = 5.0) -> dict[str, Any]:
    device = {"partition-id": 0, "train-seconds": train, "client-seconds": message}
    return device if cache is None else device | {"prefix-cache-seconds": cache}


WARM = [_round(1, 30.0, 0.70, [_device(1.0, 2.0), _device(1.0, 0.0)])]
MAIN = [
    _round(1, 40.0, 0.80, [_device(3.0, 1.0)]),
    _round(2, 10.0, 0.86, [_device(3.0, 0.0)]),
    _round(3, 10.0, None, [_device(3.0, 0.0)]),  # a round the server could not score
    _round(4, 12.0, 0.91, [_device(3.0, 0.0), {"partition-id": 1}]),  # a device without training metrics
]


def test_a_warm_start_and_its_run_are_one_row_numbered_on() -> None:
    records = chain_rounds(WARM, MAIN)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    figures = fleet_bench.run_figures(records, (0.85, 0.90))

    assert figures["rounds"] == 5 and figures["seconds"] == pytest.approx(102.0)
    assert (figures["rounds_to_0.85"], figures["seconds_to_0.85"]) == (3, pytest.approx(80.0))
    assert (figures["rounds_to_0.9"], figures["seconds_to_0.9"]) == (5, pytest.approx(102.0))
    assert figures["best_sample_accuracy"] == pytest.approx(0.91)
    # training plus the prefix cache, over the 6 device-rounds that trained: (3 + 1 + 4 * 3 + 1) / 6
    assert figures["device_compute_seconds"] == pytest.approx(17 / 6)
    assert figures["device_message_seconds"] == pytest.approx(5.0)
    assert figures["bytes_up_per_device_round"] == pytest.approx(100.0)
    assert figures["server_peak_rss_mb"] == pytest.approx(504.0)
    assert fleet_bench.wall_curve(records) == [(30.0, 0.70), (70.0, 0.80), (80.0, 0.86), (102.0, 0.91)]


def test_the_second_start_is_read_from_the_first_round_after_the_warm_up() -> None:
    warm = [{**record, "phase": recipe.HEAD_WARMUP_PHASE} for record in WARM]
    records = chain_rounds(warm, MAIN)
    # round 2 (the rest's first, 40 s) less the median of the rest's later rounds (10, 10, 12)
    assert recipe.second_start_seconds(records) == pytest.approx(30.0)
    assert recipe.second_start_seconds(records[:3]) is None  # too few rounds after the warm-up to tell


def test_a_target_never_reached_has_no_rounds_or_seconds() -> None:
    figures = fleet_bench.run_figures(MAIN, (0.95,))
    assert figures["rounds_to_0.95"] is None and figures["seconds_to_0.95"] is None


def test_the_recipe_scenario_is_written_and_read_back_unchanged(tmp_path: Path) -> None:
    scenario = load_scenario(recipe.RECIPE)
    written = fleet_bench.write_scenario(scenario, tmp_path / "recipe.toml")
    assert load_scenario(written) == scenario
    assert "[method-settings]\ndrop-layers = 4" in written.read_text()


def test_every_row_runs_on_the_same_fleet() -> None:
    plan = recipe.Plan(
        out=Path("unused"),
        data="banking77",
        fleet=load_scenario(recipe.FLEETS["banking77"]),
        today=load_scenario(recipe.TODAY),
        recipe=load_scenario(recipe.RECIPE),
        rounds=7,
        warmup_rounds=3,
        test_examples=None,
        central_epochs=1,
        personal_epochs=1,
        local_max_steps=None,
    )
    rows = {row: plan.row_scenario(row) for row in ("head", "lora", "recipe", "full", "central")}
    fleet_fields = (*recipe.DATA_FIELDS, "clients_per_round", "rounds")
    for scenario in rows.values():
        assert all(getattr(scenario, f) == getattr(rows["lora"], f) for f in fleet_fields)
    assert rows["head"].method == "head" and rows["head"].server_optimizer == "fedavg"
    assert rows["lora"].method_settings == () and rows["recipe"].method_settings == (("drop_layers", 4),)
    # Only the recipe warms up, as simulate runs it, with the scenario's own head-warmup-rounds.
    assert [row for row, scenario in rows.items() if scenario.head_warmup_rounds] == ["recipe"]
    assert rows["recipe"].head_warmup_rounds == 3 and rows["recipe"].initial_head is None
    assert load_scenario(recipe.RECIPE).head_warmup_rounds == 3
    assert recipe.make_plan(recipe_args()).warmup_rounds == 3


def recipe_args() -> Any:
    """The benchmark's command line as parsed, without running it."""
    import argparse

    return argparse.Namespace(
        out=Path("unused"),
        data="banking77",
        rounds=None,
        quick=False,
        recipe=recipe.RECIPE,
        today=recipe.TODAY,
        warmup_rounds=None,
        central_epochs=1,
        personal_epochs=1,
    )


def test_the_report_marks_each_goal_from_the_rows() -> None:
    rows = {
        "head": {"final_accuracy": 0.88},
        "lora": {"final_accuracy": 0.83, "device_compute_seconds": 9.0},
        "recipe": {
            "final_accuracy": 0.905,
            "device_compute_seconds": 2.0,
            "seconds_to_0.85": 100.0,
            "bytes_up_per_device_round": 100_000,
        },
        "full": {"final_accuracy": 0.82, "seconds_to_0.85": 250.0, "bytes_up_per_device_round": 90_000_000},
        "central": {"final_accuracy": 0.93, "seconds": 50.0},
        "personal": {"gain": 0.04},
    }
    goals = "\n".join(recipe.goal_lines(rows))
    assert "global accuracy ≥ 0.90: **met**" in goals
    assert "within 1 point of the central upper bound: **MISSED** (central 0.9300, gap +2.5 points)" in goals
    assert "3× faster than full-model FedAvg: **MISSED** (2.50×)" in goals
    assert "3× less than today's LoRA: **met** (4.50×)" in goals
    assert "300× fewer than the full model: **met** (900.00×)" in goals
    assert "global + 5 points: **MISSED** (+4.0 points)" in goals
    assert "beat federated head only: **met**" in goals
    assert "**not measured**" in "\n".join(recipe.goal_lines({"recipe": {"final_accuracy": 0.9}}))

    table = recipe.results_table(rows)
    assert len(table) == 2 + 5 and all(line.count("|") == table[0].count("|") for line in table)
    assert table[-1].startswith("| the recipe, central on the union") and table[-1].endswith("| — | 50.0 |")
