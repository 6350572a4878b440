"""Comparing a federated adapter run with full-model FedAvg on the same scenario.

Both runs' ``metrics.json`` records go in; out come the figures the simulation reports beside
each other: a target accuracy both runs reach, the rounds and seconds each needed to reach it,
final accuracies and bytes per client-round, and the ratios between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedadapt.fleet.run_config import PHASE_HEAD_WARMUP


def best_accuracy(rounds: Sequence[Mapping[str, Any]]) -> float | None:
    """The highest per-round accuracy of a run (None when no round was scored)."""
    scores = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    return max(scores) if scores else None


def time_to_target(rounds: Sequence[Mapping[str, Any]], target: float) -> dict[str, float | int] | None:
    """The first round whose accuracy reaches ``target`` and the seconds spent up to its end."""
    seconds = 0.0
    for record in rounds:
        seconds += float(record["seconds"])
        accuracy = record.get("accuracy")
        if accuracy is not None and accuracy >= target:
            return {"round": int(record["round"]), "seconds": seconds}
    return None


def run_figures(metrics: Mapping[str, Any], target: float | None) -> dict[str, Any]:
    """One run's side of the comparison."""
    rounds = metrics["rounds"]
    summary = metrics["summary"]
    reached = time_to_target(rounds, target) if target is not None else None
    return {
        "method": metrics["scenario"]["method"],
        "compression": metrics["scenario"]["compression"],
        "final_accuracy": summary.get("final_accuracy"),
        "best_accuracy": best_accuracy(rounds),
        "rounds_to_target": reached["round"] if reached else None,
        "seconds_to_target": reached["seconds"] if reached else None,
        "bytes_up_per_client_round": summary.get("bytes_up_per_client_round"),
        "seconds": summary.get("seconds"),
        "rounds": len(rounds),
    }


def compare_with_full_model(
    adapter: Mapping[str, Any], full_model: Mapping[str, Any], target: float | None = None
) -> dict[str, Any]:
    """Adapter run vs full-model FedAvg: target accuracy, per-run figures and the ratios between them.

    Without a ``target`` the lower of the two runs' best accuracies is used: the highest accuracy
    both runs reach, so that "time to target" is defined for both.
    """
    if target is None:
        bests = [b for b in (best_accuracy(adapter["rounds"]), best_accuracy(full_model["rounds"])) if b is not None]
        target = min(bests) if len(bests) == 2 else None
    ours, theirs = run_figures(adapter, target), run_figures(full_model, target)
    return {
        "target_accuracy": target,
        "adapter": ours,
        "full_model": theirs,
        "bytes_ratio": _ratio(theirs["bytes_up_per_client_round"], ours["bytes_up_per_client_round"]),
        "speedup_to_target": _ratio(theirs["seconds_to_target"], ours["seconds_to_target"]),
        "accuracy_gap": _difference(theirs["final_accuracy"], ours["final_accuracy"]),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _difference(first: float | None, second: float | None) -> float | None:
    return None if first is None or second is None else first - second


def chain_rounds(*phases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-round records of runs made one after another (a warm start, then the run), numbered 1..n."""
    chained: list[dict[str, Any]] = []
    for phase in phases:
        for record in phase:
            chained.append({**record, "round": len(chained) + 1})
    return chained


def mean_per(rounds: Sequence[Mapping[str, Any]], total: str, count: str) -> float | None:
    """``total`` over ``count`` summed across ``rounds`` (bytes per upload, say); None when nothing counted."""
    counted = sum(int(r.get(count, 0)) for r in rounds)
    return sum(float(r[total]) for r in rounds) / counted if counted else None


def chain_head_warmup(warmup: Mapping[str, Any], rest: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a run with a head warm-up: the warm-up's rounds, then the rest's, numbered on.

    The summary counts both phases' rounds, seconds and bytes, so that time and bytes to a target
    include the warm-up; accuracies and the rest are the last phase's. ``head_warmup`` keeps the
    warm-up's own summary.
    """
    rounds = chain_rounds([{**record, "phase": PHASE_HEAD_WARMUP} for record in warmup["rounds"]], rest["rounds"])
    summary = dict(rest["summary"]) | {
        "rounds": len(rounds),
        "head_warmup_rounds": len(warmup["rounds"]),
        "seconds": sum(float(r["seconds"]) for r in rounds),
        "bytes_up_per_client_round": mean_per(rounds, "bytes_up", "uploads"),
        "bytes_down_per_client_round": mean_per(rounds, "bytes_down", "clients"),
    }
    return {**rest, "rounds": rounds, "summary": summary, "head_warmup": {"summary": warmup["summary"]}}
