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
- ``devices/device-<i>.key``: SuperNode ``i``'s authentication key, ECDSA P-384 in OpenSSH private
  format (what ``flower-supernode`` reads with ``load_ssh_private_key``):
  ``flower-supernode --auth-supernode-private-key``. Copy it to that device only.
- ``devices/device-<i>.key.pub``: its OpenSSH public key (a NIST curve, as ``flwr supernode register``
  demands): ``flwr supernode register devices/device-<i>.key.pub <connection>`` before the node starts
  against ``flower-superlink --enable-supernode-auth``.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedadapt.errors import ConfigError
from fedadapt.keys import _write_new

logger = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
DEVICES_DIR = "devices"
MAX_VALIDITY_DAYS = 3650
_CURVE = ec.SECP384R1  # Flower's own choice for node keys; a NIST curve as `flwr supernode register` requires
_DEVICE_RE = re.compile(r"device-(\d+)\.key(?:\.pub)?")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class DeviceKeyFiles:
    """One SuperNode's authentication key pair."""

    index: int
    private_path: Path
    public_path: Path


@dataclass(frozen=True)
class DeploymentCerts:
    """Where the deployment's files were written, and the CA certificate's SHA-256 fingerprint."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    devices: tuple[DeviceKeyFiles, ...]
    hosts: tuple[str, ...]
    ca_fingerprint: str


def generate_deployment_certs(
    out_dir: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    devices: int = 0,
    validity_days: int = 825,
) -> DeploymentCerts:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``devices`` node key pairs; never overwrites."""
    out_dir = Path(out_dir)
    names = validate_hosts(hosts)
    if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
        raise ConfigError(f"validity_days must be in 1..{MAX_VALIDITY_DAYS}, got {validity_days!r}")
    if devices < 0:
        raise ConfigError(f"devices must be >= 0, got {devices!r}")
    paths = [out_dir / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    device_files = _device_files(out_dir, range(devices))
    _refuse_existing([*paths, *(p for d in device_files for p in (d.private_path, d.public_path))])
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(_CURVE()), ec.generate_private_key(_CURVE())
    ca_cert = _ca_certificate(ca_key, validity_days)
    server_cert = _server_certificate(server_key, ca_cert, ca_key, names, validity_days)
    contents = [
        (paths[0], ca_cert.public_bytes(Encoding.PEM), 0o644),
        (paths[1], _private_pem(ca_key), 0o600),
        (paths[2], server_cert.public_bytes(Encoding.PEM), 0o644),
        (paths[3], _private_pem(server_key), 0o600),
    ]
    _write_all(contents + _device_contents(device_files))
    logger.info("wrote CA, SuperLink certificate and %d device key pairs to %s", devices, out_dir)
    return DeploymentCerts(
        ca_cert=paths[0],
        ca_key=paths[1],
        server_cert=paths[2],
        server_key=paths[3],
        devices=tuple(device_files),
        hosts=names,
        ca_fingerprint=ca_fingerprint(ca_cert),
    )


def add_device_keys(out_dir: Path, count: int) -> tuple[DeviceKeyFiles, ...]:
    """Add ``count`` SuperNode key pairs to ``out_dir/devices``, numbered after the highest existing index."""
    out_dir = Path(out_dir)
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count!r}")
    if not (out_dir / CA_CERT).is_file():
        raise ConfigError(
            f"{out_dir / CA_CERT} does not exist: create the deployment first with `fedadapt certs --out {out_dir}`"
        )
    start = next_device_index(out_dir)
    device_files = _device_files(out_dir, range(start, start + count))
    _refuse_existing([p for d in device_files for p in (d.private_path, d.public_path)])
    _write_all(_device_contents(device_files))
    logger.info("added device key pairs %d..%d in %s", start, start + count - 1, out_dir / DEVICES_DIR)
    return tuple(device_files)


def next_device_index(out_dir: Path) -> int:
    """One past the highest ``device-<i>`` index in ``out_dir/devices`` (0 when there is none)."""
    return max((i + 1 for i in _device_indices(out_dir)), default=0)


def existing_devices(out_dir: Path) -> tuple[DeviceKeyFiles, ...]:
    """The devices of ``out_dir`` whose public key is there, by index (a private key may live on its device)."""
    return tuple(d for d in _device_files(Path(out_dir), _device_indices(out_dir)) if d.public_path.is_file())


def _device_indices(out_dir: Path) -> list[int]:
    folder = Path(out_dir) / DEVICES_DIR
    found = [_DEVICE_RE.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
    return sorted({int(m.group(1)) for m in found if m})


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
    """The fedadapt commands that use these files: the server, then each device (absolute paths)."""
    host = certs.hosts[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bind = host if _is_loopback(host) else "0.0.0.0"
    folder = certs.ca_cert.resolve().parent
    lines = [
        "# on the server (registers every devices/device-<i>.key.pub):",
        f"fedadapt serve --config SCENARIO.toml --host {bind} --port {port} --certs {folder} --out runs/server",
        "# on device <i>, given ca.crt and devices/device-<i>.key:",
    ]
    for device in certs.devices:
        lines.append(
            f"fedadapt node --superlink {address} --partition-id {device.index} --num-partitions {len(certs.devices)} "
            f"--root-certificates {certs.ca_cert.resolve()} --auth-key {device.private_path.resolve()}"
        )
    return lines


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


def _device_files(out_dir: Path, indices: Iterable[int]) -> list[DeviceKeyFiles]:
    folder = out_dir / DEVICES_DIR
    return [DeviceKeyFiles(i, folder / f"device-{i}.key", folder / f"device-{i}.key.pub") for i in indices]


def _device_contents(device_files: Sequence[DeviceKeyFiles]) -> list[tuple[Path, bytes, int]]:
    contents: list[tuple[Path, bytes, int]] = []
    for device in device_files:
        key = ec.generate_private_key(_CURVE())
        private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
        public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        contents.append((device.private_path, private, 0o600))
        contents.append((device.public_path, public + f" fedadapt-device-{device.index}\n".encode(), 0o644))
    return contents


def _refuse_existing(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"{path} already exists: certificates and keys are never overwritten; move it away or choose "
                "another --out (add SuperNode keys to an existing deployment with `fedadapt certs --add-devices N`)"
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
