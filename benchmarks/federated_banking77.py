"""Federated Banking77 (20 label-skewed clients): LoRA adapters against full-model FedAvg in the same run.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/federated_banking77.py [--out runs/bench-banking77]
      [--scenario simulations/banking77-lora-baseline.toml] [--from-run DIR]

1. ``fedadapt simulate`` of the scenario (``full-model = true``): the adapter run, then the same
   partitions, sampling and seeds as ordinary full-model FedAvg (``--from-run`` reads a finished
   run instead of starting one).
2. Both final models scored on the whole Banking77 test split (3,080 queries; the rounds are
   scored on the scenario's seeded sample of it).
3. Bytes per upload as actually serialized for each wire format: the run's LoRA delta (its final
   adapter minus the initial one) as fp32/fp16/int8, and FFA-LoRA (A frozen, only B and the head
   travel) as fp16/int8, each against the full model's fp32 bytes.
The centralized baseline is `fedadapt train` of docs/local-training.md (LoRA r=8, one epoch, 0.917).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from fleet_bench import full_test_accuracy  # noqa: E402  (benchmarks/: the script's own folder)

from fedadapt import jsonsafe  # noqa: E402
from fedadapt.checkpoint.folder import load_adapter  # noqa: E402
from fedadapt.delta.serialize import serialize_state  # noqa: E402
from fedadapt.delta.state import compute_delta  # noqa: E402
from fedadapt.fleet.build import build_model  # noqa: E402
from fedadapt.fleet.data import load_fleet_data  # noqa: E402
from fedadapt.fleet.scenario import ScenarioConfig  # noqa: E402
from fedadapt.fleet.scenario_file import load_scenario  # noqa: E402
from fedadapt.fleet.variants import with_overrides  # noqa: E402

CENTRALIZED_ACCURACY = 0.9172  # docs/local-training.md: fedadapt train, LoRA r=8, 1 epoch, full test split


def run_or_read(scenario: Path, out: Path, from_run: Path | None) -> dict[str, Any]:
    if from_run is not None:
        return dict(jsonsafe.load_file(from_run / "metrics.json", max_bytes=1024**3))
    from simulations.runner import simulate

    return simulate(scenario, out=out, show=True)


def wire_sizes(scenario: ScenarioConfig, final_adapter: Path, full_model_bytes: int) -> list[tuple[str, str, int]]:
    """(method, compression, bytes) of one upload, serialized for real."""
    labels = load_fleet_data(scenario).labels.names
    initial = build_model(scenario, labels)
    final = load_adapter(final_adapter)
    delta = compute_delta(final.state("shared"), initial.state("shared"))
    rows = [("lora", c, len(serialize_state(delta, initial.schema, "shared", c))) for c in ("none", "fp16", "int8")]
    ffa = build_model(with_overrides(scenario, method="ffa-lora"), labels)
    gen = torch.Generator().manual_seed(0)
    ffa_delta = {s.name: 1e-3 * torch.randn(s.shape, generator=gen) for s in ffa.schema.specs("shared")}
    rows += [("ffa-lora", c, len(serialize_state(ffa_delta, ffa.schema, "shared", c))) for c in ("fp16", "int8")]
    rows.append(("full model", "none", full_model_bytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=PROJECT_ROOT / "simulations" / "banking77-lora-baseline.toml")
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench-banking77")
    parser.add_argument("--from-run", type=Path, default=None, help="a finished run folder to report on")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    metrics = run_or_read(args.scenario, args.out, args.from_run)
    folder = args.from_run or args.out
    comparison = metrics["summary"]["full_model"]
    ours, theirs = comparison["adapter"], comparison["full_model"]
    whole = {
        "adapters": full_test_accuracy(folder / "final_adapter", scenario),
        "full model": full_test_accuracy(folder / "full-model" / "final_adapter", scenario),
    }
    print(
        f"\n{scenario.num_clients} clients, Dirichlet alpha {scenario.alpha}, {scenario.clients_per_round} per round, "
        f"{scenario.rounds} rounds, target accuracy {comparison['target_accuracy']:.4f} (on the per-round sample)\n"
    )
    print("| run | rounds to target | seconds to target | best accuracy (sample) | final accuracy (whole test split) |")
    print("|---|---:|---:|---:|---:|")
    for name, side in (("adapters", ours), ("full model", theirs)):
        print(
            f"| {name} ({side['method']}, {side['compression']}) | {side['rounds_to_target']} "
            f"| {side['seconds_to_target']:.0f} | {side['best_accuracy']:.4f} | {whole[name]:.4f} |"
        )
    print(f"\nspeed-up to target: {comparison['speedup_to_target']:.2f}x")
    gap = 100 * (whole["adapters"] - CENTRALIZED_ACCURACY)
    print(f"centralized baseline (docs/local-training.md): {CENTRALIZED_ACCURACY:.4f}; adapters {gap:+.1f} points")
    print(
        f"bytes up per client-round, measured: {ours['bytes_up_per_client_round']:,.0f} vs "
        f"{theirs['bytes_up_per_client_round']:,.0f} ({comparison['bytes_ratio']:.0f}x fewer)\n"
    )
    full_bytes = int(metrics["summary"]["full_model_bytes"])
    print("| method | wire format | bytes per upload | fewer than the full model (fp32) |")
    print("|---|---|---:|---:|")
    for method, compression, size in wire_sizes(scenario, folder / "final_adapter", full_bytes):
        print(f"| {method} | {compression} | {size:,} | {full_bytes / size:,.0f}x |")


if __name__ == "__main__":
    main()
