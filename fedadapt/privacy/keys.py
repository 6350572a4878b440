"""The server's long-term X25519 key pair on disk: generate, save (private 0600, public 0644) and load.

The private key is PEM PKCS#8 (unencrypted), the public key PEM SubjectPublicKeyInfo: both say what
they are, so a corrupt or wrong file is detected rather than read as 32 arbitrary bytes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from fedadapt.config_values import expand_user
from fedadapt.errors import ConfigError
from fedadapt.privacy.envelope import public_fingerprint

PRIVATE_NAME = "server.key"
PUBLIC_NAME = "server.pub"


@dataclass(frozen=True)
class KeyFiles:
    """Where a generated key pair was written, and the public key's fingerprint."""

    private_path: Path
    public_path: Path
    fingerprint: str


def generate_server_keys(out_dir: Path) -> KeyFiles:
    """Write a new key pair to ``out_dir``; ConfigError if either file exists (keys are never overwritten)."""
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"{path} already exists: keys are never overwritten; move it away or choose another --out"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    key = X25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return KeyFiles(private_path, public_path, public_fingerprint(key.public_key()))


def load_private_key(path: Path) -> X25519PrivateKey:
    """The X25519 private key in ``path``; ConfigError if missing, corrupt or readable by group or others."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"server private key {path} does not exist: create one with `fedadapt keys generate`"
        ) from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"server private key {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}): "
            f"run `chmod 600 {path}`"
        )
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not a PEM PKCS#8 private key (corrupt or wrong file)") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, expected an X25519 private key")
    return key


def load_public_key(source: Path | str | bytes) -> X25519PublicKey:
    """An X25519 public key from a file (``Path`` or ``str``), PEM bytes or 32 raw bytes."""
    if isinstance(source, bytes | bytearray):
        data, where = bytes(source), "public key bytes"
        if len(data) == 32:
            return X25519PublicKey.from_public_bytes(data)
    else:
        path = Path(source)
        try:
            data, where = path.read_bytes(), str(path)
        except FileNotFoundError:
            raise ConfigError(f"server public key {path} does not exist") from None
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(f"{where} is not a PEM public key or 32 raw bytes (corrupt or wrong file)") from None
    if not isinstance(key, X25519PublicKey):
        raise ConfigError(f"{where} holds a {type(key).__name__}, expected an X25519 public key")
    return key


def parse_public_key(value: str) -> X25519PublicKey:
    """The server public key as given in a run config: 64 hex characters (raw key) or a PEM file's path."""
    text = value.strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return X25519PublicKey.from_public_bytes(bytes.fromhex(text))
    if not text:
        raise ConfigError("the server public key is empty: give 64 hex characters or the path of server.pub")
    return load_public_key(expand_user(text, "the server public key"))


def public_key_hex(key: X25519PublicKey) -> str:
    """The raw public key as 64 hex characters (what ``parse_public_key`` reads back)."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte (O_EXCL: never over an existing file or link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: keys are never overwritten") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have cleared bits of the public key's 0644
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
