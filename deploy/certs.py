"""TLS certificates and SuperNode authentication keys for a Flower 1.41 deployment.

Files written under ``out_dir`` (private keys 0600, the rest 0644; nothing is ever overwritten):

- ``ca.crt``: the self-signed CA certificate (PEM). ``flower-superlink --ssl-ca-certfile``, every
  ``flower-supernode --root-certificates`` and ``root-certificates = "/abs/ca.crt"`` of a connection
  in ``$FLWR_HOME/config.toml`` (for ``flwr run``, ``flwr supernode register``).
- ``ca.key``: the CA's private key (PEM PKCS#8). Used by no Flower command; it only signs server
  certificates. Keep it offline.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's server certificate (SANs from ``hosts``,
  serverAuth) and its private key: ``flower-superlink --ssl-certfile`` / ``--ssl-keyfile``. Named
  apart from ``server.key`` / ``server.pub`` of ``fedadapt keys generate`` (the X25519 payload key).
- ``server-identity.key`` / ``server-identity.pub``: the server's ed25519 identity (OpenSSH formats).
  ``fedadapt serve`` signs the FAB it runs with it; keep the private key on the server.
- ``trusted-entities.yaml``: that identity as ``flower-supernode --trusted-entities`` reads it (key id
  to OpenSSH public key). Copy it to every device: ``fedadapt node --trusted-entities`` runs only FABs
  the server signed.

Device authentication keys are not made here: each device makes its own with ``fedadapt node keygen``
and hands only its public key to the server (``deploy/devices.py``).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedadapt.errors import ConfigError
from fedadapt.privacy.keys import _write_new

logger = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
DEVICES_DIR = "devices"  # the devices' public keys (*.pub) that `fedadapt serve` registers
IDENTITY_KEY = "server-identity.key"
IDENTITY_PUB = "server-identity.pub"
TRUSTED_ENTITIES = "trusted-entities.yaml"
IDENTITY_FILES = (IDENTITY_KEY, IDENTITY_PUB, TRUSTED_ENTITIES)
LOOPBACK = "127.0.0.1"
MAX_VALIDITY_DAYS = 3650
_CURVE = ec.SECP384R1  # Flower's own choice for node keys; a NIST curve as `flwr supernode register` requires
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class DeploymentCerts:
    """Where the deployment's files were written, and the CA certificate's SHA-256 fingerprint."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    identity_key: Path
    trusted_entities: Path
    hosts: tuple[str, ...]
    ca_fingerprint: str


def generate_deployment_certs(
    out_dir: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    validity_days: int = 825,
) -> DeploymentCerts:
    """Write a CA, a SuperLink certificate for ``hosts`` and the server's identity; never overwrites.

    The certificate also names 127.0.0.1: the SuperLink itself listens on loopback behind the gateway
    (``deploy/gateway.py``), and that hop checks the same certificate.
    """
    out_dir = Path(out_dir)
    names = validate_hosts(hosts)
    san_names = validate_hosts([*names, LOOPBACK])
    if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
        raise ConfigError(f"validity_days must be in 1..{MAX_VALIDITY_DAYS}, got {validity_days!r}")
    paths = [out_dir / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    _refuse_existing([*paths, *(out_dir / name for name in IDENTITY_FILES)])
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(_CURVE()), ec.generate_private_key(_CURVE())
    ca_cert = _ca_certificate(ca_key, validity_days)
    server_cert = _server_certificate(server_key, ca_cert, ca_key, san_names, validity_days)
    contents = [
        (paths[0], ca_cert.public_bytes(Encoding.PEM), 0o644),
        (paths[1], _private_pem(ca_key), 0o600),
        (paths[2], server_cert.public_bytes(Encoding.PEM), 0o644),
        (paths[3], _private_pem(server_key), 0o600),
    ]
    _write_all(contents + _identity_contents(out_dir))
    logger.info("wrote CA, SuperLink certificate and server identity to %s", out_dir)
    return DeploymentCerts(
        ca_cert=paths[0],
        ca_key=paths[1],
        server_cert=paths[2],
        server_key=paths[3],
        identity_key=out_dir / IDENTITY_KEY,
        trusted_entities=out_dir / TRUSTED_ENTITIES,
        hosts=names,
        ca_fingerprint=ca_fingerprint(ca_cert),
    )


def ensure_server_identity(out_dir: Path) -> bool:
    """Create the server's identity in ``out_dir`` if it has none (a folder from an older fedadapt); True if made."""
    out_dir = Path(out_dir)
    if (out_dir / IDENTITY_KEY).is_file():
        return False
    _refuse_existing([out_dir / name for name in IDENTITY_FILES])
    _write_all(_identity_contents(out_dir))
    logger.warning("made the server identity %s: copy %s to every device", out_dir / IDENTITY_KEY, TRUSTED_ENTITIES)
    return True


def identity_key_id(public_line: bytes) -> str:
    """The key id devices know the server's identity by: a prefix of the public key's SHA-256."""
    return "fedadapt-server-" + hashlib.sha256(public_line.split()[1]).hexdigest()[:16]


def certificate_names(cert_path: Path) -> tuple[str, ...]:
    """The DNS names and IP addresses a certificate is valid for (its SANs)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*san.get_values_for_type(x509.DNSName), *ips)


def _identity_contents(out_dir: Path) -> list[tuple[Path, bytes, int]]:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    key_id = identity_key_id(public)
    # One YAML mapping, the value a double-quoted scalar (JSON-compatible): {key id: OpenSSH public key}.
    trusted = f"{key_id}: {json.dumps(public.decode('ascii'))}\n".encode()
    return [
        (out_dir / IDENTITY_KEY, key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()), 0o600),
        (out_dir / IDENTITY_PUB, public + f" {key_id}\n".encode(), 0o644),
        (out_dir / TRUSTED_ENTITIES, trusted, 0o644),
    ]


def validate_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """The hosts, stripped and without duplicates; ConfigError unless each is an IP address or a DNS name."""
    if isinstance(hosts, str):
        hosts = [hosts]
    names: list[str] = []
    for host in hosts:
        name = _normalize_host(host)
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError("hosts is empty: give at least one IP address or DNS name the SuperLink is reached by")
    return tuple(names)


def ca_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER bytes as colon-separated hex (as `openssl x509 -fingerprint -sha256`)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def next_commands(certs: DeploymentCerts, port: int = 9092) -> list[str]:
    """The fedadapt commands that use these files: each device's key, the server, then each device (absolute paths)."""
    host = certs.hosts[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bind = host if _is_loopback(host) else "0.0.0.0"
    folder = certs.ca_cert.resolve().parent
    return [
        "# on each device: its own authentication key (the private key never leaves the device)",
        "fedadapt node keygen --out device-keys/",
        f"# hand device-keys/device.pub to the server as {folder / DEVICES_DIR}/device-<i>.pub, then on the server:",
        f"fedadapt serve --config SCENARIO.toml --host {bind} --port {port} --certs {folder} --out runs/server",
        f"# copy {certs.ca_cert.name}, {certs.trusted_entities.name} and roster.pub (written by serve) to each device:",
        f"fedadapt node --superlink {address} --partition-id <i> --num-partitions <n> --root-certificates ca.crt "
        "--trusted-entities trusted-entities.yaml --auth-key device-keys/device.key --roster roster.pub",
    ]


def _normalize_host(host: str) -> str:
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"host must be a non-empty IP address or DNS name, got {host!r}")
    text = host.strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    name = text.rstrip(".").lower()
    if ":" in text or "/" in text:
        raise ConfigError(
            f"host {host!r} is not an IP address or DNS name: give the host alone, without port or scheme"
        )
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ConfigError(
            f"host {host!r} is not an IP address or DNS name (labels of letters, digits and inner hyphens, "
            "1-63 characters each)"
        )
    if name.replace(".", "").isdigit():
        raise ConfigError(f"host {host!r} looks like an IPv4 address but is not a valid one")
    return name


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _ca_certificate(key: ec.EllipticCurvePrivateKey, validity_days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedadapt deployment CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = _key_usage(cert_sign=True)
    builder = _builder(name, name, key.public_key(), validity_days)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(usage, critical=True).add_extension(ski, critical=False)
    return builder.sign(key, hashes.SHA384())


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Iterable[str],
    validity_days: int,
) -> x509.Certificate:
    hosts = list(hosts)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    san = x509.SubjectAlternativeName([_general_name(host) for host in hosts])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = _builder(ca_cert.subject, subject, key.public_key(), validity_days)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(_key_usage(cert_sign=False), critical=True)
    builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    builder = builder.add_extension(san, critical=False)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    return builder.add_extension(aki, critical=False).sign(ca_key, hashes.SHA384())


def _builder(
    issuer: x509.Name, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, validity_days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .issuer_name(issuer)
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)  # tolerate a peer whose clock is a little behind
        .not_valid_after(now + datetime.timedelta(days=validity_days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _refuse_existing(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"{path} already exists: certificates and keys are never overwritten; move it away or choose "
                "another --out"
            )


def _write_all(contents: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every file or none: on any failure the files already written are removed."""
    written: list[Path] = []
    try:
        for path, data, mode in contents:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_new(path, data, mode)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
