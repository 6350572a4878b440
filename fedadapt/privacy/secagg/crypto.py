"""The cryptographic building blocks of SecAgg+: P-384 key agreement, share encryption, Shamir sharing.

Built on ``cryptography`` (ECDH, HKDF, AES-GCM) and ``pycryptodome`` (Shamir over GF(2¹²⁸)), not
on Flower's ``flwr.common.secure_aggregation`` helpers, whose modules are internal to Flower and
may change in any release. Every reader here takes untrusted bytes and raises ``ValueError`` (and
nothing else) for anything that is not what it expects; the callers turn that into SecAggError.

- Keys are P-384. Public keys travel as PEM SubjectPublicKeyInfo (what the setup signature covers);
  private keys are kept and Shamir-shared as their 48-byte big-endian scalar.
- ``shared_key``: ECDH, then HKDF-SHA256 whose ``info`` binds a purpose label and both public keys,
  so the share-encryption key and the pairwise mask seed of two nodes can never coincide.
- ``encrypt``/``decrypt``: AES-256-GCM, a random 12-byte nonce before the ciphertext and tag;
  the associated data binds what the ciphertext is for (sender and receiver of a share).
- ``split_secret``/``combine_shares``: a secret of whole 16-byte blocks plus one check block (its SHA-256),
  each block shared with pycryptodome's ``Shamir``; a share is its 4-byte little-endian index, then one
  16-byte share per block. A rebuild whose check block does not match is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CURVE = ec.SECP384R1()
SCALAR_SIZE = 48  # bytes of a P-384 private scalar
KEY_SIZE = 32  # bytes of a derived key: AES-256 for shares, an AES-256-CTR mask seed
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK = 16  # pycryptodome's Shamir shares 16-byte secrets
INDEX_SIZE = 4
MAX_PUBLIC_KEY = 4096  # bytes of a PEM public key; a P-384 one takes 215
_POINT = serialization.PublicFormat.CompressedPoint


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo: the form a public key travels and is signed in."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(raw: bytes) -> ec.EllipticCurvePublicKey:
    """A PEM P-384 public key; ValueError naming what is wrong for anything else (another curve included)."""
    if not isinstance(raw, bytes) or len(raw) > MAX_PUBLIC_KEY:
        raise ValueError("it is not a PEM public key")
    try:
        key = serialization.load_pem_public_key(raw)
    except UnsupportedAlgorithm as err:  # a curve this build of OpenSSL does not support
        raise ValueError(f"it is not a PEM public key OpenSSL can load ({err})") from None
    except (ValueError, TypeError):
        raise ValueError("it is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ValueError("it is not a P-384 key")
    return key


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private scalar, 48 bytes big-endian: what the session keeps and what is Shamir-shared."""
    return key.private_numbers().private_value.to_bytes(SCALAR_SIZE, "big")


def load_private(raw: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-384 key of a 48-byte scalar; ValueError if it is not one (wrong size, 0, or ≥ the group order)."""
    if not isinstance(raw, bytes) or len(raw) != SCALAR_SIZE:
        raise ValueError(f"a P-384 private key is a {SCALAR_SIZE}-byte scalar")
    return ec.derive_private_key(int.from_bytes(raw, "big"), CURVE)  # ValueError outside [1, n)


def shared_key(private: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey, purpose: bytes) -> bytes:
    """32 bytes both holders of a key pair agree on: ECDH, then HKDF-SHA256 bound to ``purpose`` and both keys.

    The two public keys enter ``info`` in sorted order, so both sides derive the same key.
    """
    shared = private.exchange(ec.ECDH(), public)
    points = sorted(key.public_bytes(serialization.Encoding.X962, _POINT) for key in (private.public_key(), public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=purpose + b"".join(points)).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM under a fresh random nonce: nonce ‖ ciphertext ‖ tag."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of ``encrypt``; ValueError if ``sealed`` was altered, or sealed under another key or data."""
    if not isinstance(sealed, bytes) or len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise ValueError("the ciphertext is too short to hold a nonce and a tag")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated)
    except InvalidTag:
        raise ValueError("the ciphertext does not authenticate") from None


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` shares of ``secret`` (whole 16-byte blocks), any ``threshold`` of which rebuild it."""
    if not secret or len(secret) % BLOCK:
        raise ValueError(f"a shared secret is a whole number of {BLOCK}-byte blocks, got {len(secret)} bytes")
    if not 1 <= threshold <= count < 2 ** (8 * INDEX_SIZE):
        raise ValueError(f"cannot split into {count} shares with threshold {threshold}")
    shares = [bytearray(index.to_bytes(INDEX_SIZE, "little")) for index in range(1, count + 1)]
    tagged = secret + _check_block(secret)
    for start in range(0, len(tagged), BLOCK):
        for index, share in Shamir.split(threshold, count, tagged[start : start + BLOCK], ssss=False):
            shares[index - 1] += share
    return [bytes(share) for share in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret behind ``shares`` (exactly ``threshold`` of them); ValueError if they are not shares of one size,
    or if they do not rebuild the secret they were split from.

    Shares from different secrets, altered ones, or too few of them combine into some other value; the last
    block rebuilt is a SHA-256 check of the others, which such a value matches with probability 2^-128.
    """
    if not shares or any(not isinstance(share, bytes) for share in shares):
        raise ValueError("shares must be a non-empty list of bytes")
    size = len(shares[0])
    if size <= INDEX_SIZE or (size - INDEX_SIZE) % BLOCK or any(len(share) != size for share in shares):
        raise ValueError(f"shares are a {INDEX_SIZE}-byte index and whole {BLOCK}-byte blocks, all of one size")
    indices = [int.from_bytes(share[:INDEX_SIZE], "little") for share in shares]
    if 0 in indices or len(set(indices)) != len(indices):
        raise ValueError("share indices must be distinct and nonzero")
    blocks = (
        Shamir.combine(
            [(index, share[start : start + BLOCK]) for index, share in zip(indices, shares, strict=True)], ssss=False
        )
        for start in range(INDEX_SIZE, size, BLOCK)
    )
    tagged = b"".join(blocks)
    secret, check = tagged[:-BLOCK], tagged[-BLOCK:]
    if not secret or not hmac.compare_digest(check, _check_block(secret)):
        raise ValueError("the shares do not rebuild one secret (too few, altered, or from different secrets)")
    return secret


def _check_block(secret: bytes) -> bytes:
    """One extra block shared with a secret: its SHA-256, cut to a block, so a wrong rebuild is detected.

    Shamir alone rebuilds *some* value from any threshold shares; the receiving side has nothing else
    to tell a dishonest neighbour's share (or the server's mix-up) from the real secret.
    """
    return hashlib.sha256(b"fedadapt.secagg.share-check" + secret).digest()[:BLOCK]
