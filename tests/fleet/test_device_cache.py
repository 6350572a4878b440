"""A device trains from its frozen-prefix cache (fedadapt.fleet.device_cache): the same delta as without it,
computed once and reused by later rounds in a fresh process, a damaged file rebuilt, nothing for methods
that leave no frozen layer."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_scenario

from fedadapt.delta.serialize import serialize_state
from fedadapt.fleet.build import _cached_model, build_model
from fedadapt.fleet.data import load_fleet_data
from fedadapt.fleet.device_data import DeviceContext, PrefixCacheSettings
from fedadapt.fleet.device_round import LocalUpdate, train_client_update
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.train import prefix_store

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
EXACT = PrefixCacheSettings(dtype="float32")  # bit for bit what the model computes: the equality checks
OFF = PrefixCacheSettings(enabled=False)  # every epoch through the whole model: the reference


# Methods that leave frozen layers, as a scenario gives them: (method, rank, [method-settings], frozen layers k).
CACHING = {
    "pfeiffer-drop1": ("pfeiffer", 4, (("drop_layers", 1),), 1),
    "lora-drop1": ("lora", 4, (("drop_layers", 1),), 1),
    "ffa-lora-drop1": ("ffa-lora", 4, (("drop_layers", 1),), 1),
    "ia3-drop1": ("ia3", None, (("drop_layers", 1),), 1),
    "head": ("head", None, (), 2),
}


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The examples each computation of the frozen prefix ran through the lower layers."""
    calls: list[int] = []
    compute = prefix_store.compute_prefix_states

    def counting(model: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(data))
        return compute(model, data, *args, **kwargs)

    monkeypatch.setattr(prefix_store, "compute_prefix_states", counting)
    return calls


def _scenario(tiny_bert: Path, caching: str = "pfeiffer-drop1") -> ScenarioConfig:
    method, rank, settings, _ = CACHING[caching]
    return tiny_scenario(
        tiny_bert, method=method, rank=rank, method_settings=settings, local_max_steps=3, batch_size=4, seed=5
    )


def _global_blob(scenario: ScenarioConfig) -> bytes:
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    return serialize_state(model.state("shared"), model.schema, "shared", "none")


def _round(
    scenario: ScenarioConfig, state_dir: Path, blob: bytes, server_round: int, cache: PrefixCacheSettings = EXACT
) -> LocalUpdate:
    return train_client_update(DeviceContext(scenario, 1, state_dir, prefix_cache=cache), blob, server_round)


def _max_difference(a: LocalUpdate, b: LocalUpdate) -> float:
    assert a.delta.keys() == b.delta.keys()
    return max((a.delta[name] - tensor).abs().max().item() for name, tensor in b.delta.items())


@pytest.mark.parametrize("caching", CACHING)
def test_a_devices_delta_from_the_cache_equals_its_delta_without(tiny_bert: Path, tmp_path: Path, caching: str) -> None:
    scenario = _scenario(tiny_bert, caching)
    blob = _global_blob(scenario)
    without = _round(scenario, tmp_path / "off", blob, 1, OFF)
    cached = _round(scenario, tmp_path / "exact", blob, 1)
    assert max(t.abs().max().item() for t in without.delta.values()) > 1e-3  # the round did train
    assert _max_difference(cached, without) <= TOL
    assert cached.metrics["prefix-layers"] == CACHING[caching][3]
    assert cached.metrics["prefix-cache-hit"] == 0 and cached.metrics["prefix-cache-seconds"] > 0
    assert "prefix-cache-hit" not in without.metrics and not (tmp_path / "off" / "prefix-cache-1").exists()


def test_the_default_float16_cache_stays_close_to_the_full_model(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = _scenario(tiny_bert)
    blob = _global_blob(scenario)
    without = _round(scenario, tmp_path / "off", blob, 1, OFF)
    half = _round(scenario, tmp_path / "half", blob, 1, PrefixCacheSettings())
    scale = max(t.abs().max().item() for t in without.delta.values())
    assert _max_difference(half, without) <= 1e-2 * scale  # float16 states: 11 significant bits


def test_a_device_restarted_mid_run_reuses_its_cache(tiny_bert: Path, tmp_path: Path, computed: list[int]) -> None:
    scenario = _scenario(tiny_bert)
    blob = _global_blob(scenario)
    first = _round(scenario, tmp_path / "device", blob, 1)
    assert first.metrics["prefix-cache-hit"] == 0 and len(computed) == 1
    _cached_model.cache_clear()  # a fresh process: its model built anew, a fresh DeviceContext below
    second = _round(scenario, tmp_path / "device", blob, 2)
    assert second.metrics["prefix-cache-hit"] == 1 and len(computed) == 1  # read back, nothing recomputed
    reference = _round(scenario, tmp_path / "reference", blob, 2, OFF)
    assert _max_difference(second, reference) <= TOL


def test_a_fresh_process_per_message_reads_the_cache_the_last_one_wrote(tiny_bert: Path, tmp_path: Path) -> None:
    code = f"""
import json, sys
sys.path.insert(0, {str(PROJECT_ROOT / "tests")!r})
from pathlib import Path
from helpers import tiny_scenario
from fedadapt.delta.serialize import serialize_state
from fedadapt.fleet.build import build_model
from fedadapt.fleet.data import load_fleet_data
from fedadapt.fleet.device_data import DeviceContext
from fedadapt.fleet.device_round import train_client_update
from fedadapt.train import prefix_store
calls = []
compute = prefix_store.compute_prefix_states
prefix_store.compute_prefix_states = lambda *a, **k: calls.append(1) or compute(*a, **k)
scenario = tiny_scenario(
    Path({str(tiny_bert)!r}), method="pfeiffer", rank=4, method_settings=(("drop_layers", 1),), local_max_steps=2
)
model = build_model(scenario, load_fleet_data(scenario).labels.names)
blob = serialize_state(model.state("shared"), model.schema, "shared", "none")
update = train_client_update(DeviceContext(scenario, 0, Path({str(tmp_path)!r})), blob, int(sys.argv[1]))
print(json.dumps([update.metrics["prefix-cache-hit"], len(calls)]))
"""

    def message(server_round: int) -> list[int]:
        run = subprocess.run(
            [sys.executable, "-c", code, str(server_round)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)},
        )
        result: list[int] = json.loads(run.stdout.strip().splitlines()[-1])
        return result

    assert message(1) == [0, 1]  # the first message computes the frozen prefix
    assert message(2) == [1, 0]  # the next process reads it from the state folder


def test_a_damaged_cache_file_is_rebuilt_not_a_crash(
    tiny_bert: Path, tmp_path: Path, computed: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    scenario = _scenario(tiny_bert)
    blob = _global_blob(scenario)
    first = _round(scenario, tmp_path, blob, 1)
    (entry,) = (tmp_path / "prefix-cache-1").iterdir()
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncated: a disk that lost the tail
    with caplog.at_level(logging.WARNING):
        second = _round(scenario, tmp_path, blob, 1)
    assert "unreadable" in caplog.text
    assert second.metrics["prefix-cache-hit"] == 0 and len(computed) == 2
    assert _max_difference(second, first) == 0.0  # the same round: the same states, the same delta
    assert _round(scenario, tmp_path, blob, 2).metrics["prefix-cache-hit"] == 1


def test_without_a_frozen_layer_nothing_is_cached(tiny_bert: Path, tmp_path: Path, computed: list[int]) -> None:
    scenario = tiny_scenario(tiny_bert)  # LoRA on every layer
    update = _round(scenario, tmp_path, _global_blob(scenario), 1)
    assert update.metrics["prefix-layers"] == 0 and "prefix-cache-hit" not in update.metrics
    assert computed == [] and not (tmp_path / "prefix-cache-1").exists()


def test_a_device_that_keeps_nothing_on_disk_still_trains_from_the_cache(
    tiny_bert: Path, tmp_path: Path, computed: list[int]
) -> None:
    scenario = _scenario(tiny_bert)
    blob = _global_blob(scenario)
    memory_only = dataclasses.replace(EXACT, max_bytes=0)
    updates = [_round(scenario, tmp_path, blob, r, memory_only) for r in (1, 2)]
    assert [u.metrics["prefix-cache-hit"] for u in updates] == [0, 0] and len(computed) == 2
    assert not (tmp_path / "prefix-cache-1").exists()
    assert _max_difference(updates[0], _round(scenario, tmp_path / "off", blob, 1, OFF)) <= TOL


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"max_bytes": -1}, "max_bytes must be an integer >= 0"), ({"dtype": "bfloat16"}, "dtype must be one of")],
)
def test_bad_cache_settings_are_a_clear_error(settings: dict[str, Any], message: str) -> None:
    from fedadapt.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        PrefixCacheSettings(**settings)


def test_a_devices_default_cap_is_the_stores_default() -> None:
    from fedadapt.fleet.device_data import DEFAULT_PREFIX_CACHE_BYTES  # defined apart: that module loads no torch

    assert PrefixCacheSettings().max_bytes == DEFAULT_PREFIX_CACHE_BYTES == prefix_store.DEFAULT_MAX_BYTES
