"""The server trains too: a warm start and fine-tuning on a labelled proxy set, on CUDA when present."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_scenario

from fedadapt.aggregate.server_training import load_proxy, train_on_proxy
from fedadapt.errors import ConfigError, DataError
from fedadapt.fleet.build import build_model
from fedadapt.fleet.data import scenario_labels
from fedadapt.fleet.scenario import scenario_from_dict
from fedadapt.train.loop import TrainConfig, evaluate

PROJECT_ROOT = Path(__file__).resolve().parents[2]
from server_harness import task_identity  # noqa: E402, F401  (autouse: messages need Flower's task identity)


def _proxy_csv(path: Path, names: tuple[str, ...], rows: int = 48) -> Path:
    """Texts that name their label, so a little training on them must lower the loss."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = names[i % len(names)]
            writer.writerow([f"{label} {label} request {i}", label])
    return path


def test_training_on_the_proxy_set_improves_the_global_model_on_it(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert)
    labels = scenario_labels(scenario)
    model = build_model(scenario, labels.names)
    proxy = load_proxy(model, _proxy_csv(tmp_path / "proxy.csv", labels.names), labels, scenario.max_length)
    start = model.state("shared")
    before = evaluate(model, proxy, device="cpu")
    run = train_on_proxy(model, start, proxy, TrainConfig(epochs=6, batch_size=8, max_length=16, device="cpu"))
    assert run.device == "cpu" and run.steps == 36 and run.examples == 6 * 48
    assert run.examples_per_second > 0 and run.final_loss is not None
    assert any(not torch.equal(run.state[name], start[name]) for name in start)
    assert all(t.device.type == "cpu" for t in run.state.values())
    model.load_state(run.state, "shared")
    after = evaluate(model, proxy, device="cpu")
    assert after.loss < before.loss
    record = run.record("warm start")
    assert record["what"] == "warm start" and record["steps"] == 36 and json.dumps(record)


def test_proxy_data_with_unknown_labels_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(tiny_bert)
    labels = scenario_labels(scenario)
    model = build_model(scenario, labels.names)
    with pytest.raises(DataError, match="labels the scenario does not know.*mystery"):
        load_proxy(model, _proxy_csv(tmp_path / "proxy.csv", ("mystery",)), labels, scenario.max_length)


def test_server_training_needs_proxy_data_and_sane_epochs() -> None:
    with pytest.raises(ConfigError, match="server-proxy-data"):
        scenario_from_dict({"server-warmup-epochs": 1})
    with pytest.raises(ConfigError, match=r"'server-finetune-epochs' must be an integer in \[0, 1000\], got -1"):
        scenario_from_dict({"server-finetune-epochs": -1, "server-proxy-data": "x.csv"})


def test_the_training_path_runs_without_flower(tiny_bert: Path, tmp_path: Path) -> None:
    """A GPU box may have torch but no flwr: server-side training must not import it."""
    names = scenario_labels(tiny_scenario(tiny_bert)).names
    proxy = _proxy_csv(tmp_path / "proxy.csv", names, rows=16)
    code = f"""
import sys
sys.modules["flwr"] = None  # any import of Flower now fails
from fedadapt.data.label_map import LabelMap
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.fleet.build import build_model
from fedadapt.aggregate.server_training import load_proxy, train_on_proxy
from fedadapt.train.loop import TrainConfig
labels = LabelMap(names={names!r})
scenario = ScenarioConfig(backbone={str(tiny_bert)!r}, rank=4, max_length=16)
model = build_model(scenario, labels.names)
proxy = load_proxy(model, {str(proxy)!r}, labels, 16)
run = train_on_proxy(model, model.state("shared"), proxy, TrainConfig(epochs=1, batch_size=8, max_length=16))
print("steps", run.steps, "device", run.device, "flwr" in sys.modules and sys.modules["flwr"] is not None)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["steps", "2", "device", "cpu", "False"]


def test_warm_start_and_fine_tuning_run_in_the_federation(tiny_bert: Path, tmp_path: Path) -> None:
    from server_harness import InProcessGrid, run_server, server_run_config, server_scenario_file

    names = scenario_labels(tiny_scenario(tiny_bert, seed=3)).names
    proxy = _proxy_csv(tmp_path / "proxy.csv", names, rows=24)
    extra: dict[str, Any] = {
        "server-proxy-data": str(proxy),
        "server-warmup-epochs": 2,
        "server-finetune-epochs": 1,
        "server-device": "cpu",
    }
    scenario = server_scenario_file(tmp_path, tiny_bert, **extra)
    metrics = run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "run")))
    first, second = metrics["rounds"]
    assert first["server_warmup"]["what"] == "warm start" and first["server_warmup"]["steps"] == 6
    assert first["server_warmup"]["device"] == "cpu" and "server_warmup" not in second
    for record in (first, second):
        assert record["server_finetune"]["steps"] == 3 and record["server_finetune"]["examples_per_second"] > 0
    (tmp_path / "plain").mkdir()
    plain = server_scenario_file(tmp_path / "plain", tiny_bert)
    baseline = run_server(InProcessGrid(3, server_run_config(plain, tmp_path / "plain-run")))
    assert "server_warmup" not in baseline["rounds"][0] and "server_finetune" not in baseline["rounds"][0]
    assert metrics["rounds"][-1]["loss"] != baseline["rounds"][-1]["loss"]  # the server's training changed the model
