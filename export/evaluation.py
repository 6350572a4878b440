"""Accuracy of a bundle's graphs on a labelled data set's test split (``--eval-data``), fp32 against int8."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export.parity import RunGraph
from fedadapt.data.dataset import TextDataset
from fedadapt.data.splits import DataConfig, load_splits
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel

logger = logging.getLogger(__name__)

BATCH_SIZE = 32


def evaluate(data: Path, reference: AdapterModel, runners: Mapping[str, RunGraph]) -> dict[str, Any]:
    """Accuracy of each graph in ``runners`` (file → runner) on ``data``'s test split; int8's change in points.

    ``data`` is read as ``fedadapt train`` reads it (fedadapt.data.splits.load_splits): a folder's
    test split, or the seeded hold-out of a single file. Labels are matched by name with the
    adapter's labels.
    """
    test = load_splits(DataConfig(path=str(data))).test
    targets = label_ids(test, reference.labels, data)
    predictions = {file: predict(run, reference, test) for file, run in runners.items()}
    accuracy = {file: float((pred == targets).mean()) for file, pred in predictions.items()}
    report: dict[str, Any] = {"data": str(data), "split": "test", "examples": len(test), "accuracy": accuracy}
    fp32 = [f for f in runners if ".int8." not in f and f.endswith(".onnx")]
    int8 = [f for f in runners if ".int8." in f and f.endswith(".onnx")]
    if fp32 and int8:
        report["fp32_accuracy"], report["int8_accuracy"] = accuracy[fp32[0]], accuracy[int8[0]]
        report["int8_change_points"] = round(100 * (accuracy[int8[0]] - accuracy[fp32[0]]), 2)
    logger.info("accuracy on %d test examples of %s: %s", len(test), data, accuracy)
    return report


def label_ids(data: TextDataset, labels: tuple[str, ...], source: Path) -> np.ndarray:
    """Class ids of ``data``'s labels in the adapter's label order; ConfigError for labels it does not know."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(data.labels) - set(index))
    if unknown:
        raise ConfigError(
            f"--eval-data {source} has labels the adapter does not know: {unknown[:5]} "
            f"(adapter labels: {list(labels)[:5]}...); evaluate on data labelled like the training data"
        )
    return np.array([index[name] for name in data.labels], dtype=np.int64)


def predict(run: RunGraph, reference: AdapterModel, data: TextDataset) -> np.ndarray:
    """Predicted class ids of ``data``'s texts, in batches of ``BATCH_SIZE`` padded to their longest text."""
    tokenizer, max_length = reference.backbone.tokenizer, reference.max_text_tokens
    predictions = []
    for start in range(0, len(data), BATCH_SIZE):
        texts = list(data.texts[start : start + BATCH_SIZE])
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {name: np.asarray(values, dtype=np.int64) for name, values in encoded.items()}
        predictions.append(run(feeds).argmax(-1))
    return np.concatenate(predictions)
