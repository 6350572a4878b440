"""Frozen-prefix states kept on disk: computed once for a set of examples, read back memory-mapped in later runs.

A device trains on the same examples every round, in a fresh process each time (deployment) or in
a simulation worker that may restart: its frozen prefix (``fedadapt.train.frozen_prefix``) is
computed once and kept in its state folder. ``PrefixStore`` is such a folder: one safetensors file
per entry, ``<key digest>.safetensors``, holding ``states`` (sum of T_i, H), every example's
unpadded states after layer k-1 in data order, by default in float16, and ``lengths`` (N,), with
the whole key in its metadata. The key (``PrefixKey``) names everything the states depend on: the
frozen prefix's fingerprint (the backbone's weights and anything else frozen in it), the tokenizer,
max_length, k, the examples (texts and labels, in order) and the stored dtype. Any change gives
another digest, so the states are computed afresh; entries no longer used are evicted oldest first.

- **Size cap.** The folder's files never exceed ``max_bytes``: before an entry is written, entries
  are evicted in order of last use (a hit sets a file's time) until it fits. An entry larger than
  the whole cap is not written; its states serve the current run from memory.
- **Crashes.** An entry is written to a temporary file beside it, synced, then renamed into place:
  a crash leaves the old state or a temporary file that no reader opens (and the next write removes).
- **Damage.** A file is mapped (``mmap``) and its header checked (``fedadapt.delta.safetensors_header``:
  bounded JSON, tensors exactly filling the file) before any row is read; the lengths must be the
  examples' token counts. A file that fails is a miss: a warning, the file removed, the states rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from transformers import PreTrainedTokenizerBase

from fedadapt import jsonsafe
from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.data.batching import EncodedTexts, collate
from fedadapt.delta.safetensors_header import read_header
from fedadapt.errors import ConfigError, StateError
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.device import select_device
from fedadapt.train.frozen_prefix import prefix_fingerprint
from fedadapt.train.prefix_cache import check_cacheable, pad_rows, prefix_states

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the file layout changes: older entries then miss and are evicted in time
DEFAULT_MAX_BYTES = 256 * 2**20  # a device's cap: Banking77's 10,003 texts take about 120 MB through MiniLM in fp16
SUFFIX = ".safetensors"
TEMP_PREFIX = "."  # write_bytes_atomic's temporaries (".<name>.<random>"); entries never start with a dot
STALE_TEMP_SECONDS = 600  # a temporary file this old belongs to a writer that died
MAX_HEADER_BYTES = 64 * 1024  # two tensors and the key: a few hundred bytes
STORED_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FP16_MAX = 65504.0
KEY_FIELD = "fedadapt-prefix-key"  # the metadata entry holding the whole key
_TOKENIZER_DIGESTS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PrefixKey:
    """Everything an entry's states depend on; any change makes another entry."""

    prefix: str  # prefix_fingerprint: the backbone's weights and anything else frozen below layer k
    tokenizer: str  # tokenizer_digest: what turns texts into token ids
    max_length: int
    frozen_layers: int
    examples: str  # examples_digest: the texts and labels, in order
    dtype: str  # how the states are stored: float16 (half the bytes) or float32 (bit for bit)

    def __post_init__(self) -> None:
        if self.dtype not in STORED_DTYPES:
            raise ConfigError(f"the prefix store keeps {sorted(STORED_DTYPES)}, not {self.dtype!r}")

    def as_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what decides a tokenizer's ids: its vocabulary and pipeline, special tokens, lower-casing.

    A fast tokenizer's serialized pipeline (normalizer, pre-tokenizer, model with its vocabulary,
    post-processor) without its truncation and padding, which each call sets anew; a slow one's
    vocabulary and settings. Remembered per tokenizer object (a simulation worker asks every round;
    serializing a 30k vocabulary takes a fifth of a second), recomputed if its vocabulary grew.
    """
    remembered = _TOKENIZER_DIGESTS.get(tokenizer)
    if remembered is not None and remembered[0] == len(tokenizer):
        return remembered[1]
    digest = _tokenizer_digest(tokenizer)
    _TOKENIZER_DIGESTS[tokenizer] = (len(tokenizer), digest)
    return digest


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    parts: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the tokenizer's own pipeline, bounded like any JSON we parse (a large vocabulary is a few MB)
        pipeline = jsonsafe.loads(
            backend.to_str(), what="the tokenizer's pipeline", max_bytes=256 * 2**20, max_depth=64
        )
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        parts["pipeline"] = pipeline
    else:
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
        parts["settings"] = {k: repr(v) for k, v in sorted(tokenizer.init_kwargs.items()) if not k.endswith("_file")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def examples_digest(texts: Sequence[str], labels: Sequence[int]) -> str:
    """A digest of the examples in order: each text and its label."""
    if len(texts) != len(labels):
        raise ConfigError(f"{len(texts)} texts but {len(labels)} labels")
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        encoded = text.encode()
        digest.update(f"{len(encoded)}:{label}:".encode())  # the length first: no two lists hash alike
        digest.update(encoded)
    return digest.hexdigest()


def prefix_key(
    model: AdapterModel,
    frozen_layers: int,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
    dtype: str = "float16",
) -> PrefixKey:
    """The key of ``texts`` (encoded with ``max_length``) through ``model``'s lowest ``frozen_layers`` layers."""
    return PrefixKey(
        prefix=prefix_fingerprint(model, frozen_layers),
        tokenizer=tokenizer_digest(model.backbone.tokenizer),
        max_length=max_length,
        frozen_layers=frozen_layers,
        examples=examples_digest(texts, labels),
        dtype=dtype,
    )


class StoredPrefix:
    """Rows of frozen-prefix states, one per example, over a (T_total, H) array (a mapped file, or memory)."""

    def __init__(self, data: EncodedTexts, key: PrefixKey, states: np.ndarray, lengths: np.ndarray) -> None:
        self.data = data
        self.frozen_layers = key.frozen_layers
        self.prefix_fingerprint = key.prefix
        self._states = states  # (T_total, H)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()

    def row(self, index: int) -> torch.Tensor:
        """Example ``index``'s states as float32, (T_index, H)."""
        start, stop = self._offsets[index], self._offsets[index + 1]
        return torch.from_numpy(np.array(self._states[start:stop], dtype=np.float32))  # a copy: the file is read-only

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """``hidden`` (B, T, H) float32 padded to the longest member, ``attention_mask`` (B, T), ``labels`` (B,)."""
        return pad_rows([self.row(i) for i in indices], [self.data.labels[i] for i in indices])


@dataclass(frozen=True)
class PrefixUse:
    """How a run got its frozen-prefix states: found on disk (``hit``) or computed, and in how many seconds."""

    hit: bool
    seconds: float
    stored: bool  # on disk now (False: larger than the whole cap, or a store with no room: memory only)


class PrefixStore:
    """A folder of frozen-prefix entries, at most ``max_bytes`` in all, evicted least recently used first."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"the prefix store's max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def path(self, key: PrefixKey) -> Path:
        return self.folder / f"{key.digest}{SUFFIX}"

    def entries(self) -> list[Path]:
        """The entries, least recently used first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".")]
        return sorted(found, key=lambda p: (_mtime_ns(p), p.name))

    def used_bytes(self) -> int:
        """Bytes of every file in the folder, temporary ones included."""
        if not self.folder.is_dir():
            return 0
        return sum(_size(p) for p in self.folder.iterdir() if p.is_file())

    def load_or_build(
        self,
        model: AdapterModel,
        data: EncodedTexts,
        key: PrefixKey,
        device: str = "auto",
        fill_batch_size: int = 64,
    ) -> tuple[StoredPrefix, PrefixUse]:
        """The entry of ``key``: read back if stored and sound, else computed from ``model`` and stored if it fits."""
        start = time.perf_counter()
        found = self.open(key, data)
        if found is not None:
            return found, PrefixUse(hit=True, seconds=time.perf_counter() - start, stored=True)
        built, stored = self.build(model, data, key, device, fill_batch_size)
        return built, PrefixUse(hit=False, seconds=time.perf_counter() - start, stored=stored)

    def open(self, key: PrefixKey, data: EncodedTexts) -> StoredPrefix | None:
        """The stored entry of ``key`` for ``data``, or None: not stored, or damaged (then removed, with a warning)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = _read_entry(path, key, data)
        except (OSError, ValueError, StateError) as err:
            logger.warning("prefix cache entry %s is unreadable (%s): computing the frozen prefix again", path, err)
            _remove(path)
            return None
        _touch(path)  # its last use, for eviction
        return entry

    def build(
        self,
        model: AdapterModel,
        data: EncodedTexts,
        key: PrefixKey,
        device: str = "auto",
        fill_batch_size: int = 64,
    ) -> tuple[StoredPrefix, bool]:
        """Compute the entry of ``key`` and store it if it fits the cap; (the entry, whether it is on disk)."""
        check_cacheable(model, key.frozen_layers)
        if key.prefix != prefix_fingerprint(model, key.frozen_layers):
            raise ConfigError("this key was made for another backbone or frozen prefix than the model's")
        dtype = STORED_DTYPES[key.dtype]
        states, lengths, largest = compute_prefix_states(model, data, key.frozen_layers, dtype, device, fill_batch_size)
        if (
            dtype == torch.float16 and largest > FP16_MAX
        ):  # not seen in BERT-family encoders, whose layers end in LayerNorm
            logger.warning(
                "the frozen prefix's states reach %.3g, beyond float16's range: kept in memory as float32 for this run",
                largest,
            )
            states = compute_prefix_states(model, data, key.frozen_layers, torch.float32, device, fill_batch_size)[0]
            return StoredPrefix(data, key, states.numpy(), lengths.numpy()), False
        blob = safetensors.torch.save({"states": states, "lengths": lengths}, metadata={KEY_FIELD: key.as_json()})
        if self._write(self.path(key), blob):
            try:
                return _read_entry(self.path(key), key, data), True
            except (OSError, ValueError, StateError) as err:  # the disk gave back other bytes than written
                logger.warning("prefix cache entry %s just written is unreadable (%s)", self.path(key), err)
        return StoredPrefix(data, key, states.numpy(), lengths.numpy()), False

    def _write(self, path: Path, blob: bytes) -> bool:
        """Write ``blob`` as ``path`` if it fits the cap, evicting least recently used entries; whether written.

        A folder that cannot be written (read-only, full) is no error: the states serve this run from memory.
        """
        try:
            return self._write_within_cap(path, blob)
        except OSError as err:
            logger.warning("could not keep the frozen prefix's states in %s (%s): using them from memory", path, err)
            return False

    def _write_within_cap(self, path: Path, blob: bytes) -> bool:
        path.unlink(missing_ok=True)  # a damaged entry of the same key
        if len(blob) > self.max_bytes:
            logger.info(
                "frozen-prefix states of %d bytes exceed the cache's cap of %d bytes: kept in memory for this run",
                len(blob),
                self.max_bytes,
            )
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        entries = self.entries()
        used = self.used_bytes()
        while used + len(blob) > self.max_bytes and entries:
            oldest = entries.pop(0)
            used -= _size(oldest)
            oldest.unlink(missing_ok=True)
            logger.info("evicted prefix cache entry %s (least recently used) to stay under %d bytes", oldest, used)
        if used + len(blob) > self.max_bytes:  # only temporaries of a live writer are left: do not exceed the cap
            return False
        write_bytes_atomic(path, blob)  # never half an entry: a crash leaves a temporary, removed later
        _touch(path)
        return True

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for leftover in self.folder.glob(f"{TEMP_PREFIX}*"):
            if _mtime_ns(leftover) / 1e9 < cutoff:
                leftover.unlink(missing_ok=True)


def compute_prefix_states(
    model: AdapterModel,
    data: EncodedTexts,
    frozen_layers: int,
    dtype: torch.dtype = torch.float32,
    device: str = "auto",
    fill_batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Every example's states after layer ``frozen_layers - 1``, on the CPU.

    (sum T_i, H) as ``dtype`` in data order, the (N,) T_i, and the largest magnitude computed
    (before the conversion to ``dtype``).
    """
    if fill_batch_size <= 0:
        raise ConfigError(f"fill_batch_size must be positive, got {fill_batch_size!r}")
    target = select_device(device)
    model.to(target)
    lengths = torch.tensor([len(ids) for ids in data.input_ids], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).tolist()
    hidden_size = int(model.backbone.model.config.hidden_size)
    states = torch.empty((offsets[-1], hidden_size), dtype=dtype)
    largest = 0.0
    # Length-sorted fill batches pad little; the real tokens' states do not depend on padding.
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), fill_batch_size):
        indices = order[start : start + fill_batch_size]
        batch = {k: v.to(target) for k, v in collate(data, indices).items()}
        computed = prefix_states(model, batch, frozen_layers).float().cpu()  # (B, T, H)
        largest = max(largest, float(computed.abs().max()))
        for b, i in enumerate(indices):
            states[offsets[i] : offsets[i + 1]] = computed[b, : offsets[i + 1] - offsets[i]]
    return states, lengths, largest


def _read_entry(path: Path, key: PrefixKey, data: EncodedTexts) -> StoredPrefix:
    """The entry in ``path``, mapped; ValueError or StateError unless it is sound and made for ``key`` and ``data``."""
    with path.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError for an empty file
    view = memoryview(mapped)
    header = read_header(view, max_length=MAX_HEADER_BYTES)  # the tensors fill the file exactly
    if header.metadata.get(KEY_FIELD) != key.as_json():
        raise ValueError("it was made for another key")
    if set(header.tensors) != {"states", "lengths"}:
        raise ValueError(f"it holds the tensors {sorted(header.tensors)[:4]}, not states and lengths")
    states_entry, lengths_entry = header.tensors["states"], header.tensors["lengths"]
    if lengths_entry.dtype != "int64" or lengths_entry.shape != (len(data),):
        raise ValueError(f"its lengths are {lengths_entry.dtype} {lengths_entry.shape}, expected int64 ({len(data)},)")
    if states_entry.dtype != key.dtype or len(states_entry.shape) != 2:
        raise ValueError(f"its states are {states_entry.dtype} {states_entry.shape}, expected {key.dtype} (T, H)")
    data_start = 8 + header.length
    lengths = np.frombuffer(view, dtype="<i8", count=len(data), offset=data_start + lengths_entry.begin)
    if lengths.tolist() != [len(ids) for ids in data.input_ids]:
        raise ValueError("its lengths are not the examples' token counts")
    total, hidden = states_entry.shape
    if total != int(lengths.sum()):
        raise ValueError(f"it holds {total} rows of states for {int(lengths.sum())} tokens")
    dtype = np.dtype("<f2") if key.dtype == "float16" else np.dtype("<f4")
    states = np.frombuffer(view, dtype=dtype, count=total * hidden, offset=data_start + states_entry.begin)
    return StoredPrefix(data, key, states.reshape(total, hidden), lengths)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as err:  # a read-only folder: the next open reads it again, and fails again, harmlessly
        logger.debug("could not remove %s: %s", path, err)


def _touch(path: Path) -> None:
    now = time.time_ns()  # set explicitly: file systems stamp writes with a coarser clock
    try:
        os.utime(path, ns=(now, now))
    except OSError as err:  # a read-only folder: the entry still serves, eviction order is just older
        logger.debug("could not mark %s as used: %s", path, err)


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
