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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner
from waiting import Watch, scaled

from deploy.certs import (
    DeploymentCerts,
    ensure_server_identity,
    generate_deployment_certs,
    identity_key_id,
    validate_hosts,
)
from deploy.devices import keygen, read_device_keys, write_roster
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
    return generate_deployment_certs(out, hosts=("127.0.0.1", "localhost", "Example.org.", "::1"))


def test_files_and_modes(deployment: DeploymentCerts) -> None:
    assert _mode(deployment.ca_cert) == _mode(deployment.server_cert) == 0o644
    assert _mode(deployment.ca_key) == _mode(deployment.server_key) == _mode(deployment.identity_key) == 0o600
    assert _mode(deployment.trusted_entities) == _mode(deployment.identity_key.with_suffix(".pub")) == 0o644
    # No device private key on the server: devices make their own (`fedadapt node keygen`).
    folder = deployment.ca_cert.parent
    assert not (folder / "devices").exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        "ca.crt", "ca.key", "server-identity.key", "server-identity.pub", "superlink.crt", "superlink.key",
        "trusted-entities.yaml",
    ]  # fmt: skip
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


def test_server_identity_is_what_flower_supernode_trusts(deployment: DeploymentCerts) -> None:
    """trusted-entities.yaml loads as flower-supernode loads it and names the identity key's public half."""
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    entities = _try_obtain_trusted_entities(deployment.trusted_entities)
    assert entities is not None and len(entities) == 1
    _validate_public_keys_ed25519(entities)
    ((key_id, public_line),) = entities.items()
    private = load_ssh_private_key(deployment.identity_key.read_bytes(), None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert load_ssh_public_key(public_line.encode()) == private.public_key()
    assert key_id == identity_key_id(public_line.encode())


def test_device_keygen_loads_as_flower_loads_it(tmp_path: Path) -> None:
    register = pytest.importorskip("flwr.cli.supernode.register")
    made = keygen(tmp_path / "device", "device-7")
    assert (_mode(made.private_path), _mode(made.public_path)) == (0o600, 0o644)
    private = load_ssh_private_key(made.private_path.read_bytes(), None)  # as flower-supernode
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    public = load_ssh_public_key(made.public_path.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public == private.public_key()
    signature = private.sign(b"timestamp", ec.ECDSA(hashes.SHA256()))  # how a SuperNode signs its requests
    public.verify(signature, b"timestamp", ec.ECDSA(hashes.SHA256()))
    assert register.try_load_public_key(made.public_path)  # what `flwr supernode register` runs
    assert made.public_path.read_text() == made.public_line + "\n" and made.public_line.endswith(" device-7")
    with pytest.raises(ConfigError, match="never overwritten"):
        keygen(tmp_path / "device", "device-7")
    assert load_ssh_private_key(made.private_path.read_bytes(), None).public_key() == public  # untouched
    with pytest.raises(ConfigError, match="--name"):
        keygen(tmp_path / "device", "../escape")


def test_server_reads_only_public_device_keys_and_writes_the_roster(tmp_path: Path) -> None:
    folder = tmp_path / "devices"
    first, second = keygen(tmp_path / "a"), keygen(tmp_path / "b", "phone")
    folder.mkdir()
    (folder / "device-0.pub").write_bytes(first.public_path.read_bytes())
    (folder / "device-1.pub").write_bytes(second.public_path.read_bytes())
    (folder / "notes.txt").write_text("ignored: not a .pub file")
    keys = read_device_keys(folder)
    assert [k.path.name for k in keys] == ["device-0.pub", "device-1.pub"]
    roster = write_roster(keys, tmp_path / "roster.pub")
    assert roster.read_text() == f"{first.public_line}\n{second.public_line}\n"  # as `cat devices/*.pub`
    assert _mode(roster) == 0o644
    (folder / "device-2.pub").write_bytes(first.private_path.read_bytes())
    with pytest.raises(ConfigError, match=r"device-2\.pub"):
        read_device_keys(folder)  # a private key handed over by mistake is refused, not registered
    (folder / "device-2.pub").write_bytes(first.public_path.read_bytes())
    with pytest.raises(ConfigError, match="same public key"):
        read_device_keys(folder)
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    (folder / "device-2.pub").write_bytes(ed)
    with pytest.raises(ConfigError, match="NIST curve"):
        read_device_keys(folder)


def test_keys_are_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        certs = generate_deployment_certs(tmp_path / "c")
        made = keygen(tmp_path / "d")
    for secret in (certs.identity_key, certs.server_key, certs.ca_key, made.private_path):
        assert secret.read_text().splitlines()[1] not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_deployment_certs(tmp_path / "c")
    with pytest.raises(ConfigError, match=r"ca\.crt already exists.*never overwritten"):
        generate_deployment_certs(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "trusted-entities.yaml").write_text("x")
    with pytest.raises(ConfigError, match=r"trusted-entities\.yaml already exists"):
        generate_deployment_certs(tmp_path / "d")
    assert not (tmp_path / "d" / "ca.crt").exists()  # checked before anything is written


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deploy.certs as certs_module

    written: list[Path] = []
    real = certs_module._write_new

    def fail_on_the_sixth(path: Path, data: bytes, mode: int) -> None:
        if len(written) == 5:
            raise OSError("disk full")
        real(path, data, mode)
        written.append(path)

    monkeypatch.setattr(certs_module, "_write_new", fail_on_the_sixth)
    out = tmp_path / "c"
    with pytest.raises(OSError, match="disk full"):
        generate_deployment_certs(out)
    assert len(written) == 5 and list(out.iterdir()) == []


def test_an_older_folder_gets_a_server_identity_once(tmp_path: Path) -> None:
    certs = generate_deployment_certs(tmp_path / "c")
    for name in ("server-identity.key", "server-identity.pub", "trusted-entities.yaml"):
        (tmp_path / "c" / name).unlink()
    assert ensure_server_identity(tmp_path / "c") is True
    before = certs.identity_key.read_bytes()
    assert ensure_server_identity(tmp_path / "c") is False and certs.identity_key.read_bytes() == before
    assert _mode(certs.identity_key) == 0o600


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


@pytest.mark.parametrize("validity_days", [0, 4000])
def test_bad_numbers_refused(tmp_path: Path, validity_days: int) -> None:
    with pytest.raises(ConfigError, match="validity_days"):
        generate_deployment_certs(tmp_path / "c", validity_days=validity_days)


def test_cli_certs(tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = runner.invoke(app, ["certs", "--out", str(out), "--host", "127.0.0.1", "--host", "example.org"])
    assert result.exit_code == 0, result.output
    assert (
        "superlink.crt" in result.output and "fedadapt serve --config SCENARIO.toml --host 127.0.0.1" in result.output
    )
    assert "127.0.0.1, example.org" in result.output
    assert "fedadapt node keygen --out" in result.output and "--trusted-entities trusted-entities.yaml" in result.output
    for path in [out / "ca.key", out / "superlink.key", out / "server-identity.key"]:
        assert path.read_text().splitlines()[1] not in result.output
    assert not (out / "devices").exists()


def test_cli_certs_errors_and_no_device_keys(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert runner.invoke(app, ["certs", "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["certs", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["certs", "--out", str(tmp_path / "x"), "--host", "a b"])
    assert bad.exit_code == 2 and "not an IP address or DNS name" in bad.output
    for gone in (["--devices", "1"], ["--add-devices", "1"]):  # the server no longer makes device private keys
        assert runner.invoke(app, ["certs", "--out", str(tmp_path / "y"), *gone]).exit_code == 2


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
    deadline = time.monotonic() + scaled(10)
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


@pytest.mark.slow
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
    good = generate_deployment_certs(tmp_path / "good", hosts=["127.0.0.1"])
    device_keys = [keygen(tmp_path / "device-keys", f"device-{i}") for i in range(2)]
    foreign = generate_deployment_certs(tmp_path / "foreign", hosts=["127.0.0.1"])
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    watch = Watch()

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                [str(bin_dir / args[0]), *args[1:]], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
            )
        procs.append(proc)
        watch.add(name, proc, log)
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
        watch.says("superlink", link_log, f"Uvicorn running on https://127.0.0.1:{port}", 60)
        (tmp_path / "flwr").mkdir(exist_ok=True)  # the SuperLink may have created it
        (tmp_path / "flwr" / "config.toml").write_text(
            f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{good.ca_cert.resolve()}"\n'
        )
        register = subprocess.run(
            [str(bin_dir / "flwr"), "supernode", "register", str(device_keys[0].public_path), "deploy"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=scaled(60),
        )  # fmt: skip
        assert register.returncode == 0 and "registered successfully" in register.stdout, register.stdout
        node, node_log = supernode("registered", good.ca_cert, device_keys[0].private_path)
        stranger, stranger_log = supernode("unregistered", good.ca_cert, device_keys[1].private_path)
        spoof, spoof_log = supernode("foreign-ca", foreign.ca_cert, device_keys[0].private_path)
        watch.says("registered", node_log, "SuperNode ID:", 60)
        watch.says("superlink", link_log, "[Fleet.ActivateNode] Activated node_id=", 10)
        refused = watch.says("unregistered", stranger_log, "Failed to activate SuperNode", 60, then_exits=True)
        assert "Exit Code: 305" in refused and stranger.returncode != 0
        tls = watch.says("foreign-ca", spoof_log, "CERTIFICATE_VERIFY_FAILED", 60, then_exits=True)
        assert "SuperNode ID:" not in tls and spoof.returncode != 0
        assert node.poll() is None, node_log.read_text()
    finally:
        _stop(procs)
