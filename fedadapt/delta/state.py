"""Adapter state: the schema that names it, and deltas between two states.

An adapter's trainable state is an ordered name → tensor mapping split into a *shared*
part (what federation averages) and a *personal* part (stays on the device). Its schema —
names, shapes, dtypes, parts, the method config, the backbone fingerprint and method
extras such as FFA-LoRA's seed — hashes to one ``schema_id`` that encryption and export
bind to, so state never lands on an adapter it was not made for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fedadapt.errors import StateError

Part = Literal["shared", "personal"]
PARTS: tuple[Part, ...] = ("shared", "personal")
Role = Literal["adapter", "head"]
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the state: its name, shape, dtype, part and role."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    part: Part
    role: Role

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "part": self.part, "role": self.role}


@dataclass(frozen=True)
class AdapterSchema:
    """Everything that must agree for two states to be combined."""

    method: dict[str, Any]
    backbone_fingerprint: str
    tensors: tuple[TensorSpec, ...]
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "backbone_fingerprint": self.backbone_fingerprint,
            "tensors": [t.to_dict() for t in self.tensors],
            "extras": self.extras,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterSchema:
        tensors = tuple(
            TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], t["part"], t["role"]) for t in data["tensors"]
        )
        return cls(dict(data["method"]), str(data["backbone_fingerprint"]), tensors, dict(data.get("extras", {})))

    @functools.cached_property
    def schema_id(self) -> str:
        """SHA-256 (hex, 32 chars) of the schema's canonical JSON (computed once: schemas are not mutated)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def specs(self, part: Part | None = None) -> tuple[TensorSpec, ...]:
        """Tensor specs of one part, in state order, or of all parts."""
        return tuple(t for t in self.tensors if part is None or t.part == part)

    def num_params(self, part: Part | None = None) -> int:
        total = 0
        for spec in self.specs(part):
            count = 1
            for dim in spec.shape:
                count *= dim
            total += count
        return total


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def check_names_and_shapes(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec], *, what: str = "state"
) -> None:
    """Raise StateError unless ``state`` has exactly the ``expected`` names, each of its shape."""
    unknown = [n for n in state if n not in expected]
    if unknown:
        raise StateError(f"{what} has tensors the schema does not know: {unknown[:3]} ({len(unknown)} in all)")
    missing = [n for n in expected if n not in state]
    if missing:
        raise StateError(f"{what} lacks tensors the schema requires: {missing[:3]} ({len(missing)} in all)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name].shape:
            raise StateError(f"{what} tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected[name].shape}")


def check_state(state: Mapping[str, torch.Tensor], specs: tuple[TensorSpec, ...], *, what: str = "state") -> None:
    """Raise StateError unless ``state`` has exactly ``specs``' names, shapes, dtypes, finite values."""
    expected = {s.name: s for s in specs}
    check_names_and_shapes(state, expected, what=what)
    for name, tensor in state.items():
        spec = expected[name]
        if dtype_name(tensor.dtype) != spec.dtype:
            raise StateError(f"{what} tensor {name!r} has dtype {dtype_name(tensor.dtype)}, expected {spec.dtype}")
    finite_squared_norms(state, what=what)


def finite_squared_norms(state: Mapping[str, torch.Tensor], *, what: str = "state") -> dict[str, float]:
    """``squared_norms(state)``, after raising StateError if any tensor holds NaN or inf."""
    squares = squared_norms(state)
    bad = [name for name, value in squares.items() if not math.isfinite(value)]
    if bad:
        raise StateError(f"{what} tensor {bad[0]!r} has non-finite values (NaN or inf)")
    return squares


def squared_norms(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's sum of squares; NaN or inf exactly when the tensor holds NaN or inf.

    One dot product per tensor checks finiteness and gives the norm at once (NaN and inf propagate
    through it); the server runs this on every tensor of every client's delta, where separate
    isfinite/abs/max passes cost several times more. A square that overflows float32 is redone in
    float64, where squares of finite float32 values cannot overflow.
    """
    result: dict[str, float] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            result[name] = 0.0
            continue
        flat = tensor.detach().reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # fp16/bf16 values squared fit in float32
        squares = float(torch.dot(flat, flat))
        if not math.isfinite(squares) and flat.dtype == torch.float32:
            wide = flat.double()
            squares = float(torch.dot(wide, wide))
        result[name] = squares
    return result


def _check_same_names(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str) -> None:
    if list(a) != list(b):
        only_a = sorted(set(a) - set(b))[:3]
        only_b = sorted(set(b) - set(a))[:3]
        if not only_a and not only_b:
            i, name_a, name_b = next((i, x, y) for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            raise StateError(f"{what}: same tensor names in another order: position {i} is {name_a!r} and {name_b!r}")
        raise StateError(f"{what}: tensor names differ (only in first: {only_a}, only in second: {only_b})")
    for name in a:
        if a[name].shape != b[name].shape:
            raise StateError(f"{what}: tensor {name!r} has shapes {tuple(a[name].shape)} and {tuple(b[name].shape)}")


def compute_delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> State:
    """new − old, per tensor (same names in the same order)."""
    _check_same_names(new, old, "compute_delta")
    return {name: (new[name].detach() - old[name].detach()).to(new[name].dtype) for name in new}


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> State:
    """base + scale·delta, per tensor, in base's dtypes; inputs are not modified."""
    _check_same_names(base, delta, "apply_delta")
    return {name: (base[name].detach() + scale * delta[name].to(base[name].dtype)) for name in base}


def flatten_state(state: Mapping[str, torch.Tensor], specs: tuple[TensorSpec, ...]) -> torch.Tensor:
    """Every tensor of ``state`` in ``specs`` order, as one flat float64 vector (for field encoding)."""
    check_state(state, specs, what="state to flatten")
    if not specs:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([state[s.name].detach().reshape(-1).to(torch.float64) for s in specs])


def unflatten_state(vector: torch.Tensor, specs: tuple[TensorSpec, ...]) -> State:
    """The inverse of ``flatten_state``: tensors of ``specs``' shapes and dtypes cut from ``vector``."""
    sizes = [math.prod(s.shape) for s in specs]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise StateError(f"a flat vector of {sum(sizes)} values is needed for these tensors, got {tuple(vector.shape)}")
    pieces = torch.split(vector, sizes)
    return {s.name: p.reshape(s.shape).to(getattr(torch, s.dtype)).clone() for s, p in zip(specs, pieces, strict=True)}
