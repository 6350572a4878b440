"""What the round loop tells those who watch it: the run's stages and the observer interface they implement."""

from __future__ import annotations

from typing import Any, Protocol

# The round loop moves through WAITING..CHECKPOINTING every round; the run ends FINISHED (its planned rounds),
# STOPPED (before them: the privacy budget) or FAILED (an error ended the server).
STARTING, WAITING, TRAINING, AGGREGATING, EVALUATING, CHECKPOINTING = (
    *("starting", "waiting", "training", "aggregating", "evaluating", "checkpointing"),
)
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
STAGES = (STARTING, WAITING, TRAINING, AGGREGATING, EVALUATING, CHECKPOINTING, FINISHED, STOPPED, FAILED)
ENDED = (FINISHED, STOPPED, FAILED)


class RoundObserver(Protocol):
    """Told by ``server.federation.Federation`` what the run does; must be quick, and its errors are only logged."""

    def stage(self, stage: str, server_round: int) -> None:
        """The server entered ``stage`` (one of STAGES) in ``server_round`` (the last round once the run ends)."""

    def round_sampled(self, server_round: int, connected: int, sampled: int) -> None:
        """``server_round`` sampled ``sampled`` of the ``connected`` devices."""

    def round_finished(self, record: dict[str, Any], completed: int) -> None:
        """A round's metrics.json ``record`` is written; ``completed`` rounds are done."""
