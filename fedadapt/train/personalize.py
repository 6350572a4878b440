"""Personalization: a shared adapter from the federation plus a personal part kept on the device.

Design (FedPer, Arivazhagan et al. 2019; FedRep, Collins et al., ICML 2021): the adapter is
shared and averaged; the classifier head is personal. Users differ most in what their
words *mean* (label conventions) and in how often they need each label, and both live in
the head; the adapter learns the representation all users share. After receiving a new
shared adapter, a device fine-tunes only its personal part on its own data. docs/
personalization.md records why and what it measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from fedadapt.data.batching import EncodedTexts
from fedadapt.delta.state import Role, State
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import ROLES, AdapterModel
from fedadapt.train.loop import EvalResult, StepCallback, TrainConfig, TrainResult, evaluate, train_adapter


@contextmanager
def train_only(model: AdapterModel, roles: tuple[Role, ...]) -> Iterator[None]:
    """Within the block only parameters of ``roles`` receive gradients (others stay as they are)."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ConfigError(f"roles must be a non-empty subset of {ROLES}, got {roles!r}")
    role_of = {spec.name: spec.role for spec in model.schema.tensors}
    params = dict(zip(role_of, model.trainable_parameters(), strict=True))
    try:
        for name, param in params.items():
            param.requires_grad_(role_of[name] in roles)
        yield
    finally:
        for param in params.values():
            param.requires_grad_(True)


def personalize(
    model: AdapterModel,
    data: EncodedTexts,
    config: TrainConfig,
    roles: tuple[Role, ...] = ("head",),
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune only the parts of ``roles`` (default: the head) on the device's own data."""
    with train_only(model, roles):
        return train_adapter(model, data, config, on_step)


@dataclass(frozen=True)
class PersonalizationReport:
    """Accuracy of three models on one client's local test split."""

    local_only: EvalResult  # adapter + head trained on the client's data alone
    global_model: EvalResult  # the shared model as received
    personalized: EvalResult  # the shared model after fine-tuning the personal part locally


def compare_on_client(
    make_model: Callable[[], AdapterModel],
    global_state: State,
    train: EncodedTexts,
    test: EncodedTexts,
    local_config: TrainConfig,
    finetune_config: TrainConfig | None = None,
    roles: tuple[Role, ...] = ("head",),
) -> PersonalizationReport:
    """Local-only vs global vs personalized, all evaluated on ``test``.

    ``make_model`` builds a fresh model of the federation's schema; ``global_state`` is the
    full trainable state of the shared model (adapter and head).
    """
    model = make_model()
    model.load_state(global_state)
    global_scores = evaluate(model, test, device=local_config.device)
    personalize(model, train, finetune_config or local_config, roles)
    personalized = evaluate(model, test, device=local_config.device)
    local = make_model()
    train_adapter(local, train, replace(local_config, seed=local_config.seed + 1))
    return PersonalizationReport(
        local_only=evaluate(local, test, device=local_config.device),
        global_model=global_scores,
        personalized=personalized,
    )
