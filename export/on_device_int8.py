"""The on-device prefix's int8 copy (``prefix.int8.onnx``): writing it and measuring it against ``prefix.onnx``.

The copy is quantized as the bundle's int8 graph is (export/quantize.py: ONNX Runtime dynamic
quantization, per-channel int8 weights), and keeps the user's per-user tensors below the top as
fp32 overridable inputs, so the same ``.onnx_adapter`` feeds either prefix. What the phone trains
on is the prefix's hidden states, so that is what is measured: the int8 states against the fp32
states on the export's parity texts, truncated and padded to the step's T tokens, over the tokens
the attention mask keeps (padding positions reach neither the top layers nor the pooling).

As for the main int8 graph, on an x86 host whose ONNX Runtime saturates u8×s8 products (which
phones' kernels never do) the figure a phone would see comes from a ``reduce_range`` copy in a
scratch folder; the shipped copy's own figure on this host is kept beside it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle_verify import HIDDEN, ORT_ERRORS
from export.errors import ExportError
from export.quantize import QUANTIZATION, REDUCE_RANGE, int8_file, parity_quantization, quantize_graph

Feeds = Mapping[str, np.ndarray]


def write_prefix_int8(folder: Path, prefix_file: str, per_user: Collection[str], feeds: Feeds) -> dict[str, Any]:
    """Write the int8 copy of ``folder / prefix_file`` beside it; return the report's figures for it.

    ``feeds`` (input_ids and attention_mask, (B, T) int64) are what both prefixes are compared on.
    """
    target = int8_file(prefix_file)
    seconds = quantize_graph(folder / prefix_file, folder / target, per_user)
    reference = run_prefix(folder / prefix_file, feeds)
    on_host = state_difference(reference, run_prefix(folder / target, feeds), feeds["attention_mask"])
    how = parity_quantization()
    measured_on, figures = target, on_host
    if how["reduce_range"] != REDUCE_RANGE:
        measured_on = f"a copy of {target} quantized with reduce_range={how['reduce_range']} (not in the bundle)"
        # In the staging folder, removed before its files are listed for the manifest.
        with tempfile.TemporaryDirectory(prefix=".int8-prefix-", dir=folder) as scratch:
            path = Path(scratch) / Path(target).name
            quantize_graph(folder / prefix_file, path, per_user, reduce_range=how["reduce_range"])
            figures = state_difference(reference, run_prefix(path, feeds), feeds["attention_mask"])
    fp32_bytes, int8_bytes = (folder / prefix_file).stat().st_size, (folder / target).stat().st_size
    return {
        "graph": target,
        "source": prefix_file,
        "quantization": QUANTIZATION,
        "quantize_seconds": round(seconds, 3),
        "bytes": int8_bytes,
        "fp32_bytes": fp32_bytes,
        "size_ratio": round(fp32_bytes / int8_bytes, 3),
        "vs_fp32": {**figures, "measured_on": measured_on, **how},
        "shipped_graph_on_this_host": {**on_host, "graph": target, "host": how["host"]},
    }


def tokenized(tokenizer: Any, texts: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """``texts`` as the trainer feeds its prefix: input_ids and attention_mask (N, ``length``), int64.

    ``tokenizer`` is the model's Hugging Face tokenizer, the one the bundle's tokenizer.json is written from.
    """
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return {key: np.asarray(encoded[key], dtype=np.int64) for key in ("input_ids", "attention_mask")}


def run_prefix(path: Path, feeds: Feeds) -> np.ndarray:
    """The hidden states (B, T, H) a prefix graph computes for ``feeds`` (its per-user inputs at their defaults)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (hidden,) = session.run([HIDDEN], dict(feeds))
    except ORT_ERRORS as err:
        raise ExportError(f"ONNX Runtime cannot run {path.name}: {str(err)[:300]}; nothing was written") from err
    return np.asarray(hidden)


def state_difference(reference: np.ndarray, found: np.ndarray, attention_mask: np.ndarray) -> dict[str, Any]:
    """Max abs diff and relative error ||found - reference|| / ||reference|| over the kept tokens' states."""
    kept = attention_mask.astype(bool)  # (B, T): index the (B, T, H) states to the (N, H) states that count
    expected, actual = reference[kept].astype(np.float64), found[kept].astype(np.float64)
    if not np.isfinite(actual).all():
        raise ExportError("the int8 prefix computes non-finite hidden states; export without --quantize int8")
    difference = actual - expected
    return {
        "max_abs_diff": float(np.abs(difference).max(initial=0.0)),
        "relative_error": float(np.linalg.norm(difference) / max(float(np.linalg.norm(expected)), 1e-30)),
        "reference_max_abs": float(np.abs(expected).max(initial=0.0)),
        "tokens": int(kept.sum()),
    }
