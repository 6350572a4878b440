"""What to export and how: a frozen, validated config (no torch import, so bad input fails at once)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedadapt.errors import ConfigError

Mode = Literal["merged", "swappable"]
MODES: tuple[str, ...] = ("merged", "swappable")
QUANTIZATIONS: tuple[str, ...] = ("int8",)
# Opset 17 is the first with LayerNormalization as one operator (older ones spell it out in several).
MIN_OPSET = 17
DEFAULT_OPSET = 17
# The newest opset torch's TorchScript exporter writes (torch.onnx._constants).
MAX_OPSET = 20
DEFAULT_ATOL = 1e-4
# An adapter name becomes a file name (adapters/<name>.onnx_adapter) on every phone: keep it portable.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

PARITY_TEXTS: tuple[str, ...] = (
    "I still have not received my new card, it was ordered three weeks ago and the tracking shows nothing",
    "top up failed",
    "Why was my card payment declined at the supermarket?",
    "How long does a transfer from another bank take to arrive in my account?",
    "change my PIN",
    "There is a direct debit on my statement that I do not recognise, can you tell me where it comes from?",
)
"""Banking-style queries of mixed lengths: padded together they exercise the attention mask."""


DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQUENCE_LENGTH = 64
DEFAULT_LEARNING_RATE = 0.05
DEFAULT_MOMENTUM = 0.9
# The on-device bounds the export accepts and the bundle's reader (export/bundle_verify.py) enforces.
MAX_LEARNING_RATE = 100.0
MAX_TRAIN_BATCH = 1024
MAX_TRAIN_TOKENS = 4096
ON_DEVICE_EXTRA = "--on-device-training writes an ExecuTorch program: pip install -e '.[phone]' (or '.[dev]')"


@dataclass(frozen=True)
class OnDeviceConfig:
    """How the phone trains: the top ``train_layers`` layers and the head, on B x T batches, with SGD."""

    train_layers: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    learning_rate: float = DEFAULT_LEARNING_RATE
    momentum: float = DEFAULT_MOMENTUM

    def __post_init__(self) -> None:
        if not isinstance(self.train_layers, int) or self.train_layers < 0:
            raise ConfigError(f"--train-layers must be a number of top layers >= 0, got {self.train_layers!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= MAX_TRAIN_BATCH:
            raise ConfigError(f"the on-device batch size must be 1 to {MAX_TRAIN_BATCH}, got {self.batch_size!r}")
        if not isinstance(self.sequence_length, int) or not 2 <= self.sequence_length <= MAX_TRAIN_TOKENS:
            raise ConfigError(
                f"the on-device sequence length must be 2 to {MAX_TRAIN_TOKENS} tokens, got {self.sequence_length!r}"
            )
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ConfigError(
                f"the on-device learning rate must be in (0, {MAX_LEARNING_RATE:g}], got {self.learning_rate!r}"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"the on-device momentum must be in [0, 1), got {self.momentum!r}")


@dataclass(frozen=True)
class ExportConfig:
    """Export the adapter folder ``adapter`` (on ``backbone``, default: the one it records) to ``out``.

    ``texts`` feed the parity check; ``atol`` is the largest logit difference it accepts.
    ``force`` replaces a non-empty ``out``, and only after the new export succeeded; when ``out`` is
    a swappable bundle and ``mode`` is swappable, the adapter joins it and ``force`` only allows
    replacing an adapter of the same name. ``adapter_name`` (swappable only) names the adapter
    inside the bundle; default: the adapter folder's name. ``quantize="int8"`` adds a dynamically
    quantized copy of the graph, ``ort`` an ``.ort`` copy of every graph (ONNX Runtime Mobile), and
    ``eval_data`` (a labelled data set; its test split) the graphs' accuracy to the report.
    ``on_device`` (swappable only) adds the graphs a phone trains the user's personal part with
    (export/on_device.py).
    """

    adapter: Path
    out: Path
    backbone: str | None = None
    mode: Mode = "merged"
    opset: int = DEFAULT_OPSET
    force: bool = False
    texts: tuple[str, ...] = PARITY_TEXTS
    atol: float = DEFAULT_ATOL
    adapter_name: str | None = None
    quantize: str | None = None
    ort: bool = False
    eval_data: Path | None = None
    on_device: OnDeviceConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", Path(self.adapter))
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", Path(self.eval_data))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "texts", tuple(self.texts))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {self.opset!r}")
        if not self.texts or not all(isinstance(t, str) and t.strip() for t in self.texts):
            raise ConfigError("texts for the parity check must be one or more non-empty strings")
        if not self.atol > 0:
            raise ConfigError(f"atol must be positive, got {self.atol!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"quantize must be one of {QUANTIZATIONS} (or left out), got {self.quantize!r}")
        if self.eval_data is not None and not self.eval_data.exists():
            raise ConfigError(
                f"--eval-data {self.eval_data} does not exist; pass a labelled CSV/JSON/JSONL file or folder"
            )
        self._check_adapter_name()
        if self.on_device is not None and self.mode != "swappable":
            raise ConfigError(
                "--on-device-training trains a user's adapter file on the phone, which only a swappable bundle "
                "has: add --mode swappable"
            )
        if self.on_device is not None and importlib.util.find_spec("executorch") is None:
            raise ConfigError(ON_DEVICE_EXTRA)

    @property
    def user_name(self) -> str:
        """The adapter's name inside a swappable bundle."""
        return self.adapter_name or self.adapter.resolve().name

    def _check_adapter_name(self) -> None:
        if self.mode != "swappable":
            if self.adapter_name is not None:
                raise ConfigError("--adapter-name names an adapter inside a swappable bundle; add --mode swappable")
            return
        if not ADAPTER_NAME.fullmatch(self.user_name):
            source = "--adapter-name" if self.adapter_name else "the adapter folder's name (default of --adapter-name)"
            raise ConfigError(
                f"{source} {self.user_name!r} is not a valid adapter name: use 1 to 100 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit; pass another --adapter-name"
            )
