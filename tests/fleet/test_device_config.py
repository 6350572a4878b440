"""A device's folders and identity come from its own configuration: node config, or the simulation's environment."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from fedadapt.errors import ConfigError
from fedadapt.fleet.device_data import DEFAULT_PREFIX_CACHE_BYTES
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.privacy.config import PrivacyConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed
    sys.path.insert(0, str(PROJECT_ROOT))

from clients import device as device_module  # noqa: E402
from clients.device import (  # noqa: E402
    DEFAULT_STATE_DIR,
    DEVICE_ROOT_ENV,
    device_from_config,
    enforce_privacy_policy,
    warn_about_device_paths,
)


def test_node_config_names_every_path(tmp_path: Path) -> None:
    node_config = {
        "partition-id": 4,
        "state-dir": str(tmp_path / "state"),
        "data-path": str(tmp_path / "own.jsonl"),
        "identity-key": str(tmp_path / "device.key"),
        "roster": str(tmp_path / "roster.pub"),
    }
    device = device_from_config(node_config, environ={DEVICE_ROOT_ENV: str(tmp_path / "ignored")})
    assert device.partition_id == 4
    assert device.state_dir == tmp_path / "state" and device.data_path == tmp_path / "own.jsonl"
    assert device.identity_key == tmp_path / "device.key" and device.roster == tmp_path / "roster.pub"


def test_simulated_devices_take_their_folder_from_the_environment(tmp_path: Path) -> None:
    device = device_from_config({"partition-id": 2}, environ={DEVICE_ROOT_ENV: str(tmp_path)})
    assert device.state_dir == tmp_path and device.data_path is None
    assert device.identity_key == tmp_path / "device-2" / "identity.key"
    assert device.roster == tmp_path / "roster.pub"


@pytest.mark.parametrize(("value", "expected"), [(None, DEFAULT_PREFIX_CACHE_BYTES), (0, 0), (1.5, 3 * 2**19)])
def test_the_prefix_cache_cap_is_the_devices_own_setting(tmp_path: Path, value: object, expected: int) -> None:
    node_config = {"partition-id": 1} | ({} if value is None else {"prefix-cache-mb": value})
    device = device_from_config(node_config, environ={DEVICE_ROOT_ENV: str(tmp_path)})
    context = device.in_scenario(ScenarioConfig(name="tiny"))
    assert context.prefix_cache.max_bytes == expected and context.prefix_cache.enabled
    assert context.prefix_cache_dir == tmp_path / "prefix-cache-1"


def test_without_configuration_a_device_keeps_its_files_in_its_home_folder() -> None:
    device = device_from_config({"partition-id": 0}, environ={})
    assert device.state_dir == DEFAULT_STATE_DIR.expanduser() and device.state_dir.is_absolute()
    assert device.identity_key is None and device.roster is None


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"partition-id": 0, "state-dir": "relative/state"}, "'state-dir' must be an absolute path"),
        ({"partition-id": 0, "data-path": "../up.jsonl"}, "'data-path' must be an absolute path"),
        ({"partition-id": -1}, "'partition-id' must be an integer >= 0"),
        ({"partition-id": "x"}, "'partition-id' must be an integer >= 0"),
        ({}, "'partition-id' must be an integer >= 0"),
        ({"partition-id": 0, "prefix-cache-mb": -1}, "'prefix-cache-mb' must be a number of MiB >= 0"),
        ({"partition-id": 0, "prefix-cache-mb": "lots"}, "'prefix-cache-mb' must be a number of MiB >= 0"),
        ({"partition-id": 0, "prefix-cache-mb": "nan"}, "'prefix-cache-mb' must be a number of MiB >= 0"),
        ({"partition-id": 0, "prefix-cache-mb": True}, "'prefix-cache-mb' must be a number of MiB >= 0"),
    ],
)
def test_bad_node_config_is_a_clear_error(node_config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        device_from_config(node_config, environ={})


def test_run_config_device_paths_are_warned_about_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(device_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="clients.device"):
        assert warn_about_device_paths({"client-state-dir": "/srv/anywhere"}) == ["client-state-dir"]
        warn_about_device_paths({"client-state-dir": "/srv/anywhere"})
        assert warn_about_device_paths({"client-state-dir": ""}) == []
    assert len(caplog.records) == 1 and "ignored" in caplog.records[0].getMessage()


def _privacy(mode: str, **changes: object) -> PrivacyConfig:
    return PrivacyConfig(mode=mode, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("required", "offered", "refused"),
    [
        ("secagg+", _privacy("none"), "asks for 'none'"),
        ("secagg+", _privacy("aead"), "asks for 'aead'"),
        ("aead", _privacy("none"), "asks for 'none'"),
        (
            "secagg+",
            _privacy("secagg+", num_shares=5, reconstruction_threshold=3, assume_honest_server=True),
            "assume-honest-server",
        ),
    ],
)
def test_the_run_config_cannot_take_a_device_below_its_privacy_policy(
    required: str, offered: PrivacyConfig, refused: str
) -> None:
    device = device_from_config({"partition-id": 0, "require-privacy": required}, environ={})
    with pytest.raises(ConfigError, match=refused):
        enforce_privacy_policy(device, offered)


def test_a_run_at_or_above_the_policy_goes_ahead() -> None:
    for required, offered in [("none", "none"), ("none", "secagg+"), ("aead", "aead"), ("aead", "secagg+")]:
        device = device_from_config({"partition-id": 0, "require-privacy": required}, environ={})
        enforce_privacy_policy(device, _privacy(offered))
    device = device_from_config({"partition-id": 0, "require-privacy": "secagg+"}, environ={})
    enforce_privacy_policy(device, _privacy("secagg+"))
    with pytest.raises(ConfigError, match="'require-privacy' must be one of"):
        device_from_config({"partition-id": 0, "require-privacy": "tls"}, environ={})
