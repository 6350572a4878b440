"""Accuracy against ε for central and distributed DP on a 1,000-device Banking77 fleet, and what DP costs a round.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_fleet.py [--out runs/bench-dp] [--only ROW ...] [--quick]

Rows (issue 22, deliverable 4), each a ``fedadapt simulate`` run of simulations/banking77-dp.toml with only its
privacy changed, so every row has the same data, partitions, sampling scheme (m of n uniformly without
replacement, drawn from the run's secret under DP and secagg+), seeds, rounds and DP knobs:
  central-inf, central-8, central-3, central-1
      ``[privacy] mode = "aead"``; ε = ∞ has no ``[privacy.dp]`` (plain weighted FedAvg), the others central DP
      with ``target-epsilon`` = 8, 3, 1 (z solved before round 1; δ = 1/n^1.1);
  distributed-inf, distributed-8, distributed-3, distributed-1
      ``[privacy] mode = "secagg+"``; ε = ∞ is plain secagg+, the others distributed DP (each device clips and
      adds its noise share before masking). Their secagg+ clipping range is sized to the noised values
      (``secagg_range``) so that no value is clipped (``clipped values`` must be 0: clipping noise voids the
      analysis).
Columns: final accuracy of the final model on the whole test split (``--test-examples`` for a seeded sample);
ε and δ the run reported, and ε recomputed here with ``dp_accounting`` directly from the recorded (z, n, m) of
every round (issue 22's third goal); z and C; the share of deltas clipped; mean round seconds over rounds 2..T
(round 1 starts the simulated devices) and that against the no-DP row of the same privacy mode.
Every row's run is kept under --out (``<row>/metrics.json``, ``scenarios/<row>.toml``); a row whose run finished
is read, not run again, so an interrupted benchmark continues where it stopped. Writes ``results.md``,
``results.json`` and ``accuracy-vs-epsilon.png`` there. ``--quick`` is a smoke run (50 devices, 10 per round,
2 rounds, 1,000 examples): its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fleet_bench, beside this file

from fleet_bench import PROJECT_ROOT, full_test_accuracy, read_metrics, scenario_toml  # noqa: E402

from fedadapt.fleet.scenario import ScenarioConfig  # noqa: E402
from fedadapt.fleet.scenario_file import load_scenario  # noqa: E402
from fedadapt.privacy.config import PrivacyConfig  # noqa: E402
from fedadapt.privacy.dp.config import DpConfig  # noqa: E402

SCENARIO = PROJECT_ROOT / "simulations" / "banking77-dp.toml"
MODES = {"central": "aead", "distributed": "secagg+"}  # DP mode -> the [privacy] mode its rows run under
EPSILONS = (math.inf, 8.0, 3.0, 1.0)
ROWS = tuple(f"{mode}-{_eps}" for mode in MODES for _eps in ("inf", "8", "3", "1"))
GOALS = {8.0: 0.03, 3.0: 0.06}  # ε -> the most accuracy DP may cost (issue 22)
TIME_GOAL = 0.05  # DP adds at most 5% to round time
QUICK = {"num_clients": 50, "clients_per_round": 10, "rounds": 2, "max_examples": 1000, "server_test_examples": 100}
QUICK_TEST_EXAMPLES = 200
# Under secagg+ each device's value is clipped to ±range before quantization. A noised value must stay inside:
# the clipped delta's coordinate (at most C) plus this many standard deviations of its noise share.
NOISE_SIGMAS_IN_RANGE = 8.0
RESULTS_MD, RESULTS_JSON, PLOT_PNG, BENCH_JSON = "results.md", "results.json", "accuracy-vs-epsilon.png", "bench.json"
WORK_JSON = "dp-work.json"  # DP's own work per round, timed in-process once per --out


@dataclass(frozen=True)
class Row:
    name: str
    mode: str  # central | distributed
    epsilon: float  # math.inf: no DP

    @property
    def label(self) -> str:
        return f"{self.mode} ε={'∞' if math.isinf(self.epsilon) else f'{self.epsilon:g}'}"


def parse_row(name: str) -> Row:
    mode, eps = name.rsplit("-", 1)
    return Row(name, mode, math.inf if eps == "inf" else float(eps))


def row_scenario(base: ScenarioConfig, row: Row) -> ScenarioConfig:
    """The base scenario with only its privacy changed for ``row``."""
    base_dp = base.privacy.dp
    if base_dp is None:
        raise SystemExit(f"{SCENARIO} must have a [privacy.dp] table: its DP knobs are every DP row's")
    dp = None
    if not math.isinf(row.epsilon):
        dp = dataclasses.replace(base_dp, mode=row.mode, target_epsilon=row.epsilon, noise_multiplier=None)
    privacy = dataclasses.replace(base.privacy, mode=MODES[row.mode], dp=dp)
    if row.mode == "distributed":
        privacy = dataclasses.replace(privacy, clipping_range=secagg_range(base, dp))
    return dataclasses.replace(base, name=f"dp-{row.name}", privacy=privacy)


def secagg_range(base: ScenarioConfig, dp: DpConfig | None) -> float:
    """The secagg+ clipping range that holds every noised value: C + NOISE_SIGMAS_IN_RANGE share stds.

    With an adaptive clip C moves; the range is then sized for 4× the initial clip (and ``clipped values`` tells).
    """
    if dp is None:
        return base.privacy.clipping_range
    from fedadapt.privacy.dp.noise import device_noise_std
    from fedadapt.privacy.dp.plan import plan_dp

    plan = plan_dp(dp, base.num_clients, base.sample_size, base.rounds)
    clip = dp.initial_clip_norm * (4 if dp.adaptive else 1)
    share = device_noise_std(plan.delta_noise_multiplier, clip, base.sample_size)
    return float(f"{clip + NOISE_SIGMAS_IN_RANGE * share:.3g}")


# --- scenario files -------------------------------------------------------------------------------------------------


def privacy_toml(privacy: PrivacyConfig) -> str:
    """The [privacy] and [privacy.dp] tables: every field that differs from its default."""
    lines = ["[privacy]"]
    lines += _changed_fields(privacy, PrivacyConfig(), skip=("dp",))
    if privacy.dp is not None:
        lines += ["", "[privacy.dp]", *_changed_fields(privacy.dp, DpConfig(noise_multiplier=1.0), keep=("mode",))]
    return "\n".join(lines) + "\n"


def _changed_fields(config: Any, default: Any, skip: Sequence[str] = (), keep: Sequence[str] = ()) -> list[str]:
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in skip or value is None or (value == getattr(default, field.name) and field.name not in keep):
            continue
        lines.append(f"{field.name.replace('_', '-')} = {json.dumps(value)}")
    return lines


def write_row_scenario(scenario: ScenarioConfig, path: Path) -> str:
    """Write the row's scenario file, checked to read back as the same scenario; returns its text."""
    text = scenario_toml(dataclasses.replace(scenario, privacy=PrivacyConfig())) + "\n" + privacy_toml(scenario.privacy)
    if path.is_file() and path.read_text() != text and (path.parent.parent / path.stem).exists():
        raise SystemExit(
            f"{path.parent.parent / path.stem} holds a run of another scenario ({path}): choose another --out"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if load_scenario(path) != scenario:
        raise RuntimeError(f"{path} does not read back as the scenario written")
    return text


# --- running and reading a row --------------------------------------------------------------------------------------


def run_row(out: Path, row: Row, scenario: ScenarioConfig, show: bool) -> dict[str, Any]:
    """The row's metrics: read when its run finished before, else run (or resumed) now."""
    from simulations.runner import simulate

    folder = (out / row.name).resolve()
    metrics = read_metrics(folder)
    if metrics is not None:
        print(f"\n== {row.name}: reading the finished run in {folder}", flush=True)
        return metrics
    path = (out / "scenarios" / f"{row.name}.toml").resolve()
    write_row_scenario(scenario, path)
    started = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    print(f"\n== {row.name}: {'resuming' if started else 'running'} {path.name} into {folder}", flush=True)
    wall = time.perf_counter()
    metrics = simulate(path, out=folder, resume=started, show=show)
    (folder / BENCH_JSON).write_text(json.dumps({"process_wall_seconds": time.perf_counter() - wall}) + "\n")
    return metrics


def row_figures(out: Path, row: Row, scenario: ScenarioConfig, test_examples: int | None, show: bool) -> dict[str, Any]:
    metrics = run_row(out, row, scenario, show)
    folder = out / row.name
    bench_path = folder / BENCH_JSON
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else {}
    if "final_accuracy" not in bench:
        bench["final_accuracy"] = full_test_accuracy(folder / "final_adapter", scenario, test_examples)
        bench_path.write_text(json.dumps(bench, indent=2) + "\n")
    records, summary = metrics["rounds"], metrics["summary"]
    later = [float(r["seconds"]) for r in records[1:]]
    dp_entries = [r["dp"] for r in records if "dp" in r]
    figures: dict[str, Any] = {
        "row": row.name,
        "mode": row.mode,
        "target_epsilon": None if math.isinf(row.epsilon) else row.epsilon,
        "privacy_mode": scenario.privacy.mode,
        "final_accuracy": bench["final_accuracy"],
        "final_sample_accuracy": records[-1].get("accuracy") if records else None,
        "rounds": len(records),
        "round_seconds": statistics.fmean(later) if later else None,
        "first_round_seconds": float(records[0]["seconds"]) if records else None,
        "epsilon": summary.get("epsilon"),
        "delta": summary.get("delta"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "clip": dp_entries[-1]["clip"] if dp_entries else None,
        "clipped_share": _clipped_share(records),
        "clipped_values": sum(int(r.get("clipped_values") or 0) for r in records)
        if row.mode == "distributed"
        else None,
        "epsilon_direct": direct_epsilon(dp_entries, summary.get("delta")),
        "curve": [(r["round"], r.get("accuracy"), r.get("epsilon")) for r in records],
    }
    return figures


def _clipped_share(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The share of accepted deltas the server clipped (central DP: it sees every delta; else unknown)."""
    clipped = [(r["dp"]["clipped"], r["accepted"]) for r in records if "dp" in r and "clipped" in r["dp"]]
    total = sum(accepted for _, accepted in clipped)
    return sum(c for c, _ in clipped) / total if total else None


def direct_epsilon(entries: Sequence[Mapping[str, Any]], delta: float | None) -> float | None:
    """ε at δ recomputed with dp_accounting alone from the rounds' recorded (z, n, m): sampling without
    replacement under REPLACE_ONE, multiplier z/2 (docs/privacy.md says why), one event per accounted round."""
    accounted = [e for e in entries if e.get("accounted")]
    if not accounted or delta is None:
        return None
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for entry in accounted:
        gaussian = dp_accounting.GaussianDpEvent(entry["noise_multiplier"] / 2)
        accountant.compose(
            dp_accounting.SampledWithoutReplacementDpEvent(entry["population"], entry["sample_size"], gaussian)
        )
    return float(accountant.get_epsilon(delta))


def finished(out: Path, row: str) -> bool:
    return read_metrics(out / row) is not None


def dp_work_seconds(base: ScenarioConfig, repeats: int = 3) -> dict[str, float]:
    """DP's own work in one round of ``base`` (its ε and clip), timed in this process, best of ``repeats``.

    The rows' round seconds are wall clock on a shared machine: a few percent there is the load of other jobs.
    This times exactly what DP adds: on the server (central) clipping the m deltas of the head's shape, their
    float64 sum, the noise and one accountant round; on a device (distributed) its clip and noise share.
    """
    import numpy as np
    import torch

    from fedadapt.aggregate.dp_rounds import DpSum
    from fedadapt.delta.state import AdapterSchema, TensorSpec
    from fedadapt.privacy.dp.accounting import Accountant
    from fedadapt.privacy.dp.device import private_vector
    from fedadapt.privacy.dp.noise import make_rng
    from fedadapt.privacy.dp.plan import plan_dp

    dp = base.privacy.dp
    assert dp is not None
    plan = plan_dp(dp, base.num_clients, base.sample_size, base.rounds)
    features, classes = 384, 77  # MiniLM-L6's pooled width, Banking77's intents: the head's shapes
    specs = (
        TensorSpec("classifier.weight", (classes, features), "float32", "shared", "head"),
        TensorSpec("classifier.bias", (classes,), "float32", "shared", "head"),
    )
    schema = AdapterSchema(method={"name": base.method}, backbone_fingerprint="bench", tensors=specs)
    rng = make_rng(0)
    deltas = [
        {s.name: torch.from_numpy(rng.normal(0, 0.1, s.shape).astype(np.float32)) for s in specs}
        for _ in range(base.sample_size)
    ]
    flat = np.concatenate([deltas[0][s.name].numpy().ravel() for s in specs])

    def server_sum() -> None:
        total = DpSum(schema, float(dp.initial_clip_norm), plan.noise_multiplier * dp.initial_clip_norm, 1, rng)
        for delta in deltas:
            total.add(delta, 1)
        total.result()

    def server_accountant() -> None:  # one RDP evaluation: what each round's record_round costs in the loop
        Accountant("fixed-size", plan.delta).record_round(plan.noise_multiplier, base.num_clients, base.sample_size)

    def device() -> None:
        dp_mode = dataclasses.replace(dp, mode="distributed")
        private_vector(flat, dp_mode, dp.initial_clip_norm, base.num_clients, base.sample_size, base.rounds, rng)

    device()  # the device's plan is solved once per process (cached_plan): not a per-round cost
    times = {}
    for name, work in (("server_sum", server_sum), ("accountant", server_accountant), ("device_distributed", device)):
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    return times | {"server_central": times["server_sum"] + times["accountant"], "sample_size": float(base.sample_size)}


# --- the report -----------------------------------------------------------------------------------------------------


def add_costs(rows: dict[str, dict[str, Any]]) -> None:
    """Each DP row's accuracy and round time against the no-DP row of its privacy mode."""
    for figures in rows.values():
        base = rows.get(f"{figures['mode']}-inf")
        if base is None or figures["target_epsilon"] is None:
            continue
        figures["accuracy_cost"] = base["final_accuracy"] - figures["final_accuracy"]
        if base["round_seconds"] and figures["round_seconds"]:
            figures["time_cost"] = figures["round_seconds"] / base["round_seconds"] - 1


def _fmt(value: Any, style: str) -> str:
    if value is None:
        return "—"
    styles = {
        "acc": f"{value:.4f}",
        "eps": "∞" if isinstance(value, float) and math.isinf(value) else f"{value:.3f}",
        "sci": f"{value:.3g}",
        "s": f"{value:.1f}",
        "pct": f"{100 * value:+.1f}%",
        "points": f"{100 * value:+.1f}",
        "share": f"{100 * value:.0f}%",
        "int": f"{value:,}",
    }
    return styles[style]


def results_table(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    columns = [
        ("final accuracy", "final_accuracy", "acc"),
        ("vs no DP (points)", "accuracy_cost", "points"),
        ("ε reached", "epsilon", "eps"),
        ("ε (dp_accounting direct)", "epsilon_direct", "eps"),
        ("δ", "delta", "sci"),
        ("z", "noise_multiplier", "sci"),
        ("C", "clip", "sci"),
        ("deltas clipped", "clipped_share", "share"),
        ("secagg+ values clipped", "clipped_values", "int"),
        ("mean round s (2..T)", "round_seconds", "s"),
        ("round time vs no DP", "time_cost", "pct"),
    ]
    lines = ["| row | privacy | " + " | ".join(title for title, _, _ in columns) + " |"]
    lines.append("|---|---|" + "---:|" * len(columns))
    for name in (r for r in ROWS if r in rows):
        figures = dict(rows[name])
        if "accuracy_cost" in figures:
            figures["accuracy_cost"] = -figures["accuracy_cost"]  # shown as the change: negative is a loss
        cells = [_fmt(figures.get(key), style) for _, key, style in columns]
        lines.append(f"| {parse_row(name).label} | {figures['privacy_mode']} | " + " | ".join(cells) + " |")
    return lines


def work_share(rows: Mapping[str, Mapping[str, Any]], work: Mapping[str, float], mode: str) -> float | None:
    """DP's own work per round over the no-DP row's mean round: the server's (central), or every sampled device's
    summed (distributed: an upper bound, as if the devices ran one after another)."""
    base = rows.get(f"{mode}-inf", {}).get("round_seconds")
    if not base or not work:
        return None
    if mode == "central":
        return work["server_central"] / base
    # the devices' clip and noise, and the server's accountant (under secagg+ the devices clip and noise)
    return (work["device_distributed"] * work["sample_size"] + work.get("accountant", 0.0)) / base


def goal_lines(rows: Mapping[str, Mapping[str, Any]], work: Mapping[str, float]) -> list[str]:
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    lines = []
    for mode in MODES:
        for epsilon, allowed in GOALS.items():
            cost = rows.get(f"{mode}-{epsilon:g}", {}).get("accuracy_cost")
            ok = None if cost is None else cost <= allowed
            shown = "—" if cost is None else f"{100 * cost:.1f} points below no DP"
            lines.append(
                f"- {mode}, ε = {epsilon:g}: accuracy within {100 * allowed:.0f} points: **{verdict[ok]}** ({shown})"
            )
        costs = [rows[r]["time_cost"] for r in rows if rows[r]["mode"] == mode and rows[r].get("time_cost") is not None]
        share = work_share(rows, work, mode)
        ok = None if share is None else share <= TIME_GOAL
        shown = ", ".join(_fmt(c, "pct") for c in costs) or "—"
        lines.append(
            f"- {mode}: DP adds ≤ 5% to round time: **{verdict[ok]}** (DP's own work "
            f"{_fmt(share, 'pct')} of the no-DP round; wall clock of the rows, under other jobs' load: {shown})"
        )
    gaps = [
        abs(f["epsilon"] - f["epsilon_direct"])
        for f in rows.values()
        if f.get("epsilon") is not None and f.get("epsilon_direct") is not None
    ]
    ok = None if not gaps else max(gaps) <= 1e-9 * max(1.0, max(f["epsilon"] or 0 for f in rows.values()))
    lines.append(
        f"- reported ε equals dp_accounting called directly on the recorded parameters: **{verdict[ok]}** "
        f"(largest difference {max(gaps) if gaps else '—'})"
    )
    return lines


def write_plot(path: Path, rows: Mapping[str, Mapping[str, Any]], title: str) -> None:
    """Final accuracy against ε (log scale), one line per DP mode; ε = ∞ at the right edge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = [e for e in EPSILONS if not math.isinf(e)]
    infinity_at = max(finite) * 3  # where "∞" sits on the log axis
    for mode, marker in zip(MODES, ("o", "s"), strict=True):
        points = sorted(
            (infinity_at if math.isinf(parse_row(r).epsilon) else parse_row(r).epsilon, rows[r]["final_accuracy"])
            for r in rows
            if rows[r]["mode"] == mode
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=marker, label=f"{mode} DP ({MODES[mode]})")
    ax.set_xscale("log")
    ax.set_xticks([*finite, infinity_at], [f"{e:g}" for e in finite] + ["∞ (no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("ε (δ = 1/n^1.1)")
    ax.set_ylabel("final accuracy (Banking77 test split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.savefig(path, format="png")


def report(
    base: ScenarioConfig,
    rows: Mapping[str, Mapping[str, Any]],
    work: Mapping[str, float],
    command: str,
    test_examples: int | None,
) -> str:
    dp = base.privacy.dp
    scored = "the whole test split" if test_examples is None else f"a seeded {test_examples:,} of the test split"
    lines = [
        "# Accuracy against ε: central and distributed DP",
        "",
        f"`{command}`",
        "",
        f"Fleet: {base.num_clients:,} devices, partition {base.partition}"
        + (f" (alpha {base.alpha:g})" if base.partition == "dirichlet" else "")
        + f", {base.sample_size} per round, {base.rounds} rounds, method {base.method}, "
        f"{base.local_epochs} local epoch(s), server optimizer {base.server_optimizer} (lr {base.server_lr:g}); "
        f"DP clip {dp.clip if dp else '—'}. Final accuracy on {scored}.",
        "",
        *results_table(rows),
        "",
        *goal_lines(rows, work),
        "",
        f"DP's own work per round, timed in-process (best of 3): the server's clip, sum and noise of "
        f"{base.sample_size} deltas {1000 * work.get('server_sum', math.nan):.1f} ms (central), the accountant's "
        f"round {1000 * work.get('accountant', math.nan):.0f} ms (both modes), one device's clip and noise share "
        f"{1000 * work['device_distributed']:.2f} ms (distributed).",
    ]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------------------------


def make_base(args: argparse.Namespace) -> ScenarioConfig:
    base = load_scenario(args.scenario)
    if args.quick:
        base = dataclasses.replace(base, **QUICK)
    if args.rounds:
        base = dataclasses.replace(base, rounds=args.rounds)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench-dp")
    parser.add_argument("--scenario", type=Path, default=SCENARIO, help="the fleet and DP knobs of every row")
    parser.add_argument(
        "--only", choices=ROWS, action="append", help="run only these rows (repeatable); finished ones are reported too"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every row (default: the scenario's)")
    parser.add_argument(
        "--test-examples", type=int, default=None, help="score final models on a seeded sample (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny settings, meaningless figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = parser.parse_args()
    base = make_base(args)
    test_examples = QUICK_TEST_EXAMPLES if args.quick else args.test_examples
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for name in ROWS:  # the rows asked for, and those finished in --out before (read, never run)
        if args.only and name not in args.only and not finished(args.out, name):
            continue
        row = parse_row(name)
        rows[name] = row_figures(args.out, row, row_scenario(base, row), test_examples, not args.no_progress)
    add_costs(rows)
    work_path = args.out / WORK_JSON
    if not work_path.is_file():
        work_path.write_text(json.dumps(dp_work_seconds(base), indent=2) + "\n")
    work = json.loads(work_path.read_text())
    command = " ".join(["python benchmarks/dp_fleet.py", *sys.argv[1:]])
    text = report(base, rows, work, command, test_examples)
    (args.out / RESULTS_MD).write_text(text)
    (args.out / RESULTS_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    write_plot(args.out / PLOT_PNG, rows, f"Banking77, {base.num_clients:,} devices: accuracy against ε")
    print("\n" + text)
    print(f"written: {args.out / RESULTS_MD}, {args.out / RESULTS_JSON}, {args.out / PLOT_PNG}")


if __name__ == "__main__":
    main()
