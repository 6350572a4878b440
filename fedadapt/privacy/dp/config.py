"""The ``[privacy.dp]`` table: client-level differential privacy for a run, typed and validated.

```toml
[privacy.dp]
mode = "central"            # central: the server adds the noise | distributed: each device adds a share (secagg+)
target-epsilon = 8.0        # or noise-multiplier = 1.1 (exactly one of the two)
# delta = 1e-5              # default 1 / n**1.1 for n devices in the population
# max-epsilon = 10.0        # stop the run before a round that would spend more
clip = 0.5                  # fixed L2 clip norm of a device's shared delta, or "adaptive":
# clip = "adaptive"
# initial-clip = 0.1
# target-quantile = 0.5      # fraction of devices left unclipped that the clip norm tracks
# clip-learning-rate = 0.2
# clipped-count-stddev = 0.5 # default: expected devices per round / 20 (Andrew et al. 2021)
sampling = "fixed-size"     # how the round loop samples devices: fixed-size | poisson
```

Clipping and noise work on the **shared** part of a device's delta only: the personal part never leaves the
device and is outside the guarantee (it is trained on the device's data and stays there).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedadapt.config_values import Bound
from fedadapt.errors import ConfigError

DpMode = Literal["central", "distributed"]
DP_MODES: tuple[DpMode, ...] = ("central", "distributed")
Sampling = Literal["fixed-size", "poisson"]
SAMPLINGS: tuple[Sampling, ...] = ("fixed-size", "poisson")
ADAPTIVE = "adaptive"
# Keys that only mean something with clip = "adaptive": set with a fixed clip they would be ignored silently.
ADAPTIVE_KEYS = ("initial-clip", "target-quantile", "clip-learning-rate", "clipped-count-stddev")
DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_CLIP_LEARNING_RATE = 0.2  # Andrew et al. (NeurIPS 2021) use 0.2 for the geometric update
CLIPPED_COUNT_STDDEV_PER_CLIENT = 1 / 20  # Andrew et al.: σ_b = m / 20 for m expected devices per round

# The range of each numeric key. A noise multiplier or ε beyond 1000 is a typo, not a choice; δ above 0.1 promises
# nothing (a mechanism that publishes one device's data in full with probability δ satisfies it).
DP_BOUNDS: dict[str, Bound] = {
    "noise-multiplier": Bound("float", 0, 1000, low_open=True),
    "target-epsilon": Bound("float", 0, 1000, low_open=True),
    "delta": Bound("float", 0, 0.1, low_open=True),
    "max-epsilon": Bound("float", 0, 1000, low_open=True),
    "clip": Bound("float", 0, 1e6, low_open=True),
    "initial-clip": Bound("float", 0, 1e6, low_open=True),
    "target-quantile": Bound("float", 0, 1, low_open=True, high_open=True),
    "clip-learning-rate": Bound("float", 0, 10, low_open=True),
    "clipped-count-stddev": Bound("float", 0, 1e6, low_open=True),
}


@dataclass(frozen=True)
class DpConfig:
    """Client-level (ε, δ)-DP for a run (keys in kebab-case in TOML: ``noise-multiplier``).

    ``mode``: ``central`` — the server adds N(0, (z·C)²) to the sum of the round's clipped shared deltas;
    ``distributed`` — each device adds its share of that noise before secure aggregation, so the server never
    sees a delta without noise. ``noise_multiplier`` (z) or ``target_epsilon``: exactly one; with a target the
    multiplier is solved before round 1 for the run's planned rounds (``accounting.solve_noise_multiplier``).
    ``delta``: None means 1/n^1.1 for a population of n devices (``delta_for``), below 1/n as (ε, δ)-DP needs
    to mean anything. ``max_epsilon``: a budget; the run stops before a round that would exceed it.
    ``clip``: the L2 norm bound C of a device's shared delta, or ``"adaptive"`` (Andrew et al., NeurIPS 2021):
    C starts at ``initial_clip`` and moves each round toward the ``target_quantile`` of the devices' delta
    norms at ``clip_learning_rate``, from a noisy count with std ``clipped_count_stddev``
    (None: expected devices per round / 20). ``sampling``: how the round loop picks devices —
    ``fixed-size`` (m of the n connected, uniformly without replacement: what ``server/federation.py`` does)
    or ``poisson`` (each device independently with probability m/n; only if the loop samples that way).

    Clipping and noise cover the shared part of the delta only; the personal part never leaves the device
    and is outside the guarantee.
    """

    mode: str = "central"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    max_epsilon: float | None = None
    clip: float | str = 1.0
    initial_clip: float | None = None
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    clip_learning_rate: float = DEFAULT_CLIP_LEARNING_RATE
    clipped_count_stddev: float | None = None
    sampling: str = "fixed-size"

    def __post_init__(self) -> None:
        if self.mode not in DP_MODES:
            raise ConfigError(f"privacy.dp mode must be one of {DP_MODES}, got {self.mode!r}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"privacy.dp sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if isinstance(self.clip, str) and self.clip != ADAPTIVE:
            raise ConfigError(f'privacy.dp clip must be a positive number or "adaptive", got {self.clip!r}')
        for key, bound in DP_BOUNDS.items():
            value = getattr(self, key.replace("-", "_"))
            if value is not None and not (key == "clip" and value == ADAPTIVE):
                bound.check(f"privacy.dp.{key}", value)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                "privacy.dp needs exactly one of noise-multiplier (the noise to add, e.g. 1.0) or target-epsilon "
                "(the ε to reach after the planned rounds; the noise multiplier is then solved before round 1)"
            )
        if self.clip == ADAPTIVE and self.initial_clip is None:
            raise ConfigError('privacy.dp clip = "adaptive" needs initial-clip, the L2 norm to start from, e.g. 0.1')
        if self.max_epsilon is not None and self.target_epsilon is not None and self.max_epsilon < self.target_epsilon:
            raise ConfigError(
                f"privacy.dp max-epsilon ({self.max_epsilon}) is below target-epsilon ({self.target_epsilon}): the run "
                "would stop before its planned rounds; raise max-epsilon or lower target-epsilon"
            )

    @property
    def adaptive(self) -> bool:
        return self.clip == ADAPTIVE

    @property
    def initial_clip_norm(self) -> float:
        """C for round 1: the fixed clip, or ``initial_clip`` when adaptive."""
        value = self.initial_clip if self.adaptive else self.clip
        return float(value)  # type: ignore[arg-type]  # __post_init__ made it a number

    def delta_for(self, population: int) -> float:
        """δ for a population of ``population`` devices: the configured one, else 1/n^1.1."""
        if self.delta is not None:
            return float(self.delta)
        Bound("int", 2, 10**9).check("population of devices", population, where="privacy.dp")
        delta = default_delta(population)
        if delta > DP_BOUNDS["delta"].high:
            raise ConfigError(
                f"privacy.dp: the default delta 1/n^1.1 is {delta:.3g} for {population} devices, above "
                f"{DP_BOUNDS['delta'].high:g}, where (ε, δ) promises nothing; set delta yourself (e.g. 1e-3) or "
                "run more devices"
            )
        return delta

    def clipped_count_stddev_for(self, expected_clients: int) -> float:
        """σ_b of the noisy unclipped count: the configured one, else expected devices per round / 20."""
        if self.clipped_count_stddev is not None:
            return float(self.clipped_count_stddev)
        Bound("int", 1, 10**9).check("expected devices per round", expected_clients, where="privacy.dp")
        return expected_clients * CLIPPED_COUNT_STDDEV_PER_CLIENT


def default_delta(population: int) -> float:
    """1/n^1.1: below 1/n, so that publishing one random device's data is not (ε, δ)-DP for any ε."""
    return 1.0 / math.pow(population, 1.1)


def _key(name: str) -> str:
    return name.replace("_", "-")


DP_KEYS: tuple[str, ...] = tuple(_key(f.name) for f in dataclasses.fields(DpConfig))


def dp_config_from_table(table: Any, where: str) -> DpConfig:
    """The ``[privacy.dp]`` table of ``where`` (a scenario file, a run config): known keys only."""
    if not isinstance(table, Mapping):
        raise ConfigError(f'{where}: privacy.dp must be a table, e.g. [privacy.dp] mode = "central", got {table!r}')
    unknown = sorted(str(k) for k in table if k not in DP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: [privacy.dp] has unknown keys {unknown}; allowed keys are: {', '.join(DP_KEYS)}")
    if table.get("clip") != ADAPTIVE:
        stray = [k for k in ADAPTIVE_KEYS if k in table]
        if stray:
            raise ConfigError(
                f'{where}: [privacy.dp] keys {stray} apply only with clip = "adaptive" (clip is '
                f"{table.get('clip', DpConfig.clip)!r}); remove them or make the clip adaptive"
            )
    try:
        return DpConfig(**{key.replace("-", "_"): value for key, value in table.items()})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
