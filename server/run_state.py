"""What the round loop tells those who watch it: the run's stages and the observer interface they implement."""

from __future__ import annotations

from typing import Any, Protocol

from fedadapt.fleet.run_status import (  # noqa: F401  (the stages, for the round loop and its observers)
    AGGREGATING,
    CHECKPOINTING,
    EVALUATING,
    FAILED,
    FINISHED,
    STAGES,
    STARTING,
    STOPPED,
    TRAINING,
    WAITING,
)


class RoundObserver(Protocol):
    """Told by ``server.federation.Federation`` what the run does; must be quick, and its errors are only logged."""

    def stage(self, stage: str, server_round: int) -> None:
        """The server entered ``stage`` (one of STAGES) in ``server_round`` (the last round once the run ends)."""

    def round_sampled(self, server_round: int, connected: int, sampled: int) -> None:
        """``server_round`` sampled ``sampled`` of the ``connected`` devices."""

    def round_finished(self, record: dict[str, Any], completed: int) -> None:
        """A round's metrics.json ``record`` is written; ``completed`` rounds are done."""
