"""On-device training (issue 21): step time, prefix time, memory, file sizes and personal accuracy, on MiniLM.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/on_device.py [--layers 0 1 2] [--users 8] [--epochs 5]
      [--quick]   (tiny random BERT, 2 users: a smoke run of every step)

1. A global LoRA (r=8) adapter is trained centrally on every synthetic user's training part (1 epoch),
   the federated starting point a phone receives.
2. For each K in ``--layers`` it is exported as a swappable bundle with ``--on-device-training
   --train-layers K --quantize int8`` (batch 8 x 64 tokens): file sizes and export seconds.
3. One training step (8 x 64, 1 thread): eager PyTorch (the same top-of-model step, forward and
   backward), ONNX Runtime on ``train_step.onnx`` (the torch-free trainer's engine) and ExecuTorch on
   ``train_step.pte``; medians of ``--repeats`` after warm-up, and each runtime's ratio to PyTorch.
   The prefix per example (8 x 64, 1 thread) in ONNX Runtime (fp32 and int8) and in PyTorch.
4. Every synthetic user personalizes the global adapter on 75% of their examples and is scored on the
   rest: on the device (export/phone_trainer.py, ONNX Runtime) and the same personalization in PyTorch
   (the same split, batches, SGD and steps; the prefix states from torch). Accuracy before and after,
   the gain, and the gap between the two after-accuracies (goal: within 1 point). The device run is
   repeated with the int8 prefix (``--prefix-precision int8``); the export reports how far its states are
   from the fp32 prefix's.
5. The trainer's peak resident memory for one user, read from the child process's ru_maxrss.

Prints a markdown report and writes it with results.json to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from export.bundle_verify import STEP_INPUTS  # noqa: E402
from export.config import ExportConfig, OnDeviceConfig  # noqa: E402
from export.exporter import export_adapter  # noqa: E402
from export.loading import load_for_export  # noqa: E402
from export.on_device import eager_train_step, personal_part  # noqa: E402
from export.phone_trainer import (  # noqa: E402
    ExecuTorchStep,
    OrtStep,
    PersonalizeConfig,
    PhoneTrainer,
    personalize,
    plan_batches,
    split_examples,
)
from fedadapt.checkpoint.folder import save_adapter  # noqa: E402
from fedadapt.data.batching import encode_texts  # noqa: E402
from fedadapt.data.synthetic import SyntheticConfig, make_synthetic_dataset  # noqa: E402
from fedadapt.methods.registry import make_method_config  # noqa: E402
from fedadapt.model.adapter_model import AdapterModel  # noqa: E402
from fedadapt.model.backbone import DEFAULT_BACKBONE, BackboneConfig, load_backbone  # noqa: E402
from fedadapt.train.loop import TrainConfig, train_adapter  # noqa: E402
from fedadapt.train.prefix_cache import prefix_states  # noqa: E402

BATCH, TOKENS = 8, 64
EVAL_FRACTION = 0.25
LEARNING_RATE = 0.05


def train_global(backbone: str, data: Any, labels: tuple[str, ...], out: Path, quick: bool) -> Path:
    """The global adapter every user starts from: LoRA r=8 trained centrally, 1 epoch."""
    loaded = load_backbone(BackboneConfig(name_or_path=backbone, num_labels=len(labels)))
    model = AdapterModel(loaded, make_method_config("lora", size=8), labels=labels)
    ids = {name: i for i, name in enumerate(labels)}
    encoded = encode_texts(model.backbone.tokenizer, data.texts, [ids[x] for x in data.labels], TOKENS)
    config = TrainConfig(epochs=1, batch_size=16, max_length=TOKENS, device="cpu", max_steps=4 if quick else None)
    train_adapter(model, encoded, config)
    return save_adapter(model.eval(), out / "global")


def export_bundle(adapter: Path, layers: int, out: Path) -> tuple[Path, float]:
    bundle = out / f"bundle-k{layers}"
    on_device = OnDeviceConfig(
        train_layers=layers, batch_size=BATCH, sequence_length=TOKENS, learning_rate=LEARNING_RATE
    )
    started = time.perf_counter()
    # --quantize int8: the prefix's int8 copy too (prefix.int8.onnx), timed and scored beside the fp32 prefix.
    config = ExportConfig(
        adapter=adapter, out=bundle, mode="swappable", on_device=on_device, force=True, quantize="int8"
    )
    export_adapter(config)
    return bundle, time.perf_counter() - started


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_times(adapter: Path, bundle: Path, layers: int, repeats: int) -> dict[str, float]:
    """Seconds per training step (8 x 64, 1 thread) in PyTorch, ONNX Runtime and ExecuTorch, and the prefix."""
    torch.set_num_threads(1)
    model = load_for_export(adapter, None)
    part = personal_part(model, layers)
    step, names = eager_train_step(model, part)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, TOKENS, int(model.backbone.model.config.hidden_size), generator=generator)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[:, TOKENS // 2 :] = 0
    labels = torch.arange(BATCH) % len(model.labels)
    weights = torch.ones(BATCH)

    def torch_step() -> None:
        for param in step.parameters():
            param.grad = None
        loss, _ = step(hidden, mask, labels, weights)
        loss.backward()

    trainer = PhoneTrainer(bundle, threads=1)
    int8_prefix = PhoneTrainer(bundle, threads=1, prefix_precision="int8")
    tensors = trainer.start_tensors(next(iter(trainer.manifest["adapters"])))
    trained = {n: tensors[n] for n in trainer.section["trainable"]}
    batch = {
        "hidden": hidden.numpy(),
        "attention_mask": mask.numpy(),
        "labels": labels.numpy(),
        "weights": weights.numpy(),
    }
    assert isinstance(trainer.step, OrtStep)
    program = trainer.bundle / trainer.section["program"]
    executorch = ExecuTorchStep(program.read_bytes(), trainer.section["program_parameters"], program, threads=1)
    texts = [f"where is my card number {i} please tell me now" for i in range(BATCH)]
    below = {n: tensors[n] for n in trainer.section["prefix_inputs"]}
    fixed = trainer.tokenizer.encode_batch(texts)  # both prefixes see the step's 8 x 64 padded batch
    encoded = {
        "input_ids": torch.tensor([e.ids for e in fixed]),
        "attention_mask": torch.tensor([e.attention_mask for e in fixed]),
    }
    times = {
        "pytorch": median_seconds(torch_step, repeats),
        "onnxruntime": median_seconds(lambda: trainer.step(batch, trained), repeats),
        "executorch": median_seconds(lambda: executorch(batch, trained), repeats),
        "prefix_onnxruntime_per_example": median_seconds(lambda: trainer.prefix_states(texts, below), repeats) / BATCH,
        "prefix_int8_onnxruntime_per_example": median_seconds(lambda: int8_prefix.prefix_states(texts, below), repeats)
        / BATCH,
        "prefix_pytorch_per_example": median_seconds(lambda: prefix_states(model, encoded, part.frozen_layers), repeats)
        / BATCH,
    }
    torch.set_num_threads(os.cpu_count() or 1)
    return times


def write_user_csv(path: Path, texts: tuple[str, ...], labels: tuple[str, ...]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    return path


def torch_personalization(
    adapter: Path, trainer: PhoneTrainer, texts: tuple[str, ...], labels: np.ndarray, seed: int, epochs: int
) -> float:
    """The on-device recipe in PyTorch: same split, tokenization, batches, SGD; accuracy on the held-out part."""
    model = load_for_export(adapter, None)
    part = personal_part(model, trainer.section["train_layers"])
    train_rows, eval_rows = split_examples(len(texts), EVAL_FRACTION, seed)
    encodings = trainer.tokenizer.encode_batch([texts[i] for i in train_rows])
    input_ids = torch.tensor([e.ids for e in encodings])
    masks = torch.tensor([e.attention_mask for e in encodings])
    states = prefix_states(model, {"input_ids": input_ids, "attention_mask": masks}, part.frozen_layers)
    step, names = eager_train_step(model, part)
    params = dict(step.named_parameters())
    optimizer = torch.optim.SGD(
        [params[n] for n in names], lr=LEARNING_RATE, momentum=trainer.section["optimizer"]["momentum"]
    )
    steps = epochs * -(-len(train_rows) // BATCH)
    for rows in plan_batches(len(train_rows), BATCH, steps, seed):
        # The trainer's own padding of a short batch (zero-weight copies of its first row), on torch's states.
        batch = trainer.step_batch(states.numpy(), masks.numpy(), labels[train_rows], rows)
        optimizer.zero_grad()
        loss, _ = step(*(torch.from_numpy(batch[name]) for name in STEP_INPUTS))
        loss.backward()
        optimizer.step()
    live = dict(model.module.named_parameters())
    with torch.no_grad():
        for name, schema in names.items():
            live[schema].copy_(params[name])
        held = [texts[i] for i in eval_rows]
        feeds = {k: torch.from_numpy(v) for k, v in trainer.classifier.encode(held).items()}
        predictions = model(**feeds).logits.argmax(-1).numpy()
    return float((predictions == labels[eval_rows]).mean())


def personal_accuracy(adapter: Path, bundle: Path, users: dict[str, Any], out: Path, epochs: int) -> dict[str, Any]:
    """Per user: accuracy before, after on the device (ONNX Runtime), after in PyTorch."""
    rows: list[dict[str, float]] = []
    label_names = None
    for index, (user, (texts, labels)) in enumerate(sorted(users.items())):
        work = Path(tempfile.mkdtemp(dir=out))
        data = write_user_csv(work / f"{user}.csv", texts, labels)
        source = next(iter(json.loads((bundle / "manifest.json").read_text())["adapters"]))
        runs = {}
        for precision in ("fp32", "int8"):  # the same user, split and steps on each prefix, from the same start
            copy = Path(shutil.copytree(bundle, work / f"bundle-{precision}"))
            runs[precision] = personalize(
                PersonalizeConfig(
                    bundle=copy,
                    user=user,
                    data=data,
                    start_from=source,
                    epochs=epochs,
                    eval_fraction=EVAL_FRACTION,
                    seed=index,
                    prefix_precision=precision,
                )
            )
        report, int8 = runs["fp32"], runs["int8"]
        trainer = PhoneTrainer(bundle)
        label_names = label_names or trainer.classifier.labels_of(source)
        ids = np.array([label_names.index(x) for x in labels])
        in_torch = torch_personalization(adapter, trainer, texts, ids, index, epochs)
        assert report.accuracy_before is not None and report.accuracy_after is not None
        assert int8.accuracy_after is not None
        rows.append(
            {
                "before": report.accuracy_before,
                "device": report.accuracy_after,
                "device_int8_prefix": int8.accuracy_after,
                "pytorch": in_torch,
                "train_seconds": report.train_seconds,
            }
        )
        shutil.rmtree(work)
    mean = {key: statistics.mean(r[key] for r in rows) for key in ("before", "device", "device_int8_prefix", "pytorch")}
    return {
        "users": dict(zip(sorted(users), rows, strict=True)),
        "mean": mean,
        "gap_points": 100 * (mean["device"] - mean["pytorch"]),
        "int8_prefix_gap_points": 100 * (mean["device_int8_prefix"] - mean["device"]),
    }


def trainer_peak_rss(bundle: Path, user: str, examples: tuple[tuple[str, ...], ...], out: Path) -> float:
    """MiB: the trainer process's peak resident set, personalizing one user (ru_maxrss of the child)."""
    work = Path(tempfile.mkdtemp(dir=out))
    copy = Path(shutil.copytree(bundle, work / "bundle"))
    data = write_user_csv(work / "u.csv", *examples)
    source = next(iter(json.loads((copy / "manifest.json").read_text())["adapters"]))
    command = [sys.executable, str(ROOT / "export" / "phone_trainer.py"), "personalize", str(copy), "--user", user]
    command += ["--from", source, "--data", str(data), "--threads", "1"]
    # A wrapper process runs the trainer and reports its children's peak: this process's own children
    # (the exports' workers) would otherwise count too.
    wrapper = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    wrapper += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True)
    peak = int(done.stdout.split()[-1])
    shutil.rmtree(work)
    return peak / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--examples-per-user", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 2 users: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-on-device")
    args = parser.parse_args()
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    backbone = DEFAULT_BACKBONE
    if args.quick:
        from tiny_bert import write_tiny_bert

        backbone = str(write_tiny_bert(out / "tiny-bert", sentence_transformers=True))
        args.users, args.repeats, args.layers = 2, 3, args.layers[:2]
    synthetic = SyntheticConfig(num_users=args.users, examples_per_user=args.examples_per_user)
    data = make_synthetic_dataset(synthetic)
    labels = synthetic.intents
    assert data.user_ids is not None
    users = {
        u: tuple(
            zip(
                *[(t, y) for t, y, who in zip(data.texts, data.labels, data.user_ids, strict=True) if who == u],
                strict=True,
            )
        )
        for u in sorted(set(data.user_ids))
    }
    # The global adapter sees each user's training part only: their held-out part stays unseen.
    seen = []
    for index, (_, (texts, ys)) in enumerate(sorted(users.items())):
        train_rows, _ = split_examples(len(texts), EVAL_FRACTION, index)
        seen += [(texts[i], ys[i]) for i in train_rows]
    from fedadapt.data.dataset import TextDataset

    global_data = TextDataset(tuple(t for t, _ in seen), tuple(y for _, y in seen), source="synthetic users")
    adapter = train_global(backbone, global_data, labels, out, args.quick)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "layers": {}}
    first_user = sorted(users)[0]
    for layers in args.layers:
        bundle, export_seconds = export_bundle(adapter, layers, out)
        manifest = json.loads((bundle / "manifest.json").read_text())
        section = manifest["on_device_training"]
        files = ("prefix", "prefix_int8", "train_step", "program")
        sizes = {key: manifest["files"][section[key]]["bytes"] for key in files}
        prefix_int8 = json.loads((bundle / "report.json").read_text())["on_device_training"]["prefix_int8"]
        adapter_bytes = manifest["files"][next(iter(manifest["adapters"].values()))["file"]]["bytes"]
        entry = {
            "export_seconds": export_seconds,
            "bytes": {**sizes, "adapter": adapter_bytes},
            "step_seconds": step_times(adapter, bundle, layers, args.repeats),
            "accuracy": personal_accuracy(adapter, bundle, users, out, args.epochs),
            "trainer_peak_rss_mib": trainer_peak_rss(bundle, first_user, users[first_user], out),
            "prefix_int8_vs_fp32": prefix_int8["vs_fp32"],
        }
        results["layers"][layers] = entry
        print(json.dumps({layers: entry}, indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    (out / "results.md").write_text(report)
    print(report)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}`", ""]
    lines += [
        "| K | PyTorch step (ms) | ONNX Runtime step (ms) | ExecuTorch step (ms) | ORT / PyTorch "
        "| ExecuTorch / PyTorch | prefix per example, ORT (ms) | prefix per example, PyTorch (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layers, entry in results["layers"].items():
        t = entry["step_seconds"]
        lines.append(
            f"| {layers} | {1e3 * t['pytorch']:.2f} | {1e3 * t['onnxruntime']:.2f} | {1e3 * t['executorch']:.2f} "
            f"| {t['onnxruntime'] / t['pytorch']:.2f}x | {t['executorch'] / t['pytorch']:.2f}x "
            f"| {1e3 * t['prefix_onnxruntime_per_example']:.2f} | {1e3 * t['prefix_pytorch_per_example']:.2f} |"
        )
    lines += [
        "",
        "| K | before | on device (ORT) | PyTorch | device - PyTorch (points) | prefix.onnx | train_step.onnx "
        "| train_step.pte | adapter | trainer peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layers, entry in results["layers"].items():
        mean, sizes = entry["accuracy"]["mean"], entry["bytes"]
        lines.append(
            f"| {layers} | {mean['before']:.3f} | {mean['device']:.3f} | {mean['pytorch']:.3f} "
            f"| {entry['accuracy']['gap_points']:+.2f} | {sizes['prefix'] / 2**20:.1f} MB "
            f"| {sizes['train_step'] / 2**20:.2f} MB | {sizes['program'] / 2**20:.2f} MB "
            f"| {sizes['adapter'] / 2**10:.0f} KB | {entry['trainer_peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "| K | prefix per example, fp32 (ms) | int8 (ms) | int8 / fp32 | prefix.onnx | prefix.int8.onnx "
        "| states: max abs diff | relative error | after, fp32 prefix | after, int8 prefix | int8 - fp32 (points) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layers, entry in results["layers"].items():
        t, sizes, mean = entry["step_seconds"], entry["bytes"], entry["accuracy"]["mean"]
        fp32, int8 = t["prefix_onnxruntime_per_example"], t["prefix_int8_onnxruntime_per_example"]
        states = entry["prefix_int8_vs_fp32"]
        lines.append(
            f"| {layers} | {1e3 * fp32:.2f} | {1e3 * int8:.2f} | {int8 / fp32:.2f}x | {sizes['prefix'] / 2**20:.1f} MB "
            f"| {sizes['prefix_int8'] / 2**20:.1f} MB | {states['max_abs_diff']:.3g} | {states['relative_error']:.2%} "
            f"| {mean['device']:.3f} | {mean['device_int8_prefix']:.3f} "
            f"| {entry['accuracy']['int8_prefix_gap_points']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
