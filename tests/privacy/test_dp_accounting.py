"""Issue 22: the accountant's ε is dp_accounting's for the round loop's sampling, the solver hits its target,
the budget stops the run at the last round within it, and a saved state replays exactly or is refused."""

from __future__ import annotations

import json
from typing import Any

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fedadapt.errors import AccountantStateError, ConfigError
from fedadapt.privacy.dp.accounting import FORMAT, MAX_ROUNDS, Accountant, solve_noise_multiplier

DELTA = 1e-5
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def _direct_fixed_size(rounds: list[tuple[float, int, int]], count: int = 1) -> float:
    """ε built by hand: m of n without replacement, REPLACE_ONE. Swapping one device's clipped delta for another
    moves the sum by up to 2C, and dp_accounting's RDP for this event reads its multiplier per L2 sensitivity,
    so noise std z·C is GaussianDpEvent(z / 2) here."""
    accountant = RdpAccountant(neighboring_relation=REPLACE_ONE)
    for z, n, m in rounds:
        gaussian = dp_accounting.GaussianDpEvent(z / 2)
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, gaussian), count)
    return accountant.get_epsilon(DELTA)


def _direct_poisson(z: float, q: float, count: int) -> float:
    accountant = RdpAccountant()  # ADD_OR_REMOVE_ONE: the relation dp_accounting supports for Poisson under RDP
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)
    return accountant.get_epsilon(DELTA)


def test_epsilon_is_dp_accountings_for_fixed_size_sampling() -> None:
    rounds = [(1.1, 1000, 20), (1.1, 1000, 20), (0.9, 950, 20), (1.1, 1000, 20)]
    accountant = Accountant("fixed-size", DELTA)
    reported = [accountant.record_round(*r) for r in rounds]
    assert reported == sorted(reported) and reported[0] > 0
    assert accountant.epsilon == pytest.approx(_direct_fixed_size(rounds), rel=1e-12)
    assert accountant.rounds == 4 and accountant.events[2].population == 950


def test_every_device_every_round_is_a_gaussian_of_sensitivity_2c() -> None:
    """m = n: no sampling, so ε is the plain Gaussian's with std z·C and sensitivity 2C (add/remove, multiplier z/2)."""
    accountant = Accountant("fixed-size", DELTA)
    for _ in range(3):
        accountant.record_round(2.0, 5, 5)
    plain = RdpAccountant()
    plain.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    assert accountant.epsilon == pytest.approx(plain.get_epsilon(DELTA), rel=1e-12)


def test_epsilon_is_dp_accountings_for_poisson_sampling() -> None:
    accountant = Accountant("poisson", DELTA)
    for _ in range(5):
        accountant.record_round(0.8, 1000, 10)
    assert accountant.epsilon == pytest.approx(_direct_poisson(0.8, 0.01, 5), rel=1e-12)


@pytest.mark.parametrize(("sampling", "target"), [("fixed-size", 4.0), ("poisson", 2.0)])
def test_the_solved_noise_multiplier_reaches_the_target(sampling: str, target: float) -> None:
    z = solve_noise_multiplier(target, DELTA, 30, 1000, 20, sampling)

    def epsilon(multiplier: float) -> float:  # 30 rounds, checked independently of the solver's own events
        if sampling == "fixed-size":
            return _direct_fixed_size([(multiplier, 1000, 20)], count=30)
        return _direct_poisson(multiplier, 20 / 1000, 30)

    assert epsilon(z) <= target  # never less private than asked
    assert epsilon(z) == pytest.approx(target, rel=1e-3)
    assert epsilon(z * 0.99) > target  # and not more noise than needed


def test_a_target_reachable_without_noise_is_refused() -> None:
    with pytest.raises(ConfigError, match="lower target-epsilon or set noise-multiplier"):
        solve_noise_multiplier(1e5, DELTA, 1, 10, 10)


def test_the_budget_stops_at_the_last_round_within_it() -> None:
    accountant = Accountant("poisson", DELTA)  # the stop logic is the same for both; Poisson's RDP is faster
    after_one = Accountant("poisson", DELTA).record_round(1.0, 1000, 50)
    budget = after_one * 1.15  # ε: 1.61, 1.73, 1.81, 1.88 ...: the budget falls after round 3
    ran = 0
    while not accountant.next_round_exceeds(budget, 1.0, 1000, 50):
        accountant.record_round(1.0, 1000, 50)
        ran += 1
        assert ran < 20
    assert accountant.epsilon <= budget < accountant.epsilon_after(1.0, 1000, 50)
    assert ran == 3 and accountant.rounds == ran


def test_a_preview_is_the_epsilon_the_round_then_records() -> None:
    accountant = Accountant("fixed-size", DELTA)
    accountant.record_round(1.0, 100, 10)
    for z in (1.0, 0.7):
        preview = accountant.epsilon_after(z, 100, 10)
        assert accountant.rounds in (1, 2)  # a preview records nothing
        assert accountant.record_round(z, 100, 10) == preview


def test_a_saved_state_replays_to_the_same_epsilon_bit_for_bit() -> None:
    accountant = Accountant("fixed-size", DELTA)
    for z in (1.0, 1.0, 1.0, 0.8, 1.0, 1.0):
        accountant.record_round(z, 200, 10)
    saved = json.loads(json.dumps(accountant.to_json()))
    assert saved["format"] == FORMAT and saved["events"][3] == [0.8, 200, 10]
    resumed = Accountant.from_json(saved, sampling="fixed-size", delta=DELTA)
    assert resumed.epsilon == accountant.epsilon and resumed.events == accountant.events
    assert resumed.record_round(1.0, 200, 10) == accountant.record_round(1.0, 200, 10)
    assert Accountant.from_json(Accountant("poisson", DELTA).to_json(), sampling="poisson", delta=DELTA).epsilon == 0


def _state(**changes: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"format": FORMAT, "sampling": "fixed-size", "delta": DELTA, "events": [[1.0, 100, 10]]}
    return state | changes


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([], "must be an object"),
        ({**_state(), "extra": 1}, "must be an object with format"),
        (_state(format="fedadapt-dp-accountant/9"), "has format"),
        (_state(sampling="poisson"), "made for sampling 'poisson'"),
        (_state(delta=1e-6), "made for delta 1e-06"),
        (_state(delta="1e-05"), "made for delta"),
        (_state(events={"0": [1.0, 100, 10]}), "must be a list"),
        (_state(events=[[1.0, 100, 10]] * (MAX_ROUNDS + 1)), f"at most {MAX_ROUNDS} rounds"),
        (_state(events=[[1.0, 100]]), "round 0: expected"),
        (_state(events=[[1.0, 100, 10], "x"]), "round 1: expected"),
        (_state(events=[[True, 100, 10]]), "must be a finite number"),
        (_state(events=[[float("nan"), 100, 10]]), "must be a finite number"),
        (_state(events=[["1.0", 100, 10]]), "must be a finite number"),
        (_state(events=[[0.0, 100, 10]]), "noise_multiplier"),
        (_state(events=[[-1.0, 100, 10]]), "noise_multiplier"),
        (_state(events=[[1.0, 100.0, 10]]), "population"),
        (_state(events=[[1.0, 2**64, 10]]), "population"),
        (_state(events=[[1.0, False, 10]]), "population"),
        (_state(events=[[1.0, 100, 101]]), "sample_size"),
        (_state(events=[[1.0, 100, 0]]), "sample_size"),
        (_state(events=[[1.0, 100, None]]), "sample_size"),
    ],
)
def test_a_hostile_state_is_refused_by_name(state: object, message: str) -> None:
    with pytest.raises(AccountantStateError, match=message):
        Accountant.from_json(state, sampling="fixed-size", delta=DELTA)


def test_bad_rounds_and_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="sampling must be one of"):
        Accountant("shuffled", DELTA)
    with pytest.raises(ConfigError, match="delta"):
        Accountant("fixed-size", 1.0)
    accountant = Accountant("fixed-size", DELTA)
    with pytest.raises(ConfigError, match="sample_size"):
        accountant.record_round(1.0, 10, 11)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        accountant.record_round(float("inf"), 10, 5)
    assert accountant.rounds == 0 and accountant.epsilon == 0.0
