"""Frozen-prefix activation cache: the frozen lower layers run once per example.

When the lowest ``k`` layers hold nothing that trains (``fedadapt.train.frozen_prefix``: AdapterDrop
for bottleneck adapters, Rücklé et al., EMNLP 2021; PEFT methods on the top layers only; a model
that trains only its head, ``k`` = every layer), on a client's fixed data they compute the same
states in every epoch and round. ``PrefixCache`` runs the embeddings and layers ``0..k-1`` once,
in eval mode (no dropout) and without grad, and keeps each example's states unpadded, (T_i, H):
in memory up to a byte cap, past it in ``.npy`` chunks in a temporary folder (read back
memory-mapped, never pickled). ``forward_from_cache`` runs layers ``k..L-1`` and the head on a
batch of them padded to its longest member. Training from the cache equals training without it:
the training loop runs the frozen prefix in eval mode too. ``fedadapt.train.prefix_store`` keeps
the states on disk between runs (a device's state folder).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeAlias

import numpy as np
import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import PretrainedConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput

from fedadapt.data.batching import EncodedTexts, collate
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.device import select_device
from fedadapt.train.frozen_prefix import encoder_parts, frozen_prefix_depth, prefix_fingerprint, prefix_modules
from fedadapt.train.loop import (
    StepCallback,
    TrainConfig,
    TrainResult,
    masked_loss,
    present_labels,
    train_adapter,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 512 * 2**20
Mask: TypeAlias = torch.Tensor | BlockMask | None  # what create_bidirectional_mask returns


class PrefixStates(Protocol):
    """Cached frozen-prefix states of ``data``: a ``PrefixCache`` or a stored entry (``prefix_store``)."""

    @property
    def data(self) -> EncodedTexts: ...
    @property
    def frozen_layers(self) -> int: ...
    @property
    def prefix_fingerprint(self) -> str: ...

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """``hidden`` (B, T, H) float32 padded to the longest member, ``attention_mask`` (B, T), ``labels`` (B,)."""
        ...


@dataclass(frozen=True)
class _OnDisk:
    """Rows ``start:stop`` of spill chunk ``chunk``: one example's states."""

    chunk: int
    start: int
    stop: int


def check_cacheable(model: AdapterModel, frozen_layers: int) -> None:
    """Raise unless the embeddings and layers ``0..frozen_layers-1`` hold nothing that trains."""
    parts = encoder_parts(model)  # explains what cannot be cached at all (virtual tokens, other encoders)
    layers = parts.layers
    if not isinstance(frozen_layers, int) or not 1 <= frozen_layers <= len(layers):
        raise ConfigError(f"frozen_layers must be an integer in [1, {len(layers)}], got {frozen_layers!r}")
    depth = frozen_prefix_depth(model)
    if frozen_layers <= depth:
        return
    trained = [n for m in prefix_modules(parts, frozen_layers) for n, p in m.named_parameters() if p.requires_grad]
    where = (
        f"{len(trained)} parameters below layer {frozen_layers} train (e.g. {trained[:3]})"
        if trained
        else "a trainable parameter sits outside the encoder's layers and head"
    )
    raise ConfigError(
        f"method {model.method.name!r} cannot use the prefix cache with frozen_layers={frozen_layers}: {where}; "
        f"its frozen prefix is {depth} layers (drop_layers={getattr(model.method, 'drop_layers', 0)})"
    )


@contextmanager
def _eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Eval mode for ``modules`` inside the block; each submodule's own mode is restored after."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for module, _ in saved:
        module.training = False
    try:
        yield
    finally:
        for module, mode in saved:
            module.training = mode


def extended_mask(config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Mask:
    """The mask ``BertModel.forward`` builds for the config's attention implementation (sdpa, eager…)."""
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def run_layers(layers: Iterable[nn.Module], hidden: torch.Tensor, mask: Mask) -> torch.Tensor:
    for layer in layers:
        hidden = layer(hidden, mask)  # (B, T, H)
    return hidden


@torch.no_grad()
def prefix_states(model: AdapterModel, batch: Mapping[str, torch.Tensor], frozen_layers: int) -> torch.Tensor:
    """Embeddings and layers ``0..frozen_layers-1`` on a collated batch, in eval mode: (B, T, H)."""
    parts = encoder_parts(model)
    prefix = prefix_modules(parts, frozen_layers)
    with _eval_mode(prefix):
        hidden = parts.embeddings(input_ids=batch["input_ids"])  # (B, T, H)
        mask = extended_mask(parts.config, hidden, batch["attention_mask"])
        return run_layers(prefix[1:], hidden, mask)


def forward_from_cache(
    model: AdapterModel, batch: Mapping[str, torch.Tensor], frozen_layers: int
) -> SequenceClassifierOutput:
    """Layers ``frozen_layers..L-1`` and the head on cached states, as ``SequenceClassifier.forward``.

    ``batch`` holds ``hidden`` (B, T, H), ``attention_mask`` (B, T) and optionally ``labels`` (B,).
    With ``frozen_layers`` = every layer (a model that trains only its head) only the pooling and
    the head run.
    """
    parts = encoder_parts(model)
    attention_mask = batch["attention_mask"]
    hidden = batch["hidden"]  # (B, T, H)
    upper = parts.layers[frozen_layers:]
    if len(upper):
        hidden = run_layers(upper, hidden, extended_mask(parts.config, hidden, attention_mask))
    backbone_pooled = parts.pooler(hidden) if parts.pooler is not None else None
    return parts.classifier.classify(hidden, attention_mask, backbone_pooled, batch.get("labels"))


def pad_rows(rows: Sequence[torch.Tensor], labels: Sequence[int]) -> dict[str, torch.Tensor]:
    """Unpadded (T_i, H) rows as a float32 batch padded to the longest, with its mask and labels."""
    width = max(r.shape[0] for r in rows)
    hidden = torch.zeros((len(rows), width, rows[0].shape[1]), dtype=torch.float32)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, states in enumerate(rows):
        hidden[b, : states.shape[0]] = states
        attention_mask[b, : states.shape[0]] = 1
    return {"hidden": hidden, "attention_mask": attention_mask, "labels": torch.tensor(labels, dtype=torch.long)}


class PrefixCache:
    """Each example's states after layer ``frozen_layers - 1``, filled once from ``model``.

    Rows stay in memory until ``max_memory_bytes`` is reached; later rows spill to ``.npy``
    chunks in a temporary folder under ``spill_dir`` (the system's temp folder if None), which
    ``close()`` (or leaving a ``with`` block) removes. Rows are kept as ``dtype`` (float32: exactly
    what the model computed) and batched as float32. ``device`` is where the prefix runs (None:
    where the model is). The weights below ``frozen_layers`` must not change while the cache is
    used; ``train_adapter_cached`` checks the prefix's fingerprint.
    """

    def __init__(
        self,
        model: AdapterModel,
        data: EncodedTexts,
        frozen_layers: int,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        spill_dir: Path | None = None,
        fill_batch_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: str | None = None,
    ) -> None:
        check_cacheable(model, frozen_layers)
        if max_memory_bytes < 0:
            raise ConfigError(f"max_memory_bytes must be >= 0, got {max_memory_bytes!r}")
        if fill_batch_size <= 0:
            raise ConfigError(f"fill_batch_size must be positive, got {fill_batch_size!r}")
        self.data = data
        self.frozen_layers = frozen_layers
        self.max_memory_bytes = max_memory_bytes
        self.prefix_fingerprint = prefix_fingerprint(model, frozen_layers)
        self.dtype = dtype
        self.fill_seconds = 0.0
        self.memory_bytes = 0
        self.disk_bytes = 0
        self._spill_parent = spill_dir
        self._spill_path: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._rows: list[torch.Tensor | _OnDisk | None] = [None] * len(data)
        self._chunks: list[np.ndarray] = []
        self._closed = False
        if device is not None:
            model.to(select_device(device))
        self._fill(model, fill_batch_size)

    @property
    def spill_path(self) -> Path | None:
        """The temporary folder holding spilled chunks, or None while nothing spilled."""
        return self._spill_path

    @property
    def num_spilled(self) -> int:
        return sum(isinstance(r, _OnDisk) for r in self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop every row and remove the spill folder; the cache cannot be read afterwards."""
        self._closed = True
        self._rows = []
        self._chunks = []
        if self._finalizer is not None:
            self._finalizer()  # removes the spill folder once
        self.memory_bytes = self.disk_bytes = 0

    def row(self, index: int) -> torch.Tensor:
        """Example ``index``'s states, (T_index, H), on the CPU."""
        if self._closed:
            raise RuntimeError("this PrefixCache is closed; build a new one to read cached states")
        entry = self._rows[index]
        if isinstance(entry, _OnDisk):
            return torch.from_numpy(np.array(self._chunks[entry.chunk][entry.start : entry.stop]))
        if entry is None:
            raise RuntimeError(f"example {index} was never cached")
        return entry

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """``hidden`` (B, T, H) float32 padded to the longest member, ``attention_mask`` (B, T), ``labels`` (B,)."""
        return pad_rows([self.row(i) for i in indices], [self.data.labels[i] for i in indices])

    def _fill(self, model: AdapterModel, batch_size: int) -> None:
        # Length-sorted fill batches pad little; the real tokens' states do not depend on padding.
        start_time = time.perf_counter()
        order = sorted(range(len(self.data)), key=lambda i: len(self.data.input_ids[i]))
        device = next(model.module.parameters()).device
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(self.data, indices).items()}
            states = prefix_states(model, batch, self.frozen_layers).to("cpu", self.dtype)  # (B, T, H)
            self._store(indices, [states[b, : len(self.data.input_ids[i])] for b, i in enumerate(indices)])
        self.fill_seconds = time.perf_counter() - start_time
        logger.info(
            "cached %d examples through %d layers: %.1f MB in memory, %.1f MB spilled to %s",
            len(self.data),
            self.frozen_layers,
            self.memory_bytes / 1e6,
            self.disk_bytes / 1e6,
            self._spill_path,
        )

    def _store(self, indices: list[int], rows: list[torch.Tensor]) -> None:
        spilled: list[tuple[int, torch.Tensor]] = []
        for index, states in zip(indices, rows, strict=True):
            size = states.numel() * states.element_size()
            if self.memory_bytes + size <= self.max_memory_bytes:
                self._rows[index] = states.clone()  # a copy, so the padded batch can be freed
                self.memory_bytes += size
            else:
                spilled.append((index, states))
        if spilled:
            self._spill(spilled)

    def _spill(self, spilled: list[tuple[int, torch.Tensor]]) -> None:
        folder = self._ensure_spill_folder()
        chunk = len(self._chunks)
        path = folder / f"chunk-{chunk:05d}.npy"
        np.save(path, torch.cat([s for _, s in spilled]).numpy(), allow_pickle=False)  # (sum T_i, H)
        self._chunks.append(np.load(path, mmap_mode="r", allow_pickle=False))
        self.disk_bytes += path.stat().st_size
        offset = 0
        for index, states in spilled:
            self._rows[index] = _OnDisk(chunk, offset, offset + states.shape[0])
            offset += states.shape[0]

    def _ensure_spill_folder(self) -> Path:
        if self._spill_path is None:
            self._spill_path = Path(tempfile.mkdtemp(prefix="fedadapt-prefix-cache-", dir=self._spill_parent))
            # Removed on close(), or when the cache is garbage-collected without one.
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._spill_path, True)
        return self._spill_path


def train_adapter_cached(
    model: AdapterModel, cache: PrefixStates, config: TrainConfig, on_step: StepCallback | None = None
) -> TrainResult:
    """``train_adapter`` on ``cache.data``, running only the layers above ``cache.frozen_layers``."""
    check_cacheable(model, cache.frozen_layers)
    if cache.prefix_fingerprint != prefix_fingerprint(model, cache.frozen_layers):
        raise ConfigError("the prefix cache was filled from a different backbone or frozen prefix than this model's")
    present = (
        present_labels(cache.data, len(model.labels), select_device(config.device))
        if config.mask_absent_labels
        else None
    )

    def forward(indices: list[int], device: torch.device) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in cache.batch(indices).items()}
        if present is not None:
            labels = batch.pop("labels")
            logits = forward_from_cache(model, batch, cache.frozen_layers).logits
            if logits is None:  # cannot happen: the head always returns logits
                raise RuntimeError("forward_from_cache returned no logits")
            return masked_loss(logits, labels, present)
        loss = forward_from_cache(model, batch, cache.frozen_layers).loss
        if loss is None:  # cannot happen: cached batches carry labels
            raise RuntimeError("forward_from_cache returned no loss")
        return loss

    return train_adapter(model, cache.data, config, on_step, forward=forward)
