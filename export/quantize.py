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
compute. On an x86 host the shipped graph's u8×s8 products saturate on AVX2 CPUs without VNNI
(measured on MiniLM: logit error 0.25 against 0.017), which no phone does; so on x86 the parity is
measured on a ``reduce_range=True`` copy quantized in a scratch folder (7-bit weights: nothing
saturates, as on ARM), and the shipped graph's own figure on this host is kept beside it
(``parity_quantization``).

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

import onnx
from onnx import numpy_helper

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


def parity_quantization() -> dict[str, Any]:
    """How to quantize the graph that int8 parity is measured on here: ``reduce_range``, ``host`` and ``reason``."""
    machine = host_machine()
    if machine.lower() in X86_MACHINES:
        reason = (
            f"x86 host ({machine}): the shipped graph's u8xs8 products can saturate on AVX2 CPUs without VNNI, "
            "which phones' ARM kernels do not; measured on a reduce_range=True copy (7-bit weights, no saturation)"
        )
        return {"reduce_range": True, "host": machine, "reason": reason}
    reason = f"{machine or 'unknown'} host: no x86 saturation, measured on the shipped graph itself"
    return {"reduce_range": REDUCE_RANGE, "host": machine, "reason": reason}


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
