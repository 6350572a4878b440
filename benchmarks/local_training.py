"""Local training on Banking77 and the synthetic task: accuracy, speed and personalization.

Run (each section alone with --only; all of them take ~25 min on 2 idle cores):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_training.py --out docs/local-training.md

Sections:
  baseline  centralized LoRA r=8 (the `fedadapt train` defaults, 1 epoch) beside a linear probe
            (softmax regression, L-BFGS) on the frozen mean-pooled embeddings, same run.
  speed     one local epoch of full fine-tuning vs LoRA vs Pfeiffer + AdapterDrop(k=3) +
            frozen-prefix cache, on the same examples, as ratios to full fine-tuning.
  personal  global vs personalized (head fine-tuned locally) vs local-only accuracy on each
            client's local test split: synthetic task by user, Banking77 Dirichlet(alpha=0.1).
            The global model is trained centrally on the union of the clients' training data:
            the model FedAvg approximates, until the fleet simulation lands.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.data.batching import EncodedTexts, batch_indices, collate, encode_dataset
from fedadapt.data.dataset import TextDataset
from fedadapt.data.label_map import LabelMap
from fedadapt.data.partition import PartitionConfig, partition_dataset
from fedadapt.data.splits import DataConfig, load_splits
from fedadapt.data.synthetic import SyntheticConfig, make_synthetic_dataset
from fedadapt.train.loop import TrainConfig, evaluate, train_adapter
from fedadapt.train.personalize import compare_on_client
from fedadapt.train.prefix_cache import PrefixCache, train_adapter_cached

BANKING77 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"


def encode(model: AdapterModel, data: TextDataset, labels: LabelMap, max_length: int = 64) -> EncodedTexts:
    return encode_dataset(model.backbone.tokenizer, data, labels, max_length)


def baseline() -> list[str]:
    splits = load_splits(DataConfig(path=str(BANKING77)))
    config = BackboneConfig(num_labels=len(splits.labels))
    model = AdapterModel(load_backbone(config), make_method_config("lora"), labels=splits.labels.names)
    train_set, test_set = encode(model, splits.train, splits.labels), encode(model, splits.test, splits.labels)
    result = train_adapter(model, train_set, TrainConfig())
    lora = evaluate(model, test_set)
    start = time.perf_counter()
    probe_accuracy = linear_probe(load_backbone(config).model, train_set, test_set, len(splits.labels))
    probe_seconds = time.perf_counter() - start
    return [
        "| model | test accuracy | macro-F1 | wall time |",
        "|---|---:|---:|---:|",
        f"| LoRA r=8 (q,v) + head, 1 epoch, `fedadapt train` defaults | {lora.accuracy:.4f} | {lora.macro_f1:.4f} |"
        f" {result.seconds:.0f} s |",
        f"| linear probe on frozen mean-pooled embeddings (L-BFGS) | {probe_accuracy:.4f} | | {probe_seconds:.0f} s |",
    ]


@torch.no_grad()
def embed(model: torch.nn.Module, data: EncodedTexts) -> torch.Tensor:
    model.eval()
    rows = []
    for indices in batch_indices(len(data), 128, None):
        batch = collate(data, indices)
        hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        rows.append(model.pooler(hidden, batch["attention_mask"]))
    return torch.cat(rows)


def linear_probe(model: torch.nn.Module, train: EncodedTexts, test: EncodedTexts, num_labels: int) -> float:
    features, labels = embed(model, train), torch.tensor(train.labels)
    head = torch.nn.Linear(features.shape[1], num_labels)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), labels) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = head(embed(model, test)).argmax(-1)
    return (predictions == torch.tensor(test.labels)).float().mean().item()


def full_finetune_epoch(model: torch.nn.Module, data: EncodedTexts) -> float:
    """Seconds for one epoch of ordinary fine-tuning: every backbone weight trains."""
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    start = time.perf_counter()
    for indices in batch_indices(len(data), 32, torch.Generator().manual_seed(0)):
        loss = model(**collate(data, indices)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def speed(examples: int, repeats: int) -> list[str]:
    """Epoch times, each configuration measured ``repeats`` times interleaved; the minimum counts.

    Interleaving keeps a burst of load on the shared machine from landing on one configuration.
    """
    splits = load_splits(DataConfig(path=str(BANKING77), max_examples=examples))
    config = BackboneConfig(num_labels=len(splits.labels))
    full = load_backbone(config).model
    lora = AdapterModel(load_backbone(config), make_method_config("lora"))
    drop = AdapterModel(load_backbone(config), make_method_config("pfeiffer", drop_layers=3))
    data = encode(lora, splits.train, splits.labels)
    start = time.perf_counter()
    cache = PrefixCache(drop, data, frozen_layers=3)
    fill = time.perf_counter() - start
    runs: dict[str, list[float]] = {}
    with cache:
        for _ in range(repeats):
            runs.setdefault("full fine-tuning", []).append(full_finetune_epoch(full, data))
            runs.setdefault("LoRA r=8", []).append(train_adapter(lora, data, TrainConfig()).seconds)
            runs.setdefault("Pfeiffer + AdapterDrop k=3, no cache", []).append(
                train_adapter(drop, data, TrainConfig()).seconds
            )
            runs.setdefault("Pfeiffer + AdapterDrop k=3 + cache", []).append(
                train_adapter_cached(drop, cache, TrainConfig()).seconds
            )
    best = {name: min(times) for name, times in runs.items()}
    best["… first epoch, cache fill included"] = best["Pfeiffer + AdapterDrop k=3 + cache"] + fill
    base = best["full fine-tuning"]
    rows = ["| one local epoch | seconds (min of runs) | speed-up vs full fine-tuning |", "|---|---:|---:|"]
    rows += [f"| {name} | {seconds:.1f} | {base / seconds:.2f}× |" for name, seconds in best.items()]
    intro = f"{len(data)} Banking77 examples, batch 32, dynamic padding, max_length 64, {repeats} interleaved runs."
    return [intro, "", *rows]


def personalization_rows(
    name: str, data: TextDataset, partition: PartitionConfig, global_epochs: int, local_epochs: int
) -> list[str]:
    labels = LabelMap.from_labels(data.labels)
    clients = partition_dataset(data, partition)
    union = TextDataset(
        texts=tuple(t for c in clients for t in c.train.texts), labels=tuple(t for c in clients for t in c.train.labels)
    )
    config = BackboneConfig(num_labels=len(labels))

    def make_model() -> AdapterModel:
        return AdapterModel(load_backbone(config), make_method_config("lora"), labels=labels.names)

    shared = make_model()
    train_adapter(shared, encode(shared, union, labels), TrainConfig(epochs=global_epochs))
    local = TrainConfig(epochs=local_epochs, batch_size=16)
    reports = []
    for client in clients:
        train, test = encode(shared, client.train, labels), encode(shared, client.test, labels)
        reports.append(compare_on_client(make_model, shared.state(), train, test, local))
    mean = {
        key: statistics.mean(getattr(r, key).accuracy for r in reports)
        for key in ("global_model", "personalized", "local_only")
    }
    return [
        f"| {name} | {len(clients)} | {mean['global_model']:.4f} | {mean['personalized']:.4f} | "
        f"{mean['personalized'] - mean['global_model']:+.4f} | {mean['local_only']:.4f} |"
    ]


def personal(banking_clients: int, local_epochs: int) -> list[str]:
    synthetic = make_synthetic_dataset(SyntheticConfig())
    rows = [
        "| data | clients | global | personalized (head fine-tuned) | gain | local-only |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows += personalization_rows(
        "synthetic (8 users, by user)", synthetic, PartitionConfig(scheme="natural", num_partitions=8), 3, local_epochs
    )
    banking = load_splits(DataConfig(path=str(BANKING77))).train
    dirichlet = PartitionConfig(scheme="dirichlet", num_partitions=banking_clients, alpha=0.1)
    rows += personalization_rows("Banking77 Dirichlet α=0.1", banking, dirichlet, 1, local_epochs)
    intro = (
        f"Mean accuracy over clients on each client's local test split (LoRA r=8). Personalized: the "
        f"global model's head fine-tuned for {local_epochs} local epochs; local-only: adapter + head "
        f"trained from scratch for {local_epochs} local epochs on the client's data alone."
    )
    return [intro, "", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["baseline", "speed", "personal"], action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-examples", type=int, default=512)
    parser.add_argument("--speed-repeats", type=int, default=2)
    parser.add_argument("--banking-clients", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = {
        "baseline": baseline,
        "speed": lambda: speed(args.speed_examples, args.speed_repeats),
        "personal": lambda: personal(args.banking_clients, args.local_epochs),
    }
    lines = [f"torch {torch.__version__}, {args.threads} CPU threads, MiniLM-L6 default backbone.", ""]
    for name in args.only or list(sections):
        lines += [f"### {name}", "", *sections[name](), ""]
        print("\n".join(lines), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
