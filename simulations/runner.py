"""Runs a fleet scenario in Flower's simulation engine: ``fedadapt simulate`` calls ``simulate``.

Why ``flwr run`` against a SuperLink we start ourselves, rather than ``flwr.simulation.run_simulation``:
``run_simulation`` is deprecated in Flower 1.41 and ignores ``[tool.flwr.app.config]``, so the apps
would need a side channel for their configuration; ``flwr run`` is the path the same apps take in
deployment, and it works offline. Letting ``flwr run`` start its local SuperLink is not enough: that
one is detached, listens on fixed ports and keeps running afterwards. So this module starts
``flower-superlink --simulation`` itself on a free port, in a private ``FLWR_HOME`` and working
directory (never the project folder, whose live files the ClientApps could otherwise import instead
of the packaged app), points ``flwr run`` at it via ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, and stops
it (and anything left below it) by PID when the run ends. Progress comes from the ``metrics.json``
the ServerApp rewrites after every round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.device import DEVICE_ROOT_ENV
from fedadapt import jsonsafe
from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.checkpoint.key import KEYS_FOLDER  # <out>/keys: the server's key pair and checkpoint key
from fedadapt.errors import ConfigError, FedAdaptError, JsonInputError
from fedadapt.fleet.device_data import PERSONAL_FILE
from fedadapt.fleet.run_config import (
    CLIENT_STATE_FOLDER,
    HEAD_WARMUP_FOLDER,
    PHASE_AFTER_HEAD_WARMUP,
    PHASE_HEAD_WARMUP,
    PHASE_WHOLE,
    RUN_ACCEPT_UNVERIFIED,
    RUN_CLIENTS_PER_ROUND,
    RUN_DASHBOARD,
    RUN_EMPTY_CLIENTS,
    RUN_FULL_MODEL,
    RUN_METRICS_HOST,
    RUN_METRICS_PORT,
    RUN_NUM_ROUNDS,
    RUN_OUT_DIR,
    RUN_PHASE,
    RUN_RESUME,
    RUN_SCENARIO,
    RUN_SERVER_KEY,
    RUN_SERVER_PUBLIC_KEY,
    MetricsEndpoint,
    phase_variant,
)
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.fleet.scenario_file import load_scenario
from fedadapt.fleet.variants import full_model_variant, with_overrides
from simulations.processes import find_tool, free_port, stop_process_tree, terminate_gracefully
from simulations.report import chain_head_warmup, compare_with_full_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent
METRICS_FILE = "metrics.json"  # written by server.federation
CHECKPOINTS = "checkpoints"
FULL_MODEL_FOLDER = "full-model"  # the full-model FedAvg run of a ``full-model = true`` scenario
FLWR_LOG = "flwr.log"
SUPERLINK_LOG = "superlink.log"
STARTUP_TIMEOUT = 60.0
FLOWER_ENV = {
    # Set for the child processes only, never at import (../shared/FLOWER-1.41-NOTES.md).
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment of the Flower processes a launcher starts: FLOWER_ENV, its FLWR_HOME, and this
    environment's bin first on PATH (the SuperLink and SuperNodes start flower-superexec and flwr-simulation
    by name: without it a SuperNode crashes and keeps running)."""
    env = os.environ | FLOWER_ENV
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(find_tool("flower-superlink")).parent), env.get("PATH", "")])
    return env


class SimulationError(FedAdaptError):
    """The simulation did not finish; the message names the log to read."""


@dataclass(frozen=True)
class SimulationPlan:
    """What one ``simulate`` call runs, and where its files go."""

    scenario_path: Path
    scenario: ScenarioConfig
    out_dir: Path
    resume: bool
    full_model: bool = False  # run the scenario's full-model FedAvg variant (``scenario`` is that variant)
    empty_clients: bool = False  # benchmarks: clients reply at once with a zero delta
    accept_unverified: bool = False  # resume even from checkpoints the server cannot authenticate
    phase: str = PHASE_WHOLE  # with head-warmup-rounds: which of the two runs this is (``scenario`` stays whole)
    metrics: MetricsEndpoint = MetricsEndpoint()  # the ServerApp's Prometheus endpoint and live page (off: port 0)

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def run_scenario(self) -> ScenarioConfig:
        """What this run of the apps runs: the scenario, or one phase of its head warm-up."""
        return phase_variant(self.scenario, self.phase, self.out_dir)

    def head_warmup_plan(self, resume: bool) -> SimulationPlan:
        """The scenario's first ``head-warmup-rounds`` rounds, head only, in ``<out>/head-warmup``."""
        out_dir = self.out_dir / HEAD_WARMUP_FOLDER
        refuse_unless_resuming(out_dir, resume)
        resuming = resume and _has_checkpoints(out_dir)
        return dataclasses.replace(self, out_dir=out_dir, resume=resuming, phase=PHASE_HEAD_WARMUP)

    def after_head_warmup_plan(self) -> SimulationPlan:
        """The scenario's remaining rounds in ``<out>``, from the warm-up's final head."""
        return dataclasses.replace(self, phase=PHASE_AFTER_HEAD_WARMUP)

    def full_model_plan(self, resume: bool) -> SimulationPlan:
        """The same scenario as full-model FedAvg, in ``<out>/full-model``."""
        out_dir = self.out_dir / FULL_MODEL_FOLDER
        refuse_unless_resuming(out_dir, resume)
        return SimulationPlan(
            self.scenario_path,
            full_model_variant(self.scenario),
            out_dir,
            resume and _has_checkpoints(out_dir),
            full_model=True,
            empty_clients=self.empty_clients,
            accept_unverified=self.accept_unverified,
            metrics=self.metrics,
        )


def plan_simulation(
    scenario: Path,
    rounds: int | None,
    out: Path | None,
    resume: bool,
    empty_clients: bool = False,
    accept_unverified: bool = False,
    endpoint: MetricsEndpoint | None = None,
) -> SimulationPlan:
    """Check the scenario and the out dir before anything starts."""
    scenario_path = Path(scenario).expanduser().resolve()
    config = with_overrides(load_scenario(scenario_path), rounds=rounds)
    out_dir = (Path(out) if out else _default_out_dir(config.name, resume)).expanduser().resolve()
    refuse_unless_resuming(out_dir, resume)
    resuming = resume and _has_checkpoints(out_dir)
    endpoint = endpoint or MetricsEndpoint()
    endpoint.warn_if_exposed()
    return SimulationPlan(
        scenario_path, config, out_dir, resuming, False, empty_clients, accept_unverified, metrics=endpoint
    )


def refuse_unless_resuming(out_dir: Path, resume: bool) -> None:
    if _holds_run(out_dir) and not resume:
        raise ConfigError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")


def _has_checkpoints(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINTS).is_dir() and any((out_dir / CHECKPOINTS).iterdir())


def _holds_run(out_dir: Path) -> bool:
    """A run has checkpointed a round there: of its own, or of its head warm-up."""
    return _has_checkpoints(out_dir) or _has_checkpoints(out_dir / HEAD_WARMUP_FOLDER)


def _default_out_dir(name: str, resume: bool) -> Path:
    """runs/sim-NAME; a fresh run beside earlier ones gets the next free runs/sim-NAME-N, so
    running the same command twice starts a second run instead of refusing, and --resume
    continues the newest."""
    base = Path("runs") / f"sim-{name}"
    taken = [base, *(Path(f"{base}-{n}") for n in range(2, 1000))]
    used = [d for d in taken if _holds_run(d)]
    if resume:
        return used[-1] if used else base
    return next(d for d in taken if not _holds_run(d))


def remove_stale_client_state(out_dir: Path) -> None:
    """Personal parts left by a run that never checkpointed a round would leak into a fresh one."""
    folder = out_dir / CLIENT_STATE_FOLDER
    pattern = PERSONAL_FILE.format(partition_id="*")
    for path in folder.glob(pattern) if folder.is_dir() else ():
        path.unlink()


def simulate(
    scenario: Path,
    rounds: int | None = None,
    out: Path | None = None,
    resume: bool = False,
    show: bool = True,
    empty_clients: bool = False,
    accept_unverified: bool = False,
    endpoint: MetricsEndpoint | None = None,
) -> dict[str, Any]:
    """Run the scenario to its last round and return the contents of its metrics.json.

    With ``head-warmup-rounds = N`` its first N rounds run on their own in ``<out>/head-warmup`` (only
    the head trains) and the rest start from their final head; metrics.json then holds both phases'
    rounds, numbered on, and the warm-up's own record stays in ``<out>/head-warmup``.
    With ``full-model = true`` the scenario then runs again as full-model FedAvg in
    ``<out>/full-model``, and the summary gains a ``full_model`` comparison of the two.
    PNG plots (accuracy.png, bytes.png) go beside metrics.json. ``endpoint``: the ServerApp's Prometheus endpoint
    (docs/deployment.md, "Watching a run").
    """
    from server.plots import write_plots

    plan = plan_simulation(scenario, rounds, out, resume, empty_clients, accept_unverified, endpoint)
    if plan.scenario.head_warmup_rounds:
        warmup = run_head_warmup(plan.head_warmup_plan(resume), show)
        metrics = chain_head_warmup(warmup, run_plan(plan.after_head_warmup_plan(), show))
        write_json(plan.metrics_file, metrics)
    else:
        metrics = run_plan(plan, show)
    full = None
    if plan.scenario.full_model:
        full = run_plan(plan.full_model_plan(resume), show)
        comparison = compare_with_full_model(metrics, full, plan.scenario.target_accuracy)
        metrics["summary"]["full_model"] = comparison
        write_json(plan.metrics_file, metrics)
    write_plots(plan.out_dir, metrics, full)
    if show:
        print_summary(metrics)
    return metrics


def run_plan(plan: SimulationPlan, show: bool) -> dict[str, Any]:
    """One ``flwr run`` of the plan on a SuperLink of its own; its metrics.json contents."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if not plan.resume:
        remove_stale_client_state(plan.out_dir)
    flwr_home = Path(tempfile.mkdtemp(prefix="fedadapt-flwr-"))
    try:
        root = device_root(plan)
        with terminate_gracefully(), _superlink(flwr_home, plan.out_dir / SUPERLINK_LOG, root) as env:
            code = _run_app(plan, flwr_home, env, show)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)
    return finished_metrics(plan, code, "the simulation")


def run_head_warmup(plan: SimulationPlan, show: bool) -> dict[str, Any]:
    """The head warm-up's run; read, not run again, once it finished (a resumed run is past it)."""
    metrics = read_metrics(plan.metrics_file)
    if metrics.get("complete") and plan.resume:
        return metrics
    return run_plan(plan, show)


def finished_metrics(plan: SimulationPlan, code: int, what: str) -> dict[str, Any]:
    """The run's metrics.json contents; SimulationError, with the log's tail, unless it completed."""
    metrics = read_metrics(plan.metrics_file)
    if code != 0 or not metrics.get("complete"):
        raise SimulationError(
            f"{what} did not finish (flwr run exited with {code}); see {plan.out_dir / FLWR_LOG}"
            f"{log_tail(plan.out_dir / FLWR_LOG)}"
        )
    return metrics


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


# --- processes --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _superlink(flwr_home: Path, log_file: Path, device_root: Path) -> Iterator[dict[str, str]]:
    """A simulation SuperLink on a free port; yields the environment ``flwr run`` needs to use it.

    The virtual devices it runs keep their files under ``device_root``: Flower's simulation gives
    them no node config of their own, so the folder travels in the environment they inherit.
    """
    port = free_port()
    env = flower_env(flwr_home) | {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), DEVICE_ROOT_ENV: str(device_root)}
    command = [find_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    with log_file.open("ab") as log:
        process = subprocess.Popen(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, process, log_file)
        yield env
    finally:
        stop_process_tree(process)


def _wait_healthy(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with {process.returncode}; see {log_file}")
        if _healthy(port):
            return
        time.sleep(0.2)
    raise SimulationError(
        f"flower-superlink did not answer on port {port} within {STARTUP_TIMEOUT:g} s; see {log_file}"
    )


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# --- the run ----------------------------------------------------------------------------------------------------


def _run_app(plan: SimulationPlan, flwr_home: Path, env: dict[str, str], show: bool) -> int:
    """``flwr run`` the project on the SuperLink; returns its exit code."""
    overrides = write_run_config(plan, flwr_home)
    scenario = plan.scenario
    federation = (
        f"num-supernodes={scenario.num_clients} client-resources-num-cpus={scenario.client_cpus} "
        f"client-resources-num-gpus={scenario.client_gpus}"
    )
    command = [find_tool("flwr"), "run", str(PROJECT_ROOT), "local", "--stream"]
    command += ["--federation-config", federation, "--run-config", str(overrides)]
    with (plan.out_dir / FLWR_LOG).open("ab") as log:
        process = subprocess.Popen(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        follow_run(plan, process, show)
    finally:
        stop_process_tree(process)  # a no-op after a normal exit; on Ctrl-C it stops the run
    return process.returncode


def write_run_config(plan: SimulationPlan, folder: Path) -> Path:
    """The run-config overrides ``flwr run`` passes to both apps, as a TOML file in ``folder``."""
    path = folder / "run-config.toml"
    path.write_text(toml_lines(run_config_values(plan)))
    return path


def run_config_values(plan: SimulationPlan) -> dict[str, str | int | bool]:
    """The plan as the apps' run-config keys (``fedadapt.fleet.run_config``)."""
    values: dict[str, str | int | bool] = {
        RUN_SCENARIO: str(plan.scenario_path),
        RUN_OUT_DIR: str(plan.out_dir),
        RUN_NUM_ROUNDS: plan.scenario.rounds,  # the whole scenario's: the apps take their phase's share of them
        RUN_CLIENTS_PER_ROUND: plan.scenario.sample_size,
        RUN_RESUME: plan.resume,
        RUN_FULL_MODEL: plan.full_model,
        RUN_EMPTY_CLIENTS: plan.empty_clients,
        RUN_ACCEPT_UNVERIFIED: plan.accept_unverified,
        RUN_PHASE: plan.phase,
    }
    if plan.metrics.enabled:
        values |= {
            RUN_METRICS_PORT: plan.metrics.port,
            RUN_METRICS_HOST: plan.metrics.host,
            RUN_DASHBOARD: plan.metrics.dashboard,
        }
    if plan.scenario.privacy.sealed:
        values |= run_keys(plan.out_dir)
    return values


def device_root(plan: SimulationPlan) -> Path:
    """``<out>/clients``, where the simulated devices keep their files (they find it through
    ``FEDADAPT_DEVICE_ROOT``). Under secagg+ it also holds ``device-<i>/identity.key`` per partition
    (0600, made once, reused on resume) and ``roster.pub``, the fleet's public keys."""
    from fedadapt.privacy.secagg.identity import generate_private_key, load_private_key, openssh_public

    root = plan.out_dir / CLIENT_STATE_FOLDER
    if not plan.scenario.privacy.secure_aggregation:
        return root
    lines = []
    for partition in range(plan.scenario.num_clients):
        path = root / f"device-{partition}" / "identity.key"
        if path.exists():
            lines.append(openssh_public(load_private_key(path).public_key()))
        else:
            lines.append(generate_private_key(path))
    (root / "roster.pub").write_bytes(b"".join(line + f" device-{i}\n".encode() for i, line in enumerate(lines)))
    return root


def run_keys(out_dir: Path) -> dict[str, str]:
    """The run's server key pair in ``<out>/keys/`` (made on first use, reused on resume), as run-config keys.

    The private key stays in the folder (only the server reads it); the public key goes to the
    clients as 64 hex characters in the run config.
    """
    from fedadapt.privacy.keys import PRIVATE_NAME, PUBLIC_NAME, generate_server_keys, load_public_key, public_key_hex

    folder = out_dir / KEYS_FOLDER
    if not (folder / PRIVATE_NAME).exists():
        generate_server_keys(folder)
    # The public key travels as hex: devices on other machines have no access to this folder.
    public = public_key_hex(load_public_key(folder / PUBLIC_NAME))
    return {RUN_SERVER_KEY: str(folder / PRIVATE_NAME), RUN_SERVER_PUBLIC_KEY: public}


def toml_lines(values: dict[str, str | int | bool]) -> str:
    # json.dumps of str/int/bool is valid TOML for them (basic strings, integers, true/false).
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def follow_run(plan: SimulationPlan, process: subprocess.Popen[bytes], show: bool) -> None:
    """Wait for ``process`` (a ``flwr run``), showing a progress bar fed by the plan's metrics.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "acc {task.fields[accuracy]}{task.fields[epsilon]}  up {task.fields[up]}  rejected {task.fields[rejected]}"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not show) as progress:
        scenario = plan.run_scenario
        task = progress.add_task(
            f"{scenario.name}: rounds", total=scenario.rounds, accuracy="-", epsilon="", up="-", rejected=0
        )
        while process.poll() is None:
            _show_rounds(progress, task, plan.metrics_file)
            time.sleep(0.5)
        _show_rounds(progress, task, plan.metrics_file)


def _show_rounds(progress: Any, task: Any, metrics_file: Path) -> None:
    rounds = read_metrics(metrics_file).get("rounds", [])
    if not rounds:
        return
    last = rounds[-1]
    progress.update(
        task,
        completed=last["round"],
        accuracy=_fmt_accuracy(last.get("accuracy")),
        epsilon=f"  ε {last['epsilon']:.2f}" if last.get("epsilon") is not None else "",
        up=_fmt_bytes(sum(r["bytes_up"] for r in rounds)),
        rejected=sum(len(r["rejected"]) for r in rounds),
    )


# metrics.json is the server's own record: a few KB per round, so even 100000 rounds of a large fleet fit.
MAX_METRICS_BYTES = 1024 * 1024 * 1024


def read_metrics(path: Path) -> dict[str, Any]:
    """metrics.json's object; {} while it is not written yet (it is replaced atomically, never half-written)."""
    try:
        data = jsonsafe.load_file(path, max_bytes=MAX_METRICS_BYTES)
    except JsonInputError:  # also a missing or unreadable file
        return {}
    return data if isinstance(data, dict) else {}


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n" + "\n".join(tail)


# --- the summary ------------------------------------------------------------------------------------------------


def _fmt_accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{value:,.1f} GB"


def _fmt_summary(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if "bytes" in key and "ratio" not in key:
        return _fmt_bytes(value)
    if "seconds" in key:
        return f"{value:.1f}"
    if key in ("bytes_ratio", "speedup_to_target"):
        return f"{value:,.1f}×"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_summary(metrics: dict[str, Any]) -> None:
    """One row per round, then the run's summary."""
    from rich.console import Console
    from rich.table import Table

    rounds = Table(title=f"{metrics['scenario']['name']}: rounds")
    private = any(r.get("epsilon") is not None for r in metrics["rounds"])
    names = ("round", "accuracy", "client acc.", *(("ε",) if private else ()), "clients", "rejected")
    for name in (*names, "bytes up", "bytes down", "seconds"):
        rounds.add_column(name, justify="right")
    for r in metrics["rounds"]:
        epsilon = (f"{r['epsilon']:.3f}" if r.get("epsilon") is not None else "-",) if private else ()
        rounds.add_row(
            str(r["round"]),
            _fmt_accuracy(r.get("accuracy")),
            _fmt_accuracy(r.get("client_accuracy")),
            *epsilon,
            f"{r['accepted']}/{r['clients']}",
            str(len(r["rejected"])),
            _fmt_bytes(r["bytes_up"]),
            _fmt_bytes(r["bytes_down"]),
            f"{r['seconds']:.1f}",
        )
    summary = Table(title="summary", show_header=False)
    for key, value in metrics["summary"].items():
        if not isinstance(value, dict):
            summary.add_row(key, _fmt_summary(key, value))
    console = Console()
    console.print(rounds)
    console.print(summary)
    if "full_model" in metrics["summary"]:
        console.print(_comparison_table(metrics["summary"]["full_model"]))


def _comparison_table(comparison: dict[str, Any]) -> Any:
    """Adapters beside full-model FedAvg on the same scenario."""
    from rich.table import Table

    ours, theirs = comparison["adapter"], comparison["full_model"]
    table = Table(
        title=f"adapters vs full-model FedAvg (target accuracy {_fmt_accuracy(comparison['target_accuracy'])})"
    )
    for name in ("", f"adapters ({ours['method']}, {ours['compression']})", "full-model FedAvg", "ratio"):
        table.add_column(name, justify="right")
    ratios = {
        "bytes_up_per_client_round": comparison["bytes_ratio"],
        "seconds_to_target": comparison["speedup_to_target"],
    }
    for key in (
        "final_accuracy",
        "best_accuracy",
        "rounds_to_target",
        "seconds_to_target",
        "bytes_up_per_client_round",
    ):
        ratio = ratios.get(key)
        shown_ratio = "" if ratio is None else f"{ratio:,.1f}×"
        table.add_row(key, _fmt_summary(key, ours[key]), _fmt_summary(key, theirs[key]), shown_ratio)
    return table
