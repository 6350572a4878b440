"""Centralized adapter training on one data set: the baseline federated runs are judged against."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedadapt.atomic_files import write_bytes_atomic
from fedadapt.backbone import DEFAULT_BACKBONE, BackboneConfig, load_backbone
from fedadapt.batching import encode_dataset
from fedadapt.data import LabelMap, TextDataset, load_text_dataset
from fedadapt.errors import ConfigError, DataError
from fedadapt.fleet.scenario import SYNTHETIC
from fedadapt.folder import save_adapter
from fedadapt.methods import MethodConfig
from fedadapt.model import AdapterModel
from fedadapt.synthetic import SyntheticConfig, make_synthetic_dataset
from fedadapt.train import StepCallback, TrainConfig, evaluate, train_adapter

CATEGORY_FILES = ("categories.json", "labels.json")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from; ``path="synthetic"`` is the built-in offline task."""

    path: str = SYNTHETIC
    text_column: str | None = None
    label_column: str | None = None
    max_examples: int | None = None  # cap on training examples (seeded sample)
    test_fraction: float = 0.2  # held out when the data has no test split
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_examples is not None and self.max_examples <= 0:
            raise ConfigError(f"max_examples must be positive, got {self.max_examples!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")


@dataclass(frozen=True)
class Splits:
    """Train and test data with the global label map."""

    train: TextDataset
    test: TextDataset
    labels: LabelMap = field(repr=False)


def load_splits(config: DataConfig) -> Splits:
    """Train/test splits and the global label map (a categories file if the folder has one)."""
    if config.path == SYNTHETIC:
        train, test = _hold_out(make_synthetic_dataset(SyntheticConfig(seed=config.seed)), config)
    else:
        path = Path(config.path)
        columns = {"text_column": config.text_column, "label_column": config.label_column}
        if path.is_dir() and _has_test_split(path):
            train = load_text_dataset(path, split="train", **columns)
            test = load_text_dataset(path, split="test", **columns)
        else:
            train, test = _hold_out(load_text_dataset(path, **columns), config)
    labels = _label_map(Path(config.path), train)
    return Splits(train=train.sample(config.max_examples, config.seed), test=test, labels=labels)


def _has_test_split(folder: Path) -> bool:
    return any(folder.glob("test.*")) or (folder / "dataset_dict.json").is_file()


def _label_map(path: Path, train: TextDataset) -> LabelMap:
    for name in CATEGORY_FILES:
        if path.is_dir() and (path / name).is_file():
            return LabelMap.from_file(path / name)
    return LabelMap.from_labels(train.labels, source=train.source)


def _hold_out(data: TextDataset, config: DataConfig) -> tuple[TextDataset, TextDataset]:
    if max(1, round(len(data) * config.test_fraction)) >= len(data):
        raise DataError(f"{data.source}: {len(data)} examples are too few to hold out a test split")
    return data.split_off(config.test_fraction, config.seed)


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
