"""Errors of the exporter: the graph could not be built, does not compute what PyTorch does, or a bundle is bad."""

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


class BundleError(ExportError):
    """An export bundle is malformed or was changed after export (manifest, paths, sizes, sha256, adapter fit).

    Raised before anything in the bundle is used; the message names the file and the field.
    """
