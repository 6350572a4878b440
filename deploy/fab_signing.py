"""The server signs the FAB it runs; devices run only FABs signed by an identity they trust.

Flower 1.41's format (``flwr app review`` signs, ``flower-supernode --trusted-entities`` verifies in
``supernode/start_client_internal.py::_verify_fab``): an ed25519 signature over the 8-byte big-endian
``signed_at`` timestamp followed by the FAB's SHA-256 digest, stored in the FAB's ``verifications``
as ``{key id: '{"signature": base64url, "signed_at": int}'}``. Open-source Flower attaches such
records only to Flower Hub apps, so ``deploy/gateway.py`` attaches this one to the FAB devices fetch.

The message is built here (``message_to_sign``), not taken from Flower's internal
``flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign``: it is two lines, and the
format is fixed by what SuperNodes verify; tests/deploy/test_fab_signing.py pins it to a recorded
signature and tests/deploy/test_gateway.py checks it against a SuperNode's own verifier.

The FAB is built as ``flwr run <project>`` builds it (``flwr.cli.build.build_fab_from_disk``: sorted
files, fixed zip dates). ``fedadapt serve`` unpacks it and runs ``flwr run`` on the unpacked files,
which rebuild the same bytes: the FAB that runs is the FAB signed here, whatever happens to the
checkout meanwhile (a FAB that differed would be refused by the devices: it fails closed).
``flwr.cli`` is the one Flower module outside its public API that production code imports (the
import contracts in pyproject.toml name it): the signature covers exact bytes, and this is the
function ``flwr run`` itself calls, so the signed FAB matches by construction. The public
``flwr build`` command writes the same bytes but also insists that the checkout's folder name be a
valid app name; copying the build (include/exclude patterns, zip layout) would drift silently. If
Flower moves it, ``fedadapt serve`` fails at this import, loudly, before anything is signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_private_key

from deploy.certs import identity_key_id
from fedadapt.errors import ConfigError


def load_identity(path: Path) -> ed25519.Ed25519PrivateKey:
    """The server's ed25519 identity key (OpenSSH private format); ConfigError if missing or not ed25519."""
    try:
        key = load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the server identity key {path}: {err}") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an ed25519 key")
    return key


def build_fab(project: Path) -> bytes:
    """The FAB ``flwr run <project>`` submits, byte for byte."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(project)


def message_to_sign(fab: bytes, signed_at: int) -> bytes:
    """What a SuperNode checks the signature against: ``signed_at`` as 8 bytes big-endian, then SHA-256(fab)."""
    return signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()


def sign_fab(fab: bytes, key: ed25519.Ed25519PrivateKey, signed_at: int | None = None) -> dict[str, str]:
    """The ``verifications`` records of ``fab`` signed by ``key``: ``{key id: record}``."""
    when = int(time.time()) if signed_at is None else signed_at
    signature = key.sign(message_to_sign(fab, when))
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    record = {"signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"), "signed_at": when}
    return {identity_key_id(public): json.dumps(record)}


def write_verifications(fab: bytes, key: ed25519.Ed25519PrivateKey, path: Path) -> str:
    """Sign ``fab`` and write ``{sha256: records}`` for the gateway to ``path``; returns the FAB's hash."""
    digest = hashlib.sha256(fab).hexdigest()
    Path(path).write_text(json.dumps({digest: sign_fab(fab, key)}), encoding="utf-8")
    return digest
