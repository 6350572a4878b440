"""Tracing a module to an ONNX file with dynamic batch and sequence axes, and checking the file.

Exporter choice: torch's TorchScript exporter (``dynamo=False``). With torch 2.13 the dynamo
exporter cannot write opset 17 for this BERT (onnx's version converter fails on a Reduce node
and it falls back to opset 18), takes about 10x longer, and leaves ``graph.value_info`` that
slowed ONNX Runtime down. The trace bakes in Python-level branches of the model (e.g. the
sdpa mask shortcuts); the parity check on padded batches of other shapes is what catches a
branch that does not generalize.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from export.errors import ExportError

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"


def write_onnx(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: Sequence[str],
    path: Path,
    opset: int,
    static_inputs: Collection[str] = (),
) -> float:
    """Export ``module(**inputs)`` to ``path``; return the seconds the export took.

    Every (B, T) input and every output gets a dynamic batch axis; (B, T) inputs also a
    dynamic sequence axis. Inputs named in ``static_inputs`` (weights fed as inputs) keep
    the shapes they were traced with.
    """
    dynamic_axes: dict[str, dict[int, str]] = {
        name: {0: BATCH_AXIS, 1: SEQUENCE_AXIS} if tensor.dim() == 2 else {0: BATCH_AXIS}
        for name, tensor in inputs.items()
        if name not in static_inputs
    }
    dynamic_axes.update({name: {0: BATCH_AXIS} for name in output_names})
    module.eval()
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer and deprecation warnings say the trace may not generalize; the parity check decides.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                tuple(inputs.values()),  # positional, in the order of ``module.forward``'s parameters
                str(path),
                input_names=list(inputs),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
        except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as err:
            raise ExportError(f"torch.onnx could not export {type(module).__name__} at opset {opset}: {err}") from err
    seconds = time.perf_counter() - started
    check_onnx(path)
    return seconds


def check_onnx(path: Path) -> None:
    """Raise ExportError if ``path`` is not a valid ONNX model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"the exported graph {path.name} is not valid ONNX: {err}") from err


def make_overridable(path: Path, defaults: Mapping[str, np.ndarray]) -> None:
    """Give each graph input named in ``defaults`` an initializer of the same name and rewrite ``path``.

    ONNX Runtime feeds an active adapter's tensors to graph inputs by name, but Python's
    ``InferenceSession.run`` refuses to start while a plain graph input is missing from the
    feeds; an input that also has an initializer (an overridable initializer) may be left out.
    """
    model = onnx.load(str(path))
    inputs = {value.name for value in model.graph.input}
    missing = sorted(set(defaults) - inputs)
    if missing:
        # The tracer drops inputs the output does not depend on: such a tensor cannot be swapped.
        raise ExportError(
            f"the exported graph has no input for {len(missing)} per-user tensor(s), e.g. {missing[:3]}: "
            "the logits do not depend on them, so an adapter could not set them"
        )
    taken = {init.name for init in model.graph.initializer} & set(defaults)
    if taken:
        raise ExportError(f"graph inputs {sorted(taken)[:3]} already have initializers; cannot add defaults")
    model.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in defaults.items())
    onnx.save(model, str(path))
    check_onnx(path)


def describe_graph(path: Path) -> dict[str, Any]:
    """Opset and input/output names, dtypes and shapes (axis names for dynamic axes), read from the file."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "opset": opset,
        "inputs": [_describe_value(v) for v in model.graph.input],
        "outputs": [_describe_value(v) for v in model.graph.output],
    }


def _describe_value(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}
