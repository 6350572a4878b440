"""Runs a scenario on Flower's deployment engine: ``fedadapt serve`` starts a SuperLink, submits the run, follows it.

The same ClientApp and ServerApp as the simulation, on real processes that talk over the network:

- a SuperLink (``flower-superlink``) on a loopback port, with TLS and SuperNode authentication unless
  ``--insecure`` (local demos only); its Control and Runtime APIs are reachable from this machine only;
- the gateway (``deploy/gateway.py``) on ``--host``/``--port``: the only listening socket devices can
  reach; it passes the Fleet API alone (403 for everything else) and attaches the server's signature
  to the FAB, which ``fedadapt serve`` signs with its identity key (``deploy/fab_signing.py``);
- the devices' public keys (every ``*.pub`` in ``--devices``, default ``<certs>/devices``) registered,
  and ``<certs>/roster.pub`` written from them for SecAgg+ (operators copy it to the devices);
- with ``--local-supernodes N``, N SuperNodes on this machine over loopback, one per partition, dialling
  the gateway with demo keys (``<certs>/demo-device-keys``), each with a warm executor that forks its
  ClientApps (``deploy/warm_executor.py``; ``cold_devices``: Flower's fresh process per message);
  without it, devices join with ``fedadapt node``;
- ``flwr run`` of the project against it, with the scenario and ``out-dir`` in the run config.

Progress, ``metrics.json``, plots and ``final_adapter/`` are the simulation's. Every process this
starts is stopped by PID, with everything below it, on success, error or Ctrl-C. Flower's files
(its ``FLWR_HOME``) live in a private temporary folder that is removed afterwards (the SuperLink keeps
its state in memory), and the SuperLink runs there: never in the project folder, whose live files
the apps could otherwise import instead of the packaged ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import executors, warm_executor
from fedadapt.errors import ConfigError
from fedadapt.fleet.run_config import CLIENT_STATE_FOLDER, MetricsEndpoint
from fedadapt.fleet.variants import with_overrides
from simulations.processes import (
    find_tool,
    free_port,
    lowered_priority,
    stop_process_tree,
    stop_process_trees,
    terminate_gracefully,
)
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
# Local devices (SuperNodes, executors, ClientApps) run this many nice levels below the server: on one machine
# twenty devices training at once otherwise starve the SuperLink and the gateway, and nodes whose heartbeats
# go unanswered are dropped from the round as unavailable (docs/deployment.md, the 20-SuperNode tries).
LOCAL_DEVICE_NICE = 10
GATEWAY_LOG = "gateway.log"
FAB_VERIFICATIONS = "fab-verifications.json"  # in the private FLWR_HOME: the gateway's signature records
INSECURE_WARNING = (
    "INSECURE: TLS and SuperNode authentication are off. Anyone who can reach the port can join the "
    "federation or read what travels. Use this on a single machine for a demo only."
)


@dataclass(frozen=True)
class Deployment:
    """Where the SuperLink listens and how it is secured."""

    host: str = "127.0.0.1"  # where the gateway listens: the only address devices (or anyone) can reach
    port: int | None = None  # None: a free port (local demos)
    certs: Path | None = None  # a `fedadapt certs` folder; None: <out>/certs, made for local SuperNodes
    insecure: bool = False
    local_supernodes: int = 0
    devices: Path | None = None  # a folder of device public keys (*.pub); None: <certs>/devices
    cold_devices: bool = False  # local SuperNodes: Flower's fresh ClientApp process per message, not warm executors

    def __post_init__(self) -> None:
        if self.local_supernodes < 0:
            raise ConfigError(f"--local-supernodes must be 0 or more, got {self.local_supernodes}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.insecure and (self.certs is not None or self.devices is not None):
            raise ConfigError("--insecure and --certs/--devices contradict each other: choose one")
        if self.local_supernodes and self.devices is not None:
            raise ConfigError("--local-supernodes registers its own demo keys in <certs>/devices: drop --devices")


def serve(
    scenario: Path,
    deployment: Deployment,
    rounds: int | None = None,
    out: Path | None = None,
    resume: bool = False,
    show: bool = True,
    empty_clients: bool = False,
    accept_unverified: bool = False,
    endpoint: MetricsEndpoint | None = None,
) -> dict[str, Any]:
    """Run the scenario on a SuperLink of this process's own and return its metrics.json contents.

    ``empty_clients`` (benchmarks): devices reply at once with a zero delta, so a round costs only
    Flower's message exchange, the ClientApp process start and the server's own work.
    """
    from server.plots import write_plots

    plan = plan_simulation(
        scenario,
        rounds,
        out,
        resume,
        empty_clients=empty_clients,
        accept_unverified=accept_unverified,
        endpoint=endpoint,
    )
    if plan.scenario.head_warmup_rounds:
        raise ConfigError(
            f"{plan.scenario.name} has head-warmup-rounds = {plan.scenario.head_warmup_rounds}, which only "
            '`fedadapt simulate` runs (as two runs): to serve it, serve a copy with method = "head" and rounds = '
            f"{plan.scenario.head_warmup_rounds} first, then this one without head-warmup-rounds, with initial-head "
            "set to the first run's final_adapter folder and the remaining rounds"
        )
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
    if certs is not None and show and not deployment.local_supernodes:
        registered = len(certs.device_publics)
        print(f"{registered} device keys; devices need {certs.ca}, {certs.trusted_entities} and {certs.roster}")
    flwr_home = Path(tempfile.mkdtemp(prefix="fedadapt-serve-"))
    try:
        with terminate_gracefully(), _superlink(flwr_home, plan.out_dir, deployment, certs) as link:
            supervisors = executors.Supervisors()
            nodes: list[subprocess.Popen[bytes]] = []
            try:
                _supernodes(flwr_home, link.env, plan, link.address, deployment, certs, supervisors, nodes)
                code = _run_app(plan, flwr_home, link.env, show, link.app)
            finally:
                # The SuperLink (and the ServerApp below it) first: with the nodes gone first, the
                # ServerApp would close the interrupted round as failed and mark the run complete.
                stop_process_trees([link.superlink, link.gateway])
                # Then every executor ever started (none restarts once stop() returns) with its SuperNode.
                try:
                    supervisors.stop()
                finally:
                    stop_process_trees(supervisors.started + nodes)
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
    identity: Path  # the server's ed25519 identity: signs the FAB
    trusted_entities: Path  # that identity for `flower-supernode --trusted-entities`
    device_publics: tuple[Path, ...]  # every device the SuperLink lets in
    roster: Path  # their public keys, one a line, for SecAgg+ signatures
    local_keys: tuple[Path, ...]  # demo private keys of the SuperNodes started here


def _certs(plan: SimulationPlan, deployment: Deployment) -> _Certs:
    """The certificates to use: --certs as given, or <out>/certs made (and kept for --resume) for local nodes."""
    from deploy.certs import (
        CA_CERT,
        DEVICES_DIR,
        IDENTITY_KEY,
        LOOPBACK,
        SERVER_CERT,
        SERVER_KEY,
        TRUSTED_ENTITIES,
        certificate_names,
        ensure_server_identity,
        generate_deployment_certs,
    )

    from .devices import ROSTER, demo_device_keys, read_device_keys, write_roster

    folder = deployment.certs or plan.out_dir / CERTS_FOLDER
    if deployment.certs is None and not (folder / CA_CERT).exists():
        generate_deployment_certs(folder, hosts=_hosts(deployment.host))
    missing = [name for name in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {missing}: make the folder with `fedadapt certs --out {folder}`")
    if LOOPBACK not in certificate_names(folder / SERVER_CERT):
        raise ConfigError(
            f"{folder / SERVER_CERT} is not valid for {LOOPBACK}, where the SuperLink now listens behind the "
            "gateway: make a new folder with `fedadapt certs`"
        )
    ensure_server_identity(folder)
    local = tuple(demo_device_keys(folder, deployment.local_supernodes))
    devices_dir = deployment.devices or folder / DEVICES_DIR
    devices = read_device_keys(devices_dir)
    if not devices:
        logger.warning("%s holds no device public keys (*.pub): no SuperNode will be allowed in", devices_dir)
    roster = write_roster(devices, folder / ROSTER)
    return _Certs(
        ca=folder / CA_CERT,
        certificate=folder / SERVER_CERT,
        key=folder / SERVER_KEY,
        identity=folder / IDENTITY_KEY,
        trusted_entities=folder / TRUSTED_ENTITIES,
        device_publics=tuple(d.path for d in devices),
        roster=roster,
        local_keys=local,
    )


def _hosts(host: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys([host, "127.0.0.1", "localhost"]))


# --- processes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Link:
    """A running SuperLink behind its gateway."""

    env: dict[str, str]  # for Flower's CLI against the SuperLink (its loopback Control API)
    address: str  # HOST:PORT devices dial: the gateway
    superlink: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    app: Path  # what `flwr run` submits: the signed FAB's own files, or the project (--insecure)


# Flower starts legacy gRPC Control/Fleet servers on 0.0.0.0 when these are "1": never here.
_LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


@contextlib.contextmanager
def _superlink(flwr_home: Path, out_dir: Path, deployment: Deployment, certs: _Certs | None) -> Iterator[_Link]:
    """A SuperLink on loopback and the gateway devices dial; stopped (both trees) on exit."""
    port = deployment.port or free_port()
    inner = free_port()
    exposed = "127.0.0.1" if deployment.host in ("0.0.0.0", "::") else deployment.host
    address = f"[{exposed}]:{port}" if ":" in exposed else f"{exposed}:{port}"
    env = {k: v for k, v in executors.fast_polling(flower_env(flwr_home)).items() if k not in _LEGACY_GRPC_ENV}
    command = [find_tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(inner)]
    # No --database: Flower's in-memory state. Its SQLite state refused pushes with "database is locked"
    # (HTTP 500) when 20 local devices replied at once on 2 busy cores, and the lost replies held the round
    # until its timeout. Nothing reads that file: the run resumes from fedadapt's own checkpoints.
    command += ["--disable-runtime-dependency-installation"]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.certificate)]
        command += ["--ssl-keyfile", str(certs.key), "--enable-supernode-auth"]
    _write_connection(flwr_home, f"127.0.0.1:{inner}", certs)
    log_file = out_dir / SUPERLINK_LOG
    with log_file.open("ab") as log:
        superlink = subprocess.Popen(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT)
    gateway = None
    try:
        _wait_listening("127.0.0.1", inner, superlink, log_file, "flower-superlink")
        app = PROJECT_ROOT if certs is None else _signed_app(flwr_home, certs)
        gateway = _gateway(flwr_home, out_dir, deployment.host, port, inner, certs, env)
        _wait_listening(exposed, port, gateway, out_dir / GATEWAY_LOG, "the gateway")
        if certs is not None:
            for public in certs.device_publics:
                _register(flwr_home, env, public, out_dir / FLWR_LOG)
        yield _Link(env, address, superlink, gateway, app)
    finally:
        stop_process_trees([superlink] if gateway is None else [superlink, gateway])


def _gateway(
    flwr_home: Path,
    out_dir: Path,
    host: str,
    port: int,
    inner: int,
    certs: _Certs | None,
    env: dict[str, str],
) -> subprocess.Popen[bytes]:
    """The gateway on ``host:port`` in front of the SuperLink on 127.0.0.1:``inner``."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    command = [sys.executable, "-m", "deploy.gateway", "--listen", listen]
    if certs is None:
        command += ["--upstream", f"http://127.0.0.1:{inner}"]
    else:
        command += ["--upstream", f"https://127.0.0.1:{inner}", "--ca-certfile", str(certs.ca)]
        command += ["--certfile", str(certs.certificate), "--keyfile", str(certs.key)]
        command += ["--fab-verifications", str(flwr_home / FAB_VERIFICATIONS)]
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    with (out_dir / GATEWAY_LOG).open("ab") as log:
        return subprocess.Popen(
            command, cwd=flwr_home, env=env | {"PYTHONPATH": path}, stdout=log, stderr=subprocess.STDOUT
        )


def _signed_app(flwr_home: Path, certs: _Certs) -> Path:
    """Build and sign the project's FAB, and unpack it as the app ``flwr run`` submits.

    ``flwr run`` rebuilds the FAB from a folder; from the unpacked FAB it rebuilds the same bytes
    (sorted files, fixed dates), so the FAB that runs is the one signed even if the checkout
    changes meanwhile.
    """
    from .fab_signing import build_fab, load_identity, write_verifications

    fab = build_fab(PROJECT_ROOT)
    write_verifications(fab, load_identity(certs.identity), flwr_home / FAB_VERIFICATIONS)
    app = flwr_home / "app"
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        archive.extractall(app)
    return app


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


def _supernodes(
    flwr_home: Path,
    env: dict[str, str],
    plan: SimulationPlan,
    address: str,
    deployment: Deployment,
    certs: _Certs | None,
    supervisors: executors.Supervisors,
    nodes: list[subprocess.Popen[bytes]],
) -> None:
    """Start the local SuperNodes, each appended to ``nodes`` as it starts (the caller stops them, also after
    an error); their warm executors run under ``supervisors`` (none for cold devices, as asked or where there
    is no os.fork)."""
    if not deployment.local_supernodes:
        return
    deployment = dataclasses.replace(deployment, cold_devices=executors.run_cold(deployment.cold_devices))
    for index in range(deployment.local_supernodes):
        _supernode(flwr_home, env, plan, address, index, deployment, certs, supervisors, nodes)


def _supernode(
    flwr_home: Path,
    env: dict[str, str],
    plan: SimulationPlan,
    address: str,
    index: int,
    deployment: Deployment,
    certs: _Certs | None,
    supervisors: executors.Supervisors,
    nodes: list[subprocess.Popen[bytes]],
) -> None:
    """Start local SuperNode ``index`` dialling the gateway over loopback (appended to ``nodes``); its warm
    executor runs under ``supervisors`` (unless cold), restarted like ``fedadapt node``'s if it exits."""
    count, runtime_port = deployment.local_supernodes, free_port()
    command = [find_tool("flower-supernode"), "--superlink", address, "--port", str(runtime_port)]
    if not deployment.cold_devices:
        command += warm_executor.SUPERNODE_FLAGS
    # The demo's devices keep their files where simulated ones do: <out>/clients (their own node config).
    state_dir = (plan.out_dir / CLIENT_STATE_FOLDER).resolve()
    node_config = f'partition-id={index} num-partitions={count} state-dir="{state_dir}"'
    if certs is None:
        command += ["--node-config", node_config, "--insecure"]
    else:
        key = certs.local_keys[index]
        node_config += f' identity-key="{key.resolve()}" roster="{certs.roster.resolve()}"'
        command += ["--node-config", node_config, "--root-certificates", str(certs.ca)]
        command += ["--auth-supernode-private-key", str(key), "--trusted-entities", str(certs.trusted_entities)]
    log_file = plan.out_dir / SUPERNODE_LOG.format(index=index)
    env = share_cores(env, count)
    command = lowered_priority(command, LOCAL_DEVICE_NICE)
    with log_file.open("ab") as log:
        node = subprocess.Popen(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT)
    nodes.append(node)  # before its executor: if that fails to start, the caller still stops the SuperNode
    if not deployment.cold_devices:
        # Its tasks may run as long as the server waits for a reply: the scenario's round-timeout (plus a margin).
        executor_env = executors.task_time_limit(env, plan.scenario.round_timeout)
        label = f"partition-id={index}"
        spec = executors.ExecutorSpec(runtime_port, executor_env, label, log_file, flwr_home, LOCAL_DEVICE_NICE)
        supervisors.add(node, spec)


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


def _wait_listening(host: str, port: int, process: subprocess.Popen[bytes], log_file: Path, what: str) -> None:
    """Until ``process`` accepts TCP connections on ``host:port`` (TLS or not)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"{what} exited with {process.returncode}; see {log_file}{log_tail(log_file)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise SimulationError(f"{what} did not listen on {host}:{port} within {STARTUP_TIMEOUT:g} s")


def _run_app(plan: SimulationPlan, flwr_home: Path, env: dict[str, str], show: bool, app: Path) -> int:
    """``flwr run`` the app on the deployment SuperLink; returns its exit code."""
    overrides = write_run_config(plan, flwr_home)
    command = [find_tool("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", str(overrides)]
    with (plan.out_dir / FLWR_LOG).open("ab") as log:
        process = subprocess.Popen(command, cwd=flwr_home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        follow_run(plan, process, show)
    finally:
        stop_process_tree(process)
    return process.returncode
