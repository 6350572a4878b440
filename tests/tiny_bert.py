"""The tiny random BERT folder the tests build (hidden 32, 2 layers, 2 heads): a module of its own, so that
``conftest`` and ``benchmarks/warm_devices.py --quick`` build the same model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_vocab import VOCAB
from transformers import BertConfig, BertModel, BertTokenizerFast


def write_tiny_bert(folder: Path, sentence_transformers: bool) -> Path:
    """Write the tiny BERT and its tokenizer to ``folder``; ``sentence_transformers``: mean pooling + normalize."""
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
