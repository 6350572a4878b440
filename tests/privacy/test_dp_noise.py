"""Issue 22: the noise has the std the guarantee needs, central or in shares, with dropouts accounted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedadapt.errors import ConfigError, StateError
from fedadapt.privacy.dp.accounting import Accountant
from fedadapt.privacy.dp.noise import (
    add_gaussian,
    central_noise_std,
    device_noise_std,
    dp_fedavg_mean,
    effective_noise_multiplier,
    make_rng,
)

Z, CLIP = 1.3, 0.7
SIZE = 20_000  # the sample std's relative error is about 1/sqrt(2·SIZE) = 0.5%: 3% is six of those


def _empirical_std(values: np.ndarray) -> float:
    return float(np.std(values.astype(np.float64), ddof=1))


def test_central_noise_on_the_sum_has_std_z_times_c() -> None:
    summed = {"a": torch.zeros(100, 100, dtype=torch.float64), "b": torch.zeros(SIZE - 10_000, dtype=torch.float64)}
    noised = add_gaussian(summed, central_noise_std(Z, CLIP), make_rng(1))
    draws = torch.cat([t.reshape(-1) for t in noised.values()]).numpy()
    assert _empirical_std(draws) == pytest.approx(Z * CLIP, rel=0.03)
    assert abs(float(draws.mean())) < 4 * Z * CLIP / math.sqrt(SIZE)
    assert [(t.dtype, t.shape) for t in noised.values()] == [(t.dtype, t.shape) for t in summed.values()]


@pytest.mark.parametrize(("planned", "survivors"), [(8, 8), (8, 5), (8, 10), (1, 1)])
def test_device_shares_sum_to_the_planned_variance_and_dropouts_are_accounted(planned: int, survivors: int) -> None:
    """k devices were planned; s sent their noised zero deltas. The sum's std is z·C·sqrt(s/k), and the multiplier
    the accountant is told is exactly that std over C."""
    rng = make_rng(2)
    share_std = device_noise_std(Z, CLIP, planned)
    assert share_std == pytest.approx(Z * CLIP / math.sqrt(planned))
    shares = [add_gaussian(np.zeros(SIZE, dtype=np.float32), share_std, rng) for _ in range(survivors)]
    total = np.sum([s.astype(np.float64) for s in shares], axis=0)
    effective = effective_noise_multiplier(Z, survivors, planned)
    assert effective == pytest.approx(Z * math.sqrt(survivors / planned))
    assert _empirical_std(total) == pytest.approx(effective * CLIP, rel=0.03)
    if survivors < planned:
        assert _empirical_std(total) < 0.9 * Z * CLIP  # the shortfall is real: less noise than planned
    accountant = Accountant("fixed-size", 1e-5)
    accountant.record_round(effective, 1000, planned)
    assert accountant.events[0].noise_multiplier == effective


def test_fewer_survivors_cost_more_privacy() -> None:
    full, short = Accountant("fixed-size", 1e-5), Accountant("fixed-size", 1e-5)
    assert short.record_round(effective_noise_multiplier(Z, 4, 8), 1000, 8) > full.record_round(
        effective_noise_multiplier(Z, 8, 8), 1000, 8
    )


def test_noise_on_a_flat_float32_vector_keeps_its_dtype() -> None:
    values = np.linspace(-1, 1, SIZE, dtype=np.float32)
    noised = add_gaussian(values, 0.25, make_rng(3))
    assert noised.dtype == np.float32 and noised.shape == values.shape
    assert _empirical_std(noised.astype(np.float64) - values) == pytest.approx(0.25, rel=0.03)


def test_a_seed_replays_the_noise_and_no_seed_draws_from_the_os() -> None:
    first, again = make_rng(7).normal(size=8), make_rng(7).normal(size=8)
    assert np.array_equal(first, again)
    assert not np.array_equal(make_rng().normal(size=8), make_rng().normal(size=8))
    for bad in (-1, True, 1.5, "7"):
        with pytest.raises(ConfigError, match="noise seed"):
            make_rng(bad)  # type: ignore[arg-type]


def test_the_mean_divides_by_the_expected_count_not_the_survivors() -> None:
    mean = dp_fedavg_mean({"w": torch.tensor([10.0, -20.0], dtype=torch.float64)}, 10)
    assert torch.equal(mean["w"], torch.tensor([1.0, -2.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="expected devices per round"):
        dp_fedavg_mean({"w": torch.ones(2)}, 0)


def test_bad_noise_parameters_are_refused() -> None:
    with pytest.raises(ConfigError, match="noise multiplier"):
        central_noise_std(0.0, 1.0)
    with pytest.raises(ConfigError, match="clip norm"):
        central_noise_std(1.0, math.nan)
    with pytest.raises(ConfigError, match="planned survivors"):
        device_noise_std(1.0, 1.0, 0)
    with pytest.raises(ConfigError, match="survivors"):
        effective_noise_multiplier(1.0, 0, 3)
    with pytest.raises(ConfigError, match="noise std"):
        add_gaussian(np.zeros(3), -1.0, make_rng(0))
    with pytest.raises(StateError, match="floating-point"):
        add_gaussian(np.zeros(3, dtype=np.int32), 1.0, make_rng(0))
    with pytest.raises(StateError, match="floating-point"):
        add_gaussian({"n": torch.zeros(3, dtype=torch.int64)}, 1.0, make_rng(0))
