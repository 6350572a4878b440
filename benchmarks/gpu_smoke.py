"""Server-side training and central evaluation on CUDA beside the CPU: examples per second, without Flower.

Run:  scripts/gpu_smoke.sh            (or: .venv/bin/python benchmarks/gpu_smoke.py [--examples 2048])

The default MiniLM-L6 with LoRA r=8 and a head, trained for one epoch on the built-in synthetic
task (what ``server-warmup-epochs`` does on a proxy set), then scored on it, on each device
present (the CPU always, CUDA when torch sees one, with bf16/fp16 autocast). Prints throughput
per device and the CUDA/CPU ratio, and fails if Flower got imported: a GPU box may not have it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from fedadapt.aggregate.server_training import train_on_proxy
    from fedadapt.data.batching import encode_dataset
    from fedadapt.data.label_map import LabelMap
    from fedadapt.data.synthetic import SyntheticConfig, make_synthetic_dataset
    from fedadapt.methods import make_method_config
    from fedadapt.model.adapter_model import AdapterModel
    from fedadapt.model.backbone import DEFAULT_BACKBONE, BackboneConfig, load_backbone
    from fedadapt.train.loop import TrainConfig, evaluate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1024, help="synthetic examples to train and score on")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the CPU run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = make_synthetic_dataset(SyntheticConfig(num_users=max(1, args.examples // 80), examples_per_user=80))
    data = data.sample(args.examples, 0)
    labels = LabelMap.from_labels(data.labels)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("torch sees no CUDA device: CPU figures only")
    else:
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    rows = []
    for device in devices:
        loaded = load_backbone(BackboneConfig(name_or_path=DEFAULT_BACKBONE, num_labels=len(labels), seed=0))
        model = AdapterModel(loaded, make_method_config("lora", size=8), labels=labels.names)
        encoded = encode_dataset(model.backbone.tokenizer, data, labels, 64)
        config = TrainConfig(epochs=1, batch_size=args.batch_size, max_length=64, device=device)
        run = train_on_proxy(model, model.state("shared"), encoded, config)
        model.load_state(run.state, "shared")
        start = time.perf_counter()
        scores = evaluate(model, encoded, batch_size=128, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        eval_rate = len(encoded) / (time.perf_counter() - start)
        rows.append((device, run.examples_per_second, eval_rate, run.final_loss, scores.accuracy))
    print(f"{'device':>6} {'train ex/s':>11} {'eval ex/s':>10} {'final loss':>11} {'accuracy':>9}")
    for device, train_rate, eval_rate, loss, accuracy in rows:
        print(f"{device:>6} {train_rate:>11.1f} {eval_rate:>10.1f} {loss:>11.4f} {accuracy:>9.3f}")
    if len(rows) == 2:
        print(f"CUDA / CPU: training {rows[1][1] / rows[0][1]:.1f}×, evaluation {rows[1][2] / rows[0][2]:.1f}×")
    if sys.modules.get("flwr") is not None:
        raise SystemExit("Flower was imported by the server-side training path")


if __name__ == "__main__":
    main()
