"""The export report: what was written and how closely the graph matches PyTorch (report.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.bundle import MODEL_FILE
from export.parity import ParityResult


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how well the graph matches PyTorch (saved as report.json)."""

    out: Path
    mode: str
    method: str
    opset: int
    parity: ParityResult
    export_seconds: float  # torch.onnx alone
    total_seconds: float  # loading, export, parity and writing
    files: dict[str, int] = field(default_factory=dict)  # bytes per file (report and manifest excluded)

    def to_dict(self) -> dict[str, Any]:
        """The report as report.json holds it."""
        return {
            "out": str(self.out),
            "mode": self.mode,
            "method": self.method,
            "opset": self.opset,
            "parity": self.parity.to_dict(),
            "export_seconds": round(self.export_seconds, 3),
            "total_seconds": round(self.total_seconds, 3),
            "files": self.files,
        }

    def summary(self) -> dict[str, Any]:
        """One flat row per fact, for the command line."""
        return {
            "out": str(self.out),
            "mode": self.mode,
            "method": self.method,
            "opset": self.opset,
            "parity": "passed" if self.parity.passed else "failed",
            "max_abs_diff": f"{self.parity.max_abs_diff:.2e}",
            "argmax_agreement": f"{self.parity.argmax_agreement:.0%}",
            "parity_texts": self.parity.texts,
            "model_bytes": self.files.get(MODEL_FILE, 0),
            "total_seconds": round(self.total_seconds, 1),
        }
