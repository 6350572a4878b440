"""Differential privacy across a run's rounds, on the server: the noise, the clip norm, the budget and ε.

``DpRounds`` is what the round loop holds when a scenario has ``[privacy.dp]``:

- before round 1 it fixes the noise multiplier z (the configured one, or solved for ``target-epsilon`` over the
  planned rounds of m of n devices) and δ (configured, or 1/n^1.1);
- before each round ``exceeds_budget`` says whether one more round would take ε above ``max-epsilon`` (the loop
  then stops, with the last round's checkpoint kept);
- in central mode ``DpSum`` (built by ``central_sum``) clips each accepted delta to C, sums them unweighted and
  adds N(0, (z_Δ·C)²) to the sum, which it divides by the m devices sampled (DP-FedAvg's fixed denominator);
- after the round ``finish_round`` composes the round in the accountant with the noise the sum really carried
  and moves an adaptive clip, and returns the round record's ``dp`` entry.

Each record's ``dp`` entry holds the round's (z, n, m) and clip norm: a resumed run rebuilds its accountant and
clip from the checkpointed history (``resume``), so it reports the same ε it would have without the restart.
With an adaptive clip the budget z splits into z_Δ for the deltas and σ_b for the count of unclipped devices
(Andrew et al., NeurIPS 2021); the accountant composes z, whose one Gaussian costs what the two together do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedadapt.aggregate.validation import CheckedDelta
from fedadapt.delta.state import AdapterSchema, State, TensorSpec, check_state, unflatten_state
from fedadapt.errors import AccountantStateError, ConfigError, EmptyAggregateError
from fedadapt.privacy.dp.accounting import FORMAT as ACCOUNTANT_FORMAT
from fedadapt.privacy.dp.accounting import Accountant
from fedadapt.privacy.dp.adaptive_clip import (
    AdaptiveClip,
    noisy_unclipped_fraction,
    unclipped_fraction,
)
from fedadapt.privacy.dp.clipping import clip_delta
from fedadapt.privacy.dp.config import DpConfig
from fedadapt.privacy.dp.device import encoding_slack, needed_clipping_range, values_range_per_clip
from fedadapt.privacy.dp.noise import add_gaussian, central_noise_std, effective_noise_multiplier, make_rng
from fedadapt.privacy.dp.plan import plan_dp

logger = logging.getLogger(__name__)

RECORD_KEY = "dp"


class DpSum:
    """Σ clip(Δᵢ, C) over accepted deltas (unweighted: every device counts once), float64, then noised / m.

    Quacks like ``StreamingFedAvg`` for ``aggregate_round``: ``add``, ``result``, ``num_clients`` and
    ``num_examples``. The example counts clients claim are ignored: under DP one device's weight is bounded by C,
    not by what it says about its data.
    """

    def __init__(
        self, schema: AdapterSchema, clip: float, noise_std: float, denominator: int, rng: np.random.Generator
    ):
        self.specs = schema.specs("shared")
        self.clip, self.noise_std, self.denominator, self.rng = clip, noise_std, denominator, rng
        self._sum: State = {s.name: torch.zeros(s.shape, dtype=torch.float64) for s in self.specs}
        self.clipped_bits: list[bool] = []
        self.num_clients = 0
        self.num_examples = 0

    def add(self, delta: Mapping[str, torch.Tensor] | CheckedDelta, num_examples: int) -> None:
        state = delta.state if isinstance(delta, CheckedDelta) else delta
        check_state(state, self.specs, what="delta to aggregate")
        clipped = clip_delta(state, self.clip)
        for name, tensor in clipped.delta.items():
            self._sum[name] += tensor.to(torch.float64)
        self.clipped_bits.append(clipped.clipped)
        self.num_clients += 1
        self.num_examples += 1

    def result(self) -> State:
        """(Σ + N(0, σ²)) / m in the schema's dtypes: the noise is drawn even for one device."""
        if self.num_clients == 0:
            raise EmptyAggregateError("no client delta was added: a DP sum needs at least one")
        noised = add_gaussian(self._sum, self.noise_std, self.rng)
        return {s.name: (noised[s.name] / self.denominator).to(getattr(torch, s.dtype)) for s in self.specs}


class DpRounds:
    """The server's DP state over a run: plan, current clip norm, accountant, noise generator."""

    def __init__(
        self, config: DpConfig, population: int, sample_size: int, rounds: int, seed: int | None = None
    ) -> None:
        self.config = config
        self.rounds = rounds
        self.plan = plan_dp(config, population, sample_size, rounds)
        self.accountant = Accountant(config.sampling, self.plan.delta)
        self.adaptive = AdaptiveClip.from_config(config) if config.adaptive else None
        self.clip = config.initial_clip_norm
        self.rng = make_rng(seed)  # seed: tests only (known noise protects nothing)
        # Under SecAgg+ (``secure``): the encoding can move a clipped vector by up to this much (L2), so a device's
        # sensitivity is C + slack; and the clip norm may not outgrow what the clipping range carries unclipped.
        self.encoding_slack = 0.0
        self.max_clip = math.inf

    def secure(self, privacy_clipping_range: float, quantization_step: float, values: int) -> None:
        """Set the SecAgg+ limits: the encoding's slack, and the largest clip the clipping range carries.

        ConfigError when the clip norm (fixed, or adaptive's first) already needs more than the clipping range.
        """
        n, m, rounds = self.plan.population, self.plan.sample_size, self.rounds
        needed = needed_clipping_range(self.config, self.clip, n, m, rounds)
        if needed > privacy_clipping_range:
            raise ConfigError(
                f"privacy clipping-range {privacy_clipping_range:g} would clip the DP values of clip norm "
                f"{self.clip:g} (with the devices' noise shares): raise it to at least {needed:.4g}, or lower the clip"
            )
        self.max_clip = privacy_clipping_range / values_range_per_clip(self.config, n, m, rounds)
        self.encoding_slack = encoding_slack(quantization_step, values)

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon

    def resume(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Rebuild the accountant and the clip from the ``dp`` entries of a checkpointed history."""
        events = []
        for record in history:
            entry = record.get(RECORD_KEY)
            if entry is None:  # a round that did not run under DP cannot be resumed into a DP run
                raise AccountantStateError(
                    f"round {record.get('round')} of the checkpoint has no {RECORD_KEY!r} record: the run did not "
                    "start with [privacy.dp]; resume it with the scenario that started it, or start a new run"
                )
            if not isinstance(entry, Mapping):
                raise AccountantStateError(f"round {record.get('round')}: the dp record must be an object")
            recorded = (entry.get("delta"), entry.get("sampling"), entry.get("mode"))
            if recorded != (self.plan.delta, self.config.sampling, self.config.mode):
                raise AccountantStateError(
                    f"round {record.get('round')} ran with DP (δ, sampling, mode) = {recorded}, this scenario has "
                    f"{(self.plan.delta, self.config.sampling, self.config.mode)}: ε would mix two accountings; "
                    "resume with the scenario that started the run"
                )
            if entry.get("accounted"):
                events.append([entry.get("noise_multiplier"), entry.get("population"), entry.get("sample_size")])
        state = {"format": ACCOUNTANT_FORMAT, "sampling": self.config.sampling, "delta": self.plan.delta}
        self.accountant = Accountant.from_json(
            state | {"events": events}, sampling=self.config.sampling, delta=self.plan.delta
        )
        if history and self.adaptive is not None:
            clip = history[-1][RECORD_KEY].get("next_clip")
            if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip < math.inf:
                raise AccountantStateError(f"the checkpoint's next_clip must be a positive number, got {clip!r}")
            self.adaptive = AdaptiveClip(float(clip), self.adaptive.target_quantile, self.adaptive.learning_rate)
            self.clip = float(clip)

    def exceeds_budget(self, population: int, sample_size: int, min_survivors: int = 1) -> bool:
        """Whether one more round of m of n devices could take ε above max-epsilon (False without a budget).

        In distributed mode a round may end with as few as ``min_survivors`` noise shares in its sum (fewer shares:
        less noise, a higher cost), so the round is priced at that worst case before it starts.
        """
        if self.config.max_epsilon is None:
            return False
        z = self.plan.noise_multiplier
        if self.config.mode == "distributed":
            z = effective_noise_multiplier(z, min(max(min_survivors, 1), self.plan.sample_size), self.plan.sample_size)
        return self.accountant.next_round_exceeds(float(self.config.max_epsilon), z, population, sample_size)

    def central_sum(self, schema: AdapterSchema, sampled: int) -> DpSum:
        """The aggregator of a central-DP round over ``sampled`` devices (the fixed denominator)."""
        std = central_noise_std(self.plan.delta_noise_multiplier, self.clip)
        return DpSum(schema, self.clip, std, sampled, self.rng)

    @property
    def extra_values(self) -> int:
        """Values a device appends to its delta under secure aggregation: the centred clipped bit when adaptive."""
        return 1 if self.adaptive is not None else 0

    def secure_sum(self, flat_sum: np.ndarray, specs: Sequence[TensorSpec], sampled: int) -> tuple[State, float | None]:
        """The released mean of a secure round's sum of clipped deltas (+ the centred bits when adaptive).

        Central mode adds the noise here, to the sum the server learnt; distributed mode's devices added theirs.
        Returns the mean state (sum / devices sampled) and the noised unclipped fraction (adaptive) or None.
        """
        values = np.asarray(flat_sum, dtype=np.float64)
        size = sum(math.prod(s.shape) for s in specs)
        if values.shape != (size + self.extra_values,):
            raise ConfigError(f"a secure DP sum must have {size + self.extra_values} values, got {values.shape}")
        delta_sum, bit_sum = values[:size], float(values[size]) if self.extra_values else 0.0
        if self.config.mode == "central":
            delta_sum = add_gaussian(
                delta_sum, central_noise_std(self.plan.delta_noise_multiplier, self.clip), self.rng
            )
            if self.plan.clipped_count_stddev is not None:
                bit_sum += float(self.rng.normal(0.0, self.plan.clipped_count_stddev))
        mean = unflatten_state(torch.from_numpy(delta_sum / sampled), tuple(specs))
        return mean, (unclipped_fraction(bit_sum, sampled) if self.extra_values else None)

    def finish_round(
        self,
        population: int,
        sample_size: int,
        aggregated: bool,
        clipped_bits: Sequence[bool] | None = None,
        unclipped: float | None = None,
        survivors: int | None = None,
    ) -> dict[str, Any]:
        """Account the round (when a noised aggregate was released), move an adaptive clip; the record's entry.

        Central rounds pass the clipped bits (the server saw every delta); secure rounds pass the noised unclipped
        fraction and, in distributed mode, the survivors whose noise shares are in the sum (z·√(s/k) accounted).
        """
        z = self.plan.noise_multiplier
        if self.config.mode == "distributed" and survivors is not None:
            z = effective_noise_multiplier(z, survivors, self.plan.sample_size)
        # SecAgg+'s rounding may carry a clipped vector up to C + slack: the noise is z·C over that sensitivity.
        z *= self.clip / (self.clip + self.encoding_slack)
        entry: dict[str, Any] = {
            "mode": self.config.mode,
            "clip": self.clip,
            "noise_multiplier": z,
            "population": population,
            "sample_size": sample_size,
            "accounted": aggregated,
        }
        if aggregated:  # a round whose state stayed as it was released nothing (its accuracy is the last one's)
            entry["epsilon"] = self.accountant.record_round(z, population, sample_size)
        else:
            entry["epsilon"] = self.accountant.epsilon
        entry["delta"] = self.plan.delta
        entry["sampling"] = self.config.sampling
        if clipped_bits is not None:
            entry["clipped"] = sum(bool(b) for b in clipped_bits)
        if self.adaptive is not None and aggregated:
            if unclipped is None and clipped_bits is not None:
                stddev = float(self.plan.clipped_count_stddev)  # type: ignore[arg-type]  # adaptive: plan_dp set it
                unclipped = noisy_unclipped_fraction(clipped_bits, sample_size, stddev, self.rng)
            if unclipped is not None:
                self.adaptive = self.adaptive.next(unclipped)
                if self.adaptive.clip > self.max_clip:  # capping a noised estimate: post-processing, no cost
                    capped = self.max_clip
                    self.adaptive = AdaptiveClip(capped, self.adaptive.target_quantile, self.adaptive.learning_rate)
                self.clip = self.adaptive.clip
                entry["noisy_unclipped_fraction"] = unclipped
        entry["next_clip"] = self.clip
        return entry

    def summary(self) -> dict[str, Any]:
        """The run's DP figures for metrics.json's summary."""
        return {
            "dp_mode": self.config.mode,
            "epsilon": self.accountant.epsilon,
            "delta": self.plan.delta,
            "noise_multiplier": self.plan.noise_multiplier,
            "dp_rounds": self.accountant.rounds,
        }
