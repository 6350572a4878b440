"""Choosing the device and the autocast precision: CUDA with bf16/fp16 when present, else CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from fedadapt.errors import ConfigError

DeviceChoice = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


def select_device(choice: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {choice!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    if choice != "cpu" and not choice.startswith("cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {choice!r}")
    return torch.device(choice)


def select_precision(device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. ``auto``: bf16 on GPUs that have it, else fp16 on CUDA."""
    if choice not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {choice!r}")
    if choice == "fp32" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda" and choice == "fp16":
        raise ConfigError("fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if choice == "bf16" else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``; a no-op for fp32."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
