"""ORT format (``.ort``) copies of a bundle's graphs, for ONNX Runtime Mobile's minimal builds.

The conversion is what ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does (fixed
optimization style): load the graph with every graph optimization on, except the NCHWc layout
transformer, which is x86-only and would make the file unusable on ARM phones, and let ONNX
Runtime save the optimized graph in ORT format. Overridable initializers survive: a swappable
``backbone.ort`` still takes every user's ``.onnx_adapter`` (checked in tests/export/test_export.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnxruntime as ort

from export.errors import ExportError

logger = logging.getLogger(__name__)

# The converter's own list: optimizers that write device-specific graphs (onnxruntime.tools).
DISABLED_OPTIMIZERS = ["NchwcTransformer"]


def ort_file(graph_file: str) -> str:
    """The ORT-format name of ``graph_file``: model.int8.onnx → model.int8.ort."""
    return f"{graph_file.removesuffix('.onnx')}.ort"


def convert_to_ort(source: Path, target: Path) -> float:
    """Write ``source`` (an .onnx graph) to ``target`` in ORT format; return the seconds it took."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # one "initializer appears in graph inputs" warning per per-user tensor
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    started = time.perf_counter()
    try:
        ort.InferenceSession(
            str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS
        )
    except (RuntimeError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail) as err:
        raise ExportError(f"ONNX Runtime could not convert {source.name} to ORT format: {err}") from err
    if not target.is_file():
        raise ExportError(f"ONNX Runtime wrote no ORT-format file for {source.name}")
    seconds = time.perf_counter() - started
    logger.info("converted %s to %s in %.1f s", source.name, target.name, seconds)
    return seconds
