"""``train_step.pte``: the joint training program lowered for ExecuTorch, with XNNPACK where it lowers and is right.

ExecuTorch's portable ``addmm`` (there is no optimized one) took 90% of a portable step on MiniLM
(docs/notes-on-device-training.md), so the program's matrix products and element-wise ops go to the
XNNPACK delegate. Two settings make that a training program:

- every weight stays a runtime input of the delegate (``force_non_static_weights_for_f32_linear``):
  a static weight is packed into the delegate when the program loads, and the partitioner cannot
  tell a trainable parameter from a frozen one, while the trainer writes the trainable ones into
  ``named_parameters()`` before each step;
- softmax stays outside: the joint graph keeps softmax's output for the backward pass, and XNNPACK
  refuses a partition that passes it through ("Output node 'aten__softmax_default' is already in
  the inputs").

The written program is checked in ExecuTorch's training runtime against eager PyTorch twice: with
the exported parameters, and after writing other values into them, so a program that ignores
written parameters is caught. A program that does not lower or fails that check is replaced by the
portable one (``to_edge(...).to_executorch()``), and the reason is logged.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.errors import ExportError

logger = logging.getLogger(__name__)

XNNPACK, PORTABLE = "xnnpack", "portable"  # the manifest's program_backend
WRITTEN_SCALE = 0.5  # the second check's parameters: the exported ones times this


@dataclass(frozen=True)
class WrittenProgram:
    """What ``write_program`` wrote: its backend, seconds, distance to eager PyTorch, and why not XNNPACK (if not)."""

    backend: str
    seconds: float
    gradient_max_abs_diff: float
    fallback_reason: str | None


def lower_portable(joint: Any) -> bytes:
    """The program in ExecuTorch's portable kernels only."""
    from executorch.exir import to_edge

    return bytes(to_edge(joint).to_executorch().buffer)


def lower_xnnpack(joint: Any) -> bytes:
    """The program with its matrix products and element-wise ops delegated to XNNPACK (see the module docstring)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import SoftmaxConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    configs = [config for config in ALL_PARTITIONER_CONFIGS if config is not SoftmaxConfig]
    partitioner = XnnpackPartitioner(configs=configs, force_non_static_weights_for_f32_linear=True)
    return bytes(to_edge_transform_and_lower(joint, partitioner=[partitioner]).to_executorch().buffer)


LOWERINGS: dict[str, Callable[[Any], bytes]] = {XNNPACK: lower_xnnpack, PORTABLE: lower_portable}


def write_program(
    make_joint: Callable[[], Any],
    step: nn.Module,
    names: Mapping[str, str],
    batch: tuple[torch.Tensor, ...],
    path: Path,
    atol: float,
) -> WrittenProgram:
    """Write ``path`` lowered with XNNPACK, or portable if that fails; ExportError if the portable one is wrong too.

    ``make_joint`` returns a fresh joint program (lowering changes the one it is given); ``step`` is
    the eager module it was traced from and ``names`` its trainable parameters.
    """
    started = time.perf_counter()
    reason = None
    try:
        program, worst = _lowered_and_checked(XNNPACK, make_joint, step, names, batch)
        if not worst <= atol:
            reason = f"its gradients differ from PyTorch's by {worst:.2e} (> {atol:g})"
    except Exception as err:  # lowering raises many kinds; any of them means no XNNPACK program
        reason = f"{type(err).__name__}: {str(err)[:300]}"
    backend = XNNPACK
    if reason is not None:
        logger.warning("train_step.pte: no XNNPACK program, writing the portable one: %s", reason)
        backend = PORTABLE
        try:
            program, worst = _lowered_and_checked(PORTABLE, make_joint, step, names, batch)
        except Exception as err:  # as above: no program at all
            raise ExportError(f"ExecuTorch could not lower or run the training program: {str(err)[:500]}") from err
        if not worst <= atol:
            raise ExportError(f"train_step.pte's gradients differ from PyTorch's by {worst:.2e} (> {atol:g})")
    path.write_bytes(program)
    return WrittenProgram(backend, time.perf_counter() - started, worst, reason)


def _lowered_and_checked(
    backend: str,
    make_joint: Callable[[], Any],
    step: nn.Module,
    names: Mapping[str, str],
    batch: tuple[torch.Tensor, ...],
) -> tuple[bytes, float]:
    program = LOWERINGS[backend](make_joint())
    return program, check_program(program, step, names, batch)


def check_program(program: bytes, step: nn.Module, names: Mapping[str, str], batch: tuple[torch.Tensor, ...]) -> float:
    """The largest difference between ``program``'s loss and gradients and eager PyTorch's, at the exported
    parameters and after writing others into the program (as the trainer does each step)."""
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer

    module = _load_for_executorch_for_training_from_buffer(program)  # reads ``program`` in place: keep it alive
    inputs = list(batch)
    module.forward_backward("forward", inputs)  # ExecuTorch lists the parameters only after a first step
    parameters = module.named_parameters()
    if sorted(parameters) != sorted(names):
        raise ExportError(f"the program's parameters {sorted(parameters)[:4]} are not the step's {sorted(names)[:4]}")
    eager = copy.deepcopy(step)
    live = dict(eager.named_parameters())
    worst = 0.0
    for scale in (1.0, WRITTEN_SCALE):
        with torch.no_grad():
            for name in names:
                live[name].mul_(scale)
                parameters[name].copy_(live[name])
        expected_loss, expected = _eager_gradients(eager, names, batch)
        found_loss = module.forward_backward("forward", inputs)[0]
        found = module.named_gradients()
        worst = max(worst, abs(float(found_loss) - expected_loss))
        worst = max(worst, *(float((found[name] - expected[name]).abs().max()) for name in names))
    return worst


def _eager_gradients(
    step: nn.Module, names: Mapping[str, str], batch: tuple[torch.Tensor, ...]
) -> tuple[float, dict[str, torch.Tensor]]:
    params = dict(step.named_parameters())
    for param in params.values():
        param.grad = None
    loss, _ = step(*batch)
    loss.backward()
    gradients = {}
    for name, schema in names.items():
        gradient = params[name].grad
        if gradient is None:
            raise ExportError(f"PyTorch computed no gradient for {schema}: it does not reach the loss")
        gradients[name] = gradient
    return float(loss), gradients
