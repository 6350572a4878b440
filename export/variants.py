"""The bundle's extra graphs (int8, ``.ort``): writing them, checking they load and run, and reporting them.

The fp32 graph has passed the parity check (1e-4) before any of this runs. An int8 graph is not
held to that: its argmax agreement and max abs diff with a freshly loaded PyTorch model are
reported, and the export fails only if the graph cannot be loaded or run. On x86 hosts those
figures come from a ``reduce_range`` copy, which computes what the phone does (export/quantize.py);
the shipped graph's own figures on this host are reported beside them. An ``.ort`` copy must
compute what its ``.onnx`` does (fp32: within the parity tolerance; int8: reported).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from export.bundle_verify import ORT_ERRORS
from export.config import ExportConfig
from export.errors import ExportError
from export.evaluation import evaluate
from export.loading import bundled_batches, load_for_export
from export.ort_format import convert_to_ort, ort_file
from export.parity import Feeds, RunGraph, measure_parity
from export.quantize import QUANTIZATION, REDUCE_RANGE, int8_file, parity_quantization, quantize_graph
from fedadapt.model.adapter_model import AdapterModel

_T = TypeVar("_T")

MakeRunner = Callable[[Path], RunGraph]
"""graph path → a runner of that graph (swappable: with the exported user's adapter active)."""


@dataclass
class Variants:
    """What the extra graphs add: the manifest's ``graphs`` table and the report's sections."""

    graphs: dict[str, dict[str, str]] = field(default_factory=dict)  # file → {"precision", "format", "source"?}
    report: dict[str, Any] = field(default_factory=dict)  # "int8", "ort", "eval"


def write_variants(
    config: ExportConfig, staging: Path, graph_file: str, make_runner: MakeRunner, per_user: Collection[str] = ()
) -> Variants:
    """Write the int8 and ``.ort`` graphs ``config`` asks for beside ``graph_file``, check and describe them."""
    variants = Variants(graphs={graph_file: {"precision": "fp32", "format": "onnx"}})
    if config.quantize is None and not config.ort and config.eval_data is None:
        return variants
    reference = load_for_export(config.adapter, config.backbone)
    batches = bundled_batches(reference, staging, config.texts)
    runners = {graph_file: make_runner(staging / graph_file)}
    if config.quantize == "int8":
        quantized = int8_file(graph_file)
        seconds = quantize_graph(staging / graph_file, staging / quantized, per_user)
        runners[quantized] = _loaded(make_runner, staging / quantized)
        measure = partial(_vs_pytorch, reference=reference, batches=batches, config=config)
        fp32_bytes, int8_bytes = (staging / graph_file).stat().st_size, (staging / quantized).stat().st_size
        variants.graphs[quantized] = {"precision": "int8", "format": "onnx", "source": graph_file}
        variants.report["int8"] = {
            "graph": quantized,
            "quantization": QUANTIZATION,
            "quantize_seconds": round(seconds, 3),
            "bytes": int8_bytes,
            "fp32_bytes": fp32_bytes,
            "size_ratio": round(fp32_bytes / int8_bytes, 3),
            **_int8_parity(staging, graph_file, runners[quantized], make_runner, per_user, measure),
        }
    if config.ort:
        variants.report["ort"] = _write_ort(config, staging, runners, batches, variants.graphs, make_runner)
    if config.eval_data is not None:
        onnx_graphs = {file: runners[file] for file, entry in variants.graphs.items() if entry["format"] == "onnx"}
        variants.report["eval"] = evaluate(config.eval_data, reference, onnx_graphs)
    return variants


def _int8_parity(
    staging: Path,
    graph_file: str,
    shipped: RunGraph,
    make_runner: MakeRunner,
    per_user: Collection[str],
    measure: Callable[[str, RunGraph], dict[str, Any]],
) -> dict[str, Any]:
    """``vs_pytorch``: what the phone computes (x86 hosts: a reduce_range copy); and the shipped graph on this host."""
    quantized, how = int8_file(graph_file), parity_quantization()
    on_host = measure(quantized, shipped)
    measured_on, figures = quantized, on_host
    if how["reduce_range"] != REDUCE_RANGE:
        measured_on = f"a copy of {quantized} quantized with reduce_range={how['reduce_range']} (not in the bundle)"
        # In the staging folder, removed before its files are listed for the manifest.
        with tempfile.TemporaryDirectory(prefix=".int8-parity-", dir=staging) as scratch:
            path = Path(scratch) / quantized
            quantize_graph(staging / graph_file, path, per_user, reduce_range=how["reduce_range"])
            figures = measure(measured_on, _loaded(make_runner, path))
    return {
        "vs_pytorch": {**figures, "measured_on": measured_on, **how},
        "shipped_graph_on_this_host": {**on_host, "graph": quantized, "host": how["host"]},
    }


def _vs_pytorch(
    name: str, run_graph: RunGraph, reference: AdapterModel, batches: dict[str, Feeds], config: ExportConfig
) -> dict[str, Any]:
    """Max abs diff and argmax agreement of ``run_graph`` with the freshly loaded PyTorch model on the parity texts."""
    texts = len(config.texts)
    parity = _run_checked(name, lambda: measure_parity(run_graph, reference, batches, config.atol, texts))
    return {"max_abs_diff": parity.max_abs_diff, "argmax_agreement": parity.argmax_agreement, "texts": texts}


def _write_ort(
    config: ExportConfig,
    staging: Path,
    runners: dict[str, RunGraph],
    batches: dict[str, Feeds],
    graphs: dict[str, dict[str, str]],
    make_runner: MakeRunner,
) -> dict[str, Any]:
    """An ``.ort`` copy of every ``.onnx`` graph in ``graphs``; fp32 copies must match their source."""
    report = {}
    for source, entry in list(graphs.items()):
        target = ort_file(source)
        seconds = convert_to_ort(staging / source, staging / target)
        runners[target] = _loaded(make_runner, staging / target)  # ONNX Runtime reads .ort files directly
        diff, agreement = _run_checked(target, partial(_compare_graphs, runners[source], runners[target], batches))
        if entry["precision"] == "fp32" and (diff > config.atol or agreement < 1.0):
            raise ExportError(
                f"{target} does not compute what {source} does (max diff = {diff:.3g}, argmax agreement "
                f"{agreement:.0%}); export without --ort, and report it with ONNX Runtime's version"
            )
        graphs[target] = {"precision": entry["precision"], "format": "ort", "source": source}
        report[target] = {
            "source": source,
            "seconds": round(seconds, 3),
            "bytes": (staging / target).stat().st_size,
            "max_abs_diff_vs_onnx": diff,
            "argmax_agreement_vs_onnx": agreement,
        }
    return report


def _compare_graphs(first: RunGraph, second: RunGraph, batches: dict[str, Feeds]) -> tuple[float, float]:
    """Max abs diff and argmax agreement (over all rows) of two graphs' logits."""
    pairs = [(first(feeds), second(feeds)) for feeds in batches.values()]
    diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    agreement = float(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in pairs]).mean())
    return diff, agreement


def _loaded(make_runner: MakeRunner, path: Path) -> RunGraph:
    """``make_runner(path)``; ExportError if ONNX Runtime cannot load the graph."""
    try:
        return make_runner(path)
    except ORT_ERRORS as err:
        raise ExportError(f"ONNX Runtime cannot load {path.name}: {err}; nothing was written") from err


def _run_checked(name: str, run: Callable[[], _T]) -> _T:
    """``run()``; ExportError if ONNX Runtime fails while running the graph ``name``."""
    try:
        return run()
    except ORT_ERRORS as err:
        raise ExportError(f"ONNX Runtime cannot run {name}: {err}; nothing was written") from err
