"""int8 logit error against PyTorch on this host: the shipped graph (reduce_range=False) and a reduce_range=True copy.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_parity.py --adapter ADAPTER --data DATA [--texts 512]

Exports ``ADAPTER`` merged (fp32), quantizes the graph as ``fedadapt export --quantize int8`` does
and again with ``reduce_range=True``, and compares each graph's logits with the PyTorch model's on a
seeded sample of ``DATA``'s test split (batches of 32, padded to their longest text). It prints
whether this host's ONNX Runtime adds u8×s8 products with saturation (x86 AVX2 without VNNI), the
case in which export reports parity on the reduce_range copy (export/quantize.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # export/ is an app folder, not installed
    sys.path.insert(0, str(PROJECT_ROOT))

from export.evaluation import BATCH_SIZE, label_ids  # noqa: E402
from export.loading import load_for_export  # noqa: E402
from export.merged import export_merged  # noqa: E402
from export.parity import onnx_runner, torch_logits  # noqa: E402
from export.quantize import int8_products_saturate, quantize_graph  # noqa: E402
from fedadapt.data.splits import DataConfig, load_splits  # noqa: E402
from fedadapt.model.adapter_model import AdapterModel  # noqa: E402

SHIPPED, COPY = "int8 shipped (reduce_range=False)", "int8 reduce_range=True copy"


def write_graphs(model: AdapterModel, folder: Path) -> dict[str, Path]:
    """The fp32 merged graph and its two int8 copies in ``folder``, by name."""
    graphs = {"fp32": folder / "model.onnx", SHIPPED: folder / "model.int8.onnx", COPY: folder / "model.int8.rr.onnx"}
    export_merged(model, graphs["fp32"], 17)
    quantize_graph(graphs["fp32"], graphs[SHIPPED])  # as fedadapt export --quantize int8 does
    quantize_graph(graphs["fp32"], graphs[COPY], reduce_range=True)
    return graphs


def all_logits(model: AdapterModel, graphs: dict[str, Path], texts: list[str]) -> dict[str, np.ndarray]:
    """Logits of PyTorch ("pytorch") and of each graph on ``texts``, in batches padded to their longest text."""
    runners = {name: onnx_runner(path) for name, path in graphs.items()}
    logits: dict[str, list[np.ndarray]] = {name: [] for name in ["pytorch", *graphs]}
    for start in range(0, len(texts), BATCH_SIZE):
        batch = texts[start : start + BATCH_SIZE]
        encoded = model.backbone.tokenizer(batch, padding=True, truncation=True, max_length=model.max_text_tokens)
        feeds = {name: np.asarray(values, dtype=np.int64) for name, values in encoded.items()}
        logits["pytorch"].append(torch_logits(model, feeds))
        for name, run in runners.items():
            logits[name].append(run(feeds))
    return {name: np.concatenate(values) for name, values in logits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=512)
    args = parser.parse_args()
    model = load_for_export(args.adapter, None)
    test = load_splits(DataConfig(path=str(args.data))).test
    rows = np.sort(np.random.default_rng(0).choice(len(test), min(args.texts, len(test)), replace=False))
    texts, targets = [test.texts[i] for i in rows], label_ids(test, model.labels, args.data)[rows]
    with tempfile.TemporaryDirectory() as scratch:
        logits = all_logits(model, write_graphs(model, Path(scratch)), texts)
    saturates = int8_products_saturate()
    print(json.dumps({"host": platform.machine(), "host_saturates_u8s8": saturates, "texts": len(texts)}))
    reference = logits.pop("pytorch")
    for name, got in logits.items():
        diff = np.abs(got - reference)
        row: dict[str, object] = {"graph": name, "max_abs_diff": float(f"{diff.max():.3g}")}
        row["mean_abs_diff"] = float(f"{diff.mean():.3g}")
        row["argmax_agreement"] = round(float((got.argmax(-1) == reference.argmax(-1)).mean()), 4)
        row["accuracy"] = round(float((got.argmax(-1) == targets).mean()), 4)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
