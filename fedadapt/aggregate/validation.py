"""Checking one client's delta before it counts: its schema, names, shapes, dtypes, finiteness, norm and example count.

Every failure is that client's rejection with a named reason (``SchemaMismatch`` or ``StateError``), cut to
``REASON_LIMIT`` characters, so a hostile reply can neither crash the round nor flood the logs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fedadapt.delta.serialize import deserialize_state
from fedadapt.delta.state import (
    PARTS,
    AdapterSchema,
    Part,
    State,
    finite_squared_norms,
    squared_norms,
)
from fedadapt.errors import ConfigError, StateError

NormPolicy = Literal["reject", "clip"]


NORM_POLICIES: tuple[NormPolicy, ...] = ("reject", "clip")


REASON_LIMIT = 300  # characters of a rejection reason kept for logs and results


_SHOWN = 80  # characters of a client-chosen value quoted in a reason


MAX_COUNT = 2**53  # the largest example count a float64 sum of counts and weights holds exactly


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
