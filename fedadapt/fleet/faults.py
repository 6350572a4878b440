"""Simulated device faults: which sampled clients crash or straggle in a round, reproducibly.

Real fleets lose devices mid-round and have slow ones. A scenario's ``dropout-fraction`` and
``straggler-fraction`` make that happen in simulation: each (seed, round, client) draws once from
its own seeded stream, so a rerun or a resumed run injects the same faults in the same places.
``scripted-faults`` put a fault at a set round and client instead (drills, deployment tests).
A crashing client raises after training (its work is lost, as on a phone killed mid-round);
a straggler replies only after the server's round timeout, so the server leaves it out.
"""

from __future__ import annotations

import random
from typing import Literal

from fedadapt.errors import FedAdaptError
from fedadapt.fleet.scenario import ScenarioConfig

Fault = Literal["crash", "stall"]
STALL_MARGIN_SECONDS = 5.0  # a straggler answers this long after the round's deadline


class SimulatedDeviceFailure(FedAdaptError):
    """A device crash injected by the scenario's ``dropout-fraction`` or ``scripted-faults`` (not a bug)."""


def device_fault(scenario: ScenarioConfig, server_round: int, partition_id: int) -> Fault | None:
    """The fault client ``partition_id`` suffers in ``server_round``, if any: scripted first, then drawn."""
    for scripted in scenario.scripted_faults:
        if (scripted.round, scripted.client) == (server_round, partition_id):
            return scripted.fault  # type: ignore[return-value]
    if scenario.dropout_fraction == 0.0 and scenario.straggler_fraction == 0.0:
        return None
    draw = random.Random(f"fault:{scenario.seed}:{server_round}:{partition_id}").random()
    if draw < scenario.dropout_fraction:
        return "crash"
    if draw < scenario.dropout_fraction + scenario.straggler_fraction:
        return "stall"
    return None


def stall_seconds(scenario: ScenarioConfig) -> float:
    """How long a straggler holds its reply: past the round timeout, so the server moves on without it."""
    return scenario.round_timeout + STALL_MARGIN_SECONDS
