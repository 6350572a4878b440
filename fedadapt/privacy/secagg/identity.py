"""Device identities for SecAgg+: ECDSA P-384 keys in OpenSSH format, a roster of trusted ones, signatures.

A device signs with the same key its SuperNode authenticates with. Each client holds a
*roster* (the devices' ``.pub`` files concatenated, given out of band), so a server cannot
introduce a key of its own as a neighbour. What is signed: in ``setup`` the client's two fresh
public keys (bound to run, round and node id), in the consistency stage the round's survivor
set (Bell et al., CCS 2020, round "ConsistencyCheck"). Messages are domain-separated and
length-prefixed, so a signature over one can never verify as the other.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedadapt.errors import ConfigError, SecAggError
from fedadapt.privacy.secagg import wire

_SETUP_DOMAIN = b"fedadapt.secagg.setup-keys.v1\0"
_SURVIVORS_DOMAIN = b"fedadapt.secagg.survivors.v1\0"
_SIGNATURE = ec.ECDSA(hashes.SHA384())
MAX_KEY_LINE = 4096  # bytes of one OpenSSH public key line; a P-384 key takes about 200
MAX_SIGNATURE = 256  # DER ECDSA P-384 signatures are at most 104 bytes


@dataclass(frozen=True)
class Identity:
    """A device's signing key for one run and the roster of identity keys it accepts from neighbours."""

    run_id: int
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    roster: frozenset[bytes] = field(repr=False)

    @property
    def public_key(self) -> bytes:
        return openssh_public(self.private_key.public_key())


def load_identity(key_path: Path, roster_path: Path, run_id: int) -> Identity:
    """The device's identity from its OpenSSH private key file and its roster file; ConfigError if unusable."""
    return Identity(run_id, load_private_key(key_path), load_roster(roster_path))


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An OpenSSH-format ECDSA P-384 private key (unencrypted), as ``ssh-keygen -t ecdsa -b 384`` writes it."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except OSError as err:
        raise ConfigError(f"cannot read the device identity key {path}: {err.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path} is not an unencrypted OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ConfigError(f"{path} is not an ECDSA P-384 key: make one with `ssh-keygen -t ecdsa -b 384`")
    return key


def load_roster(path: Path) -> frozenset[bytes]:
    """The identity keys in a roster file: OpenSSH public keys, one per line (``#`` comments, blank lines ignored)."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read the device roster {path}: {err.strerror}") from None
    keys = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        try:
            keys.add(normalize_public(line))
        except SecAggError as err:
            raise ConfigError(f"{path}, line {number}: {err}") from None
    if not keys:
        raise ConfigError(f"the device roster {path} holds no public keys")
    return frozenset(keys)


def generate_private_key(path: Path) -> bytes:
    """Write a fresh P-384 identity key to ``path`` (OpenSSH format, mode 0600); its public line."""
    key = ec.generate_private_key(ec.SECP384R1())
    raw = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(raw)
    os.chmod(path, 0o600)  # also when the file was already there with wider permissions
    return openssh_public(key.public_key())


def openssh_public(key: ec.EllipticCurvePublicKey) -> bytes:
    """``ecdsa-sha2-nistp384 AAAA...``: the canonical form compared against the roster (no comment)."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def parse_public(raw: bytes) -> ec.EllipticCurvePublicKey:
    """An OpenSSH ECDSA P-384 public key; SecAggError (never another exception) for anything else."""
    if not isinstance(raw, bytes) or len(raw) > MAX_KEY_LINE:
        raise SecAggError("an identity key must be one OpenSSH public key line")
    try:
        key = serialization.load_ssh_public_key(raw.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm, IndexError, struct.error):
        raise SecAggError("an identity key is not a readable OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SecAggError("an identity key is not an ECDSA P-384 key")
    return key


def normalize_public(raw: bytes) -> bytes:
    """The canonical OpenSSH form of an identity public key (a line with or without a comment)."""
    return openssh_public(parse_public(raw))


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return key.sign(message, _SIGNATURE)


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid signature of ``message`` by the OpenSSH key ``public_key``."""
    if not isinstance(signature, bytes) or len(signature) > MAX_SIGNATURE:
        return False
    try:
        parse_public(public_key).verify(signature, message, _SIGNATURE)
    except (SecAggError, InvalidSignature, ValueError):
        return False
    return True


def setup_message(run_id: int, server_round: int, node: int, encryption_key: bytes, mask_key: bytes) -> bytes:
    """What a client signs in ``setup``: its two fresh public keys for this run, round and node."""
    return _SETUP_DOMAIN + _ints(run_id, server_round, node) + _framed(encryption_key) + _framed(mask_key)


def survivors_message(run_id: int, server_round: int, survivors: Iterable[int]) -> bytes:
    """What a client signs in the consistency stage: the round's survivor set (sorted)."""
    ordered = sorted(survivors)
    return _SURVIVORS_DOMAIN + _ints(run_id, server_round, len(ordered), *ordered)


def _ints(*values: int) -> bytes:
    checked = [wire.uint64(value, "a signed value", SecAggError) for value in values]
    return struct.pack(f"<{len(checked)}Q", *checked)


def _framed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + bytes(data)
