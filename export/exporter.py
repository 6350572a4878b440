"""Entry point of ``fedadapt export``: an adapter folder becomes a parity-checked ONNX bundle.

Steps: check the request, load the adapter, write the graph (per mode; swappable: with the
user's ``.onnx_adapter``), tokenizer and labels into a staging folder, load a fresh copy of the
adapter and compare it with the graph in ONNX Runtime, add the int8 and ``.ort`` copies and the
``--eval-data`` accuracy asked for (export/variants.py), with ``.ort`` copies the operator list of a
minimal ONNX Runtime build (export/required_operators.py), then write report and manifest and move
the folder into place. A swappable export to an existing swappable bundle adds the adapter to
that bundle instead (export/joining.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fedadapt
from export.bundle import (
    MODEL_FILE,
    REPORT_FILE,
    check_out_folder,
    file_entries,
    is_swappable_bundle,
    staged_folder,
    tokenizer_padding,
    write_json,
    write_labels,
    write_manifest,
    write_tokenizer,
)
from export.bundle_verify import REQUIRED_OPERATORS, REQUIRED_OPERATORS_FILE
from export.config import ExportConfig
from export.graph import describe_graph
from export.joining import join_bundle
from export.layout import layout_of
from export.loading import check_against_fresh_model, load_for_export, read_adapter_manifest
from export.merged import export_merged
from export.on_device import ON_DEVICE_SECTION, OnDeviceExport, write_on_device
from export.ort_adapters import adapter_runner, write_adapter_file
from export.parity import ParityResult, RunGraph, onnx_runner
from export.report import ExportReport
from export.required_operators import write_required_operators
from export.swappable import (
    BACKBONE_FILE,
    USAGE,
    adapter_entry,
    adapter_file,
    check_swappable,
    export_swappable,
    per_user_tensors,
    split_inputs,
)
from export.variants import MakeRunner, write_variants
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel

logger = logging.getLogger(__name__)

GraphExporter = Callable[[AdapterModel, Path, int], float]
"""(live model, path of the graph file, opset) → seconds; writes the graph without changing the model."""

GRAPH_EXPORTERS: dict[str, GraphExporter] = {"merged": export_merged, "swappable": export_swappable}
GRAPH_FILES: dict[str, str] = {"merged": MODEL_FILE, "swappable": BACKBONE_FILE}
EXPORTER_NAME = f"torch.onnx TorchScript exporter (dynamo=False), torch {torch.__version__}"


def export_adapter(config: ExportConfig) -> ExportReport:
    """Export ``config.adapter`` to ``config.out`` and check it; raise before writing anything on bad input."""
    started = time.perf_counter()
    export_graph = graph_exporter(config.mode)
    adapter_manifest = read_adapter_manifest(config.adapter)
    if config.mode == "swappable":
        check_swappable(adapter_manifest["method"]["name"])
        if is_swappable_bundle(config.out):
            return join_bundle(config, adapter_manifest, started)
    check_out_folder(config.out, config.adapter, config.force)
    graph_file = GRAPH_FILES[config.mode]
    with staged_folder(config.out, config.force) as staging:
        written = _write_files(config, staging, export_graph, graph_file)
        parity = _check_parity(config, staging, graph_file)
        variants = write_variants(
            config, staging, graph_file, _runner_maker(config, staging), _per_user(config, adapter_manifest)
        )
        if written.on_device is not None:
            variants.report[ON_DEVICE_SECTION] = written.on_device.report
        if config.ort:
            variants.report[REQUIRED_OPERATORS] = _write_required_operators(staging, variants.graphs, written)
        files = {name: entry["bytes"] for name, entry in file_entries(staging).items()}
        graph = describe_graph(staging / graph_file)
        report = ExportReport(
            out=config.out,
            mode=config.mode,
            method=adapter_manifest["method"]["name"],
            opset=graph["opset"],
            parity=parity,
            export_seconds=written.seconds,
            total_seconds=time.perf_counter() - started,
            files=files,
            graph_file=graph_file,
            variants=variants.report,
            **_swappable_report(config, adapter_manifest, parity),
        )
        write_json(staging / REPORT_FILE, report.to_dict())
        description = _description(config, adapter_manifest, graph, written)
        write_manifest(staging, {**description, "graphs": variants.graphs, **_operators_field(config)})
    logger.info("exported %s to %s (max abs diff %.1e)", config.adapter, config.out, parity.max_abs_diff)
    return report


def graph_exporter(mode: str) -> GraphExporter:
    """The graph writer of ``mode``; ConfigError for a mode this version cannot export."""
    if mode not in GRAPH_EXPORTERS:
        raise ConfigError(
            f"{mode} export is not available in this version of fedadapt; available modes: {sorted(GRAPH_EXPORTERS)}"
        )
    return GRAPH_EXPORTERS[mode]


@dataclass(frozen=True)
class _Written:
    seconds: float
    labels: tuple[str, ...]
    max_length: int
    padding: dict[str, Any]
    on_device: OnDeviceExport | None = None


def _write_files(config: ExportConfig, staging: Path, export_graph: GraphExporter, graph_file: str) -> _Written:
    """Graph (and adapter file), tokenizer and labels from a model that is dropped afterwards (parity loads its own)."""
    model = load_for_export(config.adapter, config.backbone)
    adapter_seconds = 0.0
    if config.mode == "swappable":
        started = time.perf_counter()
        (staging / adapter_file(config.user_name)).parent.mkdir()
        write_adapter_file(staging / adapter_file(config.user_name), per_user_tensors(model))
        adapter_seconds = time.perf_counter() - started
    seconds = export_graph(model, staging / graph_file, config.opset) + adapter_seconds
    on_device = None
    if config.on_device is not None:
        int8_texts = config.texts if config.quantize == "int8" else None  # the prefix is quantized as the graph is
        on_device = write_on_device(model, config.on_device, staging, config.opset, int8_texts)
    write_tokenizer(staging, model.backbone.tokenizer)
    write_labels(staging, model.labels)
    padding = tokenizer_padding(model.backbone.tokenizer)
    return _Written(seconds, model.labels, model.max_text_tokens, padding, on_device)


def _check_parity(config: ExportConfig, staging: Path, graph_file: str) -> ParityResult:
    run_graph: RunGraph
    if config.mode == "swappable":
        run_graph = adapter_runner(staging / graph_file, staging / adapter_file(config.user_name))
    else:
        run_graph = onnx_runner(staging / graph_file)
    return check_against_fresh_model(run_graph, config, staging)


def _runner_maker(config: ExportConfig, staging: Path) -> MakeRunner:
    """How to run a graph of this export: swappable graphs with the exported user's adapter active."""
    if config.mode == "swappable":
        adapter = staging / adapter_file(config.user_name)
        return lambda path: adapter_runner(path, adapter)
    return onnx_runner


def _write_required_operators(staging: Path, graphs: dict[str, dict[str, str]], written: _Written) -> dict[str, Any]:
    """required_operators.config for every graph the phone may run in ONNX Runtime: .ort copies, on-device graphs."""
    ort_graphs = [name for name, entry in graphs.items() if entry["format"] == "ort"]
    return write_required_operators(staging, ort_graphs, written.on_device.ort_graphs if written.on_device else ())


def _operators_field(config: ExportConfig) -> dict[str, str]:
    """The manifest's ``required_operators`` (``--ort`` bundles only): where a minimal build's operator list is."""
    return {REQUIRED_OPERATORS: REQUIRED_OPERATORS_FILE} if config.ort else {}


def _per_user(config: ExportConfig, adapter_manifest: dict[str, Any]) -> list[str]:
    """Names of the per-user graph inputs (swappable: every tensor of the adapter's schema; merged: none)."""
    if config.mode != "swappable":
        return []
    return [tensor["name"] for tensor in adapter_manifest["schema"]["tensors"]]


def _swappable_report(config: ExportConfig, adapter_manifest: dict[str, Any], parity: ParityResult) -> dict[str, Any]:
    if config.mode != "swappable":
        return {}
    name = config.user_name
    entry = {"file": adapter_file(name), "method": adapter_manifest["method"]["name"], "parity": parity.to_dict()}
    return {"adapter": name, "adapters": {name: entry}}


def _description(
    config: ExportConfig, adapter_manifest: dict[str, Any], graph: dict[str, Any], written: _Written
) -> dict[str, Any]:
    backbone = adapter_manifest["backbone"]
    description = {
        "fedadapt_version": getattr(fedadapt, "__version__", "unknown"),
        "mode": config.mode,
        "exporter": EXPORTER_NAME,
        "graph": GRAPH_FILES[config.mode],
        "backbone": {"name_or_path": backbone["name_or_path"], "fingerprint": backbone["fingerprint"]},
        "num_labels": len(written.labels),
        "max_sequence_length": written.max_length,  # longer texts must be truncated by the app
        "tokenizer": written.padding,
    }
    if config.mode == "merged":
        adapter = {"method": adapter_manifest["method"]["name"], "schema_id": adapter_manifest["schema_id"]}
        return {**description, "adapter": adapter, **graph}
    layout = layout_of(adapter_manifest)
    if written.on_device is not None:
        description[ON_DEVICE_SECTION] = written.on_device.manifest
    return {
        **description,
        "usage": USAGE,
        "layout": layout,
        "adapters": {config.user_name: adapter_entry(config.user_name, adapter_manifest)},
        **split_inputs(graph, {t["name"] for t in layout["tensors"]}),
    }
