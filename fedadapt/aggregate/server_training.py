"""The server trains too: a warm start of the shared adapter on a labelled proxy set, and optional fine-tuning.

A server often holds a little labelled data of its own: public examples, or data donated with
consent. Training the shared part on it before round 1 gives the devices a better first global
model (a warm start). Fine-tuning the aggregate on it between rounds pulls the average back
towards the proxy distribution. That helps when the proxy set resembles the devices' data and
hurts when it does not, so it is a knob, off by default. Both run on CUDA when the server has a
GPU (with bf16/fp16 autocast), and on the CPU otherwise.

Pure library code: it needs torch and transformers, never Flower, so a GPU box without flwr
can run it (``benchmarks/gpu_smoke.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedadapt.data.batching import EncodedTexts, encode_dataset
from fedadapt.data.readers import load_text_dataset
from fedadapt.errors import ConfigError, DataError
from fedadapt.model.device import select_device
from fedadapt.train.loop import TrainConfig, train_adapter

if TYPE_CHECKING:
    from fedadapt.data.label_map import LabelMap
    from fedadapt.delta.state import State
    from fedadapt.model.adapter_model import AdapterModel


@dataclass(frozen=True)
class ProxyRun:
    """What one pass of server-side training did: the new shared state and its figures."""

    state: State = dataclasses.field(repr=False)
    steps: int
    examples: int
    seconds: float
    final_loss: float | None
    device: str

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    def record(self, what: str) -> dict[str, float | int | str | None]:
        """A JSON-ready summary for metrics.json (no tensor values)."""
        return {
            "what": what,
            "steps": self.steps,
            "examples": self.examples,
            "seconds": self.seconds,
            "examples_per_second": self.examples_per_second,
            "final_loss": self.final_loss,
            "device": self.device,
        }


def load_proxy(
    model: AdapterModel,
    path: str | Path,
    labels: LabelMap,
    max_length: int,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
) -> EncodedTexts:
    """The server's labelled proxy set, encoded with ``model``'s tokenizer under the scenario's label map."""
    data = load_text_dataset(path, text_column=text_column, label_column=label_column)
    unknown = sorted(set(data.labels) - set(labels.names))
    if unknown:
        raise DataError(
            f"the server's proxy data {path} has labels the scenario does not know: {unknown[:5]}; "
            "relabel it or drop those rows"
        )
    if len(data) == 0:
        raise DataError(f"the server's proxy data {path} is empty")
    return encode_dataset(model.backbone.tokenizer, data, labels, min(max_length, model.max_text_tokens))


def train_on_proxy(model: AdapterModel, global_state: State, proxy: EncodedTexts, config: TrainConfig) -> ProxyRun:
    """Load ``global_state`` as the shared part, train on ``proxy``; the new shared state (on the CPU)."""
    if config.epochs < 1:
        raise ConfigError(f"server-side training needs at least one epoch, got {config.epochs}")
    model.load_state(global_state, "shared")
    result = train_adapter(model, proxy, config)
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state("shared").items()}
    model.to("cpu")  # the federation's bookkeeping (deltas, checkpoints) stays on the CPU
    return ProxyRun(
        state=state,
        steps=result.steps,
        examples=result.examples_seen,
        seconds=result.seconds,
        final_loss=result.final_loss,
        device=str(select_device(config.device)),
    )
