"""fleet-1000 under Flower's simulation engine: peak memory, and the round time that is neither training nor Flower.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fleet_scale.py [--scenario simulations/fleet-1000.toml]
      [--rounds 3] [--out runs/bench-fleet-1000]

Two runs of the same scenario, one after the other, each on its own SuperLink:
  training  the real ClientApp: 10 of 1,000 virtual devices train LoRA each round;
  empty     every device replies at once with an all-zero delta (run config ``empty-clients``):
            what Flower itself costs per round (message passing, its polling, Ray dispatch) plus
            the server's own work (aggregation, central evaluation, checkpoint).
Memory: every process the run starts (SuperLink, simulation, Ray workers, ServerApp) is sampled
twice a second from /proc; the figure is the peak of their summed PSS (proportional set size, so
pages they share are not counted twice), plus the largest single process's peak RSS.
Per round: ``overhead = round − training − empty round``, where ``training`` is the clients'
reported training seconds summed and divided by the number of clients that run at once (Ray runs
``CPUs // client-cpus`` of them), i.e. the training on the round's critical path. Round 1 also
loads the backbone in each Ray worker, so it is reported apart from the steady rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from simulations.processes import descendants  # noqa: E402
from simulations.runner import simulate  # noqa: E402


class TreeMemory:
    """Samples this process's descendants; ``peak_pss_mib`` is the peak of their summed PSS."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_pss_mib = 0.0
        self.peak_rss_mib = 0.0  # the largest single process
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pids = descendants(os.getpid())
            pss = rss = 0.0
            for pid in pids:
                pss += proc_kib(pid, "smaps_rollup", "Pss:") / 1024
                rss = max(rss, proc_kib(pid, "status", "VmRSS:") / 1024)
            self.peak_pss_mib = max(self.peak_pss_mib, pss)
            self.peak_rss_mib = max(self.peak_rss_mib, rss)
            self.peak_processes = max(self.peak_processes, len(pids))


def proc_kib(pid: int, file: str, field: str) -> float:
    """A ``field`` of /proc/``pid``/``file`` in KiB (0 when the process is gone or the field is absent)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field):
                return float(line.split()[1])
    return 0.0


def run(scenario: Path, rounds: int, out: Path, empty: bool) -> tuple[dict[str, Any], TreeMemory]:
    with TreeMemory() as memory:
        metrics = simulate(scenario, rounds=rounds, out=out, show=True, empty_clients=empty)
    return metrics, memory


def concurrency(metrics: dict[str, Any]) -> int:
    """Virtual clients Ray runs at once: CPUs // client-cpus, at most the clients sampled."""
    scenario = metrics["scenario"]
    sampled = scenario["clients_per_round"] or scenario["num_clients"]
    return max(1, min(sampled, (os.cpu_count() or 1) // scenario["client_cpus"]))


def round_rows(training: dict[str, Any], empty: dict[str, Any]) -> list[dict[str, float]]:
    parallel = concurrency(training)
    rows = []
    for ours, base in zip(training["rounds"], empty["rounds"], strict=True):
        train = sum(c.get("train-seconds", 0.0) for c in ours["client_results"]) / parallel
        overhead = ours["seconds"] - train - base["seconds"]
        rows.append(
            {
                "round": ours["round"],
                "round_s": ours["seconds"],
                "training_s": train,
                "empty_round_s": base["seconds"],
                "overhead_s": overhead,
                "overhead_share": overhead / ours["seconds"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=PROJECT_ROOT / "simulations" / "fleet-1000.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench-fleet-1000")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    training, train_mem = run(args.scenario, args.rounds, args.out / f"training-{stamp}", empty=False)
    empty, empty_mem = run(args.scenario, args.rounds, args.out / f"empty-{stamp}", empty=True)
    scenario = training["scenario"]
    print(
        f"\n{scenario['num_clients']:,} virtual clients, {scenario['clients_per_round']} per round, "
        f"{args.rounds} rounds, {os.cpu_count()} CPUs, {concurrency(training)} clients at once\n"
    )
    print("| run | peak PSS, all processes (MiB) | largest process peak RSS (MiB) | processes |")
    print("|---|---:|---:|---:|")
    for name, mem in (("training", train_mem), ("empty clients", empty_mem)):
        print(f"| {name} | {mem.peak_pss_mib:,.0f} | {mem.peak_rss_mib:,.0f} | {mem.peak_processes} |")
    rows = round_rows(training, empty)
    print("\n| round | round (s) | training on the critical path (s) | empty-client round (s) | overhead (s) | share |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['round']} | {r['round_s']:.1f} | {r['training_s']:.1f} | {r['empty_round_s']:.1f} "
            f"| {r['overhead_s']:.1f} | {100 * r['overhead_share']:.1f}% |"
        )
    steady = rows[1:] or rows
    share = statistics.mean(r["overhead_share"] for r in steady)
    print(f"\nsteady rounds (2+): overhead beyond training and Flower's own round = {100 * share:.1f}% of the round")
    print(f"bytes up per client-round: {training['summary']['bytes_up_per_client_round']:,.0f}")


if __name__ == "__main__":
    main()
