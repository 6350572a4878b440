"""int8 graphs: ONNX Runtime dynamic quantization of the backbone's weights, per-user tensors kept fp32.

Dynamic quantization stores MatMul/Gemm weights and embedding tables as int8 and quantizes
activations at run time, so it needs no calibration data. Choices (``QUANTIZATION``):

- weight type QInt8 (symmetric, zero point 0): ONNX Runtime's recommended weight type for
  dynamic quantization of transformers on CPU.
- ``per_channel=True``: one scale per output column; BERT-style weight matrices have columns
  of very different ranges, and one scale per tensor would waste most of int8's range on them.
  It costs one fp32 scale per column (0.1 % of a 384x384 matrix). Measured on the Banking77
  LoRA adapter (MiniLM, 3,080 test texts): 83.1 % per channel vs 82.3 % per tensor, and no
  slower (292 vs 318 ms at batch 32 × seq 64, 2 threads).
- ``reduce_range=False``: 7-bit weights only help x86 CPUs without VNNI (where u8×s8 products
  can saturate); phones run ARM, whose int8 dot products do not saturate, so keep all 8 bits.

The int8 parity figures (report.json's ``int8.vs_pytorch``) are meant to say what the phone will
compute. ONNX Runtime's x86 int8 kernels for CPUs with AVX2 and without VNNI add u8×s8 products
in int16 pairs with saturation (``vpmaddubsw``), which phones' ARM kernels never do, so there the
shipped graph's error describes the host, not the phone. On such a host (x86, and a one-node probe
shows this ONNX Runtime saturating: ``int8_products_saturate``) the parity is measured on a
``reduce_range=True`` copy quantized in a scratch folder (7-bit weights: no product saturates),
and the shipped graph's own figure on this host is kept beside it (``parity_quantization``). x86
CPUs with VNNI add the products exactly, as phones do: there the shipped graph itself is measured
(on MiniLM the 7-bit copy's error is larger than the shipped graph's there: docs/onnx-export.md).

Swappable graphs: the quantizer treats every initializer as a constant weight. It rewrites a
Gemm whose weight is an initializer into MatMul on a transposed *copy* of it and quantizes
that copy, which would bake the zero default of a per-user head into the graph and silently
drop the input. So the per-user initializers are removed before quantizing (they are plain
graph inputs then, which the quantizer leaves fp32: dynamic mode quantizes MatMul with a
constant B only) and put back afterwards. The per-user tensors stay fp32, and users' adapter
files fit the int8 graph unchanged.
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError
from export.graph import check_onnx, describe_graph, make_overridable

logger = logging.getLogger(__name__)

PER_CHANNEL = True
REDUCE_RANGE = False
QUANTIZATION: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "per_channel": PER_CHANNEL,
    "reduce_range": REDUCE_RANGE,
    "per_user_tensors": "float32",  # adapter inputs are left out of quantization
}


# platform.machine() of x86 hosts (Linux/macOS spell it x86_64/i686, Windows AMD64/x86).
X86_MACHINES = frozenset({"x86_64", "amd64", "x64", "i386", "i486", "i586", "i686", "x86"})


def host_machine() -> str:
    """This host's CPU architecture as Python reports it (tests replace it to act as another host)."""
    return platform.machine()


def int8_products_saturate() -> bool:
    """Whether this host's ONNX Runtime adds u8×s8 products with int16 saturation (x86 AVX2 without VNNI does).

    A one-node MatMulInteger probe, 255 × 127 summed over 64 terms: exact, 2,072,640; added in
    saturated int16 pairs, 32 × 32,767 = 1,048,544. Tests replace it to act as either kind of CPU.
    """
    return _probe_sum() != SATURATION_PROBE_EXACT


SATURATION_PROBE_DEPTH = 64
SATURATION_PROBE_EXACT = 255 * 127 * SATURATION_PROBE_DEPTH


def _probe_sum() -> int:
    """What ONNX Runtime's CPU kernel computes for the saturation probe (the first output element)."""
    import onnxruntime as ort

    depth = SATURATION_PROBE_DEPTH
    weights = numpy_helper.from_array(np.full((depth, 16), 127, np.int8), "B")  # constant: prepacked like weights
    node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, depth])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.INT32, None)]
    model = helper.make_model(
        helper.make_graph([node], "saturation_probe", inputs, outputs, [weights]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"A": np.full((8, depth), 255, np.uint8)})
    return int(result[0, 0])


def parity_quantization() -> dict[str, Any]:
    """How to quantize the graph int8 parity is measured on here: ``reduce_range``, ``host``, ``reason``."""
    machine = host_machine()
    x86 = machine.lower() in X86_MACHINES
    saturates = x86 and int8_products_saturate()  # only x86's AVX2 kernels saturate: others are not probed
    if saturates:
        reason = (
            f"{machine} host whose ONNX Runtime adds u8xs8 products with int16 saturation (AVX2 without VNNI), "
            "which phones' ARM kernels do not: measured on a reduce_range=True copy (7-bit weights, no saturation)"
        )
    elif x86:
        reason = f"{machine} host whose ONNX Runtime adds u8xs8 products exactly (VNNI), as phones do: shipped graph"
    else:
        reason = f"{machine or 'unknown'} host, not x86: its int8 kernels do not saturate, as phones': shipped graph"
    reduce_range = saturates or REDUCE_RANGE
    return {"reduce_range": reduce_range, "host": machine, "host_saturates_u8s8": saturates, "reason": reason}


def int8_file(graph_file: str) -> str:
    """The int8 graph's name beside ``graph_file``: model.onnx → model.int8.onnx."""
    stem = graph_file.removesuffix(".onnx")
    return f"{stem}.int8.onnx"


def quantize_graph(
    source: Path, target: Path, per_user: Collection[str] = (), reduce_range: bool = REDUCE_RANGE
) -> float:
    """Write the int8 copy of ``source`` to ``target``, keeping the ``per_user`` inputs fp32; return seconds.

    ``reduce_range`` is for the x86 parity copy only (``parity_quantization``): bundles ship ``REDUCE_RANGE``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # slow import: only when quantizing

    started = time.perf_counter()
    model = onnx.load(str(source))
    defaults = _remove_initializers(model, set(per_user))
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        stripped = Path(scratch) / source.name
        onnx.save(model, str(stripped))
        try:
            quantize_dynamic(
                stripped, target, weight_type=QuantType.QInt8, per_channel=PER_CHANNEL, reduce_range=reduce_range
            )
        except (RuntimeError, ValueError, TypeError, KeyError, onnx.checker.ValidationError) as err:
            raise ExportError(f"ONNX Runtime could not quantize {source.name} to int8: {err}") from err
    if defaults:
        make_overridable(target, defaults)
    else:
        check_onnx(target)
    check_inputs_kept(source, target)
    seconds = time.perf_counter() - started
    logger.info("quantized %s to int8 in %.1f s", source.name, seconds)
    return seconds


def _remove_initializers(model: onnx.ModelProto, names: set[str]) -> dict[str, Any]:
    """Remove the initializers named in ``names`` from ``model``; return their arrays by name."""
    kept, removed = [], {}
    for initializer in model.graph.initializer:
        if initializer.name in names:
            removed[initializer.name] = numpy_helper.to_array(initializer)
        else:
            kept.append(initializer)
    missing = sorted(names - set(removed))
    if missing:
        raise ExportError(f"per-user tensors {missing[:3]} have no default initializer in the graph; export it again")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return removed


def check_inputs_kept(source: Path, target: Path) -> None:
    """ExportError unless ``target`` has every input of ``source`` with the same name, dtype and shape."""
    before, after = describe_graph(source)["inputs"], describe_graph(target)["inputs"]
    if before != after:
        lost = [i["name"] for i in before if i not in after]
        raise ExportError(
            f"quantizing {source.name} changed its inputs (e.g. {lost[:3]}): the int8 graph would not accept "
            "the same feeds or adapters"
        )
