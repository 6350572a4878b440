"""Issue 22: the [privacy.dp] table is typed and validated, and every refusal says what to do."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedadapt.errors import ConfigError
from fedadapt.privacy.dp.config import DP_KEYS, DpConfig, default_delta, dp_config_from_table

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_a_table_becomes_a_frozen_config() -> None:
    config = dp_config_from_table({"mode": "distributed", "target-epsilon": 8, "clip": 0.5}, "s.toml")
    assert (config.mode, config.target_epsilon, config.noise_multiplier, config.clip) == ("distributed", 8, None, 0.5)
    assert config.sampling == "fixed-size" and not config.adaptive and config.initial_clip_norm == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clip = 1.0  # type: ignore[misc]
    assert set(DP_KEYS) >= {"noise-multiplier", "target-epsilon", "max-epsilon", "clipped-count-stddev", "sampling"}


def test_adaptive_clipping_defaults_follow_andrew_et_al() -> None:
    config = dp_config_from_table({"noise-multiplier": 1.0, "clip": "adaptive", "initial-clip": 0.1}, "s.toml")
    assert config.adaptive and config.initial_clip_norm == 0.1
    assert (config.target_quantile, config.clip_learning_rate) == (0.5, 0.2)
    assert config.clipped_count_stddev_for(100) == pytest.approx(5.0)  # m / 20
    assert dataclasses.replace(config, clipped_count_stddev=2.0).clipped_count_stddev_for(100) == 2.0


def test_delta_defaults_to_one_over_n_to_the_1_1() -> None:
    config = DpConfig(noise_multiplier=1.0)
    assert config.delta_for(1000) == pytest.approx(1000**-1.1) == default_delta(1000)
    assert config.delta_for(1000) < 1 / 1000
    assert DpConfig(noise_multiplier=1.0, delta=1e-6).delta_for(1000) == 1e-6
    with pytest.raises(ConfigError, match="population of devices"):
        config.delta_for(1)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"clip": 1.0}, "exactly one of noise-multiplier"),
        ({"noise-multiplier": 1.0, "target-epsilon": 3.0}, "exactly one of noise-multiplier"),
        ({"noise-multiplier": 1.0, "mode": "local"}, "mode must be one of"),
        ({"noise-multiplier": 1.0, "sampling": "shuffle"}, "sampling must be one of"),
        ({"noise-multiplier": 0}, r"'privacy.dp.noise-multiplier' must be a finite number in \(0, 1000\]"),
        ({"noise-multiplier": float("nan")}, "noise-multiplier"),
        ({"target-epsilon": -1.0}, "target-epsilon"),
        ({"noise-multiplier": 1.0, "delta": 0.5}, r"'privacy.dp.delta' must be a finite number in \(0, 0.1\]"),
        ({"noise-multiplier": 1.0, "clip": 0.0}, "'privacy.dp.clip' must be"),
        ({"noise-multiplier": 1.0, "clip": True}, "'privacy.dp.clip' must be"),
        ({"noise-multiplier": 1.0, "clip": "auto"}, 'positive number or "adaptive"'),
        ({"noise-multiplier": 1.0, "clip": "adaptive"}, "needs initial-clip"),
        ({"noise-multiplier": 1.0, "clip": 1.0, "target-quantile": 0.9}, r"apply only with clip = \"adaptive\""),
        ({"noise-multiplier": 1.0, "clip": "adaptive", "initial-clip": 0.1, "target-quantile": 1.0}, "target-quantile"),
        ({"target-epsilon": 8.0, "max-epsilon": 4.0}, "max-epsilon .* is below target-epsilon"),
        ({"noise-multiplier": 1.0, "noise": 1.0}, "unknown keys \\['noise'\\]; allowed keys are"),
    ],
)
def test_bad_tables_are_refused_with_what_to_do(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        dp_config_from_table(table, "fleet.toml")
    assert str(raised.value).startswith("fleet.toml: ")


def test_a_table_that_is_no_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="privacy.dp must be a table"):
        dp_config_from_table(["noise-multiplier", 1.0], "fleet.toml")


def test_importing_the_dp_modules_does_not_load_dp_accounting() -> None:
    names = ("config", "clipping", "noise", "adaptive_clip", "accounting")
    modules = ", ".join(f"fedadapt.privacy.dp.{name}" for name in names)
    code = f"import sys, fedadapt, {modules}; assert 'dp_accounting' not in sys.modules, 'dp_accounting loaded'"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
