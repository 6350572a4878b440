"""Issue 22: adaptive clipping (Andrew et al. 2021) tracks a quantile of the norms and costs no more than z."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fedadapt.errors import ConfigError
from fedadapt.privacy.dp.adaptive_clip import (
    AdaptiveClip,
    centered_bit,
    noisy_unclipped_fraction,
    split_noise_multiplier,
    unclipped_fraction,
)
from fedadapt.privacy.dp.config import DpConfig
from fedadapt.privacy.dp.noise import make_rng

CLIENTS = 100
SIGMA_B = CLIENTS / 20


def _gaussian_epsilon(*multipliers: float) -> float:
    accountant = RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(1e-5)


@pytest.mark.parametrize("z", [0.3, 1.0, 4.0, 9.9])
def test_the_split_costs_exactly_one_gaussian_with_multiplier_z(z: float) -> None:
    """The delta query (z_Δ) and the count query (sensitivity ½, std σ_b: multiplier 2σ_b) compose to z."""
    z_delta = split_noise_multiplier(z, SIGMA_B)
    assert z_delta > z
    assert _gaussian_epsilon(z_delta, 2 * SIGMA_B) == pytest.approx(_gaussian_epsilon(z), rel=1e-9)
    assert _gaussian_epsilon(z_delta * 0.99, 2 * SIGMA_B) > _gaussian_epsilon(z)


@pytest.mark.parametrize(("z", "sigma_b"), [(10.0, 5.0), (12.0, 5.0), (1.0, 0.4)])
def test_a_split_the_count_cannot_afford_is_refused_with_what_to_do(z: float, sigma_b: float) -> None:
    with pytest.raises(ConfigError, match="Raise clipped-count-stddev .* or use a fixed clip"):
        split_noise_multiplier(z, sigma_b)


def _run(start: float, quantile: float, rounds: int, seed: int) -> list[float]:
    """Adaptive clipping against log-normal delta norms (median 1, sigma 0.5), central noise on the count."""
    rng = make_rng(seed)
    clip = AdaptiveClip(start, target_quantile=quantile, learning_rate=0.2)
    history = []
    for _ in range(rounds):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=CLIENTS)
        clip = clip.next(noisy_unclipped_fraction(norms > clip.clip, CLIENTS, SIGMA_B, rng))
        history.append(clip.clip)
    return history


@pytest.mark.parametrize(("start", "quantile"), [(0.05, 0.5), (20.0, 0.5), (0.05, 0.9), (20.0, 0.2)])
def test_the_clip_moves_to_the_target_quantile_of_the_norms(start: float, quantile: float) -> None:
    z_score = {0.5: 0.0, 0.9: 1.2815516, 0.2: -0.8416212}[quantile]
    true_quantile = math.exp(0.5 * z_score)
    history = _run(start, quantile, rounds=150, seed=11)
    settled = float(np.mean(history[-50:]))
    assert settled == pytest.approx(true_quantile, rel=0.1)
    # it got there monotonically in the first rounds: every step from far away goes the right way
    early = history[:5]
    assert early == sorted(early, reverse=start > true_quantile)


def test_the_count_is_centered_and_divided_by_the_expected_devices() -> None:
    assert (centered_bit(True), centered_bit(False)) == (-0.5, 0.5)
    # 7 of 10 expected devices fit under C, 3 were clipped, no noise: b̃ = (7·½ − 3·½)/10 + ½ = 0.7
    assert unclipped_fraction(7 * 0.5 - 3 * 0.5, 10) == pytest.approx(0.7)
    # one device dropped out (9 reported, 6 fit): the fixed denominator counts it as clipped
    assert unclipped_fraction(6 * 0.5 - 3 * 0.5, 10) == pytest.approx(0.65)


def test_a_wild_count_cannot_push_the_clip_to_zero_or_infinity() -> None:
    clip = AdaptiveClip(1.0, learning_rate=10.0)
    assert clip.next(1e9).clip > 0 and math.isfinite(clip.next(-1e9).clip)
    with pytest.raises(ConfigError, match="finite"):
        clip.next(math.nan)


def test_from_config_starts_at_the_initial_clip() -> None:
    config = DpConfig(noise_multiplier=1.0, clip="adaptive", initial_clip=0.3, target_quantile=0.7)
    assert AdaptiveClip.from_config(config) == AdaptiveClip(0.3, 0.7, 0.2)
    with pytest.raises(ConfigError, match='needs privacy.dp clip = "adaptive"'):
        AdaptiveClip.from_config(DpConfig(noise_multiplier=1.0, clip=0.3))
