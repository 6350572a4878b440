"""A head warm start: the server's first global head comes from an earlier run's adapter folder (``initial-head``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_scenario

from fedadapt.checkpoint.folder import save_adapter
from fedadapt.checkpoint.initial_head import initial_head_state
from fedadapt.errors import ConfigError
from fedadapt.fleet.build import build_model
from fedadapt.fleet.data import load_fleet_data
from fedadapt.fleet.run_config import FleetRun
from fedadapt.fleet.scenario_file import load_scenario
from server.federation import Federation


def _head_folder(scenario_file: Path, folder: Path, labels: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A trained-looking head of the ``head`` method saved as an adapter folder; its tensors by bare name."""
    scenario = dataclasses.replace(load_scenario(scenario_file), method="head", rank=None, method_settings=())
    model = build_model(scenario, labels or load_fleet_data(scenario).labels.names)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param))
    save_adapter(model, folder)
    return model.state()


def test_the_head_of_a_head_only_run_starts_a_lora_model_under_its_own_names(tiny_bert: Path, tmp_path: Path) -> None:
    scenario_file = write_tiny_scenario(tmp_path / "lora", tiny_bert, method_settings={"drop-layers": 1})
    saved = _head_folder(scenario_file, tmp_path / "warm")
    scenario = load_scenario(scenario_file)
    model = build_model(scenario, load_fleet_data(scenario).labels.names)

    head = initial_head_state(model, tmp_path / "warm")

    head_specs = [s for s in model.schema.tensors if s.role == "head"]
    assert sorted(head) == sorted(s.name for s in head_specs) and len(head) == 2
    for name, tensor in head.items():
        assert torch.equal(tensor, saved[f"classifier.{name.rsplit('.', 1)[-1]}"])


def test_a_head_for_other_labels_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    scenario_file = write_tiny_scenario(tmp_path / "lora", tiny_bert)
    scenario = load_scenario(scenario_file)
    labels = load_fleet_data(scenario).labels.names
    _head_folder(scenario_file, tmp_path / "warm", labels=tuple(reversed(labels)))
    with pytest.raises(ConfigError, match="same labels"):
        initial_head_state(build_model(scenario, labels), tmp_path / "warm")


def test_the_server_starts_from_the_initial_head_named_relative_to_the_scenario(
    tiny_bert: Path, tmp_path: Path
) -> None:
    plain = write_tiny_scenario(tmp_path / "plain", tiny_bert)
    saved = _head_folder(plain, tmp_path / "warmed" / "warm")
    scenario_file = write_tiny_scenario(tmp_path / "warmed", tiny_bert, initial_head="warm")

    federation = Federation(FleetRun(load_scenario(scenario_file), tmp_path / "out"))

    for spec in (s for s in federation.schema.specs("shared") if s.role == "head"):
        assert torch.equal(federation.global_state[spec.name], saved[f"classifier.{spec.name.rsplit('.', 1)[-1]}"])
    cold = Federation(FleetRun(load_scenario(plain), tmp_path / "out-plain"))
    adapters = [s.name for s in federation.schema.specs("shared") if s.role == "adapter"]
    assert adapters and all(torch.equal(federation.global_state[n], cold.global_state[n]) for n in adapters)


def test_initial_head_with_personal_heads_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    (tmp_path / "s" / "warm").mkdir(parents=True)
    scenario_file = write_tiny_scenario(tmp_path / "s", tiny_bert, initial_head="warm", personal_head=True)
    with pytest.raises(ConfigError, match="personal-head"):
        load_scenario(scenario_file)
