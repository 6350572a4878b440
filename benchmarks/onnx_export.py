"""ONNX export of a LoRA r=8 adapter with a 77-class head: latency, file sizes and export time, in one run.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_export.py [--backbone PATH] [--repeats 15] [--out FILE]

Builds the adapter on the default MiniLM-L6 (LoRA B drawn at random so the adapter is not the
identity), exports it merged and swappable, each fp32 and int8 (``fedadapt export --quantize
int8``), and a plain backbone + head graph, fp32 and int8 (the exporter's ``quantize_graph``).
Then it times, interleaved repeat by repeat, median latency at batch 1 × seq 32 and batch 32 ×
seq 64 with 1 and 2 intra-op threads (no spinning) for: the plain graph, merged, swappable with
its adapter active, the three int8 graphs, and PyTorch eager (LoRA unmerged). Ratios are against
the plain graph and against eager; the int8 speed-up an adapter keeps is its graph's
fp32/int8 ratio over the plain graph's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # export/ is an app folder, not installed
    sys.path.insert(0, str(PROJECT_ROOT))

from export.config import ExportConfig, Mode  # noqa: E402
from export.exporter import export_adapter  # noqa: E402
from export.graph import write_onnx  # noqa: E402
from export.merged import OUTPUT_NAME, LogitsGraph, dummy_inputs  # noqa: E402
from export.quantize import quantize_graph  # noqa: E402
from export.report import ExportReport  # noqa: E402
from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config  # noqa: E402
from fedadapt.checkpoint.folder import save_adapter  # noqa: E402
from fedadapt.model.backbone import DEFAULT_BACKBONE  # noqa: E402

NUM_LABELS, RANK = 77, 8
SHAPES = ((1, 32), (32, 64))
THREADS = (1, 2)
Run = Callable[[dict[str, np.ndarray]], object]


def build_adapter(backbone: str, folder: Path) -> AdapterModel:
    """LoRA r=8 with a 77-class head; B drawn at random (small) so the adapter changes the logits."""
    model = AdapterModel(
        load_backbone(BackboneConfig(name_or_path=backbone, num_labels=NUM_LABELS)),
        make_method_config("lora", size=RANK),
    )
    generator = torch.Generator().manual_seed(0)
    state = {
        name: torch.randn(tensor.shape, generator=generator) * 0.02 if ".lora_B." in name else tensor
        for name, tensor in model.state().items()
    }
    model.load_state(state)
    save_adapter(model, folder)
    return model.eval()


def export_plain(backbone: str, path: Path) -> float:
    """The backbone with a 77-class head and no adapter, as one graph: the latency baseline."""
    classifier = load_backbone(BackboneConfig(name_or_path=backbone, num_labels=NUM_LABELS)).model
    vocab_size = int(classifier.config.vocab_size)
    return write_onnx(LogitsGraph(classifier).eval(), dummy_inputs(vocab_size), (OUTPUT_NAME,), path, 17)


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads that do not spin (spinning starves the others)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtRun:
    """One inference on a graph; a swappable graph with ``adapter`` active (kept here: the run options need it)."""

    def __init__(self, path: Path, threads: int, adapter: Path | None = None) -> None:
        self.session = session(path, threads)
        self.run_options = ort.RunOptions()
        self.adapter = ort.LoraAdapter()
        if adapter is not None:
            self.adapter.Load(str(adapter))
            self.run_options.add_active_adapter(self.adapter)

    def __call__(self, feeds: dict[str, np.ndarray]) -> object:
        """Logits for ``feeds``."""
        return self.session.run(["logits"], feeds, self.run_options)


def eager_run(model: AdapterModel) -> Run:
    """One PyTorch eager forward (LoRA unmerged); ``measure`` sets torch's thread count."""

    def run(feeds: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            return model(**{name: torch.from_numpy(values) for name, values in feeds.items()})

    return run


def feeds_for(batch: int, seq: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Random token ids (B, T) with a full attention mask."""
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(5, vocab_size, size=(batch, seq), dtype=np.int64)  # past [PAD] [UNK] [CLS] [SEP] [MASK]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def measure(runs: dict[int, dict[str, Run]], vocab_size: int, repeats: int) -> dict[tuple[str, int, str], float]:
    """Median ms per (variant, threads, shape); every repeat times each variant once (interleaved).

    ``runs`` maps a thread count to its variants. torch's thread count is global and its first
    forward after a change pays for resizing the pool, so each change is followed by an untimed run.
    """
    times: dict[tuple[str, int, str], list[float]] = {}
    feeds = {f"b{b}×s{s}": feeds_for(b, s, vocab_size) for b, s in SHAPES}
    for _ in range(repeats + 1):  # the first round warms up (first runs allocate) and is not recorded
        for threads, variants in runs.items():
            torch.set_num_threads(threads)
            variants["eager"](feeds[next(iter(feeds))])
            for name, run in variants.items():
                for shape, shape_feeds in feeds.items():
                    started = time.perf_counter()
                    run(shape_feeds)
                    times.setdefault((name, threads, shape), []).append(1000 * (time.perf_counter() - started))
    return {key: statistics.median(values[1:]) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the markdown figures to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_adapter(args.backbone, root / "adapter")
        plain_seconds = export_plain(args.backbone, root / "plain.onnx")
        plain_int8_seconds = quantize_graph(root / "plain.onnx", root / "plain.int8.onnx")  # as the exporter does
        reports: dict[str, ExportReport] = {}
        modes: tuple[Mode, ...] = ("merged", "swappable")
        for mode in modes:
            reports[mode] = export_adapter(ExportConfig(root / "adapter", root / mode, mode=mode, quantize="int8"))
        adapter = root / "swappable" / "adapters" / "adapter.onnx_adapter"
        paths = {
            "plain": (root / "plain.onnx", None),
            "merged": (root / "merged" / "model.onnx", None),
            "swappable": (root / "swappable" / "backbone.onnx", adapter),
            "plain int8": (root / "plain.int8.onnx", None),
            "merged int8": (root / "merged" / "model.int8.onnx", None),
            "swappable int8": (root / "swappable" / "backbone.int8.onnx", adapter),
        }
        runs: dict[int, dict[str, Run]] = {}
        for threads in THREADS:
            runs[threads] = {name: OrtRun(path, threads, active) for name, (path, active) in paths.items()}
            runs[threads]["eager"] = eager_run(model)
        vocab_size = int(model.backbone.model.config.vocab_size)
        medians = measure(runs, vocab_size, args.repeats)
        sizes = {name: path.stat().st_size for name, (path, _) in paths.items()}
        sizes["adapter"] = adapter.stat().st_size
    export_seconds = (plain_seconds, plain_int8_seconds)
    lines = render(args, medians, sizes, reports, export_seconds, time.perf_counter() - started)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def render(
    args: argparse.Namespace,
    medians: dict[tuple[str, int, str], float],
    sizes: dict[str, int],
    reports: dict[str, ExportReport],
    plain_seconds: tuple[float, float],
    total_seconds: float,
) -> list[str]:
    """The markdown: latency table with ratios, sizes and export times, int8 agreement.

    ``plain_seconds``: the plain graph's torch.onnx export and int8 quantization.
    """
    shapes = [f"b{b}×s{s}" for b, s in SHAPES]
    names = ["plain", "merged", "swappable", "plain int8", "merged int8", "swappable int8", "eager"]
    lines = [
        f"Backbone `{args.backbone}`, LoRA r={RANK} on q,v + {NUM_LABELS}-class head; median of {args.repeats} "
        f"interleaved repeats; torch {torch.__version__}, onnxruntime {ort.__version__}.",
        "",
        "| graph | threads | " + " | ".join(f"{s} ms | ×plain | ×eager" for s in shapes) + " |",
        "|---|---|" + "---|---|---|" * len(shapes),
    ]
    for threads in THREADS:
        for name in names:
            cells = []
            for shape in shapes:
                ms = medians[name, threads, shape]
                plain, eager = medians["plain", threads, shape], medians["eager", threads, shape]
                cells.append(f"{ms:.1f} | {ms / plain:.2f} | {eager / ms:.2f}× faster")
            lines.append(f"| {name} | {threads} | " + " | ".join(cells) + " |")
    lines += ["", "| file | MB |", "|---|---|"]
    lines += [f"| {name} | {size / 1e6:.2f} |" for name, size in sizes.items()]
    lines += ["", "| export | seconds (torch.onnx) | int8 quantize s | total s | int8 argmax agree | int8 max diff |"]
    lines += ["|---|---|---|---|---|---|", f"| plain | {plain_seconds[0]:.1f} | {plain_seconds[1]:.1f} | | | |"]
    for mode, report in reports.items():
        int8 = report.variants["int8"]
        lines.append(
            f"| {mode} | {report.export_seconds:.1f} | {int8['quantize_seconds']:.1f} | {report.total_seconds:.1f} | "
            f"{int8['vs_pytorch']['argmax_agreement']:.0%} | {int8['vs_pytorch']['max_abs_diff']:.3f} |"
        )
    lines += ["", f"Benchmark wall time: {total_seconds:.0f} s.", "", *goals(medians, sizes)]
    return lines


def goals(medians: dict[tuple[str, int, str], float], sizes: dict[str, int]) -> list[str]:
    """Which of the issue's goals this run met, at 2 threads (the phone-like setting)."""
    shapes = [f"b{b}×s{s}" for b, s in SHAPES]

    def worst(ratio: Callable[[str], float]) -> float:
        return max(ratio(shape) for shape in shapes)

    def best(ratio: Callable[[str], float]) -> float:
        return min(ratio(shape) for shape in shapes)

    def m(name: str, shape: str) -> float:
        return medians[name, 2, shape]

    swap = worst(lambda s: m("swappable", s) / m("plain", s))
    merged = worst(lambda s: m("merged", s) / m("plain", s))
    speedup = best(lambda s: m("eager", s) / m("merged", s))
    int8_speed = best(lambda s: m("merged", s) / m("merged int8", s))
    int8_size = sizes["merged"] / sizes["merged int8"]

    def kept(variant: str, shape: str) -> float:
        """The share of the plain graph's int8 speed-up that ``variant`` keeps: above 1 keeps all of it."""
        return (m(variant, shape) / m(f"{variant} int8", shape)) / (m("plain", shape) / m("plain int8", shape))

    kept_swap, kept_merged = best(partial(kept, "swappable")), best(partial(kept, "merged"))

    def per_shape(variant: str) -> str:
        return ", ".join(f"{shape}: {kept(variant, shape):.1%}" for shape in shapes)

    checks = [
        (f"swappable ≤ 1.03× the plain graph (worst shape, 2 threads: {swap:.2f}×)", swap <= 1.03),
        (f"merged LoRA 1.00× the plain graph (worst: {merged:.2f}×; within noise ≤ 1.02)", merged <= 1.02),
        (f"ORT ≥ 1.1× faster than eager (merged, least: {speedup:.2f}×)", speedup >= 1.1),
        (f"int8 ≥ 2× faster than fp32 (merged, least: {int8_speed:.2f}×)", int8_speed >= 2.0),
        (f"int8 ≥ 3.9× smaller (merged: {int8_size:.2f}×)", int8_size >= 3.9),
        (f"swappable int8 keeps ≥ 95% of plain's int8 speed-up ({per_shape('swappable')})", kept_swap >= 0.95),
        (f"merged int8 keeps ≥ 95% of plain's int8 speed-up ({per_shape('merged')})", kept_merged >= 0.95),
    ]
    return ["Goals (2 threads):", ""] + [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]


if __name__ == "__main__":
    main()
