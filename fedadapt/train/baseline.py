"""Centralized adapter training on one data set: the baseline federated runs are judged against."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.checkpoint.folder import save_adapter
from fedadapt.data.batching import encode_dataset
from fedadapt.data.splits import DataConfig, load_splits
from fedadapt.methods import MethodConfig
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.backbone import DEFAULT_BACKBONE, BackboneConfig, load_backbone
from fedadapt.train.loop import StepCallback, TrainConfig, evaluate, train_adapter


def train_baseline(
    data: DataConfig,
    method: MethodConfig,
    train: TrainConfig,
    backbone: str = DEFAULT_BACKBONE,
    out_dir: Path | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train one adapter centrally, evaluate it on the test split, save folder + metrics.json."""
    splits = load_splits(data)
    loaded = load_backbone(BackboneConfig(name_or_path=backbone, num_labels=len(splits.labels), seed=train.seed))
    model = AdapterModel(loaded, method, labels=splits.labels.names)
    tokenizer = loaded.tokenizer
    max_length = min(train.max_length, model.max_text_tokens)  # prompt/prefix tokens take positions too
    train_set = encode_dataset(tokenizer, splits.train, splits.labels, max_length)
    test_set = encode_dataset(tokenizer, splits.test, splits.labels, max_length)
    result = train_adapter(model, train_set, train, on_step)
    scores = evaluate(model, test_set, device=train.device)
    _, trainable = model.num_parameters()
    metrics: dict[str, Any] = {
        "method": method.name,
        "backbone": backbone,
        "data": data.path,
        "test_accuracy": scores.accuracy,
        "macro_f1": scores.macro_f1,
        "test_loss": scores.loss,
        "test_examples": scores.examples,
        "train_examples": len(train_set),
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "final_train_loss": result.final_loss,
        "trainable_params": trainable,
        "schema_id": model.schema_id,
        "train_config": asdict(train),
    }
    if out_dir is not None:
        save_adapter(model, out_dir)
        write_bytes_atomic(out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        metrics["adapter_dir"] = str(out_dir)
    return metrics
