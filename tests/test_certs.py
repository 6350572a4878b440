"""Deployment certificates and SuperNode keys: files, modes, chain, key formats, refusals, CLI, real loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedadapt.certs import DeploymentCerts, add_device_keys, generate_deployment_certs, validate_hosts
from fedadapt.cli import app
from fedadapt.errors import ConfigError

runner = CliRunner()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(certs: DeploymentCerts, ca_file: Path, server_hostname: str) -> None:
    """A TLS handshake in memory: Python's ssl, as uvicorn (SuperLink) and httpx (SuperNode, flwr) use it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13 on
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not finish")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> DeploymentCerts:
    out = tmp_path_factory.mktemp("deploy") / "certs"
    return generate_deployment_certs(out, hosts=("127.0.0.1", "localhost", "Example.org.", "::1"), devices=2)


def test_files_and_modes(deployment: DeploymentCerts) -> None:
    assert _mode(deployment.ca_cert) == _mode(deployment.server_cert) == 0o644
    assert _mode(deployment.ca_key) == _mode(deployment.server_key) == 0o600
    assert [d.index for d in deployment.devices] == [0, 1]
    for device in deployment.devices:
        assert device.private_path.name == f"device-{device.index}.key"
        assert device.public_path.name == f"device-{device.index}.key.pub"
        assert (_mode(device.private_path), _mode(device.public_path)) == (0o600, 0o644)
    assert deployment.server_cert.name == "superlink.crt"  # apart from `fedadapt keys generate`'s server.key
    assert deployment.hosts == ("127.0.0.1", "localhost", "example.org", "::1")
    ca = _cert(deployment.ca_cert)
    assert deployment.ca_fingerprint == ca.fingerprint(hashes.SHA256()).hex(":").upper()


def test_ca_and_server_certificate(deployment: DeploymentCerts) -> None:
    ca, server = _cert(deployment.ca_cert), _cert(deployment.server_cert)
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "example.org"]
    key = load_pem_private_key(deployment.server_key.read_bytes(), password=None)
    assert key.public_key() == server.public_key()
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 825


def test_tls_handshake_verifies_names_and_ca(deployment: DeploymentCerts, tmp_path: Path) -> None:
    for name in ("127.0.0.1", "localhost", "example.org", "::1"):
        _handshake(deployment, deployment.ca_cert, name)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(deployment, deployment.ca_cert, "other.example.org")
    other = generate_deployment_certs(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(deployment, other.ca_cert, "127.0.0.1")


def test_device_keys_load_as_flower_loads_them(deployment: DeploymentCerts) -> None:
    register = pytest.importorskip("flwr.cli.supernode.register")
    for device in deployment.devices:
        private = load_ssh_private_key(device.private_path.read_bytes(), None)  # as flower-supernode
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        public = load_ssh_public_key(device.public_path.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public == private.public_key()
        signature = private.sign(b"timestamp", ec.ECDSA(hashes.SHA256()))  # how a SuperNode signs its requests
        public.verify(signature, b"timestamp", ec.ECDSA(hashes.SHA256()))
        assert register.try_load_public_key(device.public_path)  # what `flwr supernode register` runs


def test_keys_are_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        certs = generate_deployment_certs(tmp_path / "c", devices=1)
    body = certs.devices[0].private_path.read_text().splitlines()[1]
    assert "PRIVATE KEY" not in caplog.text and body not in caplog.text


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_deployment_certs(tmp_path / "c")
    with pytest.raises(ConfigError, match=r"ca\.crt already exists.*never overwritten"):
        generate_deployment_certs(tmp_path / "c")
    (tmp_path / "d" / "devices").mkdir(parents=True)
    (tmp_path / "d" / "devices" / "device-1.key.pub").write_text("x")
    with pytest.raises(ConfigError, match=r"device-1\.key\.pub already exists"):
        generate_deployment_certs(tmp_path / "d", devices=2)
    assert not (tmp_path / "d" / "ca.crt").exists()  # checked before anything is written


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "devices").write_text("a file where the folder goes")
    with pytest.raises(OSError):
        generate_deployment_certs(out, devices=1)
    assert sorted(p.name for p in out.iterdir()) == ["devices"]


@pytest.mark.parametrize(
    "hosts",
    [[], [""], ["  "], ["bad_host"], ["1.2.3.4:80"], ["https://example.org"], ["-a.example.org"], ["999.1.1.1"]],
)
def test_bad_hosts_refused(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(ConfigError, match="host"):
        generate_deployment_certs(tmp_path / "c", hosts=hosts)
    assert not (tmp_path / "c").exists()


def test_hosts_normalized() -> None:
    assert validate_hosts(["LocalHost.", "[::1]", " 127.0.0.1 ", "localhost"]) == ("localhost", "::1", "127.0.0.1")
    assert validate_hosts("example.org") == ("example.org",)


@pytest.mark.parametrize(
    ("devices", "validity_days", "match"), [(-1, 825, "devices"), (0, 0, "validity_days"), (0, 4000, "validity_days")]
)
def test_bad_numbers_refused(tmp_path: Path, devices: int, validity_days: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generate_deployment_certs(tmp_path / "c", devices=devices, validity_days=validity_days)


def test_add_device_keys_numbering(tmp_path: Path) -> None:
    out = tmp_path / "c"
    generate_deployment_certs(out, devices=2)
    assert [d.index for d in add_device_keys(out, 3)] == [2, 3, 4]
    for suffix in ("", ".pub"):
        (out / "devices" / f"device-1.key{suffix}").unlink()
    assert [d.index for d in add_device_keys(out, 1)] == [5]  # never reuses a number below the highest
    assert _mode(out / "devices" / "device-5.key") == 0o600
    with pytest.raises(ConfigError, match="count"):
        add_device_keys(out, 0)
    with pytest.raises(ConfigError, match=r"ca\.crt does not exist"):
        add_device_keys(tmp_path / "empty", 1)


def test_cli_certs(tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = runner.invoke(app, ["certs", "--out", str(out), "--host", "127.0.0.1", "--host", "example.org"])
    assert result.exit_code == 0, result.output
    assert (
        "superlink.crt" in result.output and "fedadapt serve --config SCENARIO.toml --host 127.0.0.1" in result.output
    )
    assert "127.0.0.1, example.org" in result.output
    result = runner.invoke(app, ["certs", "--out", str(out), "--add-devices", "2"])
    assert result.exit_code == 0, result.output
    assert "device-1.key.pub" in result.output and "fedadapt serve registers every" in result.output
    secrets = [out / "ca.key", out / "superlink.key", out / "devices" / "device-0.key"]
    for path in secrets:
        assert path.read_text().splitlines()[1] not in result.output


def test_cli_certs_devices_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = runner.invoke(app, ["certs", "--out", str(out), "--devices", "1"])
    assert result.exit_code == 0, result.output
    assert (
        "fedadapt node --superlink 127.0.0.1:9092 --partition-id 0" in result.output and "--auth-key" in result.output
    )
    assert (out / "devices" / "device-0.key").read_text().splitlines()[1] not in result.output
    again = runner.invoke(app, ["certs", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["certs", "--out", str(tmp_path / "x"), "--host", "a b"])
    assert bad.exit_code == 2 and "not an IP address or DNS name" in bad.output
    mixed = runner.invoke(app, ["certs", "--out", str(out), "--add-devices", "1", "--devices", "1"])
    assert mixed.exit_code == 2


# --- real loopback deployment ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc), e.g. the flower-superexec a SuperLink or SuperNode starts."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process we started (and its direct children), SIGKILL whatever is left after 10 s."""
    pids = [p.pid for p in procs if p.poll() is None]
    pids += [child for pid in pids for child in _children(pid)]
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for pid in pids:
        _kill(pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=10)


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.kill(pid, sig)


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float, until_exit: bool = False) -> str:
    """The log once it holds ``text`` (and, with ``until_exit``, the process has exited); fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content and (not until_exit or proc.poll() is not None):
            return content
        if proc.poll() is not None and text not in content:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log.name} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.deployment
@pytest.mark.timeout(180)
def test_loopback_supernode_auth(tmp_path: Path) -> None:
    """TLS + node auth on loopback: a registered key activates; an unregistered key and a foreign CA are refused."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # they start flower-superexec from PATH
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    good = generate_deployment_certs(tmp_path / "good", hosts=["127.0.0.1"], devices=2)
    foreign = generate_deployment_certs(tmp_path / "foreign", hosts=["127.0.0.1"])
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                [str(bin_dir / args[0]), *args[1:]], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
            )
        procs.append(proc)
        return proc, log

    def supernode(name: str, ca: Path, key: Path) -> tuple[subprocess.Popen[bytes], Path]:
        return start(
            name, "flower-supernode", "--root-certificates", str(ca), "--superlink", f"127.0.0.1:{port}",
            "--auth-supernode-private-key", str(key), "--port", str(_free_port()),
            "--node-config", "partition-id=0 num-partitions=1",
        )  # fmt: skip

    try:
        link, link_log = start(
            "superlink", "flower-superlink", "--ssl-ca-certfile", str(good.ca_cert),
            "--ssl-certfile", str(good.server_cert), "--ssl-keyfile", str(good.server_key),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation", "--database", str(tmp_path / "link.db"),
        )  # fmt: skip
        _wait_for(link_log, f"Uvicorn running on https://127.0.0.1:{port}", link, 60)
        (tmp_path / "flwr").mkdir(exist_ok=True)  # the SuperLink may have created it
        (tmp_path / "flwr" / "config.toml").write_text(
            f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{good.ca_cert.resolve()}"\n'
        )
        register = subprocess.run(
            [str(bin_dir / "flwr"), "supernode", "register", str(good.devices[0].public_path), "deploy"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert register.returncode == 0 and "registered successfully" in register.stdout, register.stdout
        node, node_log = supernode("registered", good.ca_cert, good.devices[0].private_path)
        stranger, stranger_log = supernode("unregistered", good.ca_cert, good.devices[1].private_path)
        spoof, spoof_log = supernode("foreign-ca", foreign.ca_cert, good.devices[0].private_path)
        _wait_for(node_log, "SuperNode ID:", node, 60)
        _wait_for(link_log, "[Fleet.ActivateNode] Activated node_id=", link, 10)
        refused = _wait_for(stranger_log, "Failed to activate SuperNode", stranger, 60, until_exit=True)
        assert "Exit Code: 305" in refused and stranger.returncode != 0
        tls = _wait_for(spoof_log, "CERTIFICATE_VERIFY_FAILED", spoof, 60, until_exit=True)
        assert "SuperNode ID:" not in tls and spoof.returncode != 0
        assert node.poll() is None, node_log.read_text()
    finally:
        _stop(procs)
