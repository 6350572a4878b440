"""Adapter methods side by side on the default MiniLM-L6: size, bytes, latency, hot-swap.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adapter_methods.py [--threads 2] [--out docs/adapter-methods.md]

Parameter counts for BERT-base come from the same code path on a meta-device BERT-base
(no weights are downloaded or allocated). Latency is the median of repeated eval forward
passes at batch 32 × seq 64, as a ratio to the bare backbone measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch
from transformers import BertConfig, BertModel

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.adapters import set_adapter_drop
from fedadapt.checkpoint.folder import save_adapter
from fedadapt.checkpoint.hotswap import AdapterSwitch
from fedadapt.delta.serialize import serialize_state
from fedadapt.model.backbone import SequenceClassifier
from fedadapt.model.pooling import PoolingConfig

METHODS = ["lora", "ffa-lora", "ia3", "prompt", "prefix", "bitfit", "houlsby", "pfeiffer", "parallel"]
# What the papers report for BERT-base-sized models (fraction of the backbone trained).
SEED_FIGURES = {"houlsby": "~3.6%", "pfeiffer": "~1.8%", "lora": "~0.3%"}
NUM_LABELS = 77
BATCH, SEQ = 32, 64


def bert_base_trainable(method: str) -> tuple[int, int]:
    """(trainable, backbone) parameters of ``method`` on BERT-base, built on the meta device."""
    with torch.device("meta"):
        encoder = BertModel(BertConfig(), add_pooling_layer=False)
        encoder.requires_grad_(False)
        model = SequenceClassifier(encoder, PoolingConfig("mean"), NUM_LABELS, 0.1)
    backbone = sum(p.numel() for p in encoder.parameters())
    # Meta tensors have no data to hash, so FFA-LoRA is counted as LoRA without its frozen A.
    applied = make_method_config("lora" if method == "ffa-lora" else method).apply(model)
    released = set(applied.released)
    for name, param in encoder.named_parameters():
        if name in released:
            param.requires_grad_(True)
    if method == "ffa-lora":
        for layer in applied.module.modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                layer.lora_A.requires_grad_(False)
    trainable = sum(p.numel() for p in applied.module.parameters() if p.requires_grad)
    return trainable, backbone


def median_forward_ms(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    model.eval()
    with torch.inference_mode():
        model(**inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def make_inputs(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (BATCH, SEQ), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def perturb(model: AdapterModel) -> None:
    """Non-zero adapters, so no method is timed on a shortcut path."""
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(0.01 * torch.randn_like(param))


def hot_swap_times(config: BackboneConfig, tmp: Path) -> dict[str, float]:
    folders = []
    for seed in range(2):
        model = AdapterModel(load_backbone(config), make_method_config("pfeiffer"))
        torch.manual_seed(seed)
        perturb(model)
        folders.append(save_adapter(model, tmp / f"user{seed}"))
    switch = AdapterSwitch(load_backbone(config))
    switch.add("user0", folders[0])
    switch.add("user1", folders[1])
    start = time.perf_counter()
    for i in range(1000):
        switch.activate(f"user{i % 2}")
    activate_us = (time.perf_counter() - start) * 1e6 / 1000
    start = time.perf_counter()
    load_backbone(config)
    reload_ms = (time.perf_counter() - start) * 1000
    return {"activate_us": activate_us, "reload_backbone_ms": reload_ms}


def run(threads: int, repeats: int) -> str:
    torch.set_num_threads(threads)
    config = BackboneConfig(num_labels=NUM_LABELS)
    bare = load_backbone(config)
    inputs = make_inputs(bare.tokenizer.vocab_size)
    bare_ms = median_forward_ms(bare.model, inputs, repeats)
    backbone_params = sum(p.numel() for p in bare.frozen.params.values())
    rows = []
    for method in METHODS:
        model = AdapterModel(load_backbone(config), make_method_config(method))
        perturb(model)
        _, trainable = model.num_parameters()
        state = model.state()
        fp32 = len(serialize_state(state, model.schema, None, "none"))
        fp16 = len(serialize_state(state, model.schema, None, "fp16"))
        # The bare backbone is timed again right before each method: the ratio stays fair
        # when the load on a shared machine drifts during the run.
        latency = median_forward_ms(model.module, inputs, repeats) / median_forward_ms(bare.model, inputs, repeats)
        drop = ""
        if method in ("houlsby", "pfeiffer", "parallel"):
            set_adapter_drop(model.module.backbone, 3)
            dropped_ms = median_forward_ms(model.module, inputs, repeats)
            drop = f"{dropped_ms / median_forward_ms(bare.model, inputs, repeats):.2f}×"
        base_trainable, base_backbone = bert_base_trainable(method)
        rows.append(
            f"| {method} | {trainable:,} | {100 * trainable / backbone_params:.2f}% | "
            f"{100 * base_trainable / base_backbone:.2f}% | {SEED_FIGURES.get(method, '')} | "
            f"{fp32 / 1024:.0f} KB | {fp16 / 1024:.0f} KB | {latency:.2f}× | {drop} |"
        )
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        swap = hot_swap_times(config, Path(tmp))
    header = (
        f"MiniLM-L6 (22.6M backbone params), {NUM_LABELS}-class head, {threads} CPU threads, "
        f"torch {torch.__version__}. Bare backbone forward at batch {BATCH} × seq {SEQ}: {bare_ms:.0f} ms "
        f"(median of {repeats}).\n\n"
        "| method | trainable (incl. head) | % of MiniLM | % of BERT-base (same config) | papers, BERT-base |"
        " state fp32 | state fp16 | latency vs bare | with AdapterDrop k=3 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    footer = (
        f"\nHot-swap between two loaded Pfeiffer adapters (AdapterSwitch.activate): "
        f"{swap['activate_us']:.1f} µs per switch; reloading the backbone instead: "
        f"{swap['reload_backbone_ms']:.0f} ms.\n"
    )
    return header + "\n".join(rows) + "\n" + footer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args()
    table = run(args.threads, args.repeats)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
