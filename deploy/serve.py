"""Runs a scenario on Flower's deployment engine: ``fedadapt serve`` starts a SuperLink, submits the run, follows it.

The same ClientApp and ServerApp as the simulation, on real processes that talk over the network:

- a SuperLink (``flower-superlink``) on ``--host``/``--port``, with TLS and SuperNode authentication
  unless ``--insecure`` (local demos only);
- with ``--local-supernodes N``, N SuperNodes on this machine over loopback, one per partition, each
  with its own authentication key registered first; without it, devices join with ``fedadapt node``;
- ``flwr run`` of the project against it, with the scenario and ``out-dir`` in the run config.

Progress, ``metrics.json``, plots and ``final_adapter/`` are the simulation's. Every process this
starts is stopped by PID, with everything below it, on success, error or Ctrl-C. Flower's state
(its ``FLWR_HOME`` and the SuperLink's database) lives in a private temporary folder that is
removed afterwards, and the SuperLink runs there: never in the project folder, whose live files
the apps could otherwise import instead of the packaged ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedadapt.errors import ConfigError
from fedadapt.processes import find_tool, free_port, stop_process_tree, stop_process_trees, terminate_gracefully
from fedadapt.scenario import with_overrides
from simulations.runner import (
    FLWR_LOG,
    PROJECT_ROOT,
    STARTUP_TIMEOUT,
    SUPERLINK_LOG,
    SimulationError,
    SimulationPlan,
    finished_metrics,
    flower_env,
    follow_run,
    log_tail,
    plan_simulation,
    print_summary,
    remove_stale_client_state,
    write_run_config,
)

logger = logging.getLogger(__name__)

CONNECTION = "fedadapt"  # the name of the SuperLink connection in the private FLWR_HOME
CERTS_FOLDER = "certs"
SUPERNODE_LOG = "supernode-{index}.log"
INSECURE_WARNING = (
    "INSECURE: TLS and SuperNode authentication are off. Anyone who can reach the port can join the "
    "federation or read what travels. Use this on a single machine for a demo only."
)


@dataclass(frozen=True)
class Deployment:
    """Where the SuperLink listens and how it is secured."""

    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port (local demos)
    certs: Path | None = None  # a `fedadapt certs` folder; None: <out>/certs, made for local SuperNodes
    insecure: bool = False
    local_supernodes: int = 0

    def __post_init__(self) -> None:
        if self.local_supernodes < 0:
            raise ConfigError(f"--local-supernodes must be 0 or more, got {self.local_supernodes}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.insecure and self.certs is not None:
            raise ConfigError("--insecure and --certs contradict each other: choose one")


def serve(
    scenario: Path,
    deployment: Deployment,
    rounds: int | None = None,
    out: Path | None = None,
    resume: bool = False,
    show: bool = True,
    empty_clients: bool = False,
) -> dict[str, Any]:
    """Run the scenario on a SuperLink of this process's own and return its metrics.json contents.

    ``empty_clients`` (benchmarks): devices reply at once with a zero delta, so a round costs only
    Flower's message exchange, the ClientApp process start and the server's own work.
    """
    from simulations.plots import write_plots

    plan = plan_simulation(scenario, rounds, out, resume, empty_clients=empty_clients)
    if plan.scenario.full_model:
        logger.warning("full-model = true is ignored by fedadapt serve: run the comparison with fedadapt simulate")
    if 0 < deployment.local_supernodes < plan.scenario.sample_size:
        # A demo with fewer nodes than the scenario samples: every node, every round.
        logger.warning(
            "%s samples %d clients a round; with %d local SuperNodes each round takes all of them",
            plan.scenario.name,
            plan.scenario.sample_size,
            deployment.local_supernodes,
        )
        fewer = with_overrides(plan.scenario, clients_per_round=deployment.local_supernodes)
        plan = dataclasses.replace(plan, scenario=fewer)
    if deployment.insecure:
        logger.warning(INSECURE_WARNING)
        if show:
            print(f"WARNING: {INSECURE_WARNING}")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if not plan.resume:
        remove_stale_client_state(plan.out_dir)
    certs = None if deployment.insecure else _certs(plan, deployment)
    flwr_home = Path(tempfile.mkdtemp(prefix="fedadapt-serve-"))
    try:
        with terminate_gracefully(), _superlink(flwr_home, plan, deployment, certs) as (env, address, link):
            nodes = [
                _supernode(flwr_home, env, plan, address, index, deployment.local_supernodes, certs)
                for index in range(deployment.local_supernodes)
            ]
            try:
                code = _run_app(plan, flwr_home, env, show)
            finally:
                # The SuperLink (and the ServerApp below it) first: with the nodes gone first, the
                # ServerApp would close the interrupted round as failed and mark the run complete.
                stop_process_tree(link)
                stop_process_trees(nodes)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)
    metrics = finished_metrics(plan, code, "the run")
    write_plots(plan.out_dir, metrics, None)
    if show:
        print_summary(metrics)
    return metrics


# --- certificates ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Certs:
    ca: Path
    certificate: Path
    key: Path
    device_publics: list[Path]  # devices/device-<i>.key.pub: every device the SuperLink lets in
    local_keys: list[Path]  # the private keys of the SuperNodes started here


def _certs(plan: SimulationPlan, deployment: Deployment) -> _Certs:
    """The certificates to use: --certs as given, or <out>/certs made (and kept for --resume) for local nodes."""
    from fedadapt.certs import (
        CA_CERT,
        SERVER_CERT,
        SERVER_KEY,
        add_device_keys,
        existing_devices,
        generate_deployment_certs,
    )

    folder = deployment.certs or plan.out_dir / CERTS_FOLDER
    if deployment.certs is None and not (folder / CA_CERT).exists():
        generate_deployment_certs(folder, hosts=_hosts(deployment.host), devices=deployment.local_supernodes)
    missing = [name for name in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {missing}: make the folder with `fedadapt certs --out {folder}`")
    devices = existing_devices(folder)
    if len(devices) < deployment.local_supernodes:
        add_device_keys(folder, deployment.local_supernodes - len(devices))
        devices = existing_devices(folder)
    local = [d.private_path for d in devices[: deployment.local_supernodes]]
    absent = [str(p) for p in local if not p.is_file()]
    if absent:
        raise ConfigError(f"local SuperNodes need their private keys, and {absent[:3]} do not exist")
    if not devices:
        logger.warning("%s/devices holds no device keys: no SuperNode will be allowed in", folder)
    publics = [d.public_path for d in devices]
    return _Certs(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY, publics, local)


def _hosts(host: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys([host, "127.0.0.1", "localhost"]))


# --- processes ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _superlink(
    flwr_home: Path, plan: SimulationPlan, deployment: Deployment, certs: _Certs | None
) -> Iterator[tuple[dict[str, str], str, subprocess.Popen[bytes]]]:
    """A deployment SuperLink; yields the environment for Flower's CLI and the address SuperNodes dial."""
    port = deployment.port or free_port()
    address = f"{'127.0.0.1' if deployment.host in ('0.0.0.0', '::') else deployment.host}:{port}"
    env = flower_env(flwr_home)
    command = [find_tool("flower-superlink"), "--host", deployment.host, "--port", str(port)]
    command += ["--disable-runtime-dependency-installation", "--database", str(flwr_home / "superlink.db")]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.certificate)]
        command += ["--ssl-keyfile", str(certs.key), "--enable-supernode-auth"]
    _write_connection(flwr_home, address, certs)
    log_file = plan.out_dir / SUPERLINK_LOG
    with log_file.open("ab") as log:
        process = subprocess.Popen(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, process, log_file)
        if certs is not None:
            for public in certs.device_publics:
                _register(flwr_home, env, public, plan.out_dir / FLWR_LOG)
        yield env, address, process
    finally:
        stop_process_tree(process)


def _write_connection(flwr_home: Path, address: str, certs: _Certs | None) -> None:
    security = "insecure = true" if certs is None else f'root-certificates = "{certs.ca.resolve()}"'
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    )


def _register(flwr_home: Path, env: dict[str, str], public: Path, log_file: Path) -> None:
    """``flwr supernode register`` a device's public key, so that its SuperNode may join."""
    command = [find_tool("flwr"), "supernode", "register", str(public), CONNECTION]
    with log_file.open("ab") as log:
        result = subprocess.run(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=60)
    if result.returncode != 0:
        raise SimulationError(f"registering {public} with the SuperLink failed; see {log_file}{log_tail(log_file)}")


def _supernode(
    flwr_home: Path,
    env: dict[str, str],
    plan: SimulationPlan,
    address: str,
    index: int,
    count: int,
    certs: _Certs | None,
) -> subprocess.Popen[bytes]:
    """Local SuperNode ``index`` (partition ``index`` of ``count``) dialling the SuperLink over loopback."""
    command = [find_tool("flower-supernode"), "--superlink", address, "--port", str(free_port())]
    command += ["--node-config", f"partition-id={index} num-partitions={count}"]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(certs.ca), "--auth-supernode-private-key", str(certs.local_keys[index])]
    log_file = plan.out_dir / SUPERNODE_LOG.format(index=index)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            command, cwd=flwr_home, env=share_cores(env, count), stdout=log, stderr=subprocess.STDOUT
        )


def share_cores(env: dict[str, str], local_nodes: int) -> dict[str, str]:
    """The environment of one of ``local_nodes`` SuperNodes on this machine: the cores split between them.

    On a real device one ClientApp has the cores to itself; N local SuperNodes run N ClientApps at
    once, and N torch processes that each start a thread per core spend the CPU waiting on each
    other. A thread count the user set (OMP_NUM_THREADS) is kept.
    """
    if "OMP_NUM_THREADS" in env:
        return env
    threads = max(1, (os.cpu_count() or 1) // max(1, local_nodes))
    return env | {"OMP_NUM_THREADS": str(threads)}


def _wait_listening(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    """Until the SuperLink accepts TCP connections on ``port`` (TLS or not)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with {process.returncode}; see {log_file}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise SimulationError(f"flower-superlink did not listen on port {port} within {STARTUP_TIMEOUT:g} s")


def _run_app(plan: SimulationPlan, flwr_home: Path, env: dict[str, str], show: bool) -> int:
    """``flwr run`` the project on the deployment SuperLink; returns its exit code."""
    overrides = write_run_config(plan, flwr_home)
    command = [find_tool("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--stream", "--run-config", str(overrides)]
    with (plan.out_dir / FLWR_LOG).open("ab") as log:
        process = subprocess.Popen(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        follow_run(plan, process, show)
    finally:
        stop_process_tree(process)
    return process.returncode
