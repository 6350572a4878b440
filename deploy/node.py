"""One device joins a real federation: ``fedadapt node`` runs a Flower SuperNode until it is stopped.

The SuperNode dials the SuperLink. By default it runs in Flower's process isolation, and a warm
executor beside it (``deploy/warm_executor.py``) forks each message's ClientApp from a process that
imported flwr, torch, transformers and PEFT once; ``cold=True`` (``--cold-devices``) leaves it to
Flower, which starts a fresh process per message (9-11 s of imports each). The device's partition
id (which part of the scenario's data it trains on), where it keeps its personal part, its identity
key and the SecAgg+ roster travel as node config.
With TLS (the default), the SuperNode checks the SuperLink's certificate against the CA from
``fedadapt certs``, signs in with its own authentication key (made on the device with ``fedadapt
node keygen``; the server registered its public key), and runs only FABs signed by an identity in
``--trusted-entities`` (the server's ``trusted-entities.yaml``): any other FAB is refused with
Flower's "FAB verification failed" log line and an error reply.
"""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy import executors, warm_executor
from fedadapt.errors import ConfigError
from fedadapt.privacy.config import MODES
from simulations.processes import find_tool, free_port, stop_process_trees, terminate_gracefully
from simulations.runner import flower_env

INSECURE_NOTE = "INSECURE: no TLS and no node authentication; for a local demo only."


@dataclass(frozen=True)
class NodeConfig:
    """How one SuperNode reaches the SuperLink and which part of the data it is."""

    superlink: str  # HOST:PORT
    partition_id: int
    num_partitions: int
    root_certificates: Path | None = None  # the CA certificate (ca.crt)
    auth_key: Path | None = None  # this device's private key (from `fedadapt node keygen`)
    trusted_entities: Path | None = None  # the server's trusted-entities.yaml: the FAB signers it accepts
    roster: Path | None = None  # the devices' public keys, one a line (the server's roster.pub), for SecAgg+
    insecure: bool = False
    state_dir: Path | None = None  # where the device keeps its personal part
    data: Path | None = None  # the device's own data file; None: its partition of the scenario's data
    port: int | None = None  # the SuperNode's own ClientAppIo port; None: a free one
    require_privacy: str = "none"  # the weakest privacy mode the device takes part in (the run config can't lower it)
    prefix_cache_mb: float | None = None  # MiB its frozen-prefix cache may take in state_dir; None: the default
    require_dp: bool = False  # take part only in runs where the device adds its own DP noise share (distributed)
    cold: bool = False  # Flower's fresh process per message instead of the warm executor

    def __post_init__(self) -> None:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--superlink must be HOST:PORT, got {self.superlink!r}")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(f"--partition-id must be in [0, {self.num_partitions}), got {self.partition_id}")
        if self.insecure and (self.root_certificates or self.auth_key or self.trusted_entities):
            raise ConfigError("--insecure contradicts --root-certificates/--auth-key/--trusted-entities: choose one")
        if not self.insecure:
            if self.root_certificates is None or self.auth_key is None or self.trusted_entities is None:
                raise ConfigError(
                    "a secure node needs --root-certificates (the CA's ca.crt), --auth-key (its key from "
                    "`fedadapt node keygen`) and --trusted-entities (the server's trusted-entities.yaml); "
                    "--insecure is for local demos only"
                )
            for path in (self.root_certificates, self.auth_key, self.trusted_entities):
                if not path.is_file():
                    raise ConfigError(f"{path} does not exist")
        if self.require_privacy not in MODES:
            raise ConfigError(f"--require-privacy must be one of {MODES}, got {self.require_privacy!r}")
        if self.require_privacy == "secagg+" and (self.roster is None or self.auth_key is None):
            raise ConfigError("--require-privacy secagg+ needs --roster and --auth-key (the device signs with its key)")
        if self.require_dp and self.require_privacy != "secagg+":
            raise ConfigError("--require-dp needs --require-privacy secagg+: distributed DP runs only under secagg+")
        if self.roster is not None and not self.roster.is_file():
            raise ConfigError(f"--roster {self.roster} does not exist")
        if self.data is not None and not self.data.exists():
            raise ConfigError(f"--data {self.data} does not exist")
        if self.prefix_cache_mb is not None and not 0 <= self.prefix_cache_mb < 2**40:
            raise ConfigError(f"--prefix-cache-mb must be a number of MiB >= 0, got {self.prefix_cache_mb!r}")

    def command(self, port: int | None = None) -> list[str]:
        """The ``flower-supernode`` command line; its Runtime API on ``port`` (else ``self.port``, else a free one)."""
        node_config = f"partition-id={self.partition_id} num-partitions={self.num_partitions}"
        if self.state_dir is not None:
            node_config += f' state-dir="{self.state_dir.resolve()}"'
        if self.data is not None:
            node_config += f' data-path="{self.data.resolve()}"'
        if self.auth_key is not None:
            node_config += f' identity-key="{self.auth_key.resolve()}"'
        if self.roster is not None:
            node_config += f' roster="{self.roster.resolve()}"'
        node_config += f' require-privacy="{self.require_privacy}"'
        if self.require_dp:
            node_config += ' require-dp="distributed"'
        if self.prefix_cache_mb is not None:
            node_config += f" prefix-cache-mb={self.prefix_cache_mb!r}"
        command = [find_tool("flower-supernode"), "--superlink", self.superlink]
        command += ["--port", str(port or self.port or free_port()), "--node-config", node_config]
        if not self.cold:
            command += warm_executor.SUPERNODE_FLAGS
        if self.insecure:
            return [*command, "--insecure"]
        assert self.root_certificates and self.auth_key and self.trusted_entities  # checked in __post_init__
        return [
            *command,
            *("--root-certificates", str(self.root_certificates.resolve())),
            *("--auth-supernode-private-key", str(self.auth_key.resolve())),
            *("--trusted-entities", str(self.trusted_entities.resolve())),
        ]


def run_node(config: NodeConfig) -> int:
    """Run the SuperNode (and its warm executor) in the foreground until it exits or this process is
    interrupted; its exit code."""
    if config.insecure:
        print(f"WARNING: {INSECURE_NOTE}")
    config = dataclasses.replace(config, cold=executors.run_cold(config.cold))  # no os.fork: cold
    env = executors.fast_polling(flower_env())
    port = config.port or free_port()
    with terminate_gracefully():
        process = subprocess.Popen(config.command(port), env=env)
        started = [process]
        try:
            if config.cold:
                return process.wait()
            label = f"partition-id={config.partition_id}"
            spec = executors.ExecutorSpec(port, env, label)
            return executors.supervise(process, spec, started)
        finally:
            stop_process_trees(started)  # Ctrl-C or an error here: the SuperNode, the executor and the ClientApps
