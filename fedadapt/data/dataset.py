"""A text-classification data set in memory (texts, label names, user ids) and its seeded splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedadapt.errors import DataError

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class TextDataset:
    """Texts with their label names (and, where the data has them, user ids), in file order."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    user_ids: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        sizes = {"texts": len(self.texts), "labels": len(self.labels)}
        if self.user_ids is not None:
            sizes["user_ids"] = len(self.user_ids)
        if len(set(sizes.values())) > 1:
            raise DataError(f"TextDataset from {self.source or 'memory'} has columns of unequal length: {sizes}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int], source: str | None = None) -> TextDataset:
        """The examples at ``indices``, in that order."""
        return TextDataset(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            user_ids=None if self.user_ids is None else tuple(self.user_ids[i] for i in indices),
            source=self.source if source is None else source,
        )

    def sample(self, count: int | None, seed: int) -> TextDataset:
        """A seeded sample of ``count`` examples in their original order (all of them when ``count`` is None)."""
        if count is None or count >= len(self):
            return self
        return self.subset(sorted(_seeded_order(len(self), seed)[:count]))

    def split_off(self, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
        """(rest, held out): a seeded ``fraction`` of the examples (at least one) held out, both in original order."""
        order = _seeded_order(len(self), seed)
        num_held = max(1, round(len(self) * fraction))
        return self.subset(sorted(order[num_held:])), self.subset(sorted(order[:num_held]))


def _seeded_order(size: int, seed: int) -> list[int]:
    import torch  # only here: loading and partitioning text does not otherwise need torch

    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
