"""A device's part of differential privacy under secure aggregation: clip, append the bit, add its noise share.

Under secagg+ the server sees only the sum, so the clipping must happen on the device, before masking. The
device decides everything that protects it from its own copy of the scenario, never from the server:

- the noise multiplier z (z_Δ with an adaptive clip) and σ_b, derived as the server derives them
  (``plan.cached_plan``: solving for a target ε takes a few seconds, so once per process);
- k, the devices whose shares make up the full noise: the scenario's devices per round.

Only the clip norm C comes from the server (an adaptive clip moves each round). That is safe: a device's noise
share scales with C, so a larger C buys the server no less noise relative to the delta.
"""

from __future__ import annotations

import math

import numpy as np

from fedadapt.config_values import Bound
from fedadapt.errors import ConfigError
from fedadapt.privacy.dp.adaptive_clip import centered_bit
from fedadapt.privacy.dp.clipping import clip_delta
from fedadapt.privacy.dp.config import DpConfig
from fedadapt.privacy.dp.noise import device_noise_std, make_rng
from fedadapt.privacy.dp.plan import cached_plan

CLIP_BOUND = Bound("float", 0, 1e6, low_open=True)
# SecAgg+ clips every masked value to ±clipping-range: a noised value beyond it would no longer carry the Gaussian
# noise the accountant assumes. Values stay within C (+ 6 share stds) but for about 2 in 10⁹.
SHARE_TAIL = 6.0


def needed_clipping_range(config: DpConfig, clip: float, population: int, sample_size: int, rounds: int) -> float:
    """The smallest SecAgg+ clipping-range that leaves a device's DP values unclipped (but for 6-σ tails)."""
    return max(
        clip * values_range_per_clip(config, population, sample_size, rounds),
        bit_range(config, population, sample_size, rounds),
    )


def values_range_per_clip(config: DpConfig, population: int, sample_size: int, rounds: int) -> float:
    """The range a device's delta values (≤ C, plus its noise share in distributed mode) need, per unit of C."""
    if config.mode != "distributed":
        return 1.0
    plan = cached_plan(config, population, sample_size, rounds)
    return 1.0 + SHARE_TAIL * device_noise_std(plan.delta_noise_multiplier, 1.0, sample_size)


def bit_range(config: DpConfig, population: int, sample_size: int, rounds: int) -> float:
    """The range the adaptive clip's centred bit (±½, plus its noise share in distributed mode) needs; 0 if fixed."""
    if not config.adaptive:
        return 0.0
    stddev = cached_plan(config, population, sample_size, rounds).clipped_count_stddev or 0.0
    share = stddev / math.sqrt(sample_size) if config.mode == "distributed" else 0.0
    return 0.5 + SHARE_TAIL * share


def encoding_slack(quantization_step: float, values: int) -> float:
    """How far SecAgg+'s stochastic rounding can move a vector of ``values`` values (< one step each), in L2."""
    return quantization_step * math.sqrt(values)


def round_clip(config: DpConfig, server_clip: object) -> float:
    """C for this round: the scenario's fixed clip, or (adaptive) the server's, checked to be a sane number."""
    if not config.adaptive:
        return float(config.clip)  # type: ignore[arg-type]  # a fixed clip is a number
    if server_clip is None:
        raise ConfigError("the server sent no clip norm (dp-clip) for an adaptive-clip DP round")
    CLIP_BOUND.check("dp-clip", server_clip, where="the server's")
    return float(server_clip)  # type: ignore[arg-type]  # checked above


def private_vector(
    vector: np.ndarray,
    config: DpConfig,
    clip: float,
    population: int,
    sample_size: int,
    rounds: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The float64 vector a device masks: its delta clipped to C, the centred bit when adaptive, and in
    distributed mode its noise share N(0, (z_Δ·C)²/k) on the delta and N(0, σ_b²/k) on the bit."""
    clipped = clip_delta(np.asarray(vector, dtype=np.float64), clip)
    values = clipped.delta
    if config.adaptive:
        values = np.append(values, centered_bit(clipped.clipped))
    if config.mode != "distributed":
        return values
    rng = make_rng() if rng is None else rng
    plan = cached_plan(config, population, sample_size, rounds)
    noised = values.copy()
    size = vector.size
    noised[:size] += rng.normal(0.0, device_noise_std(plan.delta_noise_multiplier, clip, sample_size), size=size)
    if plan.clipped_count_stddev is not None:
        noised[size] += rng.normal(0.0, plan.clipped_count_stddev / math.sqrt(sample_size))
    return noised
