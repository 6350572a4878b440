"""Parity: the exported graph must give PyTorch's logits on real, padded texts.

As in optimum's validation, every batch is compared, every mismatch collected, and one
error raised with a line per mismatching output. The reference is a freshly loaded model:
``torch.onnx.export`` may change the module it traces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedTokenizerBase

from export.errors import ExportParityError
from fedadapt.model.adapter_model import AdapterModel

Feeds = dict[str, np.ndarray]
RunGraph = Callable[[Feeds], np.ndarray]


@dataclass(frozen=True)
class BatchParity:
    """How one batch's ONNX logits compare with PyTorch's."""

    name: str
    shape: tuple[int, int]  # (B, T) tokens fed
    max_abs_diff: float
    argmax_agreement: float  # fraction of rows with the same predicted class

    def ok(self, atol: float) -> bool:
        """Within ``atol`` everywhere, and the same predicted class for every text."""
        return self.max_abs_diff <= atol and self.argmax_agreement == 1.0


@dataclass(frozen=True)
class ParityResult:
    """Parity over all batches: passes when every batch is within ``atol`` and agrees on every argmax."""

    batches: tuple[BatchParity, ...]
    texts: int
    atol: float

    @property
    def max_abs_diff(self) -> float:
        """Largest logit difference over all batches."""
        return max(b.max_abs_diff for b in self.batches)

    @property
    def argmax_agreement(self) -> float:
        """Fraction of all rows (texts, over all batches) with the same predicted class."""
        rows = sum(b.shape[0] for b in self.batches)
        return sum(b.argmax_agreement * b.shape[0] for b in self.batches) / rows

    @property
    def passed(self) -> bool:
        """Every batch is ``ok``."""
        return all(b.ok(self.atol) for b in self.batches)

    def to_dict(self) -> dict[str, Any]:
        """The parity section of report.json."""
        return {
            "passed": self.passed,
            "max_abs_diff": self.max_abs_diff,
            "argmax_agreement": self.argmax_agreement,
            "texts": self.texts,
            "atol": self.atol,
            "batches": [asdict(b) for b in self.batches],
        }


def onnx_runner(model_path: Path) -> RunGraph:
    """Run the graph at ``model_path`` in ONNX Runtime (CPU) on the feeds it names as inputs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Spinning threads fight with torch for the same cores and distort timings.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(feeds: Feeds) -> np.ndarray:
        outputs = session.run(None, {name: feeds[name] for name in names})
        return np.asarray(outputs[0])

    return run


def tokenize_batches(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, Feeds]:
    """All texts padded into one batch, and the first text alone (batch of 1, no padding)."""
    batches = {f"padded batch of {len(texts)}": list(texts), "batch of 1": [texts[0]]}
    return {name: _encode(tokenizer, chunk, max_length) for name, chunk in batches.items()}


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> Feeds:
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: np.asarray(values, dtype=np.int64) for name, values in encoded.items()}


def torch_logits(model: AdapterModel, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The PyTorch model's logits on every tokenizer output (token type ids included)."""
    with torch.no_grad():
        output = model(**{name: torch.from_numpy(values) for name, values in feeds.items()})
    logits: np.ndarray = output.logits.float().numpy()
    return logits


def compare(name: str, shape: tuple[int, int], reference: np.ndarray, candidate: np.ndarray) -> BatchParity:
    """Max absolute difference and argmax agreement of two (B, num_labels) logit arrays."""
    if reference.shape != candidate.shape:  # e.g. a batch axis that did not stay dynamic
        return BatchParity(name, shape, float("inf"), 0.0)
    diff = float(np.abs(reference.astype(np.float64) - candidate).max())
    agreement = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    return BatchParity(name, shape, diff, agreement)


def check_parity(
    run_graph: RunGraph,
    reference: AdapterModel,
    batches: Mapping[str, Feeds],
    atol: float,
    texts: int,
) -> ParityResult:
    """Compare the graph with ``reference`` on every batch; raise ExportParityError on any mismatch."""
    parity = measure_parity(run_graph, reference, batches, atol, texts)
    if not parity.passed:
        mismatches = [_describe(b) for b in parity.batches if not b.ok(atol)]
        raise ExportParityError(
            f"the ONNX graph does not compute what PyTorch does (max abs diff allowed {atol:g}, every argmax must "
            "agree):\n  " + "\n  ".join(mismatches) + "\nNothing was written. Try another --opset; if it persists, "
            "report it with the adapter's method.",
            mismatches,
        )
    return parity


def measure_parity(
    run_graph: RunGraph,
    reference: AdapterModel,
    batches: Mapping[str, Feeds],
    atol: float,
    texts: int,
) -> ParityResult:
    """Compare the graph with ``reference`` on every batch without judging: int8 graphs are not held to ``atol``."""
    reference.eval()
    results = []
    for name, feeds in batches.items():
        rows, tokens = feeds["input_ids"].shape
        results.append(compare(name, (rows, tokens), torch_logits(reference, feeds), run_graph(feeds)))
    return ParityResult(tuple(results), texts, atol)


def _describe(batch: BatchParity) -> str:
    rows, tokens = batch.shape
    return (
        f"logits, {batch.name} ({rows}x{tokens} tokens): max diff = {batch.max_abs_diff:.3g}, "
        f"argmax agrees on {batch.argmax_agreement:.0%} of texts"
    )
