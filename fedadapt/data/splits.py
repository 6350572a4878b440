"""A data source's train and test splits and its label map: a folder's own splits, or a seeded hold-out.

``path`` is a data file or folder ``load_text_dataset`` reads, or ``SYNTHETIC`` for the built-in per-user task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedadapt.data.dataset import TextDataset
from fedadapt.data.label_map import LabelMap
from fedadapt.data.readers import load_text_dataset
from fedadapt.data.synthetic import SYNTHETIC, SyntheticConfig, make_synthetic_dataset
from fedadapt.errors import ConfigError, DataError

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
