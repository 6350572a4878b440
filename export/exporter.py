"""Entry point of ``fedadapt export``: an adapter folder becomes a parity-checked ONNX bundle.

Steps: check the request, load the adapter, write the graph (per mode) with tokenizer and
labels into a staging folder, load a fresh copy of the adapter and compare it with the
graph in ONNX Runtime, then write report and manifest and move the folder into place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer

import fedadapt
from export.bundle import (
    MODEL_FILE,
    REPORT_FILE,
    check_out_folder,
    file_entries,
    staged_folder,
    write_json,
    write_labels,
    write_manifest,
    write_tokenizer,
)
from export.config import ExportConfig
from export.errors import ExportError
from export.graph import describe_graph
from export.merged import export_merged
from export.parity import Feeds, ParityResult, check_parity, onnx_runner, tokenize_batches
from export.report import ExportReport
from fedadapt.errors import AdapterFolderError, ConfigError, FedAdaptError
from fedadapt.folder import load_adapter, read_manifest
from fedadapt.model import AdapterModel

logger = logging.getLogger(__name__)

GraphExporter = Callable[[AdapterModel, Path, int], float]
"""(live model, path of model.onnx, opset) → seconds; writes the graph without changing the model."""

GRAPH_EXPORTERS: dict[str, GraphExporter] = {"merged": export_merged}
EXPORTER_NAME = f"torch.onnx TorchScript exporter (dynamo=False), torch {torch.__version__}"


def export_adapter(config: ExportConfig) -> ExportReport:
    """Export ``config.adapter`` to ``config.out`` and check it; raise before writing anything on bad input."""
    started = time.perf_counter()
    export_graph = graph_exporter(config.mode)
    adapter_manifest = _read_adapter_manifest(config.adapter)
    check_out_folder(config.out, config.adapter, config.force)
    with staged_folder(config.out, config.force) as staging:
        written = _write_graph(config, staging, export_graph)
        parity = _check_parity(config, staging)
        files = {name: entry["bytes"] for name, entry in file_entries(staging).items()}
        graph = describe_graph(staging / MODEL_FILE)
        report = ExportReport(
            out=config.out,
            mode=config.mode,
            method=adapter_manifest["method"]["name"],
            opset=graph["opset"],
            parity=parity,
            export_seconds=written.seconds,
            total_seconds=time.perf_counter() - started,
            files=files,
        )
        write_json(staging / REPORT_FILE, report.to_dict())
        write_manifest(staging, _description(config, adapter_manifest, graph, written))
    logger.info("exported %s to %s (max abs diff %.1e)", config.adapter, config.out, parity.max_abs_diff)
    return report


def graph_exporter(mode: str) -> GraphExporter:
    """The graph writer of ``mode``; ConfigError for a mode this version cannot export."""
    if mode not in GRAPH_EXPORTERS:
        raise ConfigError(
            f"{mode} export is not available in this version of fedadapt; available modes: {sorted(GRAPH_EXPORTERS)}"
        )
    return GRAPH_EXPORTERS[mode]


def _read_adapter_manifest(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise ConfigError(
            f"adapter folder {adapter} does not exist; pass the folder `fedadapt train --out` wrote "
            "(or a simulation's final_adapter/)"
        )
    try:
        return read_manifest(adapter)
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFolderError(f"{adapter} has an unreadable manifest ({err}); save the adapter again") from err


def load_for_export(config: ExportConfig) -> AdapterModel:
    """Load the adapter folder in eval mode, turning a corrupt folder's low-level errors into a clear one."""
    try:
        return load_adapter(config.adapter, backbone=config.backbone).eval()
    except FedAdaptError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise AdapterFolderError(
            f"{config.adapter} is corrupt or truncated and cannot be loaded ({type(err).__name__}: {err}); "
            "save the adapter again"
        ) from err


@dataclass(frozen=True)
class _Written:
    seconds: float
    num_labels: int
    max_length: int


def _write_graph(config: ExportConfig, staging: Path, export_graph: GraphExporter) -> _Written:
    """Graph, tokenizer and labels from a model that is dropped afterwards (parity loads its own)."""
    model = load_for_export(config)
    seconds = export_graph(model, staging / MODEL_FILE, config.opset)
    write_tokenizer(staging, model.backbone.tokenizer)
    write_labels(staging, model.labels)
    return _Written(seconds, len(model.labels), _max_length(model))


def _check_parity(config: ExportConfig, staging: Path) -> ParityResult:
    reference = load_for_export(config)
    batches = _bundled_batches(reference, staging, config.texts)
    return check_parity(onnx_runner(staging / MODEL_FILE), reference, batches, config.atol, len(config.texts))


def _bundled_batches(reference: AdapterModel, staging: Path, texts: tuple[str, ...]) -> dict[str, Feeds]:
    """Parity batches from the adapter's tokenizer, after checking the bundled one tokenizes the same."""
    max_length = _max_length(reference)
    batches = tokenize_batches(reference.backbone.tokenizer, texts, max_length)
    bundled = tokenize_batches(AutoTokenizer.from_pretrained(str(staging)), texts, max_length)
    for name, feeds in batches.items():
        if any(not (feeds[k] == bundled[name][k]).all() for k in ("input_ids", "attention_mask")):
            raise ExportError(f"the bundled tokenizer.json tokenizes the parity texts differently ({name})")
    return batches


def _max_length(model: AdapterModel) -> int:
    """Tokens the backbone can position (BERT: max_position_embeddings)."""
    positions = getattr(model.backbone.model.config, "max_position_embeddings", None)
    return int(positions) if positions else int(model.backbone.tokenizer.model_max_length)


def _description(
    config: ExportConfig, adapter_manifest: dict[str, Any], graph: dict[str, Any], written: _Written
) -> dict[str, Any]:
    backbone = adapter_manifest["backbone"]
    return {
        "fedadapt_version": getattr(fedadapt, "__version__", "unknown"),
        "mode": config.mode,
        "exporter": EXPORTER_NAME,
        "adapter": {"method": adapter_manifest["method"]["name"], "schema_id": adapter_manifest["schema_id"]},
        "backbone": {"name_or_path": backbone["name_or_path"], "fingerprint": backbone["fingerprint"]},
        "num_labels": written.num_labels,
        "max_sequence_length": written.max_length,  # longer texts must be truncated by the app
        **graph,
    }
