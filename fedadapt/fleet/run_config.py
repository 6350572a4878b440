"""The run configuration the Flower apps receive: ``[tool.flwr.app.config]`` plus ``--run-config`` overrides.

Its keys name the scenario, where the server writes, rounds and clients per round, and the
benchmark and privacy switches; ``fleet_run_from_config`` checks them and loads the scenario.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedadapt.checkpoint.key import KEYS_FOLDER
from fedadapt.config_values import expand_user
from fedadapt.errors import ConfigError
from fedadapt.fleet.scenario import ScenarioConfig
from fedadapt.fleet.scenario_file import load_scenario
from fedadapt.fleet.variants import after_head_warmup, full_model_variant, head_warmup_variant, with_overrides

RUN_SCENARIO = "scenario"  # scenario TOML; relative paths are resolved against the project folder
RUN_OUT_DIR = "out-dir"  # where the server writes checkpoints, metrics.json and final_adapter/
RUN_NUM_ROUNDS = "num-rounds"  # 0: the scenario's rounds
RUN_CLIENTS_PER_ROUND = "clients-per-round"  # 0: the scenario's; fedadapt serve lowers it to the nodes it starts
RUN_RESUME = "resume"  # continue from the latest checkpoint in out-dir
RUN_CLIENT_STATE_DIR = "client-state-dir"  # obsolete: devices ignore it (their folders are theirs to choose)
RUN_FULL_MODEL = "full-model"  # run the scenario's full-model FedAvg variant instead
RUN_EMPTY_CLIENTS = "empty-clients"  # benchmarks: clients reply at once with a zero delta
RUN_SERVER_KEY = "server-key"  # the server's X25519 private key file (privacy modes aead and secagg+)
RUN_SERVER_PUBLIC_KEY = "server-public-key"  # its public key for the clients: 64 hex characters or server.pub's path
RUN_ACCEPT_UNVERIFIED = "accept-unverified-checkpoints"  # resume from checkpoints the server cannot authenticate
RUN_PHASE = "phase"  # a scenario with head-warmup-rounds runs as two runs: "head-warmup", then "after-head-warmup"
RUN_METRICS_PORT = "metrics-port"  # > 0: the ServerApp serves Prometheus metrics (and the live page) on this port
RUN_METRICS_HOST = "metrics-host"  # the address that port binds to (loopback unless the operator says otherwise)
RUN_DASHBOARD = "dashboard"  # also serve the live page (/) beside /metrics
RUN_KEYS = (
    *(RUN_SCENARIO, RUN_OUT_DIR, RUN_NUM_ROUNDS, RUN_CLIENTS_PER_ROUND, RUN_RESUME, RUN_CLIENT_STATE_DIR),
    *(RUN_FULL_MODEL, RUN_EMPTY_CLIENTS, RUN_SERVER_KEY, RUN_SERVER_PUBLIC_KEY, RUN_ACCEPT_UNVERIFIED, RUN_PHASE),
    *(RUN_METRICS_PORT, RUN_METRICS_HOST, RUN_DASHBOARD),
)
LOOPBACK = "127.0.0.1"
MAX_HOST_LENGTH = 253  # the longest DNS name
CLIENT_STATE_FOLDER = "clients"
FINAL_ADAPTER = "final_adapter"  # <out>/final_adapter: the run's last global adapter, written by the server
HEAD_WARMUP_FOLDER = "head-warmup"  # <out>/head-warmup: a head warm-up's own run (metrics, checkpoints, final head)
PHASE_WHOLE, PHASE_HEAD_WARMUP, PHASE_AFTER_HEAD_WARMUP = "", "head-warmup", "after-head-warmup"
PHASES = (PHASE_WHOLE, PHASE_HEAD_WARMUP, PHASE_AFTER_HEAD_WARMUP)


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where the ServerApp serves its Prometheus metrics and live page; off (port 0) by default."""

    port: int = 0  # 0: no endpoint
    host: str = LOOPBACK
    dashboard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"--metrics-port must be in 1..65535 (0: off), got {self.port!r}")
        host = self.host
        if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST_LENGTH or host != host.strip():
            raise ConfigError(f"--metrics-host must be an IP address or host name, got {self.host!r}")
        if self.dashboard and not self.port:
            raise ConfigError("--dashboard is served on the metrics port: add --metrics-port")

    @property
    def enabled(self) -> bool:
        return self.port > 0

    @property
    def exposed(self) -> bool:
        """Whether the endpoint can be reached from other machines (any address but loopback)."""
        return self.enabled and not is_loopback(self.host)

    def warn_if_exposed(self) -> None:
        """Log a warning when the endpoint listens beyond loopback: it has no TLS and no authentication."""
        if self.exposed:
            logger.warning(
                "the metrics endpoint listens on %s:%d, reachable beyond this machine without TLS or authentication: "
                "anyone who reaches it reads the run's progress and rejection reasons (use 127.0.0.1 and an SSH "
                "tunnel, or a firewall)",
                self.host,
                self.port,
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: ``localhost`` or a loopback IP address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


@dataclass(frozen=True)
class FleetRun:
    """One run of a scenario: the scenario (with overrides applied) and where its files go."""

    scenario: ScenarioConfig
    out_dir: Path
    resume: bool = False
    empty_clients: bool = False
    server_key: Path | None = None  # only the server reads it
    server_public_key: str = ""
    accept_unverified_checkpoints: bool = False  # resume even from checkpoints that fail authentication
    metrics: MetricsEndpoint = field(default_factory=MetricsEndpoint)  # the server's Prometheus endpoint

    @property
    def keys_dir(self) -> Path:
        """The server's key folder (its checkpoint key lives there)."""
        return self.out_dir / KEYS_FOLDER


def fleet_run_from_config(run_config: Mapping[str, Any], project_root: Path) -> FleetRun:
    """Parse the apps' run config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides)."""
    unknown = sorted(k for k in run_config if k not in RUN_KEYS)
    if unknown:
        raise ConfigError(f"run config has unknown keys {unknown}; allowed keys are: {', '.join(RUN_KEYS)}")
    scenario_path = _resolve(str(run_config.get(RUN_SCENARIO, "")), project_root, RUN_SCENARIO)
    out_dir = _resolve(str(run_config.get(RUN_OUT_DIR, "")), Path.cwd(), RUN_OUT_DIR)
    rounds, per_round = (_count(run_config, key) for key in (RUN_NUM_ROUNDS, RUN_CLIENTS_PER_ROUND))
    resume, full_model, empty, accept_unverified = (
        _flag(run_config, key) for key in (RUN_RESUME, RUN_FULL_MODEL, RUN_EMPTY_CLIENTS, RUN_ACCEPT_UNVERIFIED)
    )
    server_key = str(run_config.get(RUN_SERVER_KEY, ""))
    written = load_scenario(scenario_path)
    _check_dp_overrides(written, rounds, per_round)
    scenario = with_overrides(written, rounds=rounds or None, clients_per_round=per_round or None)
    if full_model:
        scenario = full_model_variant(scenario)
    return FleetRun(
        scenario=phase_variant(scenario, str(run_config.get(RUN_PHASE, PHASE_WHOLE)), out_dir),
        out_dir=out_dir,
        resume=resume,
        empty_clients=empty,
        server_key=_resolve(server_key, Path.cwd(), RUN_SERVER_KEY) if server_key else None,
        server_public_key=str(run_config.get(RUN_SERVER_PUBLIC_KEY, "")),
        accept_unverified_checkpoints=accept_unverified,
        metrics=metrics_endpoint_from_config(run_config),
    )


def _check_dp_overrides(scenario: ScenarioConfig, rounds: int, per_round: int) -> None:
    """Under distributed DP a device sizes its noise share from the scenario's rounds and devices per round; the
    run config, which the server sets and nobody signs, must not change them (fewer planned rounds or more devices
    per round would each shrink every share)."""
    dp = scenario.privacy.dp
    if dp is None or dp.mode != "distributed":
        return
    changed = [
        f"{key} {value} (the scenario has {written})"
        for key, value, written in (
            (RUN_NUM_ROUNDS, rounds, scenario.rounds),
            (RUN_CLIENTS_PER_ROUND, per_round, scenario.sample_size),
        )
        if value and value != written
    ]
    if changed:
        raise ConfigError(
            f"the run config sets {', '.join(changed)}: under distributed DP each device sizes its noise from the "
            "scenario file, which the run config may not change; edit rounds or clients-per-round in the scenario"
        )


def metrics_endpoint_from_config(run_config: Mapping[str, Any]) -> MetricsEndpoint:
    """The run config's ``metrics-port``, ``metrics-host`` and ``dashboard`` (all optional)."""
    port = _count(run_config, RUN_METRICS_PORT)
    host = run_config.get(RUN_METRICS_HOST, LOOPBACK)
    if not isinstance(host, str):
        raise ConfigError(f"{RUN_METRICS_HOST} must be a string, got {host!r}")
    return MetricsEndpoint(port=port, host=host or LOOPBACK, dashboard=_flag(run_config, RUN_DASHBOARD))


def phase_variant(scenario: ScenarioConfig, phase: str, out_dir: Path) -> ScenarioConfig:
    """What one run of the apps runs: the whole scenario, or one phase of its head warm-up.

    ``out_dir`` is the phase's own: ``<out>`` after the warm-up, whose final head lies in
    ``<out>/head-warmup/final_adapter``; the warm-up runs in ``<out>/head-warmup``.
    """
    if phase not in PHASES:
        raise ConfigError(f"phase must be one of {PHASES[1:]} or empty, got {phase!r}")
    if phase == PHASE_WHOLE:
        if scenario.head_warmup_rounds:
            raise ConfigError(
                f"{scenario.name} has head-warmup-rounds = {scenario.head_warmup_rounds}: it runs as two runs, the "
                "head warm-up and then the rest, which `fedadapt simulate` chains; elsewhere run a scenario with "
                'method = "head" first and start this one from its final_adapter with initial-head'
            )
        return scenario
    if not scenario.head_warmup_rounds:
        raise ConfigError(f"phase {phase!r} needs a scenario with head-warmup-rounds, and {scenario.name} has none")
    if phase == PHASE_HEAD_WARMUP:
        return head_warmup_variant(scenario)
    return after_head_warmup(scenario, out_dir / HEAD_WARMUP_FOLDER / FINAL_ADAPTER)


def _count(run_config: Mapping[str, Any], key: str) -> int:
    value = run_config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _flag(run_config: Mapping[str, Any], key: str) -> bool:
    value = run_config.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _resolve(value: str, base: Path, key: str) -> Path:
    if not value:
        raise ConfigError(f"run config needs {key!r}")
    path = expand_user(value, f"run config {key!r}")
    return path if path.is_absolute() else (base / path).resolve()
