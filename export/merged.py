"""Merged mode: the adapter folded into (or built into) one self-contained ONNX graph.

LoRA, FFA-LoRA and IA3 are merged into the backbone's weights by PEFT (on a copy);
BitFit and full fine-tuning need nothing merged; bottleneck adapters, stacks and fusion are
ordinary modules and are traced as part of the graph. Prompt and prefix tuning add virtual
tokens, which no weight can hold: they export in swappable mode only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import peft
import torch
from torch import nn

from export.graph import write_onnx
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
DUMMY_BATCH, DUMMY_TOKENS = 2, 8


class LogitsGraph(nn.Module):
    """The graph a phone runs: token ids and attention mask (B, T) → logits (B, num_labels).

    Pooling and the head are part of ``classifier``'s forward, so they are part of the graph.
    Token type ids are left out: single-text classification uses all zeros, the backbone's default.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


def merged_module(model: AdapterModel) -> nn.Module:
    """A copy of ``model``'s classifier with the adapter in its weights or modules; ``model`` is untouched."""
    module = model.module
    if isinstance(module, peft.PeftModel) and module.peft_config["default"].is_prompt_learning:
        raise ConfigError(
            f"nothing to merge: {model.method.name} tuning adds virtual tokens, which no weight can hold; "
            "export it with --mode swappable"
        )
    return model.merged_copy().eval()


def dummy_inputs(vocab_size: int) -> dict[str, torch.Tensor]:
    """A (2, 8) batch to trace with; the second text is padded so the trace keeps the mask path."""
    input_ids = torch.arange(DUMMY_BATCH * DUMMY_TOKENS).reshape(DUMMY_BATCH, DUMMY_TOKENS) % vocab_size
    attention_mask = torch.ones(DUMMY_BATCH, DUMMY_TOKENS, dtype=torch.long)
    attention_mask[1, DUMMY_TOKENS // 2 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def export_merged(model: AdapterModel, path: Path, opset: int) -> float:
    """Write ``model`` as one ONNX graph to ``path``; return the seconds torch.onnx took."""
    graph = LogitsGraph(merged_module(model)).eval()
    vocab_size = int(model.backbone.model.config.vocab_size)
    seconds = write_onnx(graph, dummy_inputs(vocab_size), (OUTPUT_NAME,), path, opset)
    logger.info("exported %s (merged) to %s in %.1f s", model.method.name, path, seconds)
    return seconds
