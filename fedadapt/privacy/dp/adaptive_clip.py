"""Adaptive clipping: the clip norm follows a quantile of the devices' delta norms, privately.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021.
Each device reports the bit b = 1 when its shared delta's norm is ≤ C (it was *not* clipped). The server learns
only a noised mean of the bits, b̃ = (Σ (b − ½) + N(0, σ_b²)) / m + ½ for m expected devices (centering the bits
at ½ halves the count's sensitivity), and moves C geometrically toward the target quantile γ:

    C ← C · exp(−η (b̃ − γ))

so C shrinks while more than γ of the devices fit under it and grows while fewer do. The noisy count costs privacy
too. Split a total multiplier z between the deltas (z_Δ) and the count (σ_b) so that both together cost what one
Gaussian with multiplier z does (Andrew et al., Sec. 3.2; TFF's ``_build_value_noise_multiplier``):

    z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2),  defined only when 2σ_b > z.

The accountant is then told z, not z_Δ. In distributed mode each device adds N(0, σ_b²/k) to its centered bit as
its delta gets its noise share, and the count's shortfall with fewer survivors scales like the delta's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedadapt.config_values import Bound
from fedadapt.errors import ConfigError
from fedadapt.privacy.dp.config import DpConfig

_COUNT = Bound("int", 1, 10**9)
_MIN_CLIP, _MAX_CLIP = 1e-12, 1e6
_MAX_STEP = 50.0  # exp(±50) ≈ 5e21: far beyond any step a sane count gives, and exp() cannot overflow


def split_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """z_Δ for the deltas when the count takes σ_b of the budget of one Gaussian with multiplier z."""
    if not (isinstance(noise_multiplier, int | float) and 0 < noise_multiplier < math.inf):
        raise ConfigError(f"the noise multiplier must be a positive finite number, got {noise_multiplier!r}")
    if not (isinstance(clipped_count_stddev, int | float) and 0 < clipped_count_stddev < math.inf):
        raise ConfigError(f"clipped-count-stddev must be a positive finite number, got {clipped_count_stddev!r}")
    if noise_multiplier >= 2 * clipped_count_stddev:
        raise ConfigError(
            f"adaptive clipping cannot reach noise multiplier {noise_multiplier:.4g} with clipped-count-stddev "
            f"{clipped_count_stddev:.4g}: the count alone would cost more than that (it needs clipped-count-stddev > "
            f"{noise_multiplier / 2:.4g}). Raise clipped-count-stddev (its default grows with the devices per round: "
            "m / 20), sample more devices per round, or use a fixed clip"
        )
    return float((noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5)


def centered_bit(clipped: bool) -> float:
    """A device's contribution to the count: +½ if its delta fit under C, −½ if it was clipped."""
    return -0.5 if clipped else 0.5


def unclipped_fraction(noisy_centered_sum: float, expected_clients: int) -> float:
    """b̃ = noisy Σ(b − ½) / m + ½ (fixed denominator m, like the deltas' mean)."""
    _COUNT.check("expected devices per round", expected_clients, where="DP")
    if not math.isfinite(noisy_centered_sum):
        raise ConfigError(f"the noised count must be finite, got {noisy_centered_sum!r}")
    return noisy_centered_sum / expected_clients + 0.5


def noisy_unclipped_fraction(
    clipped_bits: Iterable[bool], expected_clients: int, clipped_count_stddev: float, rng: np.random.Generator
) -> float:
    """b̃ in central mode: the server centers the round's clipped bits, sums them and adds N(0, σ_b²)."""
    total = sum(centered_bit(bool(bit)) for bit in clipped_bits)
    return unclipped_fraction(total + float(rng.normal(0.0, clipped_count_stddev)), expected_clients)


@dataclass(frozen=True)
class AdaptiveClip:
    """The clip norm of the coming round and how it moves (``next`` returns the one after)."""

    clip: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        Bound("float", 0, _MAX_CLIP, low_open=True).check("clip", self.clip, where="adaptive")
        Bound("float", 0, 1, low_open=True, high_open=True).check(
            "target-quantile", self.target_quantile, where="adaptive"
        )
        Bound("float", 0, 10, low_open=True).check("clip-learning-rate", self.learning_rate, where="adaptive")

    @classmethod
    def from_config(cls, config: DpConfig) -> AdaptiveClip:
        if not config.adaptive:
            raise ConfigError('AdaptiveClip needs privacy.dp clip = "adaptive"')
        return cls(config.initial_clip_norm, float(config.target_quantile), float(config.clip_learning_rate))

    def next(self, unclipped: float) -> AdaptiveClip:
        """C · exp(−η(b̃ − γ)) for the noised unclipped fraction b̃ (noise can take it outside [0, 1]; fine).

        The result stays within the clip's bounds (a count far off by noise cannot push C to 0 or inf).
        """
        if not math.isfinite(unclipped):
            raise ConfigError(f"the unclipped fraction must be finite, got {unclipped!r}")
        step = -self.learning_rate * (unclipped - self.target_quantile)
        clip = self.clip * math.exp(min(max(step, -_MAX_STEP), _MAX_STEP))
        return AdaptiveClip(min(max(clip, _MIN_CLIP), _MAX_CLIP), self.target_quantile, self.learning_rate)
