"""Scenarios derived from a scenario: overrides, the full-model FedAvg baseline, the two phases of a head warm-up,
a cache key, a device's step budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path
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
    plain = plain_fedavg(scenario, server_lr=scenario.server_lr if scenario.server_optimizer == "fedavg" else None)
    return dataclasses.replace(
        plain,
        name=f"{scenario.name}-full-model",
        method=FULL_MODEL_METHOD,
        rank=None,
        method_settings=(),
        compression="none",
        learning_rate=scenario.full_model_learning_rate,
        full_model=False,
        privacy=PrivacyConfig(),  # the baseline is ordinary FedAvg: plain deltas
        initial_head=None,  # ordinary FedAvg starts from the pretrained model's own head
        head_warmup_rounds=0,  # and trains everything from round 1
    )


def plain_fedavg(scenario: ScenarioConfig, server_lr: float | None = None) -> ScenarioConfig:
    """``scenario`` with the server stepping by FedAvg (at ``server_lr``; None: plain averaging), no other
    optimizer's settings left."""
    return dataclasses.replace(
        scenario,
        server_optimizer="fedavg",
        server_lr=server_lr,
        server_momentum=None,
        server_beta1=None,
        server_beta2=None,
        server_tau=None,
    )


HEAD_METHOD = "head"


def head_warmup_variant(scenario: ScenarioConfig, rounds: int | None = None) -> ScenarioConfig:
    """The first ``head_warmup_rounds`` (or ``rounds``) rounds of ``scenario`` as a run of their own: head only.

    A federated linear probe on the same fleet (method ``head``: every device trains the classifier on its
    cached frozen embeddings), stepped by plain FedAvg, the exact average of a linear layer: an adaptive server
    step sized for the adapter has nothing to adapt to yet. Data, partition, sampling, seeds, local epochs and
    privacy stay the scenario's.
    """
    return dataclasses.replace(
        plain_fedavg(scenario),
        name=f"{scenario.name}-head-warmup",
        method=HEAD_METHOD,
        rank=None,
        method_settings=(),
        rounds=scenario.head_warmup_rounds if rounds is None else rounds,
        head_warmup_rounds=0,
        full_model=False,
    )


def after_head_warmup(scenario: ScenarioConfig, head_folder: Path) -> ScenarioConfig:
    """The rest of ``scenario`` after its head warm-up: the remaining rounds, from the warm-up's final head."""
    return dataclasses.replace(
        scenario,
        rounds=scenario.rounds - scenario.head_warmup_rounds,
        head_warmup_rounds=0,
        initial_head=str(head_folder),
    )


def local_step_budget(scenario: ScenarioConfig, partition_id: int) -> int | None:
    """Optimizer steps client ``partition_id`` makes per round: its tier's budget, else ``local_max_steps``."""
    if scenario.tier_steps:
        return scenario.tier_steps[partition_id % len(scenario.tier_steps)]
    return scenario.local_max_steps
