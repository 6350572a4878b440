"""The server's step after averaging, FedOpt style (Reddi et al., ICLR 2021, Alg. 2): x <- x + lr * u.

u is the mean delta (FedAvg), its momentum (FedAvgM; Hsu et al., arXiv:1909.06335) or
m / (sqrt(v) + tau) with Adam's or Yogi's second moment v (FedAdam, FedYogi); their settings are in
``server_optimizer_config``. The optimizer's buffers are part of every round checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedadapt.aggregate.server_optimizer_config import (
    SERVER_OPTIMIZERS,
    FedAdamConfig,
    FedAvgConfig,
    FedAvgMConfig,
    FedYogiConfig,
    ServerOptConfig,
)
from fedadapt.delta.state import (
    PARTS,
    AdapterSchema,
    Part,
    State,
    TensorSpec,
    check_state,
    dtype_name,
)
from fedadapt.errors import ConfigError, SchemaMismatch

__all__ = [  # the settings live beside, torch-free (a scenario checks them when read); imported from here too
    "SERVER_OPTIMIZERS",
    "FedAdamConfig",
    "FedAvgConfig",
    "FedAvgMConfig",
    "FedYogiConfig",
    "OptimizerState",
    "ServerOptConfig",
    "ServerOptimizer",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerState:
    """A server optimizer's checkpoint: flat buffers ("m/<tensor>") and JSON-able scalars."""

    tensors: State
    scalars: dict[str, Any] = field(default_factory=dict)


def _buffer_inits(config: ServerOptConfig) -> tuple[tuple[str, float], ...]:
    if isinstance(config, FedAvgMConfig):
        return (("momentum", 0.0),)
    if isinstance(config, FedAdamConfig):  # FedYogi too
        return (("m", 0.0), ("v", config.tau**2))
    return ()


def _work_dtype(spec: TensorSpec) -> torch.dtype:
    """At least float32: moments of fp16/bf16 tensors would lose the small updates."""
    return torch.promote_types(getattr(torch, spec.dtype), torch.float32)


class ServerOptimizer:
    """Applies the round's mean delta to the global state; owns the buffers that persist across rounds."""

    def __init__(self, config: ServerOptConfig, schema: AdapterSchema, part: Part = "shared") -> None:
        if not isinstance(config, FedAvgConfig | FedAvgMConfig | FedAdamConfig):  # FedYogiConfig is a FedAdamConfig
            raise ConfigError(
                f"config must be FedAvgConfig, FedAvgMConfig, FedAdamConfig or FedYogiConfig, got {config!r}"
            )
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
            v = self._buffers[f"v/{name}"]
            if isinstance(config, FedYogiConfig):
                squared = d * d
                v.sub_(squared * torch.sign(v - squared), alpha=1 - config.beta2)
            else:
                v.mul_(config.beta2).addcmul_(d, d, value=1 - config.beta2)
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
