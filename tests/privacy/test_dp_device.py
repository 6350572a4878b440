"""A device's DP under secure aggregation (fedadapt.privacy.dp.device): clip, bit, noise share, its own parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedadapt.aggregate.dp_rounds import DpRounds
from fedadapt.errors import ConfigError
from fedadapt.privacy.dp.config import DpConfig
from fedadapt.privacy.dp.device import private_vector, round_clip
from fedadapt.privacy.dp.plan import plan_dp

N, M, ROUNDS = 100, 10, 5


def test_central_mode_devices_clip_and_add_no_noise() -> None:
    config = DpConfig(mode="central", noise_multiplier=1.0, clip=0.5, delta=1e-3)
    vector = np.full(400, 2.0)
    out = private_vector(vector, config, 0.5, N, M, ROUNDS, np.random.default_rng(0))
    assert out.shape == (400,) and np.linalg.norm(out) <= 0.5 and np.allclose(out, out[0])
    small = np.full(4, 0.01)
    assert np.array_equal(private_vector(small, config, 0.5, N, M, ROUNDS), small)  # within C: untouched


def test_distributed_shares_have_the_planned_std_and_the_adaptive_bit_rides_along() -> None:
    config = DpConfig(
        mode="distributed",
        noise_multiplier=1.0,
        clip="adaptive",
        initial_clip=0.1,
        clipped_count_stddev=2.0,
        delta=1e-3,
    )
    plan = plan_dp(config, N, M, ROUNDS)
    rng = np.random.default_rng(1)
    draws = np.stack([private_vector(np.zeros(2000), config, 0.1, N, M, ROUNDS, rng) for _ in range(20)])
    noise, bits = draws[:, :-1], draws[:, -1]
    assert noise.std() == pytest.approx(plan.delta_noise_multiplier * 0.1 / math.sqrt(M), rel=0.03)
    assert plan.delta_noise_multiplier > 1.0  # the count took part of the budget: the deltas get more noise
    big = np.stack([private_vector(np.full(10, 5.0), config, 0.1, N, M, ROUNDS, rng)[-1] for _ in range(4000)])
    assert big.mean() == pytest.approx(-0.5, abs=0.05)  # clipped: the centred bit is -1/2
    assert big.std() == pytest.approx(2.0 / math.sqrt(M), rel=0.05)
    assert abs(bits.mean() - 0.5) < 3 * 2.0 / math.sqrt(M) / math.sqrt(20)  # zero delta fits: +1/2


def test_the_clip_norm_is_the_scenarios_unless_adaptive_and_a_servers_clip_is_checked() -> None:
    fixed = DpConfig(noise_multiplier=1.0, clip=0.5)
    assert round_clip(fixed, 1e9) == 0.5  # a fixed clip never comes from the server
    adaptive = DpConfig(noise_multiplier=1.0, clip="adaptive", initial_clip=0.1)
    assert round_clip(adaptive, 0.25) == 0.25
    for bad in (None, float("nan"), -1.0, 0.0, 1e9, "0.1", True):
        with pytest.raises(ConfigError):
            round_clip(adaptive, bad)


def test_dropped_devices_shares_are_accounted_as_less_noise() -> None:
    config = DpConfig(mode="distributed", noise_multiplier=1.2, clip=0.5, delta=1e-3)
    rounds = DpRounds(config, N, M, ROUNDS, seed=0)
    entry = rounds.finish_round(N, M, aggregated=True, survivors=6)
    assert entry["noise_multiplier"] == pytest.approx(1.2 * math.sqrt(6 / M))
    full = DpRounds(config, N, M, ROUNDS, seed=0).finish_round(N, M, aggregated=True, survivors=M)
    assert full["noise_multiplier"] == pytest.approx(1.2) and entry["epsilon"] > full["epsilon"]
    central = DpRounds(DpConfig(noise_multiplier=1.2, clip=0.5, delta=1e-3), N, M, ROUNDS, seed=0)
    assert central.finish_round(N, M, aggregated=True, survivors=6)["noise_multiplier"] == 1.2  # server-added


def test_a_device_that_requires_distributed_dp_refuses_runs_without_it() -> None:
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from clients.device import device_from_config, enforce_privacy_policy
    from fedadapt.fleet.scenario import scenario_from_dict

    device = device_from_config({"partition-id": 0, "require-dp": "distributed", "require-privacy": "secagg+"})
    secure = {"mode": "secagg+", "num-shares": 3}
    distributed = scenario_from_dict(
        {
            "num-clients": 20,
            "clients-per-round": 5,
            "privacy": {**secure, "dp": {"mode": "distributed", "noise-multiplier": 1.0}},
        }
    )
    enforce_privacy_policy(device, distributed.privacy)  # takes part
    for dp in (None, {"mode": "central", "noise-multiplier": 1.0}):
        privacy = {**secure, **({"dp": dp} if dp else {})}
        offered = scenario_from_dict({"num-clients": 20, "clients-per-round": 5, "privacy": privacy})
        with pytest.raises(ConfigError, match="requires distributed DP"):
            enforce_privacy_policy(device, offered.privacy)
    with pytest.raises(ConfigError, match="'require-dp'"):
        device_from_config({"partition-id": 0, "require-dp": "yes"})
