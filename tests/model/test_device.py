"""Device and precision selection (fedadapt.model.device): CUDA with bf16/fp16 when present, the CPU otherwise."""

from __future__ import annotations

import pytest
import torch

from fedadapt.errors import ConfigError
from fedadapt.model.device import autocast, select_device, select_precision


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_falls_back_to_the_cpu_without_cuda(no_cuda: None) -> None:
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")


def test_auto_takes_cuda_when_torch_sees_it(fake_cuda: None) -> None:
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cuda:1") == torch.device("cuda", 1)


REFUSED = [
    ("cuda", "sees no CUDA device"),
    ("cuda:0", "sees no CUDA device"),
    ("gpu", "must be 'auto', 'cpu' or 'cuda"),
    ("mps", "must be"),
]


@pytest.mark.parametrize(("choice", "message"), REFUSED)
def test_impossible_or_unknown_devices_are_refused(no_cuda: None, choice: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        select_device(choice)


def test_precision_is_fp32_on_the_cpu_unless_asked() -> None:
    cpu = torch.device("cpu")
    assert select_precision(cpu, "auto") is None
    assert select_precision(cpu, "fp32") is None
    assert select_precision(cpu, "bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 autocast needs a CUDA device"):
        select_precision(cpu, "fp16")
    with pytest.raises(ConfigError, match="precision must be"):
        select_precision(cpu, "int8")


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_cuda_prefers_bf16(
    monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    cuda = torch.device("cuda")
    assert select_precision(cuda, "auto") is expected
    assert select_precision(cuda, "fp16") is torch.float16 and select_precision(cuda, "fp32") is None


def test_autocast_runs_matmuls_in_the_chosen_dtype_and_fp32_is_untouched() -> None:
    cpu = torch.device("cpu")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype is torch.bfloat16
    with autocast(cpu, None):
        assert (a @ b).dtype is torch.float32
