"""What privacy costs per round: none vs aead vs secagg+ at 10, 50 and 100 clients, in one run.

Run:  .venv/bin/python benchmarks/secure_aggregation.py [--threads 2] [--clients 10 50 100] [--repeats 2]

The quickstart scenario's model (default MiniLM-L6, LoRA r=8 on q,v + the shared head: 76,038
values). Five real client updates are trained once with the quickstart's local step budget; client
``i`` of ``N`` sends update ``i % 5``. For each mode one round runs in this process, every client
and the server one after another (as on a simulation host), through the same code the apps call:
- none: fp16 serialization on the client; ``aggregate_round`` (decode, validate, stream, step).
- aead: the same inside ``fedadapt.privacy.transport`` envelopes (X25519 + HKDF + AES-256-GCM).
- secagg+: the five stages of ``fedadapt.privacy.secagg`` (clients and ``SecAggRound``), every payload sealed,
  then the optimizer step on the unmasked mean. Each client has a P-384 identity key and the roster.

The consistency check's cost (column "consistency s") is the consistency stage's whole exchange plus
every identity signature and verification of the other stages (setup signatures, their checks by the
server and the neighbours, the survivor-set checks in unmask), reported as the ratio to the plain
round's protocol time and to the plain round with training.

Protocol seconds = client work (summed over clients) + server work, best of ``--repeats``.
"Round with training" adds the measured training seconds of every client (the median of the five
real trainings × N); "no training" is the protocol alone. Bytes are every payload both ways.
Flower's message transport is not included: see docs/privacy.md for its cost per exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "aead", "secagg+")


@dataclass
class Figures:
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    consistency_seconds: float = 0.0  # secagg+: the consistency stage + identity signing/verification

    @property
    def protocol_seconds(self) -> float:
        return self.client_seconds + self.server_seconds


class Clock:
    """Adds elapsed time to a Figures field."""

    def __init__(self, figures: Figures, side: str) -> None:
        self.figures, self.side = figures, side

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        name = f"{self.side}_seconds"
        setattr(self.figures, name, getattr(self.figures, name) + time.perf_counter() - self.start)


def train_updates(scenario, count: int):  # type: ignore[no-untyped-def]
    """``count`` real quickstart client updates from the initial global state, and their training seconds."""
    from fedadapt.delta.serialize import serialize_state
    from fedadapt.fleet.build import build_model
    from fedadapt.fleet.data import load_fleet_data
    from fedadapt.fleet.device_data import DeviceContext
    from fedadapt.fleet.device_round import train_client_update

    fleet = load_fleet_data(scenario)
    model = build_model(scenario, fleet.labels.names)
    global_blob = serialize_state(model.state("shared"), model.schema, "shared", "none")
    updates, seconds = [], []
    with tempfile.TemporaryDirectory() as state_dir:
        for partition in range(count):
            start = time.perf_counter()
            device = DeviceContext(scenario, partition, Path(state_dir))
            updates.append(train_client_update(device, global_blob, server_round=1))
            seconds.append(time.perf_counter() - start)
    return model, global_blob, updates, seconds


def plain_round(mode: str, model, global_blob: bytes, updates, clients: int, keys: dict) -> tuple[Figures, dict]:  # type: ignore[no-untyped-def]
    from fedadapt.aggregate.fedavg import aggregate_round
    from fedadapt.aggregate.server_optimizers import FedAvgConfig, ServerOptimizer
    from fedadapt.aggregate.validation import DeltaValidator
    from fedadapt.delta.serialize import serialize_state
    from fedadapt.privacy.config import PrivacyConfig
    from fedadapt.privacy.transport import ClientSealer, ServerOpener

    privacy = PrivacyConfig(mode=mode)
    schema = model.schema
    figures = Figures(bytes_down=len(global_blob) * clients)
    opener = ServerOpener(privacy, 1, keys.get("server_key"), keys.get("public", ""))
    opener.start_round(1)
    sent = []
    for index in range(clients):
        update = updates[index % len(updates)]
        with Clock(figures, "client"):
            sealer = ClientSealer.from_config(privacy, 1, 1000 + index, keys.get("public", ""))
            blob = serialize_state(update.delta, schema, "shared", "fp16")
            sent.append((1000 + index, sealer.seal_delta(blob, update.num_examples, 1, schema.schema_id)))
        figures.bytes_up += len(sent[-1][1])
    validator = DeltaValidator(schema)
    optimizer = ServerOptimizer(FedAvgConfig(), schema)
    with Clock(figures, "server"):
        counts = [update.num_examples for update in (updates[i % len(updates)] for i in range(clients))]
        opened = (
            (f"node {node}", *_opened(opener.open_delta(blob, 1, node, schema.schema_id), count))
            for (node, blob), count in zip(sent, counts, strict=True)
        )
        result = aggregate_round(model.state("shared"), opened, validator, optimizer)
    return figures, result.state


def _opened(opened: tuple[bytes, int | None], clear_count: int) -> tuple[bytes, int]:
    blob, sealed_count = opened
    return blob, clear_count if sealed_count is None else sealed_count


def secure_round(model, global_blob: bytes, updates, clients: int, keys: dict, privacy) -> tuple[Figures, dict]:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedadapt.aggregate.server_optimizers import FedAvgConfig, ServerOptimizer
    from fedadapt.delta.state import flatten_state, unflatten_state
    from fedadapt.privacy.secagg import client as secagg
    from fedadapt.privacy.secagg import stages
    from fedadapt.privacy.secagg.identity import Identity, openssh_public
    from fedadapt.privacy.secagg.server import SecAggRound
    from fedadapt.privacy.transport import ClientSealer, ServerOpener

    schema = model.schema
    specs = schema.specs("shared")
    nodes = [1000 + i for i in range(clients)]
    figures = Figures()
    opener = ServerOpener(privacy, 1, keys["server_key"], keys["public"])
    opener.start_round(1)
    sealers = {n: ClientSealer.from_config(privacy, 1, n, keys["public"]) for n in nodes}
    vectors = {n: flatten_state(updates[i % len(updates)].delta, specs).numpy() for i, n in enumerate(nodes)}
    counts = {n: updates[i % len(updates)].num_examples for i, n in enumerate(nodes)}
    signing_keys = {n: ec.generate_private_key(ec.SECP384R1()) for n in nodes}  # made on the devices, untimed
    roster = frozenset(openssh_public(key.public_key()) for key in signing_keys.values())
    devices = {n: Identity(1, signing_keys[n], roster) for n in nodes}
    sessions: dict[int, bytes] = {}
    with Clock(figures, "server"):
        server = SecAggRound(privacy, 1, nodes, schema.num_params("shared"), seed=1, run_id=1)
        requests = server.setup_requests()

    def exchange(stage: str, requests: dict[int, bytes], answer) -> dict[int, bytes]:  # type: ignore[no-untyped-def]
        replies = {}
        for node, request in requests.items():
            figures.bytes_down += len(request) + (len(global_blob) if stage == stages.MASKED else 0)
            with Clock(figures, "client"):
                step = answer(node, request)
                sessions[node] = step.session
                sealed = sealers[node].seal(step.reply, 1, schema.schema_id, stage)
            figures.bytes_up += len(sealed)
            with Clock(figures, "server"):
                replies[node] = opener.open(sealed, 1, node, schema.schema_id, stage)
        return replies

    def masked(node: int, request: bytes):  # type: ignore[no-untyped-def]
        session = secagg.receive_shares(privacy, 1, sessions[node], request)
        return secagg.mask(privacy, 1, session, vectors[node], counts[node])

    with IdentityTimer(figures) as timer:
        replies = exchange(stages.SETUP, requests, lambda n, r: secagg.setup(privacy, 1, n, r, devices[n]))
        with Clock(figures, "server"):
            requests = server.keys_received(replies, {})
        replies = exchange(
            stages.SHARE_KEYS, requests, lambda n, r: secagg.share_keys(privacy, 1, sessions[n], r, devices[n])
        )
        with Clock(figures, "server"):
            requests = server.shares_received(replies, {})
        replies = exchange(stages.MASKED, requests, masked)
        with Clock(figures, "server"):
            requests = server.masked_received(replies, {})
        # The consistency stage is all consistency check: time it whole (its signatures inside it).
        timer.paused = True
        start = figures.protocol_seconds
        replies = exchange(stages.CONSISTENCY, requests, lambda n, r: secagg.consistency(1, sessions[n], r, devices[n]))
        with Clock(figures, "server"):
            requests = server.consistency_received(replies, {})
        figures.consistency_seconds += figures.protocol_seconds - start
        timer.paused = False
        replies = exchange(stages.UNMASK, requests, lambda n, r: secagg.unmask(privacy, 1, sessions[n], r))
        with Clock(figures, "server"):
            result = server.unmask_received(replies, {})
            mean = unflatten_state(torch.from_numpy(result.mean), specs)
            state = ServerOptimizer(FedAvgConfig(), schema).step(model.state("shared"), mean)
    return figures, state


class IdentityTimer:
    """Times ``identity.sign``/``verify``/``normalize_public`` (outside the consistency stage, timed whole)."""

    def __init__(self, figures: Figures) -> None:
        from fedadapt.privacy.secagg import identity

        self.module, self.figures, self.paused = identity, figures, False
        self.originals = {name: getattr(identity, name) for name in ("sign", "verify", "normalize_public")}

    def __enter__(self) -> IdentityTimer:
        for name, original in self.originals.items():
            setattr(self.module, name, self._timed(original))
        return self

    def __exit__(self, *_: object) -> None:
        for name, original in self.originals.items():
            setattr(self.module, name, original)

    def _timed(self, function):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if not self.paused:
                    self.figures.consistency_seconds += time.perf_counter() - start

        return timed


def exact_fedavg(model, updates, clients: int) -> dict:  # type: ignore[no-untyped-def]
    """The global state after one plain FedAvg step on the uncompressed deltas (the reference)."""
    from fedadapt.aggregate.fedavg import StreamingFedAvg
    from fedadapt.aggregate.server_optimizers import FedAvgConfig, ServerOptimizer

    fedavg = StreamingFedAvg(model.schema)
    for index in range(clients):
        update = updates[index % len(updates)]
        fedavg.add(update.delta, update.num_examples)
    return ServerOptimizer(FedAvgConfig(), model.schema).step(model.state("shared"), fedavg.result())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fedadapt.fleet.scenario_file import load_scenario
    from fedadapt.privacy.keys import generate_server_keys

    scenario = load_scenario(PROJECT_ROOT / "simulations" / "secure.toml")
    privacy = scenario.privacy
    model, global_blob, updates, train_seconds = train_updates(replace(scenario, device="cpu"), 5)
    train_per_client = float(np.median(train_seconds))  # the first also builds the process's model
    print(
        f"shared values: {model.schema.num_params('shared'):,}; training per client: {train_per_client:.2f} s "
        f"(quickstart step budget, median of {len(train_seconds)})"
    )
    with tempfile.TemporaryDirectory() as folder:
        files = generate_server_keys(Path(folder))
        keys = {"server_key": files.private_path, "public": str(files.public_path)}
        rows = []
        for clients in args.clients:
            results: dict[str, Figures] = {}
            states = {}
            for mode in MODES:
                best = None
                for _ in range(args.repeats):
                    if mode == "secagg+":
                        figures, state = secure_round(model, global_blob, updates, clients, keys, privacy)
                    else:
                        figures, state = plain_round(mode, model, global_blob, updates, clients, keys)
                    if best is None or figures.protocol_seconds < best.protocol_seconds:
                        best = figures
                assert best is not None
                results[mode], states[mode] = best, state
            exact = exact_fedavg(model, updates, clients)
            gap = max((states["secagg+"][k].double() - exact[k].double()).abs().max().item() for k in exact)
            plain = results["none"]
            for mode in MODES:
                figures = results[mode]
                with_training = train_per_client * clients + figures.protocol_seconds
                plain_training = train_per_client * clients + plain.protocol_seconds
                rows.append(
                    {
                        "clients": clients,
                        "mode": mode,
                        "client_seconds": figures.client_seconds,
                        "server_seconds": figures.server_seconds,
                        "protocol_seconds": figures.protocol_seconds,
                        "protocol_ratio": figures.protocol_seconds / plain.protocol_seconds,
                        "round_with_training_seconds": with_training,
                        "overhead_with_training": with_training / plain_training - 1,
                        "bytes_up": figures.bytes_up,
                        "bytes_down": figures.bytes_down,
                        "max_abs_gap_to_exact": gap if mode == "secagg+" else None,
                        "consistency_seconds": figures.consistency_seconds if mode == "secagg+" else None,
                        "consistency_ratio_to_plain_protocol": (
                            figures.consistency_seconds / plain.protocol_seconds if mode == "secagg+" else None
                        ),
                        "consistency_ratio_to_plain_round_with_training": (
                            figures.consistency_seconds / plain_training if mode == "secagg+" else None
                        ),
                    }
                )
    header = (
        f"{'clients':>7} {'mode':>8} {'client s':>9} {'server s':>9} {'protocol':>9} {'vs none':>8} "
        f"{'round+train s':>13} {'overhead':>9} {'up MB':>8} {'down MB':>8}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['clients']:>7} {row['mode']:>8} {row['client_seconds']:>9.2f} {row['server_seconds']:>9.2f} "
            f"{row['protocol_seconds']:>9.2f} {row['protocol_ratio']:>7.1f}× "
            f"{row['round_with_training_seconds']:>13.1f} "
            f"{row['overhead_with_training']:>8.1%} {row['bytes_up'] / 1e6:>8.2f} {row['bytes_down'] / 1e6:>8.2f}"
        )
    print(f"{'clients':>7} {'consistency s':>13} {'vs plain protocol':>17} {'vs plain+train':>15} {'of secagg+':>10}")
    for row in rows:
        if row["consistency_seconds"] is not None:
            print(
                f"{row['clients']:>7} {row['consistency_seconds']:>13.3f} "
                f"{row['consistency_ratio_to_plain_protocol']:>16.2f}× "
                f"{row['consistency_ratio_to_plain_round_with_training']:>14.2%} "
                f"{row['consistency_seconds'] / row['protocol_seconds']:>9.1%}"
            )
    gaps = [r["max_abs_gap_to_exact"] for r in rows if r["max_abs_gap_to_exact"] is not None]
    print(
        f"secagg+ global state vs exact fp32 FedAvg after one round: max |difference| {max(gaps):.2e} "
        f"(quantization step {privacy.quantization_step:.2e})"
    )
    if args.json:
        args.json.write_text(json.dumps({"train_seconds_per_client": train_per_client, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
