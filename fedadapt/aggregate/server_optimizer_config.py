"""The server optimizers' settings: FedAvg, FedAvgM, FedAdam and FedYogi, chosen by name in a scenario.

Kept apart from their step (``fedadapt.aggregate.server_optimizers``, which needs torch): a scenario
checks its server optimizer when it is read, and devices read scenarios without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedadapt.errors import ConfigError


def _check_lr(server_lr: float) -> None:
    if not (0 < server_lr < math.inf):
        raise ConfigError(f"server_lr must be a positive finite number, got {server_lr!r}")


def _check_unit(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class FedAvgConfig:
    """x ← x + server_lr·Δ̄; server_lr = 1 is plain FedAvg."""

    server_lr: float = 1.0
    kind: ClassVar[str] = "fedavg"

    def __post_init__(self) -> None:
        _check_lr(self.server_lr)


@dataclass(frozen=True)
class FedAvgMConfig:
    """u ← momentum·u + Δ̄; x ← x + server_lr·u. The steady-state step is server_lr / (1 − momentum)."""

    server_lr: float = 1.0
    momentum: float = 0.9
    kind: ClassVar[str] = "fedavgm"

    def __post_init__(self) -> None:
        _check_lr(self.server_lr)
        _check_unit("momentum", self.momentum)


@dataclass(frozen=True)
class FedAdamConfig:
    """Reddi et al. Alg. 2: m ← β₁m + (1−β₁)Δ̄; v ← β₂v + (1−β₂)Δ̄²; x ← x + η·m / (√v + τ).

    As in the paper, m starts at 0, v at τ² (v₋₁ ≥ τ²) and there is no bias correction
    (Flower's FedAdam starts v at 0 and bias-corrects η instead).
    """

    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    kind: ClassVar[str] = "fedadam"

    def __post_init__(self) -> None:
        _check_lr(self.server_lr)
        _check_unit("beta1", self.beta1)
        _check_unit("beta2", self.beta2)
        if not (0 < self.tau < math.inf):
            raise ConfigError(f"tau must be a positive finite number, got {self.tau!r}")


@dataclass(frozen=True)
class FedYogiConfig(FedAdamConfig):
    """FedAdam with Yogi's second moment (Reddi et al. Alg. 2): v ← v − (1−β₂)·Δ̄²·sign(v − Δ̄²).

    v moves towards Δ̄² by (1−β₂)·Δ̄², where Adam's moves by (1−β₂)·(Δ̄² − v): after a large round
    Adam's v decays by a fixed share each round and its step soon grows back, Yogi's by the size of
    the new deltas only (Zaheer et al., NeurIPS 2018). m, v's start at τ² and the step are FedAdam's.
    """

    kind: ClassVar[str] = "fedyogi"


ServerOptConfig = FedAvgConfig | FedAvgMConfig | FedAdamConfig | FedYogiConfig
SERVER_OPTIMIZERS: dict[str, type[ServerOptConfig]] = {
    config.kind: config for config in (FedAvgConfig, FedAvgMConfig, FedAdamConfig, FedYogiConfig)
}
