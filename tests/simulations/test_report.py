"""simulations.report: adapter run vs full-model FedAvg from hand-made metrics records."""

from __future__ import annotations

from typing import Any

import pytest

from simulations.report import best_accuracy, compare_with_full_model, run_figures, time_to_target


def _metrics(
    method: str,
    compression: str,
    rounds: list[tuple[int, float | None, float]],
    bytes_up: float | None,
) -> dict[str, Any]:
    records = [{"round": r, "accuracy": a, "seconds": s} for r, a, s in rounds]
    return {
        "scenario": {"method": method, "compression": compression},
        "rounds": records,
        "summary": {
            "final_accuracy": records[-1]["accuracy"] if records else None,
            "bytes_up_per_client_round": bytes_up,
            "seconds": sum(s for _, _, s in rounds),
        },
    }


# best 0.8 (round 3); a round without a score in between
ADAPTER = _metrics("lora", "fp16", [(1, 0.5, 10.0), (2, None, 12.0), (3, 0.8, 8.0), (4, 0.7, 10.0)], 2_000.0)
# best 0.78 (round 3)
FULL = _metrics("full", "none", [(1, 0.6, 100.0), (2, 0.75, 110.0), (3, 0.78, 90.0)], 180_000.0)


def test_best_accuracy_skips_unscored_rounds() -> None:
    assert best_accuracy(ADAPTER["rounds"]) == 0.8
    assert best_accuracy([{"round": 1, "accuracy": None, "seconds": 1.0}, {"round": 2, "seconds": 1.0}]) is None
    assert best_accuracy([]) is None


def test_time_to_target_is_the_first_round_reaching_it_with_cumulative_seconds() -> None:
    assert time_to_target(ADAPTER["rounds"], 0.5) == {"round": 1, "seconds": 10.0}
    assert time_to_target(ADAPTER["rounds"], 0.6) == {"round": 3, "seconds": 30.0}  # the unscored round's time counts
    assert time_to_target(ADAPTER["rounds"], 0.8) == {"round": 3, "seconds": 30.0}  # reaching = at least the target
    assert time_to_target(ADAPTER["rounds"], 0.81) is None
    assert time_to_target(FULL["rounds"], 0.7) == {"round": 2, "seconds": 210.0}
    unscored_first = [{"round": 1, "accuracy": None, "seconds": 5.0}, {"round": 2, "accuracy": 0.9, "seconds": 5.0}]
    assert time_to_target(unscored_first, 0.0) == {"round": 2, "seconds": 10.0}


def test_default_target_is_the_lower_best_accuracy() -> None:
    report = compare_with_full_model(ADAPTER, FULL)
    assert report["target_accuracy"] == 0.78
    adapter, full = report["adapter"], report["full_model"]
    assert (adapter["rounds_to_target"], adapter["seconds_to_target"]) == (3, 30.0)
    assert (full["rounds_to_target"], full["seconds_to_target"]) == (3, 300.0)
    assert report["speedup_to_target"] == pytest.approx(300.0 / 30.0)
    assert report["bytes_ratio"] == pytest.approx(180_000.0 / 2_000.0)
    assert report["accuracy_gap"] == pytest.approx(0.78 - 0.7)
    assert (adapter["best_accuracy"], full["best_accuracy"]) == (0.8, 0.78)
    assert (adapter["final_accuracy"], full["final_accuracy"]) == (0.7, 0.78)
    assert (adapter["method"], adapter["compression"], full["method"], full["compression"]) == (
        "lora",
        "fp16",
        "full",
        "none",
    )
    assert (adapter["rounds"], full["rounds"]) == (4, 3)
    assert (adapter["seconds"], full["seconds"]) == (40.0, 300.0)
    assert (adapter["bytes_up_per_client_round"], full["bytes_up_per_client_round"]) == (2_000.0, 180_000.0)


def test_default_target_is_symmetric() -> None:
    swapped = compare_with_full_model(FULL, ADAPTER)
    assert swapped["target_accuracy"] == 0.78
    assert swapped["speedup_to_target"] == pytest.approx(30.0 / 300.0)
    assert swapped["bytes_ratio"] == pytest.approx(2_000.0 / 180_000.0)


def test_an_explicit_target_is_used_as_given() -> None:
    report = compare_with_full_model(ADAPTER, FULL, target=0.7)
    assert report["target_accuracy"] == 0.7
    assert (report["adapter"]["rounds_to_target"], report["adapter"]["seconds_to_target"]) == (3, 30.0)
    assert (report["full_model"]["rounds_to_target"], report["full_model"]["seconds_to_target"]) == (2, 210.0)
    assert report["speedup_to_target"] == pytest.approx(7.0)


def test_a_run_that_never_reaches_the_target_gives_none() -> None:
    report = compare_with_full_model(ADAPTER, FULL, target=0.79)  # only the adapter run gets there
    assert report["adapter"]["rounds_to_target"] == 3 and report["adapter"]["seconds_to_target"] == 30.0
    assert report["full_model"]["rounds_to_target"] is None and report["full_model"]["seconds_to_target"] is None
    assert report["speedup_to_target"] is None
    neither = compare_with_full_model(ADAPTER, FULL, target=0.95)
    assert neither["adapter"]["rounds_to_target"] is None and neither["speedup_to_target"] is None
    assert neither["bytes_ratio"] == pytest.approx(90.0)  # bytes do not depend on the target


def test_runs_without_scores_have_no_target() -> None:
    unscored = _metrics("lora", "int8", [(1, None, 5.0), (2, None, 5.0)], 500.0)
    report = compare_with_full_model(unscored, FULL)
    assert report["target_accuracy"] is None
    assert report["adapter"]["best_accuracy"] is None and report["adapter"]["final_accuracy"] is None
    assert report["full_model"]["rounds_to_target"] is None and report["speedup_to_target"] is None
    assert report["accuracy_gap"] is None
    assert report["bytes_ratio"] == pytest.approx(360.0)


def test_missing_or_zero_bytes_give_no_ratio() -> None:
    no_bytes = _metrics("lora", "fp16", [(1, 0.9, 1.0)], None)
    assert compare_with_full_model(no_bytes, FULL)["bytes_ratio"] is None
    zero_bytes = _metrics("lora", "fp16", [(1, 0.9, 1.0)], 0.0)
    assert compare_with_full_model(zero_bytes, FULL)["bytes_ratio"] is None


def test_run_figures_without_a_target() -> None:
    figures = run_figures(FULL, None)
    assert figures["rounds_to_target"] is None and figures["seconds_to_target"] is None
    assert figures["best_accuracy"] == 0.78 and figures["rounds"] == 3
