"""Tokenizing once and batching with dynamic padding (each batch padded to its longest text)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from fedadapt.data.dataset import TextDataset
    from fedadapt.data.label_map import LabelMap


@dataclass(frozen=True)
class EncodedTexts:
    """Token ids per text (unpadded) and the label id per text."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.labels)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int], max_length: int
) -> EncodedTexts:
    """Tokenize every text once, truncated to ``max_length`` tokens."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedTexts(tuple(tuple(x) for x in ids), tuple(labels), pad)


def encode_dataset(
    tokenizer: PreTrainedTokenizerBase, data: TextDataset, labels: LabelMap, max_length: int
) -> EncodedTexts:
    """Token ids and class ids of ``data`` under the global label map (errors name its source)."""
    return encode_texts(tokenizer, data.texts, labels.encode(data.labels, source=data.source), max_length)


def collate(encoded: EncodedTexts, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """A batch of ``indices`` padded to its longest member, with attention mask and labels."""
    rows = [encoded.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), encoded.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_indices(size: int, batch_size: int, generator: torch.Generator | None) -> Iterator[list[int]]:
    """Index lists of one epoch: shuffled with ``generator``, in order without one."""
    order = torch.randperm(size, generator=generator).tolist() if generator is not None else list(range(size))
    for start in range(0, size, batch_size):
        yield order[start : start + batch_size]
