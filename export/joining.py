"""Adding a user's adapter to an existing swappable bundle: only ``adapters/<name>.onnx_adapter`` is new.

The adapter must fit the layout ``backbone.onnx`` was built for (export/layout.py). Its file is
written beside its final path, checked through the bundle's ``backbone.onnx`` against a freshly
loaded PyTorch model, and only then renamed into place together with the rewritten report.json
and manifest.json (last): a failure at any step leaves the bundle as it was.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from export.bundle import (
    MANIFEST_FILE,
    REPORT_FILE,
    committed_files,
    file_entry,
    read_bundle_manifest,
    write_json,
    write_manifest,
)
from export.bundle_verify import REQUIRED_OPERATORS, bundle_path, check_files, read_report
from export.config import ExportConfig
from export.errors import BundleError
from export.layout import layout_differences, layout_of
from export.loading import check_against_fresh_model, load_for_export
from export.ort_adapters import adapter_runner, write_adapter_file
from export.report import ExportReport
from export.swappable import BACKBONE_FILE, adapter_entry, adapter_file, per_user_tensors
from fedadapt.errors import ConfigError, SchemaMismatch

logger = logging.getLogger(__name__)


def join_bundle(config: ExportConfig, adapter_manifest: dict[str, Any], started: float) -> ExportReport:
    """Add ``config.adapter`` as ``config.user_name`` to the swappable bundle ``config.out``; return the report."""
    bundle, name = config.out, config.user_name
    manifest = read_bundle_manifest(bundle)  # checked: fields, and every path it names stays inside the bundle
    _check_can_join(config, manifest, adapter_manifest)
    earlier_report = read_report(bundle, manifest)
    earlier = earlier_report.get("adapters", {})
    # The graphs do not change: their int8, .ort and operator sections (made with the first adapter) carry over.
    carried = ("int8", "ort", REQUIRED_OPERATORS)
    variants: dict[str, Any] = {key: earlier_report[key] for key in carried if key in earlier_report}
    graph_file = manifest.get("graph", BACKBONE_FILE)
    where = str(bundle / MANIFEST_FILE)
    with committed_files(bundle) as temp:  # refuses adapters/ (or any target) that is a symlink
        adapter_path = temp(adapter_file(name))
        seconds = _write_adapter(config, adapter_path)
        graph = adapter_runner(bundle_path(bundle, graph_file, where), adapter_path)
        parity = check_against_fresh_model(graph, config, bundle)
        for other in manifest.get("graphs", {}):
            if other != graph_file:  # the int8 and .ort copies take the same adapter files: check it fits them
                adapter_runner(bundle_path(bundle, other, where), adapter_path)
        files = {**manifest["files"], adapter_file(name): file_entry(adapter_path)}
        method = adapter_manifest["method"]["name"]
        report = ExportReport(
            out=bundle,
            mode="swappable",
            method=method,
            opset=manifest["opset"],
            parity=parity,
            export_seconds=seconds,
            total_seconds=time.perf_counter() - started,
            files={path: entry["bytes"] for path, entry in files.items() if path != REPORT_FILE},
            graph_file=graph_file,
            adapter=name,
            adapters={**earlier, name: {"file": adapter_file(name), "method": method, "parity": parity.to_dict()}},
            variants=variants,
        )
        report_path = temp(REPORT_FILE)
        write_json(report_path, report.to_dict())
        files[REPORT_FILE] = file_entry(report_path)
        description = {key: value for key, value in manifest.items() if key not in ("format", "files")}
        description["adapters"] = {**manifest["adapters"], name: adapter_entry(name, adapter_manifest)}
        write_manifest(bundle, description, files=files, path=temp(MANIFEST_FILE))  # last: commits the update
    logger.info("added %s to %s as %r (max abs diff %.1e)", config.adapter, bundle, name, parity.max_abs_diff)
    return report


def _check_can_join(config: ExportConfig, manifest: dict[str, Any], adapter_manifest: dict[str, Any]) -> None:
    """Refuse a taken name (without --force), an adapter of another layout, or a bundle changed since export."""
    bundle, name = config.out, config.user_name
    if name in manifest.get("adapters", {}) and not config.force:
        raise ConfigError(
            f"the swappable bundle {bundle} already has an adapter named {name!r}; pass --adapter-name to add "
            "this one under another name, or --force to replace it"
        )
    differences = layout_differences(manifest.get("layout", {}), layout_of(adapter_manifest))
    if differences:
        raise SchemaMismatch(
            f"{config.adapter} cannot join the swappable bundle {bundle}: its {BACKBONE_FILE} was built for another "
            "adapter layout, and this adapter differs in:\n  - " + "\n  - ".join(differences) + "\n"
            "Export this adapter to another --out folder (a bundle of its own), or train it with the bundle's "
            "method settings, backbone and number of labels."
        )
    _check_graphs_requested(config, manifest)
    check_files(bundle, manifest)  # every file: sizes first, then sha256
    if manifest.get("opset") is None:
        raise BundleError(f"{bundle / MANIFEST_FILE} records no opset; export the bundle again")


def _check_graphs_requested(config: ExportConfig, manifest: dict[str, Any]) -> None:
    """Refuse --quantize, --ort or --eval-data that the bundle's existing graphs cannot honour.

    Adding a user writes only the adapter file: the graphs (and their int8 and .ort copies) were
    made when the bundle was created, and the adapter's fp32 tensors fit all of them.
    """
    graphs = manifest.get("graphs", {}).values()
    where = f"the swappable bundle {config.out}"
    if config.quantize is not None and not any(g.get("precision") == config.quantize for g in graphs):
        raise ConfigError(
            f"{where} has no {config.quantize} graph, and adding an adapter does not change the graphs; "
            f"export to a new --out with --quantize {config.quantize}, then add the other users to it"
        )
    if config.ort and not any(g.get("format") == "ort" for g in graphs):
        raise ConfigError(
            f"{where} has no .ort graph, and adding an adapter does not change the graphs; "
            "export to a new --out with --ort, then add the other users to it"
        )
    if config.eval_data is not None:
        raise ConfigError(f"--eval-data is not supported when adding an adapter to {where}; leave it out")


def _write_adapter(config: ExportConfig, path: Path) -> float:
    """Write the adapter's per-user tensors to ``path`` from a model that is dropped afterwards; return seconds."""
    model = load_for_export(config.adapter, config.backbone)
    started = time.perf_counter()
    write_adapter_file(path, per_user_tensors(model))
    return time.perf_counter() - started
