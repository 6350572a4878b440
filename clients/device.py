"""Which device this is and where it keeps its files: from the device's own configuration, never the run's.

The run config comes from the server. A device's state folder (its personal part, its cached
split with raw texts), its own data file, its identity key and the weakest privacy mode it takes
part in are the device's business: they come from its node config (``fedadapt node`` passes
``state-dir``, ``data-path``, ``identity-key``, ``roster`` and ``require-privacy``; ``prefix-cache-mb``
caps the frozen-prefix cache in its state folder, 0 keeps nothing there), or, in Flower's
simulation, which cannot give virtual nodes extra node config, from ``FEDADAPT_DEVICE_ROOT`` in the
environment the simulation runner starts Flower with. A run config that names a path on devices
(``client-state-dir``) is ignored there, with a warning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedadapt.config_values import expand_user
from fedadapt.errors import ConfigError
from fedadapt.fleet.device_data import DEFAULT_PREFIX_CACHE_BYTES, DeviceContext, PrefixCacheSettings
from fedadapt.fleet.run_config import RUN_CLIENT_STATE_DIR
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.privacy.config import MODES, PrivacyConfig

logger = logging.getLogger(__name__)

PARTITION_ID = "partition-id"  # node config key Flower's simulation sets for each virtual device
STATE_DIR = "state-dir"  # where a real device keeps its personal part and cached split
DATA_PATH = "data-path"  # the device's own data file (else its partition of the scenario's)
IDENTITY_KEY = "identity-key"  # the device's ECDSA P-384 key (its SuperNode key): signs its SecAgg+ messages
ROSTER = "roster"  # the devices' public keys, one OpenSSH line each: whom SecAgg+ messages may come from
REQUIRE_PRIVACY = "require-privacy"  # the weakest privacy mode this device takes part in: none | aead | secagg+
REQUIRE_DP = "require-dp"  # "distributed": take part only where the device noises its own delta before masking
DP_REQUIREMENTS = ("", "distributed")
PREFIX_CACHE_MB = "prefix-cache-mb"  # MiB the device's frozen-prefix cache may take in its state folder
DEVICE_ROOT_ENV = "FEDADAPT_DEVICE_ROOT"  # simulation: the folder every virtual device keeps its files in
DEFAULT_STATE_DIR = Path("~/.fedadapt/device")  # a device with no state-dir configured
RUN_CONFIG_DEVICE_PATHS = (RUN_CLIENT_STATE_DIR,)  # run-config keys that once named paths on devices
_warned: set[str] = set()  # keys already warned about in this process (simulation reuses its workers)


@dataclass(frozen=True)
class Device:
    """This device: its partition id, where it keeps its files, its own data file and identity, if any."""

    partition_id: int
    state_dir: Path
    data_path: Path | None = None
    identity_key: Path | None = None
    roster: Path | None = None
    required_privacy: str = "none"  # the run config (the server's word) cannot take the device below this
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    required_dp: str = ""  # "distributed": the device refuses runs where it does not add its own noise share

    def in_scenario(self, scenario: ScenarioConfig) -> DeviceContext:
        """This device as a round in ``scenario`` takes it (``fedadapt.fleet.device_round``)."""
        cache = PrefixCacheSettings(max_bytes=self.prefix_cache_bytes)
        return DeviceContext(scenario, self.partition_id, self.state_dir, self.data_path, cache)


def device_from_config(node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Device:
    """The device a ClientApp runs as, from its node config (and, in simulation, the environment)."""
    environ = os.environ if environ is None else environ
    partition_id = _partition_id(node_config)
    root = environ.get(DEVICE_ROOT_ENV, "")
    state_dir = _path(node_config, STATE_DIR) or (Path(root) if root else DEFAULT_STATE_DIR.expanduser())
    identity, roster = _path(node_config, IDENTITY_KEY), _path(node_config, ROSTER)
    if root and identity is None:
        identity = Path(root) / f"device-{partition_id}" / "identity.key"
    if root and roster is None:
        roster = Path(root) / "roster.pub"
    required = str(node_config.get(REQUIRE_PRIVACY, "none") or "none")
    if required not in MODES:
        raise ConfigError(f"node config {REQUIRE_PRIVACY!r} must be one of {MODES}, got {required!r}")
    cache_bytes = _prefix_cache_bytes(node_config)
    required_dp = str(node_config.get(REQUIRE_DP, "") or "")
    if required_dp not in DP_REQUIREMENTS:
        raise ConfigError(f"node config {REQUIRE_DP!r} must be 'distributed' or left out, got {required_dp!r}")
    data = _path(node_config, DATA_PATH)
    return Device(partition_id, state_dir, data, identity, roster, required, cache_bytes, required_dp)


def enforce_privacy_policy(device: Device, privacy: PrivacyConfig) -> None:
    """ConfigError unless the run's privacy is at least what the device requires.

    The scenario a device runs is named by the run config, which the server sets and nobody signs;
    a device that requires secagg+ refuses a run that asks for less, or that asks it to assume the
    server follows the protocol (``assume-honest-server``)."""
    wanted, offered = MODES.index(device.required_privacy), MODES.index(privacy.mode)  # type: ignore[arg-type]
    if offered < wanted:
        raise ConfigError(
            f"this device requires privacy {device.required_privacy!r} (node config {REQUIRE_PRIVACY!r}), the run "
            f"asks for {privacy.mode!r}: it does not take part"
        )
    if device.required_privacy == "secagg+" and privacy.assume_honest_server:
        raise ConfigError(
            f"this device requires secagg+ against a malicious server (node config {REQUIRE_PRIVACY!r}), the run "
            "sets assume-honest-server = true: it does not take part"
        )
    if device.required_dp == "distributed" and (privacy.dp is None or privacy.dp.mode != "distributed"):
        asked = "no differential privacy" if privacy.dp is None else f"{privacy.dp.mode} DP"
        raise ConfigError(
            f"this device requires distributed DP (node config {REQUIRE_DP!r}): it adds its own noise share before "
            f"its delta leaves it; the run asks for {asked}: it does not take part"
        )


def warn_about_device_paths(run_config: Mapping[str, Any]) -> list[str]:
    """Run-config keys that name paths on devices: logged (once per process) and ignored."""
    named = [key for key in RUN_CONFIG_DEVICE_PATHS if str(run_config.get(key, "") or "")]
    for key in named:
        if key in _warned:
            continue
        _warned.add(key)
        logger.warning(
            "the run config sets %r, a path on this device: ignored. A device's folders come from its own "
            "configuration (fedadapt node --state-dir, or node config %r)",
            key,
            STATE_DIR,
        )
    return named


def _partition_id(node_config: Mapping[str, Any]) -> int:
    value = node_config.get(PARTITION_ID)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"node config {PARTITION_ID!r} must be an integer >= 0, got {value!r}")
    try:
        partition_id = int(value)
    except ValueError:
        raise ConfigError(f"node config {PARTITION_ID!r} must be an integer >= 0, got {value!r}") from None
    if partition_id < 0:
        raise ConfigError(f"node config {PARTITION_ID!r} must be an integer >= 0, got {partition_id}")
    return partition_id


def _prefix_cache_bytes(node_config: Mapping[str, Any]) -> int:
    value = node_config.get(PREFIX_CACHE_MB)
    if value in (None, ""):
        return DEFAULT_PREFIX_CACHE_BYTES
    try:
        megabytes = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        megabytes = math.nan
    if not 0 <= megabytes < 2**40:  # NaN fails too
        raise ConfigError(f"node config {PREFIX_CACHE_MB!r} must be a number of MiB >= 0, got {value!r}")
    return int(megabytes * 2**20)


def _path(node_config: Mapping[str, Any], key: str) -> Path | None:
    value = node_config.get(key)
    if value in (None, ""):
        return None
    path = expand_user(str(value), f"node config {key!r}")
    if not path.is_absolute():
        raise ConfigError(f"node config {key!r} must be an absolute path, got {str(value)!r}")
    return path
