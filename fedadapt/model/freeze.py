"""Keeping the backbone frozen: requires-grad guard and weight fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fedadapt.errors import FrozenBackboneError


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest.update(raw.numpy().data)
    return digest.hexdigest()


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One SHA-256 over the named tensors, independent of their order."""
    digests = sorted(f"{name}:{tensor_digest(name, t)}" for name, t in named)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


@dataclass
class FrozenWeights:
    """References to the weights that must never train, and their digests at freeze time."""

    params: dict[str, nn.Parameter]
    digests: dict[str, str]

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the frozen weights as they were when frozen."""
        return hashlib.sha256("\n".join(f"{n}:{d}" for n, d in sorted(self.digests.items())).encode()).hexdigest()

    def release(self, names: Iterable[str]) -> FrozenWeights:
        """A copy that no longer guards ``names`` (for methods such as BitFit that train them)."""
        dropped = set(names)
        return FrozenWeights(
            params={n: p for n, p in self.params.items() if n not in dropped},
            digests={n: d for n, d in self.digests.items() if n not in dropped},
        )

    def check_frozen(self) -> None:
        """Raise if any frozen weight requires grad."""
        thawed = [n for n, p in self.params.items() if p.requires_grad]
        if thawed:
            raise FrozenBackboneError(
                f"{len(thawed)} backbone weights require grad but must stay frozen, e.g. {thawed[:3]}; "
                "something called requires_grad_(True) on the backbone. Train adapter parameters only."
            )

    def check_unchanged(self) -> None:
        """Raise if any frozen weight differs from its value at freeze time."""
        changed = [n for n, p in self.params.items() if tensor_digest(n, p) != self.digests[n]]
        if changed:
            raise FrozenBackboneError(
                f"{len(changed)} frozen backbone weights changed, e.g. {changed[:3]}; the backbone "
                "must stay identical on every device. Reload it and train adapter parameters only."
            )


def freeze_module(module: nn.Module) -> FrozenWeights:
    """Set requires_grad False on every parameter of ``module`` and remember them."""
    params = dict(module.named_parameters())
    for param in params.values():
        param.requires_grad_(False)
    return FrozenWeights(params=params, digests={n: tensor_digest(n, p) for n, p in params.items()})


@contextmanager
def guard_frozen(frozen: FrozenWeights) -> Iterator[None]:
    """Check the backbone is frozen before a block (e.g. training) and unchanged after it."""
    frozen.check_frozen()
    yield
    frozen.check_frozen()
    frozen.check_unchanged()
