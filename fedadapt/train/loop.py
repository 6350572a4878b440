"""Local adapter training and evaluation: AdamW, warmup + linear decay, clipping, autocast.

Only adapter and head parameters reach the optimizer; the backbone is checked frozen before
and unchanged after every training call. The frozen prefix (the lowest layers, when nothing in
them trains: ``fedadapt.train.frozen_prefix``) runs in eval mode, without dropout. The head
gets its own, larger learning rate: it starts from scratch on pooled (and, for
sentence-transformers backbones, unit-length) embeddings, while adapters start at the
identity and must move gently.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from fedadapt.data.batching import EncodedTexts, batch_indices, collate
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.device import autocast, select_device, select_precision
from fedadapt.model.freeze import guard_frozen
from fedadapt.train.frozen_prefix import eval_frozen_prefix

StepCallback = Callable[[int, int, float], None]  # (step, total_steps, loss)
BatchForward = Callable[[list[int], torch.device], torch.Tensor]  # (indices, device) -> mean loss


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings. ``max_steps`` (if set) overrides ``epochs``."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 2e-3
    head_learning_rate: float = 5e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    # The loss's softmax runs over the labels present in the data only: on label-skewed clients the
    # absent classes' head rows get no gradient, so FedAvg does not average in rows pushed down by
    # clients that never saw those classes (cf. FedRS, Li & Zhan, KDD 2021).
    mask_absent_labels: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ConfigError(f"max_steps must be a positive integer or None, got {self.max_steps!r}")
        for name in ("learning_rate", "head_learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass
class TrainResult:
    """What one training call did."""

    steps: int
    examples_seen: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else math.nan


@dataclass(frozen=True)
class EvalResult:
    """Accuracy, macro-F1 (over labels present in truth or prediction) and mean loss."""

    accuracy: float
    macro_f1: float
    loss: float
    examples: int


def total_steps(num_examples: int, config: TrainConfig) -> int:
    """Optimizer steps one ``train_adapter`` call takes."""
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * math.ceil(num_examples / config.batch_size)


def make_optimizer(model: AdapterModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: adapter group and head group."""
    roles = {spec.name: spec.role for spec in model.schema.tensors}
    params = dict(zip((s.name for s in model.schema.tensors), model.trainable_parameters(), strict=True))
    adapter = [p for n, p in params.items() if roles[n] == "adapter"]
    head = [p for n, p in params.items() if roles[n] == "head"]
    groups = [
        {"params": group, "lr": lr}
        for group, lr in ((adapter, config.learning_rate), (head, config.head_learning_rate))
        if group
    ]
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def warmup_linear_decay(
    optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio`` of the steps, then linear decay to zero."""
    warmup = max(1, int(steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_adapter(
    model: AdapterModel,
    data: EncodedTexts,
    config: TrainConfig,
    on_step: StepCallback | None = None,
    forward: BatchForward | None = None,
) -> TrainResult:
    """Train ``model``'s adapter and head on ``data``; the backbone is guarded throughout.

    ``forward`` replaces collating ``data`` and calling ``model`` on it (e.g. the frozen-prefix
    cache of ``fedadapt.train.prefix_cache``); it gets each batch's indices into ``data``.
    """
    if len(data) == 0:
        raise ConfigError("cannot train on an empty data set")
    device = select_device(config.device)
    dtype = select_precision(device, config.precision)
    model.to(device).train()
    # Frozen lower layers are a fixed feature extractor: no dropout there, so training from the
    # prefix cache (which computes them once, in eval mode) equals training the full model.
    eval_frozen_prefix(model)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    steps = total_steps(len(data), config)
    optimizer = make_optimizer(model, config)
    scheduler = warmup_linear_decay(optimizer, steps, config.warmup_ratio)
    params = list(model.trainable_parameters())
    present = present_labels(data, len(model.labels), device) if config.mask_absent_labels else None
    batch_loss = forward or partial(_collated_loss, model, data, present)
    result = TrainResult(steps=0, examples_seen=0, seconds=0.0)
    start = time.perf_counter()
    with guard_frozen(model.frozen):
        while result.steps < steps:
            for indices in batch_indices(len(data), config.batch_size, generator):
                with autocast(device, dtype):
                    loss = batch_loss(indices, device)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                result.examples_seen += len(indices)
                result.losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(result.steps, steps, result.losses[-1])
                if result.steps >= steps:
                    break
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def present_labels(data: EncodedTexts, num_labels: int, device: torch.device) -> torch.Tensor:
    """A (num_labels,) bool mask of the class ids that occur in ``data``."""
    mask = torch.zeros(num_labels, dtype=torch.bool)
    mask[torch.tensor(sorted(set(data.labels)), dtype=torch.long)] = True
    return mask.to(device)


def _collated_loss(
    model: AdapterModel, data: EncodedTexts, present: torch.Tensor | None, indices: list[int], device: torch.device
) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in collate(data, indices).items()}
    if present is None:
        loss: torch.Tensor = model(**batch).loss
        return loss
    labels = batch.pop("labels")
    return masked_loss(model(**batch).logits, labels, present)


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the softmax over the ``present`` classes only (``TrainConfig.mask_absent_labels``)."""
    return torch.nn.functional.cross_entropy(logits.float().masked_fill(~present, float("-inf")), labels)


@torch.no_grad()
def predict(model: AdapterModel, data: EncodedTexts, batch_size: int = 64, device: str = "auto") -> torch.Tensor:
    """Logits (N, num_labels) in data order, in eval mode."""
    target = select_device(device)
    model.to(target).eval()
    logits = [
        model(**{k: v.to(target) for k, v in collate(data, idx).items() if k != "labels"}).logits.float().cpu()
        for idx in batch_indices(len(data), batch_size, None)
    ]
    return torch.cat(logits)


def evaluate(model: AdapterModel, data: EncodedTexts, batch_size: int = 64, device: str = "auto") -> EvalResult:
    """Accuracy, macro-F1 and loss of ``model`` on ``data``."""
    if len(data) == 0:
        raise ConfigError("cannot evaluate on an empty data set")
    logits = predict(model, data, batch_size, device)
    labels = torch.tensor(data.labels)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    predictions = logits.argmax(dim=-1)
    return EvalResult(
        accuracy=(predictions == labels).float().mean().item(),
        macro_f1=macro_f1(predictions, labels, logits.shape[-1]),
        loss=loss,
        examples=len(data),
    )


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    true_pos = torch.bincount(labels[predictions == labels], minlength=num_classes).float()
    predicted = torch.bincount(predictions, minlength=num_classes).float()
    actual = torch.bincount(labels, minlength=num_classes).float()
    present = (predicted + actual) > 0
    f1 = 2 * true_pos / (predicted + actual).clamp(min=1)
    return f1[present].mean().item()
