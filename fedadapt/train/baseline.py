"""Centralized adapter training on one data set: the baseline federated runs are judged against.

A method that leaves the lowest layers frozen trains from the frozen-prefix cache: in memory for
the run, or kept in a folder between runs (``prefix_cache_dir``, float16, ``fedadapt.train.prefix_store``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.checkpoint.folder import save_adapter
from fedadapt.data.batching import EncodedTexts, encode_dataset
from fedadapt.data.splits import DataConfig, load_splits
from fedadapt.methods import MethodConfig
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.backbone import DEFAULT_BACKBONE, BackboneConfig, load_backbone
from fedadapt.train.frozen_prefix import frozen_prefix_depth
from fedadapt.train.loop import StepCallback, TrainConfig, TrainResult, evaluate, train_adapter
from fedadapt.train.prefix_cache import PrefixCache, train_adapter_cached
from fedadapt.train.prefix_store import PrefixStore, prefix_key


def train_baseline(
    data: DataConfig,
    method: MethodConfig,
    train: TrainConfig,
    backbone: str = DEFAULT_BACKBONE,
    out_dir: Path | None = None,
    on_step: StepCallback | None = None,
    prefix_cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one adapter centrally, evaluate it on the test split, save folder + metrics.json.

    ``prefix_cache_dir`` keeps the frozen prefix's states between runs (when the method leaves one).
    """
    splits = load_splits(data)
    loaded = load_backbone(BackboneConfig(name_or_path=backbone, num_labels=len(splits.labels), seed=train.seed))
    model = AdapterModel(loaded, method, labels=splits.labels.names)
    tokenizer = loaded.tokenizer
    max_length = min(train.max_length, model.max_text_tokens)  # prompt/prefix tokens take positions too
    train_set = encode_dataset(tokenizer, splits.train, splits.labels, max_length)
    test_set = encode_dataset(tokenizer, splits.test, splits.labels, max_length)
    result, cache_metrics = _train(model, train_set, splits.train.texts, train, on_step, max_length, prefix_cache_dir)
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
        **cache_metrics,
        "trainable_params": trainable,
        "schema_id": model.schema_id,
        "train_config": asdict(train),
    }
    if out_dir is not None:
        save_adapter(model, out_dir)
        write_bytes_atomic(out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        metrics["adapter_dir"] = str(out_dir)
    return metrics


def _train(
    model: AdapterModel,
    train_set: EncodedTexts,
    texts: tuple[str, ...],
    config: TrainConfig,
    on_step: StepCallback | None,
    max_length: int,
    cache_dir: Path | None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train, through the frozen-prefix cache when the method leaves frozen layers; with the cache's metrics."""
    depth = frozen_prefix_depth(model)
    if depth == 0:
        return train_adapter(model, train_set, config, on_step), {"prefix_layers": 0}
    if cache_dir is None:
        with PrefixCache(model, train_set, depth, device=config.device) as cache:
            result = train_adapter_cached(model, cache, config, on_step)
        return result, {"prefix_layers": depth, "prefix_cache_hit": False, "prefix_cache_seconds": cache.fill_seconds}
    key = prefix_key(model, depth, texts, train_set.labels, max_length)
    states, use = PrefixStore(cache_dir).load_or_build(model, train_set, key, device=config.device)
    result = train_adapter_cached(model, states, config, on_step)
    return result, {"prefix_layers": depth, "prefix_cache_hit": use.hit, "prefix_cache_seconds": use.seconds}
