"""Shared fixtures: tiny random BERT folders built on the spot (no network, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ["the", "a", "my", "card", "has", "not", "arrived", "yet", "where", "is", "money", "transfer"]
WORDS += ["account", "balance", "top", "up", "why", "declined"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def _write_tiny_bert(folder: Path, sentence_transformers: bool) -> Path:
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab=str(vocab_file)).save_pretrained(folder)
    if sentence_transformers:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
        )
        (folder / "modules.json").write_text(
            json.dumps([{"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
        )
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT folder laid out like a sentence-transformers model (mean pooling, normalize)."""
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-st"), sentence_transformers=True)


@pytest.fixture(scope="session")
def tiny_bert_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain BERT folder (no pooling declaration: CLS pooling)."""
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-plain"), sentence_transformers=False)


@pytest.fixture
def batch(tiny_bert: Path) -> dict[str, torch.Tensor]:
    """A padded batch of three texts of different lengths, with labels."""
    tokenizer = BertTokenizerFast.from_pretrained(tiny_bert)
    texts = ["my card has not arrived yet", "top up", "why is my transfer declined"]
    encoded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    encoded["labels"] = torch.tensor([0, 1, 2])
    return encoded
