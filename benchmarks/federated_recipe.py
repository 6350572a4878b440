"""One run, same partitions: the federated recipe beside head only, today's LoRA, full-model FedAvg and central.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/federated_recipe.py [--out runs/bench-recipe]
      [--data banking77|synthetic] [--only ROW ...] [--rounds N] [--quick]

Rows (issue 19, deliverable 3), each a fleet simulation on the same data, partitions, sampling and seeds
(the fleet of banking77-dirichlet.toml, or of quickstart.toml with ``--data synthetic``), all for the
recipe's number of rounds:
  head     federated head only: method ``head`` (a federated linear probe; every device trains from its
           cached embeddings), the recipe's local epochs, plain FedAvg (the average of a linear layer);
  lora     the full-depth LoRA of before issue 19, as banking77-lora-baseline.toml has it;
  recipe   simulations/banking77-dirichlet.toml, the recipe, run as ``fedadapt simulate`` runs it: its first
           ``head-warmup-rounds`` rounds train the head only (the ``head`` row's scenario) in
           ``recipe/head-warmup`` and the rest start from that head; its rounds, seconds and bytes include
           the warm-up's;
  full     full-model FedAvg (banking77-lora-baseline.toml's ``full-model`` variant);
  central  the recipe's model trained centrally on the union of the devices' training splits
           (CENTRAL_EPOCHS epochs, through the frozen-prefix cache): the upper bound;
  personal the recipe at Dirichlet alpha = 0.1 (banking77; with --data synthetic the recipe row's own
           fleet of one user per device), then every device's local test split scored with the global
           model and with that model after fine-tuning its head on the device's own data
           (``fedadapt.train.personalize``, PERSONAL_EPOCHS epochs: FedRep's order).
Columns: final accuracy on the whole test split (the rounds are scored on the scenario's seeded
sample of it); rounds and wall seconds to 0.85 and 0.90 (the first round whose sample accuracy
reaches it; seconds are the rounds' as the server timed them, summed: round 1 includes starting the
simulated devices and loading their model, what happens before it does not count);
device compute seconds per device-round (``train-seconds`` + ``prefix-cache-seconds`` of every reply,
averaged) and the whole message (``client-seconds``); peak memory: nothing in the replies records a
device's memory, so the benchmark samples the simulation's processes and reports the largest peak RSS
of a Ray worker (``ray/_private/workers/`` in its command line): the process that runs the virtual
devices one after another, backbone and Ray runtime included; bytes up per device-round
(``bytes_up`` / ``uploads`` over every round).
Every row's run is kept under --out (``<row>/metrics.json``, ``scenarios/<row>.toml``); a row whose
run finished is read, not run again, so an interrupted benchmark continues where it stopped and a
second call only reports. Writes ``results.md``, ``results.json`` and ``accuracy-vs-time.png`` there.
``--quick`` is a smoke run (2 rounds, 2 local steps, 1,000 Banking77 examples): its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fleet_bench, beside this file

from fleet_bench import (  # noqa: E402
    PROJECT_ROOT,
    ProcessPeaks,
    full_test_accuracy,
    read_metrics,
    run_figures,
    wall_curve,
    write_scenario,
)

from fedadapt.fleet.data import DATA_FIELDS  # noqa: E402
from fedadapt.fleet.run_config import PHASE_HEAD_WARMUP as HEAD_WARMUP_PHASE  # noqa: E402
from fedadapt.fleet.scenario import ScenarioConfig  # noqa: E402
from fedadapt.fleet.scenario_file import load_scenario  # noqa: E402
from fedadapt.fleet.variants import full_model_variant, head_warmup_variant  # noqa: E402

SIMULATIONS = PROJECT_ROOT / "simulations"
FLEETS = {"banking77": SIMULATIONS / "banking77-dirichlet.toml", "synthetic": SIMULATIONS / "quickstart.toml"}
TODAY = SIMULATIONS / "banking77-lora-baseline.toml"  # the full-depth LoRA of before, and full-model FedAvg
RECIPE = SIMULATIONS / "banking77-dirichlet.toml"  # the recipe, head warm-up included
FLEET_ROWS = ("head", "lora", "recipe", "full")
ROWS = (*FLEET_ROWS, "central", "personal")
LABELS = {
    "head": "federated head only (cached)",
    "lora": "today's LoRA (all 6 layers)",
    "recipe": "the recipe (head warm start + top-layer LoRA + FedYogi)",
    "full": "full-model FedAvg",
    "central": "the recipe, central on the union (upper bound)",
}
TARGETS = (0.85, 0.90)
CENTRAL_EPOCHS = 3
PERSONAL_ALPHA = 0.1
PERSONAL_EPOCHS = 3  # as docs/local-training.md's personalization section
QUICK = {"rounds": 2, "warmup": 1, "steps": 2, "max_examples": 1000, "test_examples": 200, "epochs": 1}
RESULTS_MD, RESULTS_JSON, PLOT_PNG, BENCH_JSON = "results.md", "results.json", "accuracy-vs-time.png", "bench.json"
DEVICE_PROCESS = "ray/_private/workers/"  # in the command line of the Ray workers that run the virtual devices


@dataclass(frozen=True)
class Plan:
    """What this call runs: the rows' scenarios on one fleet, and the settings of the runs."""

    out: Path
    data: str
    fleet: ScenarioConfig  # whose data and partition fields every row takes
    today: ScenarioConfig
    recipe: ScenarioConfig
    rounds: int
    warmup_rounds: int
    test_examples: int | None  # None: the whole test split for the final scores
    central_epochs: int
    personal_epochs: int
    local_max_steps: int | None  # --quick only
    show: bool = True

    def on_fleet(self, scenario: ScenarioConfig, row: str, **changes: Any) -> ScenarioConfig:
        """``scenario`` on the benchmark's fleet: its data, partition, sampling, seed and rounds; no warm-up
        unless ``changes`` ask for one (only the recipe's rows do: recipe_scenario)."""
        fleet = {name: getattr(self.fleet, name) for name in (*DATA_FIELDS, "clients_per_round")}
        settings = {
            **fleet,
            "name": f"{self.data}-{row}",
            "rounds": self.rounds,
            "full_model": False,
            "head_warmup_rounds": 0,
            "local_max_steps": self.local_max_steps or scenario.local_max_steps,
        }
        return dataclasses.replace(scenario, **(settings | changes))

    def recipe_scenario(self, row: str, **changes: Any) -> ScenarioConfig:
        """The recipe on the fleet with its head warm-up, which simulate runs as a phase of its own."""
        warmup_rounds = min(self.warmup_rounds, self.rounds - 1)
        return self.on_fleet(self.recipe, row, **changes, head_warmup_rounds=warmup_rounds)

    def row_scenario(self, row: str) -> ScenarioConfig:
        if row == "head":  # the recipe's head warm-up (method ``head``, plain FedAvg) for every round
            return self.on_fleet(head_warmup_variant(self.recipe, rounds=self.rounds), row)
        if row in ("lora", "full"):
            return self.on_fleet(self.today, row)
        if row == "central":  # trained in one go: no warm-up phase
            return self.on_fleet(self.recipe, row)
        return self.recipe_scenario(row)


# --- running the rows ---------------------------------------------------------------------------------------------


def run_fleet_row(plan: Plan, name: str, scenario: ScenarioConfig, full_model: bool = False) -> dict[str, Any]:
    """The run of ``scenario`` in ``<out>/<name>``: read when it finished before, else run (or resumed)."""
    from simulations.runner import SimulationPlan, run_plan, simulate

    folder = (plan.out / name).resolve()
    metrics = read_metrics(folder)
    if metrics is not None:
        print(f"\n== {name}: reading the finished run in {folder}", flush=True)
        if not (folder / BENCH_JSON).is_file():  # finished outside the benchmark: no memory was sampled
            (folder / BENCH_JSON).write_text(json.dumps({"device_peak_rss_mib": None}) + "\n")
        return metrics
    scenario_file = plan.out / "scenarios" / f"{name}.toml"
    _refuse_other_scenario(scenario_file, scenario, folder)
    path = write_scenario(scenario, scenario_file).resolve()
    started = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    print(f"\n== {name}: {'resuming' if started else 'running'} {path.name} into {folder}", flush=True)
    wall = time.perf_counter()
    with ProcessPeaks() as peaks:
        if full_model:
            variant = SimulationPlan(path, full_model_variant(scenario), folder, started, full_model=True)
            metrics = run_plan(variant, plan.show)
        else:
            metrics = simulate(path, out=folder, resume=started, show=plan.show)
    bench = {
        "device_peak_rss_mib": peaks.peak_mib(DEVICE_PROCESS),
        "largest_processes": peaks.largest(),
        "process_wall_seconds": time.perf_counter() - wall,
    }
    (folder / BENCH_JSON).write_text(json.dumps(bench, indent=2) + "\n")
    return metrics


def _refuse_other_scenario(path: Path, scenario: ScenarioConfig, folder: Path) -> None:
    """A row's folder holds the run of the scenario written beside it; another one would mix two runs."""
    from fleet_bench import scenario_toml

    if path.is_file() and folder.exists() and path.read_text() != scenario_toml(scenario):
        raise SystemExit(f"{folder} holds a run of another scenario ({path}): choose another --out")


def row_records(plan: Plan, row: str) -> tuple[list[dict[str, Any]], Path, ScenarioConfig]:
    """Run (or read) a fleet row; its per-round records (the recipe's warm-up first), final adapter and scenario."""
    scenario = plan.row_scenario(row)
    metrics = run_fleet_row(plan, row, scenario, full_model=row == "full")
    return metrics["rounds"], plan.out / row, full_model_variant(scenario) if row == "full" else scenario


def fleet_row(plan: Plan, row: str) -> dict[str, Any]:
    records, folder, scenario = row_records(plan, row)
    bench = json.loads((folder / BENCH_JSON).read_text())
    if "whole_test_accuracy" not in bench:
        bench["whole_test_accuracy"] = full_test_accuracy(folder / "final_adapter", scenario, plan.test_examples)
        (folder / BENCH_JSON).write_text(json.dumps(bench, indent=2) + "\n")
    figures = run_figures(records, TARGETS)
    if row == "recipe":
        figures["second_start_seconds"] = second_start_seconds(records)
    return figures | {
        "row": row,
        "final_accuracy": bench["whole_test_accuracy"],
        "device_peak_rss_mib": bench.get("device_peak_rss_mib"),  # both phases: sampled across the whole run
        "curve": wall_curve(records),
    }


def second_start_seconds(records: Sequence[Mapping[str, Any]]) -> float | None:
    """What the recipe's second simulation adds to the first round after its head warm-up (that round less
    the median of the later ones): the warm-up is a simulation of its own, starting workers and models once more."""
    seconds = [float(r["seconds"]) for r in records if r.get("phase") != HEAD_WARMUP_PHASE]
    return seconds[0] - statistics.median(seconds[1:]) if len(seconds) > 2 else None


def central_row(plan: Plan) -> dict[str, Any]:
    """The recipe's model trained centrally on the union of the devices' training splits."""
    path = plan.out / "central" / "central.json"
    if path.is_file():
        print(f"\n== central: reading {path}", flush=True)
        return dict(json.loads(path.read_text()))
    from fedadapt.checkpoint.folder import save_adapter
    from fedadapt.data.dataset import TextDataset
    from fedadapt.fleet.build import build_model, encode_split, train_config
    from fedadapt.fleet.data import load_fleet_data
    from fedadapt.train.frozen_prefix import frozen_prefix_depth
    from fedadapt.train.loop import evaluate, train_adapter
    from fedadapt.train.prefix_cache import PrefixCache, train_adapter_cached

    scenario = plan.row_scenario("central")
    print(f"\n== central: {scenario.method}, {plan.central_epochs} epoch(s) on the union", flush=True)
    fleet = load_fleet_data(scenario)
    union = TextDataset(
        texts=tuple(t for c in fleet.clients for t in c.train.texts),
        labels=tuple(label for c in fleet.clients for label in c.train.labels),
    )
    model = build_model(scenario, fleet.labels.names)
    train_set = encode_split(model, union, fleet.labels, scenario.max_length)
    config = dataclasses.replace(
        train_config(scenario, scenario.seed),
        epochs=plan.central_epochs,
        max_steps=plan.local_max_steps and plan.local_max_steps * 5,
        mask_absent_labels=False,  # the union holds every label
    )
    depth = frozen_prefix_depth(model)
    start = time.perf_counter()
    if depth:
        with PrefixCache(model, train_set, depth, device=config.device) as cache:
            result = train_adapter_cached(model, cache, config)
    else:
        result = train_adapter(model, train_set, config)
    seconds = time.perf_counter() - start
    test_fleet = load_fleet_data(dataclasses.replace(scenario, server_test_examples=plan.test_examples))
    test = encode_split(model, test_fleet.splits.test, fleet.labels, scenario.max_length)
    accuracy = evaluate(model, test, device=config.device).accuracy
    save_adapter(model, plan.out / "central" / "final_adapter")
    row = {
        "row": "central",
        "final_accuracy": accuracy,
        "seconds": seconds,
        "epochs": plan.central_epochs,
        "train_examples": len(train_set),
        "train_steps": result.steps,
        "prefix_layers": depth,
    }
    path.write_text(json.dumps(row, indent=2) + "\n")
    return row


def personal_part(plan: Plan) -> dict[str, Any]:
    """Each device's global and personalized accuracy on its local test split (the recipe at alpha 0.1)."""
    path = plan.out / "personal.json"
    if path.is_file():
        print(f"\n== personal: reading {path}", flush=True)
        return dict(json.loads(path.read_text()))
    if plan.fleet.partition == "dirichlet":
        name, changes = f"alpha-{PERSONAL_ALPHA:g}", {"alpha": PERSONAL_ALPHA}
        scenario, folder = plan.recipe_scenario(name, **changes), plan.out / name
        run_fleet_row(plan, name, scenario)
    else:  # one user per device already: the recipe row's own fleet
        _, folder, scenario = row_records(plan, "recipe")
        changes = {}
    devices = personalize_devices(plan, folder / "final_adapter", scenario)
    part = {"alpha": changes.get("alpha"), "partition": scenario.partition, "devices": devices}
    part |= personal_summary(devices)
    path.write_text(json.dumps(part, indent=2) + "\n")
    return part


def personalize_devices(plan: Plan, adapter: Path, scenario: ScenarioConfig) -> list[dict[str, Any]]:
    from fedadapt.checkpoint.folder import load_adapter
    from fedadapt.fleet.build import encode_split, train_config
    from fedadapt.fleet.data import load_fleet_data
    from fedadapt.train.loop import evaluate
    from fedadapt.train.personalize import personalize

    model = load_adapter(adapter)
    global_state = model.state()
    fleet = load_fleet_data(scenario)
    devices = []
    for partition_id, client in enumerate(fleet.clients):
        if not len(client.test) or not len(client.train):
            continue
        model.load_state(global_state)
        train = encode_split(model, client.train, fleet.labels, scenario.max_length)
        test = encode_split(model, client.test, fleet.labels, scenario.max_length)
        before = evaluate(model, test, device=scenario.device).accuracy
        config = dataclasses.replace(
            train_config(scenario, scenario.seed + partition_id, partition_id),
            epochs=plan.personal_epochs,
            max_steps=plan.local_max_steps,
        )
        personalize(model, train, config)  # the head only, on the device's own data
        after = evaluate(model, test, device=scenario.device).accuracy
        devices.append({"device": partition_id, "test_examples": len(test), "global": before, "personalized": after})
    return devices


def finished(plan: Plan, row: str) -> bool:
    """Whether ``row``'s results are all in --out already (so reporting it runs nothing)."""
    if row == "central":
        return (plan.out / "central" / "central.json").is_file()
    if row == "personal":
        return (plan.out / "personal.json").is_file()
    return read_metrics(plan.out / row) is not None


# --- the report ---------------------------------------------------------------------------------------------------


def personal_summary(devices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over the devices (each device counts once) of the global and the personalized accuracy."""
    if not devices:
        return {"global_mean": None, "personalized_mean": None, "gain": None}
    count = len(devices)
    before = sum(d["global"] for d in devices) / count
    after = sum(d["personalized"] for d in devices) / count
    return {"global_mean": before, "personalized_mean": after, "gain": after - before}


def _number(value: Any, style: str) -> str:
    if value is None:
        return "—"
    if style == "accuracy":
        return f"{value:.4f}"
    if style == "int":
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def results_table(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The markdown table: one line per row that has results, in ROWS order."""
    columns = [
        ("final accuracy (whole test split)", "final_accuracy", "accuracy"),
        ("best per-round accuracy (sample)", "best_sample_accuracy", "accuracy"),
        *(
            item
            for target in TARGETS
            for item in (
                (f"rounds to {target:.2f}", f"rounds_to_{target:g}", "int"),
                (f"wall s to {target:.2f}", f"seconds_to_{target:g}", "seconds"),
            )
        ),
        ("device compute s / device-round", "device_compute_seconds", "seconds"),
        ("device message s / device-round", "device_message_seconds", "seconds"),
        ("peak RSS of a device worker (MiB)", "device_peak_rss_mib", "int"),
        ("bytes up / device-round", "bytes_up_per_device_round", "int"),
        ("rounds", "rounds", "int"),
        ("wall s (all rounds)", "seconds", "seconds"),
    ]
    lines = ["| row | " + " | ".join(title for title, _, _ in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for row in (r for r in ROWS if r in rows and r != "personal"):
        figures = rows[row]
        cells = [_number(figures.get(key), style) for _, key, style in columns]
        if row == "central":  # trained once, not in rounds: its seconds are the training's
            cells = [_number(figures.get("final_accuracy"), "accuracy"), *["—"] * (len(columns) - 3)]
            cells += ["—", _number(figures.get("seconds"), "seconds")]
        lines.append(f"| {LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    return lines


def personal_table(part: Mapping[str, Any]) -> list[str]:
    lines = ["| device | test examples | global | personalized | gain |", "|---:|---:|---:|---:|---:|"]
    for d in part["devices"]:
        gain = d["personalized"] - d["global"]
        lines.append(
            f"| {d['device']} | {d['test_examples']} | {d['global']:.4f} | {d['personalized']:.4f} | {gain:+.4f} |"
        )
    lines.append(
        f"| **mean** | | {_number(part['global_mean'], 'accuracy')} | "
        f"{_number(part['personalized_mean'], 'accuracy')} | "
        f"{'—' if part['gain'] is None else format(part['gain'], '+.4f')} |"
    )
    return lines


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def goal_lines(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The issue's goals, each with the figures it reads and met / missed / not measured."""

    def get(row: str, key: str) -> Any:
        return rows.get(row, {}).get(key)

    def times(value: float | None) -> str:
        return "—" if value is None else f"{value:,.2f}×"

    recipe, central, head = (get(r, "final_accuracy") for r in ("recipe", "central", "head"))
    gap = None if recipe is None or central is None else central - recipe
    speed = _ratio(get("full", "seconds_to_0.85"), get("recipe", "seconds_to_0.85"))
    compute = _ratio(get("lora", "device_compute_seconds"), get("recipe", "device_compute_seconds"))
    fewer = _ratio(get("full", "bytes_up_per_device_round"), get("recipe", "bytes_up_per_device_round"))
    gain = get("personal", "gain")
    checks: list[tuple[str, bool | None, str]] = [
        ("global accuracy ≥ 0.90", _at_least(recipe, 0.90), f"recipe {_number(recipe, 'accuracy')}"),
        (
            "stretch: within 1 point of the central upper bound",
            None if gap is None else gap <= 0.01,
            f"central {_number(central, 'accuracy')}, gap {'—' if gap is None else f'{100 * gap:+.1f} points'}",
        ),
        ("wall time to 0.85 ≥ 3× faster than full-model FedAvg", _at_least(speed, 3), times(speed)),
        ("device compute per round ≥ 3× less than today's LoRA", _at_least(compute, 3), times(compute)),
        ("bytes up per device-round ≥ 300× fewer than the full model", _at_least(fewer, 300), times(fewer)),
        (
            "personalized ≥ global + 5 points",
            _at_least(gain, 0.05),
            "—" if gain is None else f"{100 * gain:+.1f} points",
        ),
        (
            "the adapters beat federated head only",
            None if head is None or recipe is None else recipe > head,
            f"recipe {_number(recipe, 'accuracy')} vs head only {_number(head, 'accuracy')}",
        ),
    ]
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    return [f"- {name}: **{verdict[ok]}** ({figures})" for name, ok, figures in checks]


def _at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def write_plot(path: Path, rows: Mapping[str, Mapping[str, Any]], title: str) -> None:
    """Accuracy (the rounds' sample) against wall seconds for every fleet row; central as a level line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 5.5), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in FLEET_ROWS:
        curve = rows.get(row, {}).get("curve")
        if curve:
            xs, ys = zip(*curve, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=LABELS[row])
    central = rows.get("central")
    if central:
        ax.axhline(central["final_accuracy"], color="black", linestyle="--", linewidth=1, label=LABELS["central"])
    for target in TARGETS:
        ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("wall seconds (the rounds' own, summed)")
    ax.set_ylabel("accuracy (the server's test sample)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, format="png")


def report(plan: Plan, rows: Mapping[str, Mapping[str, Any]], command: str) -> str:
    lines = [
        f"# The federated recipe beside the other rows ({plan.data})",
        "",
        f"`{command}`",
        "",
        f"Fleet: {plan.fleet.num_clients} devices, partition {plan.fleet.partition}"
        + (f" (alpha {plan.fleet.alpha:g})" if plan.fleet.partition == "dirichlet" else "")
        + f", {plan.fleet.sample_size} per round, {plan.rounds} rounds per row "
        f"(the recipe's first {min(plan.warmup_rounds, plan.rounds - 1)} are its head warm start).",
        "",
        *results_table(rows),
        "",
        *goal_lines(rows),
    ]
    extra = rows.get("recipe", {}).get("second_start_seconds")
    if extra is not None:
        lines += [
            "",
            f"The recipe's wall seconds include a second simulation start ({extra:,.0f} s: its round 1 less its "
            "median round), since its head warm-up runs as a simulation of its own.",
        ]
    if "personal" in rows:
        part = rows["personal"]
        where = f"Dirichlet alpha {part['alpha']:g}" if part.get("alpha") else f"partition {part['partition']}"
        lines += ["", f"## Personalization ({where}): the global model vs its head fine-tuned on the device", ""]
        lines += personal_table(part)
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> Plan:
    fleet, today, recipe = load_scenario(FLEETS[args.data]), load_scenario(args.today), load_scenario(args.recipe)
    if args.quick and args.data == "banking77":
        fleet = dataclasses.replace(fleet, max_examples=QUICK["max_examples"], server_test_examples=100)
    rounds = args.rounds or (QUICK["rounds"] if args.quick else recipe.rounds)
    return Plan(
        out=args.out,
        data=args.data,
        fleet=fleet,
        today=today,
        recipe=recipe,
        rounds=rounds,
        warmup_rounds=QUICK["warmup"] if args.quick else (args.warmup_rounds or recipe.head_warmup_rounds),
        test_examples=QUICK["test_examples"] if args.quick else None,
        central_epochs=QUICK["epochs"] if args.quick else args.central_epochs,
        personal_epochs=QUICK["epochs"] if args.quick else args.personal_epochs,
        local_max_steps=QUICK["steps"] if args.quick else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench-recipe")
    parser.add_argument("--data", choices=sorted(FLEETS), default="banking77")
    parser.add_argument(
        "--only", choices=ROWS, action="append", help="run only these rows (repeatable); finished ones are reported too"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every row (default: the recipe's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny settings, meaningless figures")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--today", type=Path, default=TODAY)
    parser.add_argument("--warmup-rounds", type=int, default=None, help="default: the recipe's head-warmup-rounds")
    parser.add_argument("--central-epochs", type=int, default=CENTRAL_EPOCHS)
    parser.add_argument("--personal-epochs", type=int, default=PERSONAL_EPOCHS)
    args = parser.parse_args()
    plan = make_plan(args)
    if plan.rounds < 2:
        parser.error("--rounds must be at least 2 (the recipe's head warm start takes at least one)")
    plan.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for row in ROWS:  # the rows asked for, and those finished in --out before (read, never run)
        if args.only and row not in args.only and not finished(plan, row):
            continue
        if row in FLEET_ROWS:
            rows[row] = fleet_row(plan, row)
        elif row == "central":
            rows[row] = central_row(plan)
        else:
            rows[row] = personal_part(plan)
    command = " ".join(["python benchmarks/federated_recipe.py", *sys.argv[1:]])
    text = report(plan, rows, command)
    (plan.out / RESULTS_MD).write_text(text)
    (plan.out / RESULTS_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    write_plot(plan.out / PLOT_PNG, rows, f"{plan.data}: accuracy against wall time")
    print("\n" + text)
    print(f"written: {plan.out / RESULTS_MD}, {plan.out / RESULTS_JSON}, {plan.out / PLOT_PNG}")


if __name__ == "__main__":
    main()
