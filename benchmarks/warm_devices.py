"""Warm devices before and after, in one run (issue 20): where a deployed round's time goes, cold and warm.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/warm_devices.py [--nodes 3 [20]] [--rounds 10]
      [--secagg-rounds 5] [--max-examples 4000] [--batch-size 16] [--max-length 32]
      [--out runs/bench-warm-devices] [--quick]

``fedadapt serve --local-supernodes N`` (TLS + node authentication, as ``benchmarks/deployment_load.py``)
four times per ``--nodes``: cold devices (``--cold-devices``: Flower's fresh ClientApp process per message)
and warm devices (the default: ``deploy/warm_executor.py`` forks a child per message), each for plain
rounds and for secagg+ rounds (``[privacy] mode = "secagg+"``, 5 messages per device and round).
``--quick``: the tests' tiny random BERT on synthetic data, 2 rounds (a smoke run, not a measurement).

A plain round is split from its metrics.json record (the critical device is the one whose process lived
longest):
  compute   that device's own time for the message (``client-seconds``) less the imports its handler
            needed (``import-seconds``: torch, transformers and PEFT in a cold process, little in a warm one);
  start-up  its process's life before that compute (``process-seconds`` - compute): a cold process's start
            and imports, or a forked child's Flower entry point (task pull, FAB, app load) and app imports;
  flower    the exchange (sent until the last reply) minus that process's life: Flower's waits;
  server    the round minus the exchange: waiting for nodes, aggregation, evaluation (and proxy training,
            if the scenario has any). Not the checkpoint: server/federation.py takes a round's ``seconds``
            before ``save_checkpoint``, so no round has it.
Under secagg+ the devices report no timings (they would reveal their example counts), so a secagg+ round
is split into its stages' exchanges and the server's work only; a round that failed before any stage has
no per-message figure.
Memory: every 2 s the devices' processes below this one are read from /proc, cold and warm alike (each
one's stat, smaps_rollup and status), each sample filed under the round in progress (metrics.json's
rounds + 1; none after the last round). A device's memory is the PSS summed over its processes: a warm
executor's parent (its command line names ``warm_executor.py``) with its forked children, or the
``flwr-clientapp`` processes of one cold device's SuperExec. PSS splits each shared page among all the
processes that map it, on this device or another (a child's copy-on-write pages with its parent, a
library's with every process that loaded it): no page is counted twice, and a device's figure is its
share. Each warm parent's RSS is kept too, for the growth goal. A peak shorter than 2 s can fall between
samples, for either kind of device.

Goals (issue 20; ratios from this run, steady rounds 2+, 3 SuperNodes, warm devices):
  per-message overhead beyond compute (start-up + flower) <= 1.5 s + the SuperNode's 3 s idle pull
  interval (``time.sleep(3)`` in flwr/supernode/start_client_internal.py, 1.41, no flag);
  plain round <= 1.3 x (compute + server); secagg+ round <= 2 x plain round;
  each warm parent's resident memory grows <= 5% from round 2 to the last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.deployment_load import CLIENTAPP_MIB, DATA, SERVER_SIDE_MIB, available_mib  # noqa: E402
from benchmarks.deployment_load import write_scenario as write_load_scenario  # noqa: E402
from benchmarks.fleet_scale import proc_kib  # noqa: E402
from deploy import warm_executor  # noqa: E402
from deploy.serve import Deployment, serve  # noqa: E402
from simulations.processes import descendants, parent_pid  # noqa: E402

SUPERNODE_PULL_S = 3.0  # flwr 1.41 supernode/start_client_internal.py: time.sleep(3) when no message was pulled
OVERHEAD_GOAL_S = 1.5 + SUPERNODE_PULL_S
PLAIN_ROUND_RATIO = 1.3
SECAGG_RATIO = 2.0
MEMORY_GROWTH = 0.05
SECAGG = {"mode": "secagg+", "num-shares": 3, "reconstruction-threshold": 2}
VARIANTS = (("cold", "plain"), ("cold", "secagg+"), ("warm", "plain"), ("warm", "secagg+"))
CLIENTAPP_COMMAND = "flwr-clientapp"
WARM_SCRIPT = Path(warm_executor.__file__).name


# --- splitting a round (pure: tests/deploy/test_warm_bench.py) -------------------------------------------------


def plain_round_split(record: dict[str, Any]) -> dict[str, float]:
    """A plain round's seconds: compute, start-up, flower, server (and overhead = start-up + flower)."""
    clients = record["client_results"]
    critical = max(clients, key=lambda c: c.get("process-seconds", c.get("client-seconds", 0.0)), default={})
    message = float(critical.get("client-seconds", 0.0))
    compute = message - float(critical.get("import-seconds", 0.0))  # a cold process imports torch in its handler
    process = float(critical.get("process-seconds", message))
    exchange = float(record["exchange_seconds"])
    return {
        "round": record["round"],
        "round_s": record["seconds"],
        "exchange_s": exchange,
        "message_s": exchange,  # one message per device
        "compute_s": compute,
        "startup_s": process - compute,
        "flower_s": exchange - process,
        "server_s": record["seconds"] - exchange,
        "overhead_s": exchange - compute,
        "messages": 1,
    }


def secure_round_split(record: dict[str, Any]) -> dict[str, Any]:
    """A secagg+ round's seconds: each stage's exchange, their sum, and the server's work beside them.

    Per message: the exchange over the stages run; None for a round that failed before any stage.
    """
    stages = {name: float(s["seconds"]) for name, s in record.get("stages", {}).items()}
    exchange = sum(stages.values())
    return {
        "round": record["round"],
        "round_s": record["seconds"],
        "exchange_s": exchange,
        "message_s": exchange / len(stages) if stages else None,
        "server_s": record["seconds"] - exchange,
        "stages_s": stages,
        "messages": len(stages),
    }


def round_split(record: dict[str, Any]) -> dict[str, Any]:
    return secure_round_split(record) if "stages" in record else plain_round_split(record)


def steady(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rounds 2 and later (round 1 also waits for the nodes to join), or all when there is one."""
    return rows[1:] or rows


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the known values; None when there are none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    return median_of(r.get(key) for r in rows)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is unknown or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def busy_ratio(row: dict[str, Any]) -> float | None:
    """A plain round over the work in it: round / (compute + server)."""
    compute, server = row.get("compute_s"), row.get("server_s")
    return None if compute is None or server is None else ratio(row.get("round_s"), compute + server)


def memory_growth(rss_by_round: dict[int, float]) -> float | None:
    """Growth of a resident size from round 2 to the last round (a fraction); None with fewer than 3 rounds."""
    rounds = sorted(r for r in rss_by_round if r >= 2)
    if len(rounds) < 2:
        return None
    return ratio(rss_by_round[rounds[-1]] - rss_by_round[rounds[0]], rss_by_round[rounds[0]])


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= limit else "MISSED"


# --- device memory from /proc ---------------------------------------------------------------------------------


@dataclass
class DeviceMemory:
    """Samples the devices' processes below this one; per round in progress, peak sizes in MiB.

    A device is a warm parent with its forked children, or the cold ClientApps below one SuperNode's
    SuperExec. Every device process is read alike, cold or warm: its stat, smaps_rollup and status.
    """

    metrics_file: Path
    rounds: int  # samples taken after the last round (the run's teardown) are not filed
    interval: float = 2.0
    devices: dict[int, dict[int, float]] = field(default_factory=dict)  # round -> device -> peak PSS summed
    processes: dict[int, float] = field(default_factory=dict)  # round -> peak RSS of one device process
    parents: dict[int, dict[int, float]] = field(default_factory=dict)  # round -> warm parent pid -> peak RSS
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _seen: tuple[float, int] = (0.0, 0)  # metrics.json mtime, rounds finished

    def __enter__(self) -> DeviceMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample(self._round())

    def _round(self) -> int:
        try:
            mtime = self.metrics_file.stat().st_mtime
            if mtime != self._seen[0]:
                self._seen = (mtime, len(json.loads(self.metrics_file.read_text())["rounds"]))
        except (OSError, ValueError, KeyError):
            pass
        return self._seen[1] + 1

    def sample(self, server_round: int) -> None:
        if server_round > self.rounds:
            return
        kinds = {pid: _kind(_cmdline(pid)) for pid in descendants(os.getpid())}
        totals: dict[int, float] = {}
        for pid, kind in kinds.items():
            if kind is None:
                continue
            parent = parent_pid(pid) or 0
            pss = proc_kib(pid, "smaps_rollup", "Pss:") / 1024
            rss = proc_kib(pid, "status", "VmRSS:") / 1024
            self.processes[server_round] = max(self.processes.get(server_round, 0.0), rss)
            leads = kind == "warm" and kinds.get(parent) != "warm"  # a warm parent, not one of its children
            device = pid if leads else parent  # a cold ClientApp's parent: its SuperNode's SuperExec
            totals[device] = totals.get(device, 0.0) + pss
            if leads:
                _keep_peak(self.parents.setdefault(server_round, {}), pid, rss)
        for device, pss in totals.items():
            _keep_peak(self.devices.setdefault(server_round, {}), device, pss)

    def parent_growth(self) -> float | None:
        """The largest growth of one warm parent's peak RSS from round 2 to the last (None: cold or < 3 rounds)."""
        pids = {pid for peaks in self.parents.values() for pid in peaks}
        growths = [memory_growth({r: p[pid] for r, p in self.parents.items() if pid in p}) for pid in pids]
        known = [g for g in growths if g is not None]
        return max(known) if known else None


def _keep_peak(peaks: dict[int, float], key: int, value: float) -> None:
    peaks[key] = max(peaks.get(key, 0.0), value)


def _kind(argv: list[str]) -> str | None:
    """What a command line runs: a warm executor (parent or forked child), a cold ClientApp, or neither (None)."""
    if any(a.endswith(WARM_SCRIPT) for a in argv):
        return "warm"
    if any(a.endswith(CLIENTAPP_COMMAND) for a in argv[:2]):
        return "cold"
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


# --- the runs -------------------------------------------------------------------------------------------------


def write_scenario(folder: Path, nodes: int, rounds: int, privacy: str, args: argparse.Namespace) -> Path:
    """deployment_load's scenario (or the tiny one with --quick), plus the secagg+ table when asked."""
    if args.quick:
        values: dict[str, Any] = {"name": "warm-bench-quick", "backbone": str(args.tiny_bert), "data": "synthetic"}
        values |= {"partition": "natural", "num-clients": nodes, "rounds": rounds, "rank": 4}
        values |= {"local-max-steps": 2, "batch-size": 8, "max-length": 16, "device": "cpu", "seed": 3}
        values |= {"round-timeout": 600, "node-timeout": 300}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "scenario.toml"
        path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    else:
        path = write_load_scenario(folder, nodes, rounds, args)
    if privacy == "secagg+":
        with path.open("a") as file:
            file.write("[privacy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in SECAGG.items()))
    return path


def run_variant(nodes: int, devices: str, privacy: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    rounds = args.rounds if privacy == "plain" else args.secagg_rounds
    folder = out / f"{nodes}-nodes-{devices}-{privacy}"
    scenario = write_scenario(folder, nodes, rounds, privacy, args)
    deployment = Deployment(local_supernodes=nodes, cold_devices=devices == "cold")
    started = time.perf_counter()
    with DeviceMemory(folder / "run" / "metrics.json", rounds) as memory:
        metrics = serve(scenario, deployment, rounds=rounds, out=folder / "run", show=True)
    rows = [round_split(r) for r in metrics["rounds"]]
    return {
        "nodes": nodes,
        "devices": devices,
        "privacy": privacy,
        "rounds": rows,
        "failures": sum(len(r.get("rejected", [])) + ("error" in r) for r in metrics["rounds"]),
        "device_peak_pss_mib": memory.devices,
        "process_peak_rss_mib": memory.processes,
        "warm_parent_peak_rss_mib": memory.parents,
        "warm_parent_growth": memory.parent_growth(),
        "wall_s": time.perf_counter() - started,
    }


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's four goals from the warm runs at 3 SuperNodes: value, limit, verdict (None: not measured)."""
    found = {(r["nodes"], r["devices"], r["privacy"]): r for r in results}
    plain, secure = found.get((3, "warm", "plain")), found.get((3, "warm", "secagg+"))
    overhead = busy = secagg = growth = None
    if plain:
        rows = steady(plain["rounds"])
        overhead = median(rows, "overhead_s")
        busy = median_of(busy_ratio(r) for r in rows)
        growth = plain.get("warm_parent_growth")
        if secure:
            secagg = ratio(median(steady(secure["rounds"]), "round_s"), median(rows, "round_s"))
    lines = [
        ("per-message overhead beyond device compute (s)", overhead, OVERHEAD_GOAL_S),
        ("plain round / (compute + server)", busy, PLAIN_ROUND_RATIO),
        ("secagg+ round / plain round", secagg, SECAGG_RATIO),
        ("warm parent RSS growth after round 2", growth, MEMORY_GROWTH),
    ]
    return [{"goal": g, "value": v, "limit": lim, "verdict": verdict(v, lim)} for g, v, lim in lines]


# --- report ---------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """Medians over the steady rounds (per message: a round's exchange over its messages per device); peaks."""
    rows = steady(result["rounds"])
    devices = [mib for per_device in result["device_peak_pss_mib"].values() for mib in per_device.values()]
    return {
        "round_s": median(rows, "round_s"),
        "message_s": median(rows, "message_s"),
        "compute_s": median(rows, "compute_s"),
        "startup_s": median(rows, "startup_s"),
        "flower_s": median(rows, "flower_s"),
        "server_s": median(rows, "server_s"),
        "device_peak_mib": max(devices, default=None),
        "process_peak_mib": max(result["process_peak_rss_mib"].values(), default=None),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Warm devices before and after ({report['mode']})",
        "",
        f"Command: `{report['command']}`",
        "",
        "Medians of rounds 2+. Per message: the exchange over the messages each device answers per round (1 plain,"
        " 5 secagg+); compute, start-up and Flower's waits are the critical device's in a plain round (secagg+"
        " devices report no timings). Device peak: the largest PSS summed over one device's processes (a warm"
        " parent with its children, or a cold device's flwr-clientapp processes); PSS splits each shared page"
        " among the processes that map it. Process peak: the largest RSS of one of those processes. Both sampled"
        " every 2 s, cold and warm alike.",
        "",
        "| nodes | devices | rounds | round (s) | per message (s) | compute (s) | start-up (s) | Flower waits (s)"
        " | server work (s) | device peak PSS (MiB) | process peak RSS (MiB) | failures |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in report["results"]:
        s = summary_row(result)
        lines.append(
            f"| {result['nodes']} | {result['devices']} | {result['privacy']} | {_fmt(s['round_s'])}"
            f" | {_fmt(s['message_s'])} | {_fmt(s['compute_s'])} | {_fmt(s['startup_s'])} | {_fmt(s['flower_s'])}"
            f" | {_fmt(s['server_s'])} | {_fmt(s['device_peak_mib'], 0)} | {_fmt(s['process_peak_mib'], 0)}"
            f" | {result['failures']} |"
        )
    lines += ["", "| warm parent | " + " | ".join(f"round {r}" for r in _memory_rounds(report)) + " |"]
    lines.append("|---" * (1 + len(_memory_rounds(report))) + "|")
    for result in report["results"]:
        if result["devices"] == "warm":
            label = f"{result['nodes']} nodes, {result['privacy']}: largest parent RSS (MiB)"
            per_round = {int(r): max(p.values()) for r, p in result["warm_parent_peak_rss_mib"].items()}
            lines.append(f"| {label} | " + " | ".join(_fmt(per_round.get(r), 0) for r in _memory_rounds(report)) + " |")
    lines += ["", "## Goals (warm devices, 3 SuperNodes)", ""]
    lines += [goal_line(g) for g in report["goals"]]
    return "\n".join(lines) + "\n"


def _memory_rounds(report: dict[str, Any]) -> list[int]:
    return sorted({int(r) for res in report["results"] for r in res["warm_parent_peak_rss_mib"]})


def goal_line(goal: dict[str, Any]) -> str:
    return f"- {goal['goal']}: {_fmt(goal['value'], 3)} (goal <= {goal['limit']:g}): {goal['verdict']}"


def write_report(out: Path, mode: str, results: list[dict[str, Any]]) -> str:
    """results.json and results.md in ``out`` for the variants run so far; the markdown."""
    report = {"command": " ".join(sys.argv), "mode": mode, "results": results, "goals": goals(results)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3], help="local SuperNodes per run, e.g. 3 20")
    parser.add_argument("--rounds", type=int, default=10, help="plain rounds (memory is read across them)")
    parser.add_argument("--secagg-rounds", type=int, default=5)
    parser.add_argument("--max-examples", type=int, default=4000, help="0: all 10,003 training queries")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=[f"{d}-{p}" for d, p in VARIANTS])
    parser.add_argument("--quick", action="store_true", help="tiny BERT, synthetic data, 2 rounds: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench-warm-devices")
    args = parser.parse_args()
    if args.quick:
        args.rounds = args.secagg_rounds = 2
    chosen = [(d, p) for d, p in VARIANTS if f"{d}-{p}" in args.variants]
    check_resources(args)
    out = (args.out / time.strftime("%Y%m%d-%H%M%S")).resolve()
    mode = "quick smoke run: tiny BERT, not a measurement" if args.quick else "MiniLM on Banking77"
    results: list[dict[str, Any]] = []
    text = ""
    with tempfile.TemporaryDirectory(prefix="warm-bench-") as scratch:
        if args.quick:
            args.tiny_bert = _tiny_bert(Path(scratch))
        for nodes in args.nodes:
            for devices, privacy in chosen:
                results.append(run_variant(nodes, devices, privacy, args, out))
                text = write_report(out, mode, results)  # after each variant: a later failure keeps these
    print("\n" + text)
    print(f"results: {out / 'results.md'} and results.json")


def check_resources(args: argparse.Namespace) -> None:
    if args.quick:
        return
    if not (DATA / "train.csv").is_file():
        sys.exit(f"Banking77 is not at {DATA}: this benchmark reads ../shared/data/banking77 beside the repo")
    needed = max(args.nodes) * CLIENTAPP_MIB + SERVER_SIDE_MIB
    available = available_mib()
    if available is not None and available < needed:
        sys.exit(f"{max(args.nodes)} local SuperNodes need about {needed:,} MiB and {available:,} MiB are available")


def _tiny_bert(folder: Path) -> Path:
    """The tests' tiny random BERT (tests/tiny_bert.py), built in ``folder``."""
    sys.path.insert(0, str(PROJECT_ROOT / "tests"))
    from tiny_bert import write_tiny_bert

    return write_tiny_bert(folder / "tiny-bert", sentence_transformers=True)


if __name__ == "__main__":
    main()
