"""A head warm-up (``head-warmup-rounds``): ``fedadapt simulate`` runs the first rounds head only, then the rest
from their final head, as two runs of the real apps (here on the in-process grid instead of Flower's engine)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedadapt.checkpoint.folder import load_adapter
from fedadapt.delta.serialize import deserialize_state
from fedadapt.errors import ConfigError
from fedadapt.fleet.run_config import fleet_run_from_config
from fedadapt.fleet.scenario_file import load_scenario
from fedadapt.fleet.variants import full_model_variant

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed; Flower imports them from the project folder
    sys.path.insert(0, str(PROJECT_ROOT))

from server_harness import (  # noqa: E402
    InProcessGrid,
    run_server,
    server_scenario_file,
    task_identity,  # noqa: F401  (autouse)
)

import server.federation  # noqa: E402
from deploy.serve import Deployment, serve  # noqa: E402
from simulations import runner  # noqa: E402

WARMUP = {"rounds": 3, "head-warmup-rounds": 1, "server-optimizer": "fedadam", "server-lr": 0.01}


class InProcessRuns:
    """Stands in for ``runner.run_plan``: each plan runs the real ServerApp and ClientApps on an in-process grid."""

    def __init__(self, fail_phase: str | None = None) -> None:
        self.phases: list[str] = []
        self.grids: dict[str, InProcessGrid] = {}  # the last grid of each phase (what its server sent)
        self.fail_phase = fail_phase  # this phase's first run crashes before its first round

    def __call__(self, plan: runner.SimulationPlan, show: bool) -> dict[str, Any]:
        self.phases.append(plan.phase)
        if plan.phase == self.fail_phase:
            self.fail_phase = None
            raise runner.SimulationError("the machine went down")
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        grid = self.grids[plan.phase] = InProcessGrid(plan.scenario.num_clients, runner.run_config_values(plan))
        run_server(grid)
        return runner.finished_metrics(plan, 0, "the in-process run")


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> InProcessRuns:
    fake = InProcessRuns()
    monkeypatch.setattr(runner, "run_plan", fake)
    monkeypatch.setattr("server.plots.write_plots", lambda *args: None)
    return fake


def test_the_warmup_trains_the_head_alone_and_the_rest_starts_from_its_head(
    tiny_bert: Path, tmp_path: Path, runs: InProcessRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads_loaded: list[Path] = []
    real_initial_head = server.federation.initial_head_state

    def recording(model: Any, folder: str | Path, backbone: str | None = None) -> Any:
        heads_loaded.append(Path(folder))
        return real_initial_head(model, folder, backbone)

    monkeypatch.setattr(server.federation, "initial_head_state", recording)
    out = tmp_path / "run"
    metrics = runner.simulate(server_scenario_file(tmp_path, tiny_bert, **WARMUP), out=out, show=False)

    assert runs.phases == ["head-warmup", "after-head-warmup"]
    warmup = runner.read_metrics(out / "head-warmup" / "metrics.json")
    assert warmup["complete"] and warmup["scenario"]["method"] == "head" and len(warmup["rounds"]) == 1
    assert warmup["scenario"]["server_optimizer"] == "fedavg"  # a linear layer's exact average
    assert heads_loaded == [out / "head-warmup" / "final_adapter"]
    warm_head = load_adapter(out / "head-warmup" / "final_adapter")
    assert {spec.role for spec in warm_head.schema.specs("shared")} == {"head"}  # nothing but the head was shared
    # The rest is the scenario's own method from the warmed head: its rounds, numbered on after the warm-up's.
    assert metrics["scenario"]["method"] == "lora" and metrics["scenario"]["initial_head"] == str(heads_loaded[0])
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert [r.get("phase") for r in metrics["rounds"]] == ["head-warmup", None, None]
    head_upload, lora_upload = metrics["rounds"][0]["bytes_up"], metrics["rounds"][1]["bytes_up"]
    assert 0 < head_upload < lora_upload  # the warm-up's devices send the head only
    summary = metrics["summary"]
    assert summary["rounds"] == 3 and summary["head_warmup_rounds"] == 1
    assert summary["seconds"] == pytest.approx(sum(r["seconds"] for r in metrics["rounds"]))
    uploads = sum(r["uploads"] for r in metrics["rounds"])
    assert summary["bytes_up_per_client_round"] == pytest.approx(
        sum(r["bytes_up"] for r in metrics["rounds"]) / uploads
    )
    assert runner.read_metrics(out / "metrics.json") == metrics  # what simulate returns is what it keeps


def test_the_rests_first_round_sends_the_warmups_final_head(
    tiny_bert: Path, tmp_path: Path, runs: InProcessRuns
) -> None:
    out = tmp_path / "run"
    runner.simulate(server_scenario_file(tmp_path, tiny_bert, **WARMUP | {"rounds": 2}), out=out, show=False)
    warm = load_adapter(out / "head-warmup" / "final_adapter")
    rest = load_adapter(out / "final_adapter")
    warm_head = head_by_suffix(warm.state(), warm)
    sent_head = head_by_suffix(
        deserialize_state(runs.grids["after-head-warmup"].global_blobs[0], rest.schema, "shared"), rest
    )
    assert sorted(sent_head) == sorted(warm_head) == ["bias", "weight"]
    for name, tensor in warm_head.items():  # exactly the warm-up's trained head, not a fresh random one
        assert torch.equal(sent_head[name], tensor)
    untrained = head_by_suffix(
        deserialize_state(runs.grids["head-warmup"].global_blobs[0], warm.schema, "shared"), warm
    )
    assert not torch.equal(untrained["weight"], warm_head["weight"])  # and the warm-up did train it


def head_by_suffix(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """The head tensors of ``state`` by ``weight`` / ``bias``: the two methods name them differently."""
    heads = {spec.name for spec in model.schema.tensors if spec.role == "head"}
    return {name.rsplit(".", 1)[-1]: tensor for name, tensor in state.items() if name in heads}


def test_resume_after_a_crash_past_the_warmup_does_not_run_it_again(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    scenario_file = server_scenario_file(tmp_path, tiny_bert, **WARMUP)
    crashing = InProcessRuns(fail_phase="after-head-warmup")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_plan", crashing)
        patch.setattr("server.plots.write_plots", lambda *args: None)
        with pytest.raises(runner.SimulationError, match="went down"):
            runner.simulate(scenario_file, out=out, show=False)
        with pytest.raises(ConfigError, match="--resume"):  # the warm-up's checkpoints are a run's
            runner.simulate(scenario_file, out=out, show=False)
        metrics = runner.simulate(scenario_file, out=out, resume=True, show=False)
    assert crashing.phases == ["head-warmup", "after-head-warmup", "after-head-warmup"]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3] and metrics["complete"]


def test_a_fresh_default_out_dir_skips_a_folder_holding_only_a_warmup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sim-x" / "head-warmup" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "sim-x" / "head-warmup" / "checkpoints" / "round-0001.safetensors").write_bytes(b"x")
    assert runner._default_out_dir("x", resume=False) == Path("runs/sim-x-2")
    assert runner._default_out_dir("x", resume=True) == Path("runs/sim-x")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rounds": 2, "head-warmup-rounds": 2}, "must leave at least one"),
        ({"method": "head", "rank": None}, 'method = "head"'),
        ({"personal-head": True}, "personal-head"),
        ({"initial-head": "somewhere"}, "initial-head"),
        ({"head-warmup-rounds": -1}, "head-warmup-rounds"),
    ],
)
def test_a_warmup_that_cannot_work_is_refused_when_the_scenario_loads(
    tiny_bert: Path, tmp_path: Path, changes: dict[str, Any], named: str
) -> None:
    values = {"rounds": 3, "head-warmup-rounds": 1} | changes
    with pytest.raises(ConfigError, match=named):
        load_scenario(server_scenario_file(tmp_path, tiny_bert, **{k: v for k, v in values.items() if v is not None}))


def test_the_apps_refuse_to_run_a_warmup_scenario_whole_or_a_phase_of_another(tiny_bert: Path, tmp_path: Path) -> None:
    warm = server_scenario_file(tmp_path / "warm", tiny_bert, **WARMUP)
    plain = server_scenario_file(tmp_path / "plain", tiny_bert)
    config = {"scenario": str(warm), "out-dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="fedadapt simulate"):  # silently skipping the warm-up would mislead
        fleet_run_from_config(config, PROJECT_ROOT)
    with pytest.raises(ConfigError, match="phase must be one of"):
        fleet_run_from_config(config | {"phase": "warmup"}, PROJECT_ROOT)
    with pytest.raises(ConfigError, match="has none"):
        fleet_run_from_config({"scenario": str(plain), "out-dir": str(tmp_path), "phase": "head-warmup"}, PROJECT_ROOT)
    # The full-model baseline trains everything from round 1: it has no warm-up to run.
    full = fleet_run_from_config(config | {"full-model": True}, PROJECT_ROOT).scenario
    assert full == full_model_variant(load_scenario(warm)) and full.head_warmup_rounds == 0 and full.rounds == 3
    after = fleet_run_from_config(config | {"phase": "after-head-warmup", "num-rounds": 5}, PROJECT_ROOT).scenario
    assert after.rounds == 4 and after.initial_head == str(tmp_path / "out" / "head-warmup" / "final_adapter")


def test_serve_refuses_a_warmup_before_starting_anything(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert, **WARMUP)
    with pytest.raises(ConfigError, match='method = "head" and rounds = 1 first'):
        serve(scenario, Deployment(local_supernodes=1), out=tmp_path / "out", show=False)
    assert not (tmp_path / "out").exists()
