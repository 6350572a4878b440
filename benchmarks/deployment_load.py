"""A real deployment under load: 20 SuperNodes on loopback, MiniLM LoRA on Banking77 partitions.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/deployment_load.py [--nodes 20] [--rounds 5]
      [--max-examples 4000] [--batch-size 16] [--max-length 32] [--out runs/bench-deployment-load]

``fedadapt serve`` with TLS + node authentication and ``--nodes`` local SuperNodes, each a device
holding an IID partition of Banking77 (``--max-examples`` caps the training queries before they are
split, so that the run fits a laptop's cores). Each round, every device trains LoRA r=8 for one
epoch; in deployment every message starts a fresh ClientApp process, and on one host all of them
run at once: batch 16 x 32 tokens keeps 20 of them in memory (the run refuses to start where they
would not fit).

Every round is split into:
  compute   the slowest device's own time for the message (``client-seconds``: data, model,
            local training and evaluation), and its whole process's life (``process-seconds``,
            which adds the ClientApp process start and imports that Flower's process-per-message
            design costs);
  flower    the exchange (sent until the last reply) minus the slowest process: Flower's own
            message latency (its SuperNodes and the ServerApp poll on fixed sleeps in 1.41);
  server    the round minus the exchange: waiting for nodes, aggregation, central evaluation,
            checkpoint.
Baseline, in the same run: one SuperNode whose device replies at once with a zero delta
(``empty-clients``), three rounds: its ``flower`` figure is one Flower exchange on an idle system,
the unit of the goal "round latency <= compute + one Flower exchange per protocol stage".
Memory: the ServerApp records its own RSS after every round (metrics.json); every process of the
run is sampled twice a second from /proc for the peak summed PSS. Failures: rejected deltas and
round errors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.fleet_scale import TreeMemory  # noqa: E402
from deploy.serve import Deployment, serve  # noqa: E402

DATA = PROJECT_ROOT.parent / "shared" / "data" / "banking77"
BASELINE_ROUNDS = 3
# Measured: a MiniLM LoRA ClientApp peaks at ~1.4 GiB RSS with batch 32 x 64 tokens (imports and the
# data libraries ~540 MiB, the model ~110 MiB, activations through all six layers the rest), ~0.8 GiB
# with batch 16 x 32 tokens; the SuperLink, the ServerApp and the SuperNodes add ~3 GiB at 20 nodes.
CLIENTAPP_MIB = 800
SERVER_SIDE_MIB = 3000


def available_mib() -> int | None:
    """MemAvailable from /proc/meminfo, in MiB; None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def write_scenario(folder: Path, nodes: int, rounds: int, args: argparse.Namespace) -> Path:
    values: dict[str, Any] = {
        "name": "deployment-load",
        "data": str(DATA),
        "partition": "iid",
        "num-clients": nodes,
        "test-fraction": 0.1,
        "method": "lora",
        "rank": 8,
        "rounds": rounds,
        "local-epochs": 1,
        "batch-size": args.batch_size,
        "max-length": args.max_length,
        "compression": "fp16",
        "server-test-examples": 1000,
        "round-timeout": 1800,  # a load test measures rounds; it never cuts one short
        "node-timeout": 600,
        "seed": 0,
    }
    if args.max_examples:
        values["max-examples"] = args.max_examples
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scenario.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def round_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for record in metrics["rounds"]:
        clients = record["client_results"]
        compute = max((c.get("client-seconds", 0.0) for c in clients), default=0.0)
        process = max((c.get("process-seconds", 0.0) for c in clients), default=0.0)
        exchange = record["exchange_seconds"]
        rows.append(
            {
                "round": record["round"],
                "round_s": record["seconds"],
                "exchange_s": exchange,
                "compute_s": compute,
                "train_s": max((c.get("train-seconds", 0.0) for c in clients), default=0.0),
                "process_s": process,
                "flower_s": exchange - process,
                "server_s": record["seconds"] - exchange,
                "server_rss_mb": record["server_rss_mb"],
                "server_peak_rss_mb": record["server_peak_rss_mb"],
                "bytes_up": record["bytes_up"],
                "bytes_down": record["bytes_down"],
                "accepted": record["accepted"],
                "clients": record["clients"],
                "failures": len(record["rejected"]) + ("error" in record),
                "accuracy": record["accuracy"],
            }
        )
    return rows


def run(scenario: Path, nodes: int, rounds: int, out: Path, empty: bool) -> tuple[dict[str, Any], TreeMemory]:
    with TreeMemory() as memory:
        metrics = serve(scenario, Deployment(local_supernodes=nodes), rounds=rounds, out=out, empty_clients=empty)
    return metrics, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-examples", type=int, default=4000, help="0: all 10,003 training queries")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32, help="tokens; Banking77 queries average about 15")
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench-deployment-load")
    args = parser.parse_args()
    if not (DATA / "train.csv").is_file():
        sys.exit(f"Banking77 is not at {DATA}: this benchmark reads ../shared/data/banking77 beside the repo")
    needed = args.nodes * CLIENTAPP_MIB + SERVER_SIDE_MIB
    available = available_mib()
    if available is not None and available < needed:
        sys.exit(
            f"{args.nodes} local SuperNodes run {args.nodes} ClientApps at once, about {needed:,} MiB in all, and "
            f"this machine has {available:,} MiB available: a run that pages would measure the paging. Use "
            f"fewer --nodes, or a smaller --batch-size / --max-length."
        )
    out = (args.out / time.strftime("%Y%m%d-%H%M%S")).resolve()
    started = time.perf_counter()
    baseline_scenario = write_scenario(out / "baseline", 1, BASELINE_ROUNDS, args)
    baseline, _ = run(baseline_scenario, 1, BASELINE_ROUNDS, out / "baseline" / "run", empty=True)
    scenario = write_scenario(out / "load", args.nodes, args.rounds, args)
    metrics, memory = run(scenario, args.nodes, args.rounds, out / "load" / "run", empty=False)
    baseline_rows = round_rows(baseline)
    one_exchange = statistics.median(r["flower_s"] for r in baseline_rows)
    rows = round_rows(metrics)
    report = {
        "command": " ".join(sys.argv),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "max_examples": args.max_examples or None,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "one_flower_exchange_s": one_exchange,
        "baseline_rounds": baseline_rows,
        "rounds_detail": rows,
        "peak_pss_mib_all_processes": memory.peak_pss_mib,
        "peak_rss_mib_largest_process": memory.peak_rss_mib,
        "peak_processes": memory.peak_processes,
        "final_accuracy": metrics["summary"]["final_accuracy"],
        "wall_s": time.perf_counter() - started,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"\nreport: {out / 'report.json'}")


def print_report(report: dict[str, Any]) -> None:
    rows = report["rounds_detail"]
    one = report["one_flower_exchange_s"]
    print(f"\n{report['nodes']} SuperNodes, {report['rounds']} rounds; one Flower exchange (1 idle node): {one:.1f} s")
    header = (
        "round  round_s  exchange  compute  process  flower  server  rss_MB  peak_MB  bytes_up  bytes_down  acc  fail"
    )
    print(header)
    for r in rows:
        print(
            f"{r['round']:>5}  {r['round_s']:7.1f}  {r['exchange_s']:8.1f}  {r['compute_s']:7.1f}"
            f"  {r['process_s']:7.1f}  {r['flower_s']:6.1f}  {r['server_s']:6.1f}  {r['server_rss_mb']:6.0f}"
            f"  {r['server_peak_rss_mb']:7.0f}"
            f"  {r['bytes_up']:>8,}  {r['bytes_down']:>10,}  {r['accuracy']:.3f}  {r['failures']:>4}"
        )
    failures = sum(r["failures"] for r in rows)
    steady = rows[1:] or rows
    growth = steady[-1]["server_rss_mb"] - steady[0]["server_rss_mb"]
    worst = max(r["flower_s"] / one for r in rows) if one > 0 else float("inf")
    print(f"\nfailures: {failures} (goal 0)")
    print(
        f"server RSS from round {steady[0]['round']} to {steady[-1]['round']}: {growth:+.0f} MB "
        f"({growth / steady[0]['server_rss_mb']:+.1%}; goal: flat)"
    )
    print(
        f"Flower's own latency per round, worst: {max(r['flower_s'] for r in rows):.1f} s = {worst:.2f}x one "
        f"exchange (goal: round <= compute + 1 exchange, i.e. <= 1.00x for the one stage of FedAvg)"
    )
    print(
        f"peak PSS of all {report['peak_processes']} processes: {report['peak_pss_mib_all_processes']:.0f} MiB; "
        f"largest process {report['peak_rss_mib_largest_process']:.0f} MiB; wall {report['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
