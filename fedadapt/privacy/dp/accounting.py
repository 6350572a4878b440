"""The privacy accountant: ε(δ) of a run after every round, from Google's ``dp_accounting`` (RDP).

One DP event per round, with that round's sampling and *effective* noise multiplier:

- ``fixed-size`` (what ``server/federation.py`` does: m of the n connected devices, uniformly without
  replacement) → ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))`` under the **REPLACE_ONE**
  relation (neighbouring runs differ in one device's data; n is public). dp_accounting's RDP for this event
  (Wang, Balle, Kasiviswanathan, AISTATS 2019, Thm. 27) reads the multiplier as noise std / L2 *sensitivity*;
  replacing one device's clipped delta (norm ≤ C) by another moves the sum by up to 2C, so a run with noise
  std z·C has multiplier z/2 there. (``GaussianDpEvent``'s docstring defines the multiplier per C, right only
  for add/remove; google/differential-privacy issue #378.)
- ``poisson`` (each device independently with probability q = m/n) →
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under **ADD_OR_REMOVE_ONE** (neighbouring runs differ by one
  device present or absent; sensitivity C). dp_accounting's RDP accountant supports this event only under
  add/remove (or replace-special), and the WOR event only under replace-one.

The state to save with a checkpoint is the list of per-round (z, n, m) events (``to_json``); ``from_json``
checks every type and bound of a saved state before replaying it, and replays the rounds in the same runs of
identical events as they were composed live, so a resumed run reports the same ε to the last bit. Composition
costs one RDP evaluation (about 0.1–0.2 s for the WOR event here) per round, and one per run of identical rounds
on resume. ``dp_accounting`` is imported inside the functions: ``import fedadapt`` does not load it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedadapt.config_values import Bound
from fedadapt.errors import AccountantStateError, ConfigError
from fedadapt.privacy.dp.config import SAMPLINGS

if TYPE_CHECKING:
    from dp_accounting import DpEvent
    from dp_accounting.rdp import RdpAccountant

FORMAT = "fedadapt-dp-accountant/1"
MAX_ROUNDS = 100_000  # bounds a saved state (about 40 bytes a round) and the solver's composition count
MAX_POPULATION = 10**9
# Below this multiplier a Gaussian hides little; a target ε reachable only with less noise is refused, so that
# the solver's bracket search starts on finite ε (dp_accounting's RDP of z → 0 is infinite).
MIN_SOLVED_NOISE_MULTIPLIER = 0.05
SOLVER_TOLERANCE = 1e-5
NOISE_BOUND = Bound("float", 0, 1e6, low_open=True)
DELTA_BOUND = Bound("float", 0, 1, low_open=True, high_open=True)


@dataclass(frozen=True)
class RoundEvent:
    """One round as the accountant sees it: effective noise multiplier z, devices n it sampled from, m sampled
    (expected m for Poisson)."""

    noise_multiplier: float
    population: int
    sample_size: int

    def __post_init__(self) -> None:
        NOISE_BOUND.check("noise_multiplier", self.noise_multiplier, where="DP round")
        Bound("int", 1, MAX_POPULATION).check("population", self.population, where="DP round")
        Bound("int", 1, self.population).check("sample_size", self.sample_size, where="DP round")


def check_sampling(sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


def round_dp_event(sampling: str, event: RoundEvent) -> DpEvent:
    """The dp_accounting event of one round (module docstring: why z/2 under fixed-size sampling)."""
    import dp_accounting

    check_sampling(sampling)
    if sampling == "fixed-size":
        gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier / 2)
        return dp_accounting.SampledWithoutReplacementDpEvent(event.population, event.sample_size, gaussian)
    gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
    return dp_accounting.PoissonSampledDpEvent(event.sample_size / event.population, gaussian)


def fresh_rdp_accountant(sampling: str) -> RdpAccountant:
    """An empty RDP accountant with the neighbouring relation ``sampling`` needs."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    check_sampling(sampling)
    relation = dp_accounting.NeighboringRelation
    return RdpAccountant(
        neighboring_relation=relation.REPLACE_ONE if sampling == "fixed-size" else relation.ADD_OR_REMOVE_ONE
    )


class Accountant:
    """ε(δ) of the rounds so far: ``record_round`` after each round, ``next_round_exceeds`` before one.

    Internally the rounds are runs of identical events: ``_committed`` holds every finished run, ``_current``
    that plus the run in progress, composed as ``compose(event, count)`` on a copy of ``_committed``.
    """

    def __init__(self, sampling: str, delta: float) -> None:
        check_sampling(sampling)
        DELTA_BOUND.check("delta", delta, where="DP")
        self.sampling = sampling
        self.delta = float(delta)
        self._events: list[RoundEvent] = []
        self._committed = fresh_rdp_accountant(sampling)
        self._current = self._committed
        self._run: RoundEvent | None = None
        self._run_count = 0
        self._epsilon = 0.0
        self._preview: tuple[RoundEvent, RdpAccountant] | None = None

    @property
    def rounds(self) -> int:
        return len(self._events)

    @property
    def events(self) -> tuple[RoundEvent, ...]:
        return tuple(self._events)

    @property
    def epsilon(self) -> float:
        """ε at ``delta`` after the rounds recorded so far (0 before the first)."""
        return self._epsilon

    def record_round(self, noise_multiplier: float, population: int, sample_size: int) -> float:
        """Compose one round that ran with effective multiplier z over m of n devices; returns ε after it."""
        event = RoundEvent(noise_multiplier, population, sample_size)
        if len(self._events) >= MAX_ROUNDS:
            raise ConfigError(f"the accountant holds at most {MAX_ROUNDS} rounds")
        accountant = self._composed_with(event)
        if event != self._run:
            self._committed, self._run, self._run_count = self._current, event, 0
        self._run_count += 1
        self._current, self._preview = accountant, None
        self._events.append(event)
        self._epsilon = float(accountant.get_epsilon(self.delta))
        return self._epsilon

    def epsilon_after(self, noise_multiplier: float, population: int, sample_size: int) -> float:
        """ε if one more round ran with these parameters (nothing is recorded)."""
        event = RoundEvent(noise_multiplier, population, sample_size)
        accountant = self._composed_with(event)
        self._preview = (event, accountant)  # record_round of the same event reuses it
        return float(accountant.get_epsilon(self.delta))

    def next_round_exceeds(
        self, max_epsilon: float, noise_multiplier: float, population: int, sample_size: int
    ) -> bool:
        """Whether one more round would take ε above ``max_epsilon``: the loop stops at the last round within it.

        In distributed mode pass the multiplier of the fewest survivors the round can complete with
        (``effective_noise_multiplier``): fewer survivors mean less noise, so that bounds the round's cost.
        """
        NOISE_BOUND.check("max_epsilon", max_epsilon, where="DP")
        return self.epsilon_after(noise_multiplier, population, sample_size) > max_epsilon

    def _composed_with(self, event: RoundEvent) -> RdpAccountant:
        if self._preview is not None and self._preview[0] == event:
            return self._preview[1]
        if event == self._run:
            base, count = self._committed, self._run_count + 1
        else:
            base, count = self._current, 1
        accountant = copy.deepcopy(base)
        accountant.compose(round_dp_event(self.sampling, event), count)
        return accountant

    def to_json(self) -> dict[str, Any]:
        """The state to checkpoint: the sampling, δ and every round's (z, n, m)."""
        return {
            "format": FORMAT,
            "sampling": self.sampling,
            "delta": self.delta,
            "events": [[e.noise_multiplier, e.population, e.sample_size] for e in self._events],
        }

    @classmethod
    def from_json(cls, data: object, *, sampling: str, delta: float) -> Accountant:
        """The accountant ``to_json`` saved, for a run configured with ``sampling`` and ``delta``.

        Every field is checked (types, bounds, the count of rounds) and must match the run's configuration:
        a state made under another sampling or δ would report an ε that is not this run's.
        """
        events = _events_from_json(data, sampling, delta)
        accountant = cls(sampling, delta)
        for event, count in _runs(events):
            # the same operations record_round did live, one RDP evaluation per run
            accountant._committed = accountant._current
            accountant._current = copy.deepcopy(accountant._committed)
            accountant._current.compose(round_dp_event(sampling, event), count)
            accountant._run, accountant._run_count = event, count
        accountant._events = events
        if events:
            accountant._epsilon = float(accountant._current.get_epsilon(accountant.delta))
        return accountant


def _events_from_json(data: object, sampling: str, delta: float) -> list[RoundEvent]:
    if not isinstance(data, dict) or set(data) != {"format", "sampling", "delta", "events"}:
        raise AccountantStateError("the DP accountant state must be an object with format, sampling, delta, events")
    if data["format"] != FORMAT:
        raise AccountantStateError(f"the DP accountant state has format {str(data['format'])[:40]!r}, not {FORMAT!r}")
    if data["sampling"] != sampling:
        raise AccountantStateError(
            f"the DP accountant state was made for sampling {str(data['sampling'])[:20]!r}, this run uses "
            f"{sampling!r}; resume with the configuration the run started with"
        )
    if not isinstance(data["delta"], float) or data["delta"] != delta:
        raise AccountantStateError(
            f"the DP accountant state was made for delta {str(data['delta'])[:30]}, this run uses {delta!r}; "
            "resume with the configuration the run started with"
        )
    raw = data["events"]
    if not isinstance(raw, list) or len(raw) > MAX_ROUNDS:
        raise AccountantStateError(f"the DP accountant's events must be a list of at most {MAX_ROUNDS} rounds")
    return [_event_from_json(i, entry) for i, entry in enumerate(raw)]


def _event_from_json(index: int, entry: object) -> RoundEvent:
    if not isinstance(entry, list) or len(entry) != 3:
        raise AccountantStateError(f"DP accountant round {index}: expected [noise_multiplier, population, sample_size]")
    z, population, sample_size = entry
    if isinstance(z, bool) or not isinstance(z, float | int) or not math.isfinite(z):
        raise AccountantStateError(f"DP accountant round {index}: the noise multiplier must be a finite number")
    try:
        return RoundEvent(float(z), population, sample_size)
    except ConfigError as err:
        raise AccountantStateError(f"DP accountant round {index}: {err}") from None


def _runs(events: list[RoundEvent]) -> list[tuple[RoundEvent, int]]:
    """Consecutive identical events as (event, count)."""
    runs: list[tuple[RoundEvent, int]] = []
    for event in events:
        if runs and runs[-1][0] == event:
            runs[-1] = (event, runs[-1][1] + 1)
        else:
            runs.append((event, 1))
    return runs


def solve_noise_multiplier(
    target_epsilon: float, delta: float, rounds: int, population: int, sample_size: int, sampling: str = "fixed-size"
) -> float:
    """The smallest z (within 1e-5, never below the target's privacy) whose ``rounds`` rounds of m-of-n sampling
    reach ε ≤ ``target_epsilon`` at ``delta``: ``dp_accounting.calibrate_dp_mechanism`` on the same events the
    accountant composes."""
    import dp_accounting

    NOISE_BOUND.check("target-epsilon", target_epsilon, where="DP")
    DELTA_BOUND.check("delta", delta, where="DP")
    Bound("int", 1, MAX_ROUNDS).check("rounds", rounds, where="DP")
    RoundEvent(1.0, population, sample_size)  # checks n and m

    def run_event(z: float) -> DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            round_dp_event(sampling, RoundEvent(z, population, sample_size)), rounds
        )

    lowest = fresh_rdp_accountant(sampling).compose(run_event(MIN_SOLVED_NOISE_MULTIPLIER)).get_epsilon(delta)
    if lowest <= target_epsilon:
        raise ConfigError(
            f"target-epsilon {target_epsilon} is reached with a noise multiplier below {MIN_SOLVED_NOISE_MULTIPLIER} "
            f"(ε = {lowest:.4g} there): that little noise hides almost nothing; lower target-epsilon or set "
            "noise-multiplier yourself"
        )
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: fresh_rdp_accountant(sampling),
        run_event,
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(MIN_SOLVED_NOISE_MULTIPLIER, 1.0),
        tol=SOLVER_TOLERANCE,
    )
    return float(z)
