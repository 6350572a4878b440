"""The export report: what was written and how closely the graph matches PyTorch (report.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.bundle import MODEL_FILE
from export.bundle_verify import REQUIRED_OPERATORS
from export.parity import ParityResult


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how well the graph matches PyTorch (saved as report.json)."""

    out: Path
    mode: str
    method: str
    opset: int
    parity: ParityResult
    export_seconds: float  # torch.onnx alone (swappable: and writing the adapter file; joining: that alone)
    total_seconds: float  # loading, export, parity and writing
    files: dict[str, int] = field(default_factory=dict)  # bytes per file (report and manifest excluded)
    graph_file: str = MODEL_FILE
    # Swappable mode: ``parity`` is that of ``adapter``, the adapter this run wrote; ``adapters``
    # holds every adapter of the bundle (name → {"file", "method", "parity"}), earlier ones as recorded.
    adapter: str | None = None
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Extra graphs (export/variants.py): "int8", "ort" and "eval" sections, when asked for; with --ort also
    # "required_operators" (export/required_operators.py).
    variants: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as report.json holds it."""
        report = {
            "out": str(self.out),
            "mode": self.mode,
            "method": self.method,
            "opset": self.opset,
            "parity": self.parity.to_dict(),
            "export_seconds": round(self.export_seconds, 3),
            "total_seconds": round(self.total_seconds, 3),
            "files": self.files,
        }
        if self.adapter is not None:
            report.update(adapter=self.adapter, adapters=self.adapters)
        return {**report, **self.variants}

    def summary(self) -> dict[str, Any]:
        """One flat row per fact, for the command line."""
        row = {
            "out": str(self.out),
            "mode": self.mode,
            "method": self.method,
            "opset": self.opset,
            "parity": "passed" if self.parity.passed else "failed",
            "max_abs_diff": f"{self.parity.max_abs_diff:.2e}",
            "argmax_agreement": f"{self.parity.argmax_agreement:.0%}",
            "parity_texts": self.parity.texts,
            "model_bytes": self.files.get(self.graph_file, 0),
            "total_seconds": round(self.total_seconds, 1),
        }
        if self.adapter is not None:
            row["adapter"] = self.adapter
            row["adapter_bytes"] = self.files.get(self.adapters[self.adapter]["file"], 0)
            row["adapters_in_bundle"] = ", ".join(sorted(self.adapters))
        return {**row, **self._variant_rows()}

    def _variant_rows(self) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        if "int8" in self.variants:
            int8 = self.variants["int8"]
            rows["int8_bytes"] = int8["bytes"]
            rows["int8_size_ratio"] = f"{int8['size_ratio']:.2f}x smaller"
            rows["int8_max_abs_diff"] = f"{int8['vs_pytorch']['max_abs_diff']:.2e}"
            rows["int8_argmax_agreement"] = f"{int8['vs_pytorch']['argmax_agreement']:.0%}"
            shipped = int8.get("shipped_graph_on_this_host")  # absent in bundles exported before it was added
            if shipped is not None and int8["vs_pytorch"].get("measured_on") != shipped["graph"]:
                rows["int8_measured_on"] = int8["vs_pytorch"]["measured_on"]
                rows["int8_max_abs_diff shipped graph here"] = f"{shipped['max_abs_diff']:.2e}"
        if "ort" in self.variants:
            rows["ort_files"] = ", ".join(sorted(self.variants["ort"]))
        if REQUIRED_OPERATORS in self.variants:
            operators = self.variants[REQUIRED_OPERATORS]
            rows[REQUIRED_OPERATORS] = f"{operators['file']} ({operators['operators']} operators)"
        if "eval" in self.variants:
            evaluation = self.variants["eval"]
            rows["eval_examples"] = evaluation["examples"]
            for file, accuracy in sorted(evaluation["accuracy"].items()):
                rows[f"accuracy {file}"] = f"{accuracy:.2%}"
            if "int8_change_points" in evaluation:
                rows["int8_accuracy_change"] = f"{evaluation['int8_change_points']:+.2f} points"
        return rows
