"""A run's fixed DP parameters, derived the same way on the server and on every device from the scenario alone.

z (configured, or solved for ``target-epsilon`` over the planned rounds), z_Δ and σ_b (an adaptive clip splits
the budget between the deltas and the count of unclipped devices) and δ. A device derives them itself
(``cached_plan``) rather than trusting the server's numbers: under distributed DP its noise share protects it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from fedadapt.errors import ConfigError
from fedadapt.privacy.dp.accounting import solve_noise_multiplier
from fedadapt.privacy.dp.adaptive_clip import split_noise_multiplier
from fedadapt.privacy.dp.config import DpConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DpPlan:
    """The run's fixed DP parameters: z (what the accountant composes), z_Δ (the deltas' share), σ_b, δ."""

    noise_multiplier: float
    delta_noise_multiplier: float
    clipped_count_stddev: float | None
    delta: float
    population: int  # n: the scenario's devices
    sample_size: int  # m: devices per round


def plan_dp(config: DpConfig, population: int, sample_size: int, rounds: int) -> DpPlan:
    """z, z_Δ, σ_b and δ for a run of ``rounds`` rounds of ``sample_size`` of ``population`` devices."""
    if population < 2:
        raise ConfigError("privacy.dp needs at least 2 devices: the privacy of one device among one is no privacy")
    delta = config.delta_for(population)
    if config.noise_multiplier is not None:
        z = float(config.noise_multiplier)
    else:
        target = float(config.target_epsilon)  # type: ignore[arg-type]  # DpConfig: exactly one of the two
        z = solve_noise_multiplier(target, delta, rounds, population, sample_size, config.sampling)
        logger.info(
            "privacy.dp: noise multiplier %.4f reaches ε = %g at δ = %.3g after %d rounds", z, target, delta, rounds
        )
    stddev = config.clipped_count_stddev_for(sample_size) if config.adaptive else None
    z_delta = split_noise_multiplier(z, stddev) if stddev is not None else z
    return DpPlan(z, z_delta, stddev, delta, population, sample_size)


@functools.lru_cache(maxsize=8)
def cached_plan(config: DpConfig, population: int, sample_size: int, rounds: int) -> DpPlan:
    """``plan_dp``, once per process: solving for a target ε takes seconds, and a device answers every round."""
    return plan_dp(config, population, sample_size, rounds)
