"""Streaming FedAvg over 1,000 synthetic LoRA r=8 deltas of the default MiniLM-L6 shape: time and memory.

Run:  .venv/bin/python benchmarks/aggregate_deltas.py [--threads 2] [--clients 1000] [--repeats 3]

The schema is built by hand (no model is loaded): LoRA r=8 on query/value of 6 layers, hidden 384
(A (8, 384), B (384, 8) per module) plus a 77-class head ((77, 384), (77,)): 103,373 float32 values.
Deltas are N(0, 1e-3²), serialized as clients send them (none = fp32, fp16, int8).
Time: ``aggregate_round`` over blobs already received (validate + deserialize + norm check +
accumulate + one FedAvg step), best of ``--repeats``, with the decode and accumulate shares.
Memory: peak RSS above the process's RSS before the round, each case in a fresh process, blobs
handed over one at a time from a pool of 10 (what the server holds while streaming); "keep all" is
the naive alternative (decode every delta, then stack and average) for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fedadapt import jsonsafe
from fedadapt.aggregate.fedavg import ReceivedDelta, StreamingFedAvg
from fedadapt.aggregate.fedavg import aggregate_round as run_round
from fedadapt.aggregate.server_optimizers import FedAvgConfig, ServerOptimizer
from fedadapt.aggregate.validation import DeltaValidator
from fedadapt.delta.serialize import Compression, serialize_state
from fedadapt.delta.state import AdapterSchema, State, TensorSpec

LAYERS, HIDDEN, RANK, LABELS = 6, 384, 8, 77
COMPRESSIONS: tuple[Compression, ...] = ("none", "fp16", "int8")
MAX_NORM = 10.0  # far above the synthetic deltas' norm (≈ 0.32): every delta pays for the check, none is clipped


def minilm_lora_schema() -> AdapterSchema:
    """The shared-part schema of LoRA r=8 on query/value of MiniLM-L6 with a 77-class head."""
    specs = []
    for layer in range(LAYERS):
        for module in ("query", "value"):
            prefix = f"base_model.model.backbone.encoder.layer.{layer}.attention.self.{module}"
            specs.append(TensorSpec(f"{prefix}.lora_A.default.weight", (RANK, HIDDEN), "float32", "shared", "adapter"))
            specs.append(TensorSpec(f"{prefix}.lora_B.default.weight", (HIDDEN, RANK), "float32", "shared", "adapter"))
    head = "base_model.model.classifier.modules_to_save.default"
    specs.append(TensorSpec(f"{head}.weight", (LABELS, HIDDEN), "float32", "shared", "head"))
    specs.append(TensorSpec(f"{head}.bias", (LABELS,), "float32", "shared", "head"))
    method = {"name": "lora", "r": RANK, "alpha": 16, "dropout": 0.0, "target_modules": None}
    return AdapterSchema(method, "synthetic-minilm-l6", tuple(specs))


def synthetic_delta(schema: AdapterSchema, seed: int) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {s.name: 1e-3 * torch.randn(s.shape, generator=gen) for s in schema.specs("shared")}


def make_blobs(schema: AdapterSchema, count: int, compression: Compression) -> list[bytes]:
    return [serialize_state(synthetic_delta(schema, seed), schema, "shared", compression) for seed in range(count)]


def replies(blobs: list[bytes], clients: int) -> Iterator[ReceivedDelta]:
    """``clients`` replies cycling over ``blobs``; example counts 1..500."""
    for i in range(clients):
        yield ReceivedDelta(f"client-{i}", blobs[i % len(blobs)], 1 + (i * 37) % 500)


def time_round(schema: AdapterSchema, blobs: list[bytes], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds for a whole round, and for its decode and accumulate parts alone."""
    validator = DeltaValidator(schema, max_norm=MAX_NORM, norm_policy="clip")
    global_state = {s.name: torch.zeros(s.shape) for s in schema.specs("shared")}
    rounds, splits = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run_round(global_state, replies(blobs, len(blobs)), validator, ServerOptimizer(FedAvgConfig(), schema))
        rounds.append(time.perf_counter() - start)
        assert result.accepted == len(blobs) and not result.rejected
        splits.append(split_round(schema, blobs, validator))
    return {"round": min(rounds), "decode": min(d for d, _ in splits), "accumulate": min(a for _, a in splits)}


def split_round(schema: AdapterSchema, blobs: list[bytes], validator: DeltaValidator) -> tuple[float, float]:
    """(seconds in ``validator.check``, seconds in ``StreamingFedAvg.add``) over all blobs."""
    decode = accumulate = 0.0
    fedavg = StreamingFedAvg(schema)
    for _, blob, count in replies(blobs, len(blobs)):
        t0 = time.perf_counter()
        checked = validator.check(blob)
        t1 = time.perf_counter()
        fedavg.add(checked, count)
        accumulate += time.perf_counter() - t1
        decode += t1 - t0
    return decode, accumulate


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(clients: int, compression: Compression, strategy: str, threads: int) -> dict[str, float]:
    """Runs in a fresh process: (RSS before, peak RSS) in MiB for one aggregation."""
    torch.set_num_threads(threads)
    schema = minilm_lora_schema()
    blobs = make_blobs(schema, 10, compression)
    validator = DeltaValidator(schema, max_norm=MAX_NORM, norm_policy="clip")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = rss_kib("VmRSS")
    if strategy == "streaming":
        global_state = {s.name: torch.zeros(s.shape) for s in schema.specs("shared")}
        run_round(global_state, replies(blobs, clients), validator, ServerOptimizer(FedAvgConfig(), schema))
    else:
        kept = [(validator.validate(blob), count) for _, blob, count in replies(blobs, clients)]
        weights = torch.tensor([count for _, count in kept], dtype=torch.float64)
        for spec in schema.specs("shared"):
            stacked = torch.stack([delta[spec.name].double() for delta, _ in kept])  # (clients, *shape)
            (torch.tensordot(weights, stacked, dims=1) / weights.sum()).float()
    return {"before": before / 1024, "peak": rss_kib("VmHWM") / 1024}


def memory_row(clients: int, compression: Compression, strategy: str, threads: int) -> dict[str, float]:
    args = ["--probe", str(clients), compression, strategy, "--threads", str(threads)]
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return dict(jsonsafe.loads(out.stdout.strip().splitlines()[-1], what="the memory probe's last line"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", nargs=3, metavar=("CLIENTS", "COMPRESSION", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        clients, compression, strategy = args.probe
        print(json.dumps(probe_memory(int(clients), compression, strategy, args.threads)))
        return
    torch.set_num_threads(args.threads)
    schema = minilm_lora_schema()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{schema.num_params('shared'):,} values per delta, {args.clients} clients, {args.threads} threads")
    print(f"{os.cpu_count()} CPUs, load average before the run: {load}\n")
    print("| compression | blob KiB | round (s) | decode + validate (s) | accumulate (s) | µs / client |")
    print("|---|---:|---:|---:|---:|---:|")
    for compression in COMPRESSIONS:
        blobs = make_blobs(schema, args.clients, compression)
        t = time_round(schema, blobs, args.repeats)
        per_client = 1e6 * t["round"] / args.clients
        print(
            f"| {compression} | {len(blobs[0]) / 1024:.0f} | {t['round']:.3f} | {t['decode']:.3f} "
            f"| {t['accumulate']:.3f} | {per_client:.0f} |"
        )
        del blobs
    print("\n| strategy | compression | clients | RSS before (MiB) | peak RSS (MiB) | peak − before (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for strategy in ("streaming", "keep all"):
        for compression in ("none", "int8"):
            for clients in (100, args.clients):
                mem = memory_row(clients, compression, strategy.replace(" ", "-"), args.threads)
                print(
                    f"| {strategy} | {compression} | {clients} | {mem['before']:.0f} | {mem['peak']:.0f} "
                    f"| {mem['peak'] - mem['before']:.1f} |"
                )


if __name__ == "__main__":
    main()
