"""One round on the server: admit checked client deltas, stream their weighted mean, take the server step.

FedAvg (McMahan et al., AISTATS 2017) weights each client's delta by its example count. The
server step is FedOpt's (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 2):
x ← x + η·u, with u the mean delta (FedAvg), its momentum (FedAvgM; Hsu et al., arXiv:1909.06335)
or Adam's m / (√v + τ) (FedAdam). Memory is O(model) whatever the number of clients: deltas are
summed as they arrive and dropped. Pure torch; the Flower ServerApp calls it. Each delta is checked
first (``validation``); the step itself is ``server_optimizers``'.
Averaging LoRA's A and B separately is not the average of B·A (FFA-LoRA freezes A to make it exact).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from fedadapt.aggregate.validation import REASON_LIMIT, CheckedDelta, DeltaValidator, check_num_examples
from fedadapt.delta.state import (
    PARTS,
    AdapterSchema,
    Part,
    State,
    check_state,
)
from fedadapt.errors import ConfigError, EmptyAggregateError, FedAdaptError, SchemaMismatch

logger = logging.getLogger(__name__)


class StreamingFedAvg:
    """Σ nᵢ·Δᵢ / Σ nᵢ over deltas added one at a time; holds one float64 buffer per schema tensor."""

    def __init__(self, schema: AdapterSchema, part: Part = "shared") -> None:
        if part not in PARTS:
            raise ConfigError(f"part must be one of {PARTS}, got {part!r}")
        self.specs = schema.specs(part)
        if not self.specs:
            raise ConfigError(f"the schema has no {part!r} tensors to average")
        integral = [s.name for s in self.specs if not getattr(torch, s.dtype).is_floating_point]
        if integral:
            raise ConfigError(f"only floating-point tensors can be averaged, got integer tensors {integral[:3]}")
        self._sums: State = {s.name: torch.zeros(s.shape, dtype=torch.float64) for s in self.specs}
        self._totals = list(self._sums.values())  # the same tensors, in spec order
        self._layout = [(s.name, torch.Size(s.shape), getattr(torch, s.dtype)) for s in self.specs]
        self.num_clients = 0
        self.num_examples = 0

    def add(self, delta: Mapping[str, torch.Tensor] | CheckedDelta, num_examples: int) -> None:
        """Accumulate ``num_examples``·``delta``; neither is kept.

        A plain mapping is checked in full (names, shapes, dtypes, finite values). A CheckedDelta
        from ``DeltaValidator.check`` had its values checked there, so only its layout is checked again.
        """
        num_examples = check_num_examples(num_examples)
        if isinstance(delta, CheckedDelta):
            delta = delta.state
            self._check_layout(delta)
        else:
            check_state(delta, self.specs, what="delta to aggregate")
        with torch.no_grad():
            # float32 → float64 in place; one C++ loop instead of one Python call per tensor
            torch._foreach_add_(self._totals, [delta[s.name] for s in self.specs], alpha=num_examples)
        self.num_clients += 1
        self.num_examples += num_examples

    def _check_layout(self, delta: Mapping[str, torch.Tensor]) -> None:
        same = len(delta) == len(self._layout) and all(
            (t := delta.get(name)) is not None and t.shape == shape and t.dtype == dtype
            for name, shape, dtype in self._layout
        )
        if not same:
            check_state(delta, self.specs, what="delta to aggregate")  # raises, naming the first difference

    def result(self) -> State:
        """The weighted mean so far, in the schema's dtypes."""
        if self.num_clients == 0:
            raise EmptyAggregateError("no client delta was added: a weighted mean needs at least one")
        return {s.name: (self._sums[s.name] / self.num_examples).to(getattr(torch, s.dtype)) for s in self.specs}


class Averager(Protocol):
    """What ``aggregate_round`` folds accepted deltas into: ``StreamingFedAvg``, or a DP sum (``dp_rounds.DpSum``)."""

    num_clients: int
    num_examples: int

    def add(self, delta: CheckedDelta, num_examples: int) -> None: ...

    def result(self) -> State: ...


class RoundStep(Protocol):
    """What turns the round's mean into the next global state: a ``ServerOptimizer``, or for a prototype round
    ``fedadapt.train.prototypes.PrototypeHeadStep``."""

    schema_id: str
    part: Part

    def step(self, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> State: ...


class ReceivedDelta(NamedTuple):
    """One client's delta as the server received it, not yet checked: the client's id (for logs), the serialized
    delta and the example count the client claims. (A device builds its reply as
    ``fedadapt.fleet.device_round.ClientReply``.)
    """

    client_id: str
    blob: bytes
    num_examples: int


@dataclass(frozen=True)
class RoundResult:
    """The new global state and what went into it."""

    state: State
    accepted: int
    total_examples: int
    bytes_received: int
    rejected: list[tuple[str, str]]  # (client id, reason); reasons never hold tensor values
    clipped: list[str]  # ids of accepted clients whose delta was scaled down to max_norm


def aggregate_round(
    global_state: Mapping[str, torch.Tensor],
    replies: Iterable[ReceivedDelta | tuple[str, bytes, int]],
    validator: DeltaValidator,
    optimizer: RoundStep,
    min_clients: int = 1,
    max_examples: int | None = None,
    averager: Averager | None = None,
) -> RoundResult:
    """Validate each reply, leave failing clients out with a logged reason, and step on the weighted mean.

    ``replies`` may be a generator: each blob is decoded, added and dropped before the next is read.
    A reply claiming more than ``max_examples`` is rejected (``num-examples N exceeds limit L``): one
    client's weight is bounded. ``averager`` (default: a fresh ``StreamingFedAvg``, example-weighted) takes the
    accepted deltas; under differential privacy it is the round's clipped, noised sum. Raises
    EmptyAggregateError when fewer than ``min_clients`` replies are accepted (the global state and the
    optimizer then stay as they are).
    """
    if (validator.schema.schema_id, validator.part) != (optimizer.schema_id, optimizer.part):
        raise SchemaMismatch("validator and optimizer must be built for the same adapter schema and part")
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ConfigError(f"min_clients must be a positive integer, got {min_clients!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise ConfigError(f"max_examples must be a positive int or None, got {max_examples!r}")
    fedavg = StreamingFedAvg(validator.schema, validator.part) if averager is None else averager
    rejected: list[tuple[str, str]] = []
    clipped: list[str] = []
    seen: set[str] = set()
    received = 0
    for client_id, blob, num_examples in replies:
        received += len(blob) if isinstance(blob, bytes | bytearray | memoryview) else 0
        reason, checked = _admit(client_id, blob, num_examples, validator, seen, max_examples)
        seen.add(client_id)
        if checked is None:
            logger.warning("leaving client %s out of the round: %s", client_id, reason)
            rejected.append((client_id, reason))
            continue
        fedavg.add(checked, num_examples)
        if checked.clipped:
            clipped.append(client_id)
    if fedavg.num_clients == 0:
        raise EmptyAggregateError(
            f"no client delta was accepted this round ({len(rejected)} rejected; first: {rejected[:3]})", rejected
        )
    if fedavg.num_clients < min_clients:
        raise EmptyAggregateError(
            f"only {fedavg.num_clients} client deltas were accepted this round, fewer than min-clients "
            f"({min_clients}); {len(rejected)} rejected",
            rejected,
        )
    new_state = optimizer.step(global_state, fedavg.result())
    logger.info(
        "round aggregated: %d accepted (%d clipped), %d rejected, %d examples, %d bytes",
        fedavg.num_clients,
        len(clipped),
        len(rejected),
        fedavg.num_examples,
        received,
    )
    return RoundResult(new_state, fedavg.num_clients, fedavg.num_examples, received, rejected, clipped)


def _admit(
    client_id: str,
    blob: bytes,
    num_examples: int,
    validator: DeltaValidator,
    seen: set[str],
    max_examples: int | None = None,
) -> tuple[str, CheckedDelta | None]:
    """('', delta) for an acceptable reply, else (reason, None)."""
    if client_id in seen:
        return "a second reply from the same client this round", None
    try:
        check_num_examples(num_examples, max_examples)
    except ValueError as err:
        return str(err)[:REASON_LIMIT], None
    try:
        return "", validator.check(blob)
    except FedAdaptError as err:
        # Our errors name tensors, shapes and dtypes, never values; the cap bounds client-chosen strings.
        return f"{type(err).__name__}: {err}"[:REASON_LIMIT], None
    except Exception as err:  # a parser's bug must not end the round: the client's bytes caused it
        logger.exception("unexpected error while validating the delta of client %s", client_id)
        return f"unexpected {type(err).__name__} while validating the delta: {err}"[:REASON_LIMIT], None
