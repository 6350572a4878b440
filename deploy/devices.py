"""Device authentication keys: made on the device, only the public key reaches the server.

- ``fedadapt node keygen --out DIR`` makes ``DIR/<name>.key`` (ECDSA P-384, OpenSSH private format,
  0600, never overwritten: what ``flower-supernode --auth-supernode-private-key`` reads) and
  ``DIR/<name>.pub`` (0644). The operator hands the ``.pub`` file to the server.
- ``fedadapt serve`` registers every ``*.pub`` in its devices folder (``<certs>/devices``) and writes
  the roster: the devices' public keys, one a line (``cat devices/*.pub``), which SecAgg+ clients use
  to check each other's signatures. Operators copy ``roster.pub`` to every device.
- The local demo (``fedadapt serve --local-supernodes N``) is the one place a private device key
  lives beside the server: ``<certs>/demo-device-keys/``, named so that nobody mistakes it for a
  deployment layout.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_ssh_public_key,
)

from deploy.certs import DEVICES_DIR
from fedadapt.errors import ConfigError
from fedadapt.privacy.keys import _write_new

logger = logging.getLogger(__name__)

ROSTER = "roster.pub"
DEMO_KEYS_DIR = "demo-device-keys"  # local demo only: private keys the server made for its own SuperNodes
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # NIST curves: what `flwr supernode register` accepts
_MAX_PUB_BYTES = 16 * 1024
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class DeviceKey:
    """A device's key pair as keygen wrote it (the private file stays on the device)."""

    private_path: Path
    public_path: Path
    public_line: str  # "ecdsa-sha2-nistp384 AAAA... <name>"


@dataclass(frozen=True)
class DevicePublicKey:
    """One public key the server was given: the file and its single OpenSSH line."""

    path: Path
    line: str


def keygen(out_dir: Path, name: str = "device") -> DeviceKey:
    """Make this device's authentication key in ``out_dir``; refuses to overwrite either file."""
    if not name or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise ConfigError(f"--name must be letters, digits, '-', '_' or '.', got {name!r}")
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} already exists: device keys are never overwritten")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")
    line = f"{public} {name}"
    _write_new(private_path, key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()), 0o600)
    try:
        _write_new(public_path, f"{line}\n".encode(), 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return DeviceKey(private_path, public_path, line)


def read_public_key(path: Path) -> DevicePublicKey:
    """The one OpenSSH ECDSA (NIST curve) public key in ``path``; ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_PUB_BYTES:
            raise ConfigError(f"{path} is over {_MAX_PUB_BYTES} bytes: not one OpenSSH public key")
        lines = [line.strip() for line in path.read_text(encoding="ascii").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read device public key {path}: {err}") from err
    if len(lines) != 1:
        raise ConfigError(f"{path} must hold exactly one OpenSSH public key line, found {len(lines)}")
    if "PRIVATE KEY" in lines[0]:
        raise ConfigError(f"{path} holds a private key: the server takes only public keys")
    try:
        key = load_ssh_public_key(lines[0].encode("ascii"))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path} is not an OpenSSH public key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _CURVES):
        raise ConfigError(f"{path} must be an ECDSA key on a NIST curve (make it with `fedadapt node keygen`)")
    return DevicePublicKey(path, lines[0])


def read_device_keys(folder: Path) -> tuple[DevicePublicKey, ...]:
    """Every ``*.pub`` in ``folder``, by name; ConfigError on a bad file or a key given twice."""
    folder = Path(folder)
    keys = tuple(read_public_key(p) for p in sorted(folder.glob("*.pub"))) if folder.is_dir() else ()
    seen: dict[str, Path] = {}
    for key in keys:
        material = " ".join(key.line.split()[:2])
        if material in seen:
            raise ConfigError(f"{key.path} and {seen[material]} hold the same public key: give each device its own")
        seen[material] = key.path
    return keys


def write_roster(keys: Sequence[DevicePublicKey], path: Path) -> Path:
    """The roster: the devices' public keys, one a line (as ``cat devices/*.pub``); replaced atomically."""
    path = Path(path)
    data = "".join(f"{key.line}\n" for key in keys)
    fd, tmp = tempfile.mkstemp(prefix=".roster-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def demo_device_keys(certs_dir: Path, count: int) -> list[Path]:
    """Local demo only: keys for ``count`` SuperNodes on this machine, made once and kept for --resume.

    Private keys go to ``<certs>/demo-device-keys/device-<i>.key``, public keys to
    ``<certs>/devices/device-<i>.pub`` (which serve registers). Returns the private key paths.
    """
    certs_dir = Path(certs_dir)
    private_paths = []
    for index in range(count):
        private = certs_dir / DEMO_KEYS_DIR / f"device-{index}.key"
        public = certs_dir / DEVICES_DIR / f"device-{index}.pub"
        if not private.is_file():
            made = keygen(certs_dir / DEMO_KEYS_DIR, f"device-{index}")
            public.parent.mkdir(parents=True, exist_ok=True)
            public.unlink(missing_ok=True)  # a stale public key of a demo key that is gone
            _write_new(public, made.public_path.read_bytes(), 0o644)
            made.public_path.unlink()
        private_paths.append(private)
    return private_paths
