"""Fixtures of the delta tests: one LoRA model per module, its shared state with noise, and that state's blob."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import build_lora, perturbed

from fedadapt import AdapterModel
from fedadapt.delta.serialize import serialize_state
from fedadapt.delta.state import State


@pytest.fixture(scope="module")
def lora(tiny_bert: Path) -> AdapterModel:
    """One LoRA model shared by the read-only tests of a module."""
    return build_lora(tiny_bert)


@pytest.fixture(scope="module")
def state(lora: AdapterModel) -> State:
    """The shared state with seeded noise added, so no tensor is all zeros."""
    return perturbed(lora.state("shared"))


@pytest.fixture(scope="module")
def blob(lora: AdapterModel, state: State) -> bytes:
    """``state`` serialized uncompressed."""
    return serialize_state(state, lora.schema, "shared", "none")
