"""The closed deployment surface (issue 16): only the Fleet API on the address devices dial; signed FABs only.

One real SuperLink started as ``fedadapt serve`` starts it (``deploy.serve._superlink``) exposes the
devices' side on 127.0.0.2. From there an attacker holding only the address and the public ``ca.crt``
tries the Control and Runtime APIs (``flwr supernode register`` with a key of its own, raw POSTs to
``start-run``, ``register-node``, the Runtime API, unknown paths); every call is refused. A registered
SuperNode that trusts only the server's identity joins through the same address, and refuses a FAB the
server did not sign with Flower's "FAB verification failed" line. Every process is stopped by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from waiting import Watch, scaled

from deploy import devices, fab_signing, gateway
from deploy import node as node_module
from deploy import serve as serve_module
from deploy.certs import generate_deployment_certs
from fedadapt.errors import ConfigError
from simulations.processes import free_port, stop_process_trees

BIN = Path(sys.executable).parent
EXPOSED = "127.0.0.2"
REFUSED = [
    "/v1/control/register-node",
    "/v1/control/start-run",
    "/v1/control/list-nodes",
    "/v1/control/stop-run",
    "/v1/runtime/get-nodes",
    "/v1/runtime/push-messages",
    "/v1/fleet/../control/register-node",
    "/v1/fleet",
    "/health",
    "/docs",
    "/",
]

_TINY_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "intruderapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "intruder"

[tool.flwr.app.components]
serverapp = "intruder_server:app"
clientapp = "intruder_client:app"

[tool.flwr.app.config]
x = 1
"""
_TINY_SERVER = """import time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    while not list(grid.get_node_ids()):
        time.sleep(1)
    messages = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), n, "query") for n in grid.get_node_ids()]
    list(grid.send_and_receive(messages, timeout=60))
"""
_TINY_CLIENT = """from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    raise SystemExit("an unsigned FAB ran on a device")
"""


def _env(home: Path) -> dict[str, str]:
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


def _can_bind(host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, 0))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.deployment
@pytest.mark.timeout(300)
def test_only_the_fleet_api_is_reachable_and_an_unsigned_fab_is_refused(tmp_path: Path) -> None:
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")
    if not _can_bind(EXPOSED):
        pytest.skip(f"{EXPOSED} is not a loopback address here")
    out, home = tmp_path / "run", tmp_path / "flwr-home"
    out.mkdir()
    home.mkdir()
    deployment = serve_module.Deployment(host=EXPOSED, port=free_port(), local_supernodes=1)
    certs = serve_module._certs(SimpleNamespace(out_dir=out), deployment)
    attacker = tmp_path / "attacker"
    attacker_key = devices.keygen(attacker, "attacker")
    (attacker / "home").mkdir()
    address = f"{EXPOSED}:{deployment.port}"
    (attacker / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{address}"\nroot-certificates = "{certs.ca}"\n'
    )
    node = None
    watch = Watch(log_folders=[tmp_path, out, home])
    try:
        with serve_module._superlink(home, out, deployment, certs) as link:
            watch.add("flower-superlink", link.superlink)
            watch.add("gateway", link.gateway)
            assert link.address == address
            # What `flwr run` submits (the unpacked signed FAB) rebuilds to exactly the FAB the server signed.
            signed = json.loads((home / serve_module.FAB_VERIFICATIONS).read_text())
            assert list(signed) == [hashlib.sha256(fab_signing.build_fab(link.app)).hexdigest()]
            # The SuperLink itself is on 127.0.0.1 only: nothing answers on the exposed host but the gateway.
            inner = int((home / "config.toml").read_text().split('address = "127.0.0.1:')[1].split('"')[0])
            with pytest.raises(OSError), socket.create_connection((EXPOSED, inner), timeout=2):
                pass
            # 1. Flower's own CLI, as in the reproduction: register a key of one's own.
            register = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(attacker_key.public_path), "x"],
                env=_env(attacker / "home"), cwd=attacker, capture_output=True, text=True, timeout=scaled(120),
            )  # fmt: skip
            assert register.returncode != 0, register.stdout + register.stderr
            assert "registered successfully" not in register.stdout
            # 2. Raw HTTPS calls with the public CA: every Control/Runtime/unknown path, any method, is refused.
            with httpx.Client(verify=str(certs.ca), timeout=scaled(30)) as client:
                for path in REFUSED:
                    for method in ("POST", "GET"):
                        reply = client.request(method, f"https://{address}{path}", content=b"\x08\x01")
                        assert reply.status_code == 403, (method, path, reply.status_code, reply.text)
                        assert "only the Fleet API" in reply.text
                for path in sorted(gateway.FLEET_PATHS):
                    assert client.get(f"https://{address}{path}").status_code == 403  # Fleet is POST only
            # 3. The stranger's key is not among the registered nodes (Control API on loopback, as the operator).
            listed = subprocess.run(
                [str(BIN / "flwr"), "supernode", "list", serve_module.CONNECTION],
                env=link.env, cwd=home, capture_output=True, text=True, timeout=scaled(120),
            )  # fmt: skip
            assert listed.returncode == 0, listed.stdout + listed.stderr
            assert listed.stdout.count("registered") + listed.stdout.count("online") >= 1
            assert attacker_key.public_line.split()[1][:40] not in listed.stdout
            # 4. A registered device, trusting only the server's identity, joins through the exposed address.
            node_log = tmp_path / "node.log"
            command = [str(BIN / "flower-supernode"), "--superlink", address, "--port", str(free_port())]
            command += ["--root-certificates", str(certs.ca), "--auth-supernode-private-key", str(certs.local_keys[0])]
            command += ["--trusted-entities", str(certs.trusted_entities)]
            command += ["--node-config", "partition-id=0 num-partitions=1"]
            with node_log.open("wb") as handle:
                node = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_env(tmp_path / "nh"))
            watch.add("flower-supernode", node, node_log)
            watch.says("flower-supernode", node_log, "SuperNode ID:", 90)
            # 5. A FAB the server did not sign (submitted on the loopback Control API) is refused on the device.
            app = tmp_path / "intruderapp"
            app.mkdir()
            (app / "pyproject.toml").write_text(_TINY_PYPROJECT)
            (app / "intruder_server.py").write_text(_TINY_SERVER)
            (app / "intruder_client.py").write_text(_TINY_CLIENT)
            run = subprocess.run(
                [str(BIN / "flwr"), "run", str(app), serve_module.CONNECTION],
                env=link.env, cwd=home, capture_output=True, text=True, timeout=scaled(120),
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
            refused = watch.says("flower-supernode", node_log, "FAB verification failed", 120)
            assert "an unsigned FAB ran" not in refused
            assert node.poll() is None
    finally:
        if node is not None:
            stop_process_trees([node])
    gateway_log = (out / serve_module.GATEWAY_LOG).read_text()
    assert "refused POST /v1/control/register-node" in gateway_log


# --- FAB signatures (no processes) --------------------------------------------------------------------------


def _verify(fab_reply: bytes, trusted: Path) -> bool:
    """What flower-supernode decides for this GetFabResponse with --trusted-entities ``trusted``."""
    from flwr.common.serde import fab_from_proto
    from flwr.proto.fab_pb2 import GetFabResponse
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities
    from flwr.supernode.start_client_internal import _verify_fab

    reply = GetFabResponse()
    reply.ParseFromString(fab_reply)
    fab = fab_from_proto(reply.fab)
    assert fab.verifications.get("valid_license")  # else the node refuses as "not supported by the SuperLink"
    entities = _try_obtain_trusted_entities(trusted)
    assert entities is not None
    return _verify_fab(fab, entities)


def _reply(content: bytes) -> bytes:
    from flwr.proto.fab_pb2 import Fab, GetFabResponse

    digest = hashlib.sha256(content).hexdigest()
    return GetFabResponse(fab=Fab(hash_str=digest, content=content, verifications={})).SerializeToString()


def test_only_the_fab_the_server_signed_passes_a_node_that_trusts_the_server(tmp_path: Path) -> None:
    server = generate_deployment_certs(tmp_path / "server")
    other = generate_deployment_certs(tmp_path / "other")
    fab, forged = b"PK the FAB the server runs", b"PK a FAB of the attacker's choosing"
    signed = tmp_path / "verifications.json"
    fab_signing.write_verifications(fab, fab_signing.load_identity(server.identity_key), signed)
    records = gateway.load_verifications(signed)
    assert _verify(gateway.with_signature(_reply(fab), records), server.trusted_entities)
    # Unsigned, and a FAB whose hash_str claims the signed FAB's hash: refused (the hash is of the content).
    assert not _verify(gateway.with_signature(_reply(forged), records), server.trusted_entities)
    from flwr.proto.fab_pb2 import Fab, GetFabResponse

    lying = Fab(hash_str=hashlib.sha256(fab).hexdigest(), content=forged, verifications={})
    assert not _verify(gateway.with_signature(GetFabResponse(fab=lying).SerializeToString(), records),
                       server.trusted_entities)  # fmt: skip
    # Signed by another identity: refused by a node that trusts only the server's.
    other_signed = tmp_path / "other.json"
    fab_signing.write_verifications(forged, fab_signing.load_identity(other.identity_key), other_signed)
    reply = gateway.with_signature(_reply(forged), gateway.load_verifications(other_signed))
    assert not _verify(reply, server.trusted_entities)
    assert _verify(reply, other.trusted_entities)  # the check is the signature's, not a blanket refusal
    # A record smuggled in by the SuperLink is dropped: only the gateway's own records travel.
    smuggled = GetFabResponse(fab=Fab(hash_str="x", content=forged, verifications=dict(
        fab_signing.sign_fab(forged, fab_signing.load_identity(other.identity_key)))))  # fmt: skip
    cleaned = GetFabResponse()
    cleaned.ParseFromString(gateway.with_signature(smuggled.SerializeToString(), records))
    assert dict(cleaned.fab.verifications) == {"valid_license": "Valid"}


def test_a_secure_node_demands_trusted_entities_and_passes_them(tmp_path: Path) -> None:
    server = generate_deployment_certs(tmp_path / "server")
    key = devices.keygen(tmp_path / "dev")
    roster = tmp_path / "roster.pub"
    roster.write_text(key.public_line + "\n")
    base = {"superlink": "127.0.0.1:9092", "partition_id": 0, "num_partitions": 2}
    secure = {"root_certificates": server.ca_cert, "auth_key": key.private_path}
    with pytest.raises(ConfigError, match="--trusted-entities"):
        node_module.NodeConfig(**base, **secure)
    config = node_module.NodeConfig(**base, **secure, trusted_entities=server.trusted_entities, roster=roster)
    command = config.command()
    assert command[command.index("--trusted-entities") + 1] == str(server.trusted_entities.resolve())
    node_config = command[command.index("--node-config") + 1]
    assert f'identity-key="{key.private_path.resolve()}"' in node_config
    assert f'roster="{roster.resolve()}"' in node_config
    insecure = node_module.NodeConfig(**base, insecure=True).command()
    assert "--trusted-entities" not in insecure and "identity-key" not in " ".join(insecure)
    assert "prefix-cache-mb" not in node_config  # the device's default
    capped = node_module.NodeConfig(**base, insecure=True, prefix_cache_mb=64.0).command()
    assert " prefix-cache-mb=64.0" in capped[capped.index("--node-config") + 1]
    with pytest.raises(ConfigError, match="--prefix-cache-mb"):
        node_module.NodeConfig(**base, insecure=True, prefix_cache_mb=-1.0)
    with contextlib.suppress(FileNotFoundError):
        roster.unlink()
    with pytest.raises(ConfigError, match="--roster"):
        node_module.NodeConfig(**base, **secure, trusted_entities=server.trusted_entities, roster=roster)
