"""Frozen-prefix activation cache: the adapter-free lower layers run once per example.

With AdapterDrop (Rücklé et al., "AdapterDrop: On the Efficiency of Adapters in Transformers",
EMNLP 2021) the lowest ``k`` layers hold no adapters, so on a client's fixed data they compute
the same states in every epoch and round. ``PrefixCache`` runs the embeddings and layers
``0..k-1`` once, in eval mode (no dropout) and without grad, and keeps each example's states
unpadded, (T_i, H): in memory up to a byte cap, past it in ``.npy`` chunks in a temporary
folder (read back memory-mapped, never pickled). ``forward_from_cache`` runs layers ``k..L-1``
and the head on a batch of them padded to its longest member. Training from the cache equals
training without it when the lower layers are in eval mode, as they are here.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeAlias

import numpy as np
import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import PretrainedConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput

from fedadapt.adapters.slots import find_slots
from fedadapt.data.batching import EncodedTexts, collate
from fedadapt.errors import BackboneError, ConfigError
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.backbone import SequenceClassifier
from fedadapt.train.loop import StepCallback, TrainConfig, TrainResult, train_adapter

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 512 * 2**20
Mask: TypeAlias = torch.Tensor | BlockMask | None  # what create_bidirectional_mask returns


@dataclass(frozen=True)
class _OnDisk:
    """Rows ``start:stop`` of spill chunk ``chunk``: one example's states."""

    chunk: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Parts:
    """The pieces of a BERT-family classifier the cache runs separately."""

    classifier: SequenceClassifier
    config: PretrainedConfig
    embeddings: nn.Module
    layers: nn.ModuleList
    pooler: nn.Module | None  # BERT's NSP pooler, when the backbone kept it


def _parts(model: AdapterModel) -> _Parts:
    classifier = model.module
    if not isinstance(classifier, SequenceClassifier):
        raise ConfigError(
            f"method {model.method.name!r} wraps the backbone ({type(classifier).__name__}) and puts "
            "adapters in every layer, so no layer can be cached; use a bottleneck method with "
            "AdapterDrop, e.g. make_method_config('pfeiffer', drop_layers=3)"
        )
    backbone = classifier.backbone
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
        raise BackboneError(
            f"the prefix cache needs a BERT-family encoder (embeddings, encoder.layer), got {type(backbone).__name__}"
        )
    pooler = getattr(backbone, "pooler", None)
    return _Parts(classifier, backbone.config, embeddings, layers, pooler if isinstance(pooler, nn.Module) else None)


def check_cacheable(model: AdapterModel, frozen_layers: int) -> None:
    """Raise unless the embeddings and layers ``0..frozen_layers-1`` hold nothing that trains or adapts."""
    parts = _parts(model)
    layers = parts.layers
    drop_layers = getattr(model.method, "drop_layers", 0)
    if not isinstance(frozen_layers, int) or not 1 <= frozen_layers < len(layers):
        raise ConfigError(f"frozen_layers must be an integer in [1, {len(layers) - 1}], got {frozen_layers!r}")
    adapted = [
        s.layer
        for s in find_slots(parts.classifier.backbone)
        if s.setup is not None and not s.dropped and len(s.adapters)
    ]
    if adapted and min(adapted) < frozen_layers:
        raise ConfigError(
            f"frozen_layers={frozen_layers} but layer {min(adapted)} holds adapters "
            f"({model.method.name}, drop_layers={drop_layers}); only layers below the first adapted "
            "one can be cached: set frozen_layers <= drop_layers"
        )
    prefix = [parts.embeddings, *layers[:frozen_layers]]
    trained = [n for m in prefix for n, p in m.named_parameters() if p.requires_grad]
    if trained:
        raise ConfigError(
            f"{len(trained)} parameters below layer {frozen_layers} train (e.g. {trained[:3]}); "
            f"method {model.method.name!r} cannot use the prefix cache"
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


def _extended_mask(config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Mask:
    """The mask ``BertModel.forward`` builds for the config's attention implementation (sdpa, eager…)."""
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def _run_layers(layers: Iterable[nn.Module], hidden: torch.Tensor, mask: Mask) -> torch.Tensor:
    for layer in layers:
        hidden = layer(hidden, mask)  # (B, T, H)
    return hidden


@torch.no_grad()
def prefix_states(model: AdapterModel, batch: Mapping[str, torch.Tensor], frozen_layers: int) -> torch.Tensor:
    """Embeddings and layers ``0..frozen_layers-1`` on a collated batch, in eval mode: (B, T, H)."""
    parts = _parts(model)
    prefix = [parts.embeddings, *parts.layers[:frozen_layers]]
    with _eval_mode(prefix):
        hidden = parts.embeddings(input_ids=batch["input_ids"])  # (B, T, H)
        mask = _extended_mask(parts.config, hidden, batch["attention_mask"])
        return _run_layers(prefix[1:], hidden, mask)


def forward_from_cache(
    model: AdapterModel, batch: Mapping[str, torch.Tensor], frozen_layers: int
) -> SequenceClassifierOutput:
    """Layers ``frozen_layers..L-1`` and the head on cached states, as ``SequenceClassifier.forward``.

    ``batch`` holds ``hidden`` (B, T, H), ``attention_mask`` (B, T) and optionally ``labels`` (B,).
    """
    parts = _parts(model)
    classifier = parts.classifier
    attention_mask = batch["attention_mask"]
    hidden = batch["hidden"]  # (B, T, H)
    hidden = _run_layers(parts.layers[frozen_layers:], hidden, _extended_mask(parts.config, hidden, attention_mask))
    backbone_pooled = parts.pooler(hidden) if parts.pooler is not None else None
    return classifier.classify(hidden, attention_mask, backbone_pooled, batch.get("labels"))


class PrefixCache:
    """Each example's states after layer ``frozen_layers - 1``, filled once from ``model``.

    Rows stay in memory until ``max_memory_bytes`` is reached; later rows spill to ``.npy``
    chunks in a temporary folder under ``spill_dir`` (the system's temp folder if None), which
    ``close()`` (or leaving a ``with`` block) removes. The weights below ``frozen_layers`` must
    not change while the cache is used; ``train_adapter_cached`` checks the backbone guard.
    """

    def __init__(
        self,
        model: AdapterModel,
        data: EncodedTexts,
        frozen_layers: int,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        spill_dir: Path | None = None,
        fill_batch_size: int = 64,
    ) -> None:
        check_cacheable(model, frozen_layers)
        if max_memory_bytes < 0:
            raise ConfigError(f"max_memory_bytes must be >= 0, got {max_memory_bytes!r}")
        if fill_batch_size <= 0:
            raise ConfigError(f"fill_batch_size must be positive, got {fill_batch_size!r}")
        self.data = data
        self.frozen_layers = frozen_layers
        self.max_memory_bytes = max_memory_bytes
        self.backbone_fingerprint = model.backbone.fingerprint
        self.memory_bytes = 0
        self.disk_bytes = 0
        self._spill_parent = spill_dir
        self._spill_path: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._rows: list[torch.Tensor | _OnDisk | None] = [None] * len(data)
        self._chunks: list[np.ndarray] = []
        self._closed = False
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
        """``hidden`` (B, T, H) padded to the longest member, ``attention_mask`` (B, T), ``labels`` (B,)."""
        rows = [self.row(i) for i in indices]
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].new_zeros((len(rows), width, rows[0].shape[1]))
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, states in enumerate(rows):
            hidden[b, : states.shape[0]] = states
            attention_mask[b, : states.shape[0]] = 1
        labels = torch.tensor([self.data.labels[i] for i in indices], dtype=torch.long)
        return {"hidden": hidden, "attention_mask": attention_mask, "labels": labels}

    def _fill(self, model: AdapterModel, batch_size: int) -> None:
        # Length-sorted fill batches pad little; the real tokens' states do not depend on padding.
        order = sorted(range(len(self.data)), key=lambda i: len(self.data.input_ids[i]))
        device = next(model.module.parameters()).device
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(self.data, indices).items()}
            states = prefix_states(model, batch, self.frozen_layers).cpu()  # (B, T, H)
            self._store(indices, [states[b, : len(self.data.input_ids[i])] for b, i in enumerate(indices)])
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
    model: AdapterModel, cache: PrefixCache, config: TrainConfig, on_step: StepCallback | None = None
) -> TrainResult:
    """``train_adapter`` on ``cache.data``, running only the layers above ``cache.frozen_layers``."""
    if cache.backbone_fingerprint != model.backbone.fingerprint:
        raise ConfigError("the prefix cache was filled from a different backbone than this model's")
    check_cacheable(model, cache.frozen_layers)

    def forward(indices: list[int], device: torch.device) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in cache.batch(indices).items()}
        loss = forward_from_cache(model, batch, cache.frozen_layers).loss
        if loss is None:  # cannot happen: cached batches carry labels
            raise RuntimeError("forward_from_cache returned no loss")
        return loss

    return train_adapter(model, cache.data, config, on_step, forward=forward)
