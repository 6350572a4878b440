"""Scenarios derived from a scenario: overrides, the full-model FedAvg baseline, a cache key, a device's step budget."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.privacy.config import PrivacyConfig


def only_fields(scenario: ScenarioConfig, names: tuple[str, ...]) -> ScenarioConfig:
    """The scenario with every field but ``names`` at its default: a cache key that ignores the others."""
    return ScenarioConfig(**{name: getattr(scenario, name) for name in names})


def with_overrides(scenario: ScenarioConfig, **changes: Any) -> ScenarioConfig:
    """A copy with some fields changed (``None`` values are ignored), validated again."""
    return dataclasses.replace(scenario, **{k: v for k, v in changes.items() if v is not None})


FULL_MODEL_METHOD = "full"


def full_model_variant(scenario: ScenarioConfig) -> ScenarioConfig:
    """The same scenario as ordinary full-model FedAvg: every backbone weight trained and sent as fp32.

    Data, partition, schedule, seeds and faults stay the same, so the two runs differ only in
    what is trained and sent; the backbone trains at ``full_model_learning_rate`` (adapter learning
    rates would wreck a pretrained backbone) and the head at the scenario's head learning rate.
    The adapter method's ``[method-settings]`` do not apply, and the server steps by plain FedAvg
    whatever ``server-optimizer`` says: an adaptive step sized for adapters would wreck the backbone
    too (a fedavg scenario keeps its ``server-lr``, as before the choice existed).
    """
    return dataclasses.replace(
        scenario,
        name=f"{scenario.name}-full-model",
        method=FULL_MODEL_METHOD,
        rank=None,
        method_settings=(),
        compression="none",
        learning_rate=scenario.full_model_learning_rate,
        full_model=False,
        privacy=PrivacyConfig(),  # the baseline is ordinary FedAvg: plain deltas
        server_optimizer="fedavg",
        initial_head=None,  # ordinary FedAvg starts from the pretrained model's own head
        server_lr=scenario.server_lr if scenario.server_optimizer == "fedavg" else None,
        server_momentum=None,
        server_beta1=None,
        server_beta2=None,
        server_tau=None,
    )


def local_step_budget(scenario: ScenarioConfig, partition_id: int) -> int | None:
    """Optimizer steps client ``partition_id`` makes per round: its tier's budget, else ``local_max_steps``."""
    if scenario.tier_steps:
        return scenario.tier_steps[partition_id % len(scenario.tier_steps)]
    return scenario.local_max_steps
