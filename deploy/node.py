"""One device joins a real federation: ``fedadapt node`` runs a Flower SuperNode until it is stopped.

The SuperNode dials the SuperLink, and for every message Flower starts the project's ClientApp
in a fresh process. The device's partition id (which part of the scenario's data it trains on)
and where it keeps its personal part travel as node config. With TLS (the default), the
SuperNode checks the SuperLink's certificate against the CA from ``fedadapt certs`` and signs in
with its own authentication key, which the server must have registered.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedadapt.errors import ConfigError
from fedadapt.processes import find_tool, free_port, stop_process_tree, terminate_gracefully
from simulations.runner import flower_env

INSECURE_NOTE = "INSECURE: no TLS and no node authentication; for a local demo only."


@dataclass(frozen=True)
class NodeConfig:
    """How one SuperNode reaches the SuperLink and which part of the data it is."""

    superlink: str  # HOST:PORT
    partition_id: int
    num_partitions: int
    root_certificates: Path | None = None  # the CA certificate (ca.crt)
    auth_key: Path | None = None  # this device's private key (devices/device-<i>.key)
    insecure: bool = False
    state_dir: Path | None = None  # where the device keeps its personal part
    data: Path | None = None  # the device's own data file; None: its partition of the scenario's data
    port: int | None = None  # the SuperNode's own ClientAppIo port; None: a free one

    def __post_init__(self) -> None:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--superlink must be HOST:PORT, got {self.superlink!r}")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(f"--partition-id must be in [0, {self.num_partitions}), got {self.partition_id}")
        if self.insecure and (self.root_certificates or self.auth_key):
            raise ConfigError("--insecure contradicts --root-certificates/--auth-key: choose one")
        if not self.insecure:
            if self.root_certificates is None or self.auth_key is None:
                raise ConfigError(
                    "a secure node needs --root-certificates (the CA's ca.crt) and --auth-key (its device key "
                    "from `fedadapt certs`); --insecure is for local demos only"
                )
            for path in (self.root_certificates, self.auth_key):
                if not path.is_file():
                    raise ConfigError(f"{path} does not exist")
        if self.data is not None and not self.data.exists():
            raise ConfigError(f"--data {self.data} does not exist")

    def command(self) -> list[str]:
        """The ``flower-supernode`` command line."""
        node_config = f"partition-id={self.partition_id} num-partitions={self.num_partitions}"
        if self.state_dir is not None:
            node_config += f' state-dir="{self.state_dir.resolve()}"'
        if self.data is not None:
            node_config += f' data-path="{self.data.resolve()}"'
        command = [find_tool("flower-supernode"), "--superlink", self.superlink]
        command += ["--port", str(self.port or free_port()), "--node-config", node_config]
        if self.insecure:
            return [*command, "--insecure"]
        assert self.root_certificates is not None and self.auth_key is not None
        return [
            *command,
            *("--root-certificates", str(self.root_certificates.resolve())),
            *("--auth-supernode-private-key", str(self.auth_key.resolve())),
        ]


def run_node(config: NodeConfig) -> int:
    """Run the SuperNode in the foreground until it exits or this process is interrupted; its exit code."""
    if config.insecure:
        print(f"WARNING: {INSECURE_NOTE}")
    env = flower_env()
    with terminate_gracefully():
        process = subprocess.Popen(config.command(), env=env)
        try:
            return process.wait()
        finally:
            stop_process_tree(process)  # Ctrl-C or an error here: the SuperNode and its ClientApps go too
