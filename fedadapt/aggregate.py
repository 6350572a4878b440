"""Server-side aggregation: validate client deltas, stream their weighted mean, take a server step.

FedAvg (McMahan et al., AISTATS 2017) weights each client's delta by its example count. The
server step is FedOpt's (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 2):
x ← x + η·u, with u the mean delta (FedAvg), its momentum (FedAvgM; Hsu et al., arXiv:1909.06335)
or Adam's m / (√v + τ) (FedAdam). Memory is O(model) whatever the number of clients: deltas are
summed as they arrive and dropped. Pure torch; the Flower ServerApp calls it.
Averaging LoRA's A and B separately is not the average of B·A (FFA-LoRA freezes A to make it exact).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch

from fedadapt.errors import ConfigError, EmptyAggregateError, FedAdaptError, SchemaMismatch, StateError
from fedadapt.serialize import deserialize_state
from fedadapt.state import (
    PARTS,
    AdapterSchema,
    Part,
    State,
    TensorSpec,
    check_state,
    dtype_name,
    finite_squared_norms,
    squared_norms,
)

logger = logging.getLogger(__name__)

NormPolicy = Literal["reject", "clip"]
NORM_POLICIES: tuple[NormPolicy, ...] = ("reject", "clip")
REASON_LIMIT = 300  # characters of a rejection reason kept for logs and results
_SHOWN = 80  # characters of a client-chosen value quoted in a reason
MAX_COUNT = 2**53  # the largest example count a float64 sum of counts and weights holds exactly


# --- validation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedDelta:
    """A delta that passed validation, its global L2 norm before clipping, and whether it was clipped."""

    state: State
    norm: float
    clipped: bool


@dataclass(frozen=True)
class DeltaValidator:
    """Turns a client's bytes into a delta the server may average, or raises StateError/SchemaMismatch.

    ``deserialize_state`` checks format, schema id, part, names, shapes, dtypes and finiteness;
    this adds the global L2-norm bound: deltas above ``max_norm`` are rejected or scaled down to it,
    and a size bound checked before anything is parsed: blobs over ``max_bytes`` are rejected
    (``serialize.max_blob_size`` gives the largest legal blob of a schema and compression).
    """

    schema: AdapterSchema
    max_norm: float | None = None
    norm_policy: NormPolicy = "reject"
    part: Part = "shared"
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_norm is not None and not (0 < self.max_norm < math.inf):
            raise ConfigError(f"max_norm must be a positive finite number or None, got {self.max_norm!r}")
        if self.norm_policy not in NORM_POLICIES:
            raise ConfigError(f"norm_policy must be one of {NORM_POLICIES}, got {self.norm_policy!r}")
        if self.part not in PARTS:
            raise ConfigError(f"part must be one of {PARTS}, got {self.part!r}")
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or self.max_bytes < 1):
            raise ConfigError(f"max_bytes must be a positive int or None, got {self.max_bytes!r}")

    def check(self, blob: bytes) -> CheckedDelta:
        """The validated (and possibly clipped) delta in ``blob``, with its norm."""
        if self.max_bytes is not None and isinstance(blob, bytes | bytearray) and len(blob) > self.max_bytes:
            raise StateError(f"blob of {len(blob)} bytes exceeds the {self.max_bytes} the largest legal delta takes")
        state = deserialize_state(blob, self.schema, self.part, check_values=False)
        squares = finite_squared_norms(state, what="received blob")  # finiteness and the norm in one pass
        norm = math.sqrt(sum(squares.values()))
        if self.max_norm is None or norm <= self.max_norm:
            return CheckedDelta(state, norm, clipped=False)
        if self.norm_policy == "reject":
            raise StateError(f"delta L2 norm {norm:.4g} exceeds max_norm {self.max_norm:.4g}")
        scale = self.max_norm / norm
        return CheckedDelta({n: (t * scale).to(t.dtype) for n, t in state.items()}, norm, clipped=True)

    def validate(self, blob: bytes) -> State:
        """The validated (and possibly clipped) delta in ``blob``."""
        return self.check(blob).state


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over every tensor of ``state`` (NaN or inf when a tensor holds NaN or inf)."""
    return math.sqrt(sum(squared_norms(state).values()))


# --- streaming weighted mean ---------------------------------------------------------------------------------


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


def check_num_examples(num_examples: object, limit: int | None = None) -> int:
    """``num_examples`` as an int; ValueError unless it is a positive integer (bool and 3.0 are not counts)
    of at most ``limit`` (a client's FedAvg weight is bounded) and at most 2**53 (torch and float64 sums
    take it exactly; 2**64 − 1 would overflow them)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) or num_examples <= 0:
        raise ValueError(f"num_examples must be a positive int, got {_shown(num_examples)}")
    count = int(num_examples)
    if limit is not None and count > limit:
        raise ValueError(f"num-examples {_shown(count)} exceeds limit {limit}")
    if count > MAX_COUNT:
        raise ValueError(f"num-examples {_shown(count)} exceeds limit {MAX_COUNT} (2**53)")
    return count


def _shown(value: object) -> str:
    """A client-chosen value for a message: its repr, cut short (an int of 5,000 digits has none)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an {type(value).__name__} too large to show>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


# --- server optimizers ---------------------------------------------------------------------------------------


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

    server_lr: float
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


ServerOptConfig = FedAvgConfig | FedAvgMConfig | FedAdamConfig


@dataclass(frozen=True)
class OptimizerState:
    """A server optimizer's checkpoint: flat buffers ("m/<tensor>") and JSON-able scalars."""

    tensors: State
    scalars: dict[str, Any] = field(default_factory=dict)


def _buffer_inits(config: ServerOptConfig) -> tuple[tuple[str, float], ...]:
    if isinstance(config, FedAvgMConfig):
        return (("momentum", 0.0),)
    if isinstance(config, FedAdamConfig):
        return (("m", 0.0), ("v", config.tau**2))
    return ()


def _work_dtype(spec: TensorSpec) -> torch.dtype:
    """At least float32: moments of fp16/bf16 tensors would lose the small updates."""
    return torch.promote_types(getattr(torch, spec.dtype), torch.float32)


class ServerOptimizer:
    """Applies the round's mean delta to the global state; owns the buffers that persist across rounds."""

    def __init__(self, config: ServerOptConfig, schema: AdapterSchema, part: Part = "shared") -> None:
        if not isinstance(config, FedAvgConfig | FedAvgMConfig | FedAdamConfig):
            raise ConfigError(f"config must be FedAvgConfig, FedAvgMConfig or FedAdamConfig, got {config!r}")
        if part not in PARTS:
            raise ConfigError(f"part must be one of {PARTS}, got {part!r}")
        self.config = config
        self.schema_id = schema.schema_id
        self.part = part
        self.specs = schema.specs(part)
        self.steps = 0
        self._buffers: State = {
            f"{buf}/{s.name}": torch.full(s.shape, init, dtype=_work_dtype(s))
            for buf, init in _buffer_inits(config)
            for s in self.specs
        }

    def step(self, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> State:
        """The next global state (in its dtypes); inputs are not modified, buffers advance one round."""
        check_state(global_state, self.specs, what="global state")
        check_state(mean_delta, self.specs, what="mean delta")
        with torch.no_grad():
            new = {s.name: self._apply(s, global_state[s.name], mean_delta[s.name]) for s in self.specs}
        self.steps += 1
        return new

    def _apply(self, spec: TensorSpec, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        d = delta.detach().to(_work_dtype(spec))
        return (x.detach().to(d.dtype) + self.config.server_lr * self._direction(spec.name, d)).to(x.dtype)

    def _direction(self, name: str, d: torch.Tensor) -> torch.Tensor:
        config = self.config
        if isinstance(config, FedAvgMConfig):
            return self._buffers[f"momentum/{name}"].mul_(config.momentum).add_(d)
        if isinstance(config, FedAdamConfig):
            m = self._buffers[f"m/{name}"].mul_(config.beta1).add_(d, alpha=1 - config.beta1)
            v = self._buffers[f"v/{name}"].mul_(config.beta2).addcmul_(d, d, value=1 - config.beta2)
            return m / (v.sqrt() + config.tau)
        return d

    def state_dict(self) -> OptimizerState:
        """Copies of the buffers and the scalars needed to resume exactly."""
        scalars = {
            "kind": self.config.kind,
            "config": dataclasses.asdict(self.config),
            "steps": self.steps,
            "schema_id": self.schema_id,
            "part": self.part,
        }
        return OptimizerState({n: t.clone() for n, t in self._buffers.items()}, scalars)

    def load_state_dict(self, state: OptimizerState) -> None:
        """Restore buffers and step count saved by ``state_dict`` (same kind, schema and part)."""
        scalars = state.scalars
        if scalars.get("kind") != self.config.kind:
            raise ConfigError(f"optimizer state is for {scalars.get('kind')!r}, this optimizer is {self.config.kind!r}")
        if scalars.get("schema_id") != self.schema_id or scalars.get("part") != self.part:
            raise SchemaMismatch(
                f"optimizer state was saved for schema {scalars.get('schema_id')!r} part {scalars.get('part')!r}, "
                f"this optimizer has {self.schema_id!r} part {self.part!r}"
            )
        steps = scalars.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"optimizer state steps must be a non-negative int, got {steps!r}")
        by_name = {spec.name: spec for spec in self.specs}
        specs = tuple(
            dataclasses.replace(by_name[name.split("/", 1)[1]], name=name, dtype=dtype_name(buf.dtype))
            for name, buf in self._buffers.items()
        )
        check_state(state.tensors, specs, what="optimizer state")
        if scalars.get("config") != dataclasses.asdict(self.config):
            logger.warning(
                "resuming %s with config %s (the checkpoint had %s)",
                self.config.kind,
                dataclasses.asdict(self.config),
                scalars.get("config"),
            )
        self._buffers = {n: state.tensors[n].detach().clone() for n in self._buffers}
        self.steps = steps


# --- one round -----------------------------------------------------------------------------------------------


class ReceivedDelta(NamedTuple):
    """One client's delta as the server received it, not yet checked: the client's id (for logs), the serialized
    delta and the example count the client claims. (A device builds its reply as ``fedadapt.fleet.ClientReply``.)
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
    optimizer: ServerOptimizer,
    min_clients: int = 1,
    max_examples: int | None = None,
) -> RoundResult:
    """Validate each reply, leave failing clients out with a logged reason, and step on the weighted mean.

    ``replies`` may be a generator: each blob is decoded, added and dropped before the next is read.
    A reply claiming more than ``max_examples`` is rejected (``num-examples N exceeds limit L``): one
    client's weight is bounded. Raises EmptyAggregateError when fewer than ``min_clients`` replies are
    accepted (the global state and the optimizer then stay as they are).
    """
    if (validator.schema.schema_id, validator.part) != (optimizer.schema_id, optimizer.part):
        raise SchemaMismatch("validator and optimizer must be built for the same adapter schema and part")
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ConfigError(f"min_clients must be a positive integer, got {min_clients!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise ConfigError(f"max_examples must be a positive int or None, got {max_examples!r}")
    fedavg = StreamingFedAvg(validator.schema, validator.part)
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
