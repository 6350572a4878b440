"""Gaussian noise for DP-FedAvg: on the server (central) or in shares on the devices (distributed).

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018): each sampled
device's shared delta is clipped to L2 norm C, the clipped deltas are **summed** with equal weight (not weighted by
example counts: a device's influence must not depend on a count it claims), N(0, σ²) with σ = z·C is added to
every coordinate of the sum, and the sum is divided by the *expected* number of devices per round, a fixed
denominator that does not depend on who took part.

- **central**: the server adds N(0, σ²) to the sum (``add_gaussian(total, central_noise_std(z, C), rng)``).
- **distributed**: each device adds N(0, σ²/k) to its clipped delta before secure aggregation, where k is the
  number of devices the server plans to survive (e.g. the fewest SecAgg+ can rebuild a sum from). When s
  devices survive, the sum carries variance σ²·s/k: with s < k the round had less noise than planned, and the
  accountant must be told the effective multiplier z·√(s/k) (``effective_noise_multiplier``), not z.

Random numbers: ``make_rng()`` seeds NumPy's PCG64DXSM from 256 bits of the OS's CSPRNG (``secrets``), so no
one can predict or replay a run's noise; a seed is for tests only. PCG64DXSM itself is a statistical generator,
not a cryptographic one: the guarantee assumes its outputs are never seen apart from the noised sum. Floating-point
Gaussian samples leak through their low-order bits (Mironov, CCS 2012, shown for Laplace); this code does not
defend against that.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import overload

import numpy as np
import torch

from fedadapt.config_values import Bound
from fedadapt.errors import ConfigError, StateError

SEED_BITS = 256
_COUNT = Bound("int", 1, 10**9)
_POSITIVE = Bound("float", 0, 1e12, low_open=True)


def make_rng(seed: int | None = None) -> np.random.Generator:
    """A generator for DP noise: seeded from the OS's CSPRNG when ``seed`` is None (real runs), else from ``seed``
    (tests only: a known seed makes the noise known, and known noise protects nothing)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"a noise seed must be a non-negative int or None, got {seed!r}")
    entropy = secrets.randbits(SEED_BITS) if seed is None else seed
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(entropy)))


def central_noise_std(noise_multiplier: float, clip: float) -> float:
    """σ = z·C: the std of the noise on the round's sum of clipped deltas."""
    _POSITIVE.check("noise multiplier", noise_multiplier, where="DP")
    _POSITIVE.check("clip norm", clip, where="DP")
    return noise_multiplier * clip


def device_noise_std(noise_multiplier: float, clip: float, planned_survivors: int) -> float:
    """σ/√k: the std of one device's share when the server plans on ``planned_survivors`` (k) devices surviving."""
    _COUNT.check("planned survivors", planned_survivors, where="DP")
    return central_noise_std(noise_multiplier, clip) / math.sqrt(planned_survivors)


def effective_noise_multiplier(noise_multiplier: float, survivors: int, planned_survivors: int) -> float:
    """z·√(s/k): the multiplier the round's sum really had when s of the planned k devices' shares were in it.

    Below k the shortfall is accounted, not ignored; above k the extra noise is real and counted too.
    """
    _COUNT.check("survivors", survivors, where="DP")
    _COUNT.check("planned survivors", planned_survivors, where="DP")
    _POSITIVE.check("noise multiplier", noise_multiplier, where="DP")
    return noise_multiplier * math.sqrt(survivors / planned_survivors)


@overload
def add_gaussian(values: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray: ...
@overload
def add_gaussian(
    values: Mapping[str, torch.Tensor], std: float, rng: np.random.Generator
) -> dict[str, torch.Tensor]: ...
def add_gaussian(
    values: Mapping[str, torch.Tensor] | np.ndarray, std: float, rng: np.random.Generator
) -> dict[str, torch.Tensor] | np.ndarray:
    """``values`` + N(0, std²) on every coordinate, drawn in float64 and rounded once to each value's dtype.

    Add to the float64 sum on the server (central) or to the device's float32 clipped delta (distributed).
    """
    _POSITIVE.check("noise std", std, where="DP")
    if isinstance(values, np.ndarray):
        _check_floating(values.dtype, "values")
        return (values.astype(np.float64) + rng.normal(0.0, std, size=values.shape)).astype(values.dtype)
    noised: dict[str, torch.Tensor] = {}
    for name, tensor in values.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise StateError(f"DP noise goes on floating-point tensors only; {name!r} is not one")
        noise = torch.from_numpy(rng.normal(0.0, std, size=tuple(tensor.shape)))
        noised[name] = (tensor.detach().to(torch.float64) + noise).to(tensor.dtype)
    return noised


def dp_fedavg_mean(noisy_sum: Mapping[str, torch.Tensor], expected_clients: int) -> dict[str, torch.Tensor]:
    """The noised sum divided by the expected devices per round (fixed denominator, DP-FedAvg), in its dtypes."""
    _COUNT.check("expected devices per round", expected_clients, where="DP")
    return {name: tensor / expected_clients for name, tensor in noisy_sum.items()}


def _check_floating(dtype: np.dtype, name: str) -> None:
    if not np.issubdtype(dtype, np.floating):
        raise StateError(f"DP noise goes on floating-point values only; {name} has dtype {dtype}")
