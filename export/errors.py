"""Errors of the exporter: the graph could not be built, or it does not compute what PyTorch does."""

from __future__ import annotations

from collections.abc import Sequence

from fedadapt.errors import FedAdaptError


class ExportError(FedAdaptError):
    """The ONNX export failed; nothing was written to the output folder."""


class ExportParityError(ExportError):
    """The ONNX graph's outputs differ from PyTorch's; ``mismatches`` has one line per output."""

    def __init__(self, message: str, mismatches: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.mismatches = list(mismatches)
