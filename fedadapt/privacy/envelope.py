"""Authenticated encryption of one payload (a serialized delta) from a client to the server.

The suite is X25519 + HKDF-SHA256 + AES-256-GCM, ECIES-style: for every message the sender makes an
ephemeral X25519 key pair, agrees a secret with the server's long-term X25519 public key, derives a
32-byte key with HKDF-SHA256 (``info`` binds the suite label and both public keys) and seals the
payload with AES-256-GCM under a fresh random 12-byte nonce. The whole header — magic, version,
ephemeral key, nonce, run id, round, sender id, schema id, kind and ciphertext length — is the
associated data, so no header byte can change without the tag failing; the receiver still checks
each field against what it expects, to say precisely what mismatched. An ephemeral key per message
means a leaked client key exposes nothing, and one message's key opens no other. This protects a
delta in transit (confidentiality and integrity, bound to run, round, sender and schema); it does
not authenticate the sender — anyone holding the server's public key can seal — so who sent it
rests on Flower's node identity, and it does not hide the delta from the server (that needs masked
aggregation). Flower's own secure-aggregation helpers use ECDH on P-384 with Fernet; this is a
different suite, for a different path (every payload, one hop to the server), built only from
``cryptography``'s primitives.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from typing import Literal, get_args

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedadapt.errors import EnvelopeError

Reason = Literal[
    "truncated",
    "malformed",
    "wrong-run",
    "replayed",
    "wrong-sender",
    "wrong-schema",
    "wrong-kind",
    "duplicate",
    "tampered-or-wrong-key",
]
REASONS: tuple[Reason, ...] = get_args(Reason)

MAGIC = b"FAEN"
VERSION = 1
SUITE_LABEL = b"fedadapt/envelope/v1:x25519-hkdf-sha256-aes256gcm"
# magic, version, ephemeral public key, nonce, run id, round, sender id, len(schema), len(kind), len(ciphertext)
_HEADER = struct.Struct(">4sB32s12sQQQHBQ")
HEADER_SIZE = _HEADER.size  # 84 bytes, followed by the schema id, the kind, then ciphertext + 16-byte tag
_KEY_SIZE = 32
_NONCE_SIZE = 12
_TAG_SIZE = 16
TAG_SIZE = _TAG_SIZE  # bytes of the AES-GCM tag after the ciphertext
_U64 = 2**64
_SHOWN = 80  # characters of a received (untrusted) string quoted in an error message


@dataclass(frozen=True)
class EnvelopeContext:
    """What an envelope is bound to: the run, the round, the sending node, the adapter schema and its kind."""

    run_id: int
    server_round: int
    sender_id: int
    schema_id: str
    kind: str = "delta"

    def __post_init__(self) -> None:
        for name in ("run_id", "server_round", "sender_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U64:
                raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}")
        if not isinstance(self.schema_id, str) or not 0 < len(self.schema_id.encode()) <= 0xFFFF:
            raise ValueError(f"schema_id must be a non-empty str of at most 65535 UTF-8 bytes, got {self.schema_id!r}")
        if not isinstance(self.kind, str) or not 0 < len(self.kind.encode()) <= 0xFF:
            raise ValueError(f"kind must be a non-empty str of at most 255 UTF-8 bytes, got {self.kind!r}")


def public_fingerprint(public_key: X25519PublicKey | bytes) -> str:
    """First 16 hex characters of SHA-256 over the raw 32-byte public key: safe to print and compare."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def seal(plaintext: bytes, receiver_public: X25519PublicKey | bytes, context: EnvelopeContext) -> bytes:
    """Encrypt and authenticate ``plaintext`` for the holder of ``receiver_public``, bound to ``context``."""
    receiver_raw = _raw_public(receiver_public)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = _raw_public(ephemeral.public_key())
    nonce = os.urandom(_NONCE_SIZE)
    schema, kind = context.schema_id.encode(), context.kind.encode()
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        ephemeral_raw,
        nonce,
        context.run_id,
        context.server_round,
        context.sender_id,
        len(schema),
        len(kind),
        len(plaintext) + _TAG_SIZE,
    )
    aad = header + schema + kind
    key = _derive_key(ephemeral.exchange(X25519PublicKey.from_public_bytes(receiver_raw)), ephemeral_raw, receiver_raw)
    return aad + AESGCM(key).encrypt(nonce, bytes(plaintext), aad)


@dataclass(frozen=True)
class _Parsed:
    aad: bytes
    ephemeral: bytes
    nonce: bytes
    context: EnvelopeContext
    ciphertext: bytes


class EnvelopeOpener:
    """The server's side: holds its private key and which (run, round, sender, kind) it has accepted.

    Call ``start_round`` when a round begins: it forgets earlier rounds (memory stays bounded) and
    closes them, so an envelope for an earlier round is then rejected as replayed.
    """

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private = private_key
        self._public_raw = _raw_public(private_key.public_key())
        self._accepted: set[tuple[int, int, int, str]] = set()
        self._first_open_round = 0
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """Fingerprint of this opener's public key (see ``public_fingerprint``)."""
        return public_fingerprint(self._public_raw)

    def start_round(self, server_round: int) -> None:
        """Forget and close every round before ``server_round``."""
        with self._lock:
            self._first_open_round = max(self._first_open_round, server_round)
            self._accepted = {key for key in self._accepted if key[1] >= server_round}

    def open(self, blob: bytes, expected: EnvelopeContext) -> bytes:
        """The plaintext of ``blob`` if it is intact, for this key and matches ``expected``; else EnvelopeError."""
        parsed = _parse(blob)
        _check_context(parsed.context, expected)
        slot = (expected.run_id, expected.server_round, expected.sender_id, expected.kind)
        with self._lock:
            if expected.server_round < self._first_open_round:
                raise EnvelopeError(
                    "replayed",
                    f"envelope is for round {expected.server_round}, which is closed "
                    f"(this server started round {self._first_open_round})",
                )
            if slot in self._accepted:
                raise EnvelopeError(
                    "duplicate",
                    f"sender {expected.sender_id} already delivered a {expected.kind!r} envelope in round "
                    f"{expected.server_round} of run {expected.run_id}: one per sender, round and kind is accepted",
                )
            plaintext = self._decrypt(parsed)
            self._accepted.add(slot)
        return plaintext

    def _decrypt(self, parsed: _Parsed) -> bytes:
        failed = EnvelopeError(
            "tampered-or-wrong-key",
            f"envelope from sender {parsed.context.sender_id} in round {parsed.context.server_round} failed "
            "authentication (AES-GCM tag): it was altered in transit or sealed for a different server key, "
            f"which cannot be told apart; check the client uses the public key with fingerprint {self.fingerprint}",
        )
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(parsed.ephemeral))
        except ValueError:  # a low-order ephemeral point gives an all-zero secret, which cryptography refuses
            raise failed from None
        key = _derive_key(shared, parsed.ephemeral, self._public_raw)
        try:
            return AESGCM(key).decrypt(parsed.nonce, parsed.ciphertext, parsed.aad)
        except InvalidTag:
            raise failed from None


def _raw_public(public_key: X25519PublicKey | bytes) -> bytes:
    if isinstance(public_key, X25519PublicKey):
        return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    if isinstance(public_key, bytes | bytearray) and len(public_key) == _KEY_SIZE:
        return bytes(public_key)
    raise ValueError(f"public key must be an X25519PublicKey or {_KEY_SIZE} raw bytes, got {type(public_key).__name__}")


def _derive_key(shared: bytes, ephemeral_raw: bytes, receiver_raw: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=None, info=SUITE_LABEL + ephemeral_raw + receiver_raw)
    return hkdf.derive(shared)


def _parse(blob: bytes) -> _Parsed:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise EnvelopeError("malformed", f"envelope must be bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if len(data) >= len(MAGIC) and data[: len(MAGIC)] != MAGIC:
        raise EnvelopeError("malformed", "not a fedadapt envelope: its first 4 bytes are not the magic 'FAEN'")
    if len(data) > len(MAGIC) and data[len(MAGIC)] != VERSION:
        raise EnvelopeError("malformed", f"envelope version {data[len(MAGIC)]} is not supported (expected {VERSION})")
    if len(data) < HEADER_SIZE:
        raise EnvelopeError(
            "truncated", f"envelope is truncated: {len(data)} bytes, its header alone needs {HEADER_SIZE}"
        )
    _, _, ephemeral, nonce, run_id, server_round, sender_id, schema_len, kind_len, ct_len = _HEADER.unpack_from(data)
    total = HEADER_SIZE + schema_len + kind_len + ct_len
    if len(data) < total:
        raise EnvelopeError("truncated", f"envelope is truncated: {len(data)} bytes, its header announces {total}")
    if len(data) > total:
        raise EnvelopeError(
            "malformed", f"envelope has {len(data) - total} bytes after the {total} its header announces"
        )
    if ct_len < _TAG_SIZE or schema_len == 0 or kind_len == 0:
        raise EnvelopeError("malformed", "envelope header has an empty schema id, kind or authentication tag")
    aad_end = HEADER_SIZE + schema_len + kind_len
    try:
        schema_id = data[HEADER_SIZE : HEADER_SIZE + schema_len].decode()
        kind = data[HEADER_SIZE + schema_len : aad_end].decode()
    except UnicodeDecodeError:
        raise EnvelopeError("malformed", "envelope's schema id or kind is not UTF-8") from None
    context = EnvelopeContext(run_id, server_round, sender_id, schema_id, kind)
    return _Parsed(data[:aad_end], ephemeral, nonce, context, data[aad_end:])


def _check_context(got: EnvelopeContext, expected: EnvelopeContext) -> None:
    if got.run_id != expected.run_id:
        raise EnvelopeError("wrong-run", f"envelope is for run {got.run_id}, this server runs {expected.run_id}")
    if got.server_round != expected.server_round:
        raise EnvelopeError(
            "replayed",
            f"envelope was sealed for round {got.server_round}, the current round is {expected.server_round}",
        )
    if got.sender_id != expected.sender_id:
        raise EnvelopeError(
            "wrong-sender",
            f"envelope names sender {got.sender_id} but arrived from node {expected.sender_id}: "
            "an envelope cannot be relayed by another node",
        )
    if got.schema_id != expected.schema_id:
        raise EnvelopeError(
            "wrong-schema",
            f"envelope was sealed for adapter schema {got.schema_id[:_SHOWN]!r}, this server's is "
            f"{expected.schema_id!r}: client and server must use the same method, config and backbone",
        )
    if got.kind != expected.kind:
        raise EnvelopeError("wrong-kind", f"envelope holds a {got.kind[:_SHOWN]!r}, expected a {expected.kind!r}")
