"""Clip a device's shared delta to a global L2 norm: the bound C that every DP guarantee of a round rests on.

A delta is the shared part of an adapter's state (``fedadapt.delta.state.State``: name → tensor), or the flat
numpy vector SecAgg+ encodes. Only the shared part is clipped and protected: the personal part never leaves the
device and is outside the guarantee. The bound holds for every finite delta, however large its values (the norm
is taken in float64 after scaling by the largest magnitude, so float32's largest values do not overflow it);
a delta with NaN or inf has no norm and is refused with ``NonFiniteDeltaError`` (reason ``non-finite-delta``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

import numpy as np
import torch

from fedadapt.errors import ConfigError, NonFiniteDeltaError, StateError

D = TypeVar("D", dict[str, torch.Tensor], np.ndarray)
# The norm is a float64 sum: over n values its rounding error is below n·2⁻⁵³ relative (about 1e-9 for 10⁷
# values; pairwise summation does far better). Deltas are scaled to C·(1 − _MARGIN), so the exact norm of the
# result stays ≤ C although only its rounded value is measured.
_MARGIN = 1e-9


@dataclass(frozen=True)
class ClippedDelta(Generic[D]):
    """A delta scaled to L2 norm ≤ C, its norm before clipping, and whether it was scaled (norm > C)."""

    delta: D
    norm: float
    clipped: bool


@overload
def clip_delta(delta: Mapping[str, torch.Tensor], clip: float) -> ClippedDelta[dict[str, torch.Tensor]]: ...
@overload
def clip_delta(delta: np.ndarray, clip: float) -> ClippedDelta[np.ndarray]: ...
def clip_delta(delta: Mapping[str, torch.Tensor] | np.ndarray, clip: float) -> ClippedDelta[D]:  # type: ignore[misc]
    """``delta`` scaled by min(1, C/‖delta‖₂) over all its tensors at once, in its own dtypes.

    The returned delta's norm is ≤ ``clip`` for every finite input: a delta above C·(1 − 1e-9) is scaled to that
    (the margin covers the float64 arithmetic's own rounding), and each scaled value is rounded toward zero into
    the delta's dtype, so no rounding, not even of float16 subnormals, can carry the norm back up. ``clipped``
    says whether the norm was above C; a delta within C·(1 − 1e-9) comes back unchanged (the same tensors).
    Raises NonFiniteDeltaError on NaN or inf, StateError on an integer tensor or a value that is no tensor.
    """
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip < math.inf:
        raise ConfigError(f"the clip norm must be a positive finite number, got {clip!r}")
    target = clip * (1 - _MARGIN)
    if isinstance(delta, np.ndarray):
        norm = global_norm([_float_array(delta, "delta")])
        if norm <= target:
            return ClippedDelta(delta, norm, clipped=False)  # type: ignore[arg-type]
        wide = delta.astype(np.float64) / norm * target  # dividing first: target / norm may be subnormal
        narrow = wide.astype(delta.dtype)
        grew = np.abs(narrow.astype(np.float64)) > np.abs(wide)
        narrow[grew] = np.nextafter(narrow[grew], np.zeros(1, dtype=delta.dtype))
        return ClippedDelta(narrow, norm, clipped=norm > clip)  # type: ignore[arg-type]
    state = dict(delta)
    norm = global_norm(_float_array(_as_numpy(t, name), name) for name, t in state.items())
    if norm <= target:
        return ClippedDelta(state, norm, clipped=False)  # type: ignore[arg-type]
    clipped = {name: _scaled_toward_zero(tensor, norm, target) for name, tensor in state.items()}
    return ClippedDelta(clipped, norm, clipped=norm > clip)  # type: ignore[arg-type]


def _scaled_toward_zero(tensor: torch.Tensor, norm: float, target: float) -> torch.Tensor:
    """``tensor / norm · target`` in float64, rounded toward zero into the tensor's dtype (bfloat16 included)."""
    wide = tensor.detach().cpu().to(torch.float64) / norm * target
    narrow = wide.to(tensor.dtype)
    grew = narrow.to(torch.float64).abs() > wide.abs()
    narrow[grew] = torch.nextafter(narrow[grew], torch.zeros_like(narrow[grew]))
    return narrow


def global_norm(vectors: Iterable[np.ndarray]) -> float:
    """‖concat(vectors)‖₂ in float64; NonFiniteDeltaError if any value is NaN or inf.

    Each vector is divided by its largest magnitude before squaring, so no finite value overflows (a float64
    square of 1e300 would): ‖v‖ = max|v| · ‖v / max|v|‖.
    """
    total = 0.0
    peak = 0.0
    parts: list[tuple[float, float]] = []
    for vector in vectors:
        flat = np.asarray(vector, dtype=np.float64).reshape(-1)
        if flat.size == 0:
            continue
        largest = float(np.max(np.abs(flat)))
        if not math.isfinite(largest):
            raise NonFiniteDeltaError("the delta holds NaN or inf values: it has no norm to clip to")
        if largest == 0.0:
            continue
        unit = flat / largest
        parts.append((largest, float(np.dot(unit, unit))))
        peak = max(peak, largest)
    for largest, unit_squares in parts:
        total += (largest / peak) ** 2 * unit_squares
    return peak * math.sqrt(total)


def _as_numpy(tensor: torch.Tensor, name: str) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise StateError(f"delta tensor {name!r} is a {type(tensor).__name__}, not a torch tensor")
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16; float32 holds both exactly
    return tensor.numpy()


def _float_array(array: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise StateError(f"delta {name!r} has dtype {array.dtype}; only floating-point deltas can be clipped")
    return array.reshape(-1)
