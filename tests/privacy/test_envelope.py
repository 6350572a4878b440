"""Envelope (X25519 + HKDF-SHA256 + AES-256-GCM) round trips, each rejection reason, fuzzing, and server keys."""

from __future__ import annotations

import dataclasses
import os
import stat
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedadapt.cli import app
from fedadapt.errors import ConfigError
from fedadapt.privacy.envelope import (
    HEADER_SIZE,
    MAGIC,
    REASONS,
    VERSION,
    EnvelopeContext,
    EnvelopeError,
    EnvelopeOpener,
    seal,
)
from fedadapt.privacy.keys import generate_server_keys, load_private_key, load_public_key

PLAINTEXT = b"safetensors delta bytes \x00\x01\x02 " * 8
CTX = EnvelopeContext(run_id=7, server_round=3, sender_id=1234567890123, schema_id="lora-r8-abc123")


@cache
def _server() -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


@cache
def _valid() -> bytes:
    return seal(PLAINTEXT, _server().public_key(), CTX)


def _reason(blob: bytes, expected: EnvelopeContext = CTX, opener: EnvelopeOpener | None = None) -> str:
    with pytest.raises(EnvelopeError) as info:
        (opener or EnvelopeOpener(_server())).open(blob, expected)
    return info.value.reason


def _with(**changes: object) -> EnvelopeContext:
    return dataclasses.replace(CTX, **changes)  # type: ignore[arg-type]


def test_round_trip_and_fresh_randomness() -> None:
    blob = seal(PLAINTEXT, _server().public_key(), CTX)
    assert EnvelopeOpener(_server()).open(blob, CTX) == PLAINTEXT
    again = seal(PLAINTEXT, _server().public_key(), CTX)
    assert again != blob
    assert again[5:37] != blob[5:37]  # ephemeral public key
    assert again[37:49] != blob[37:49]  # nonce
    raw_public = _server().public_key().public_bytes_raw()
    assert EnvelopeOpener(_server()).open(seal(b"", raw_public, CTX), CTX) == b""


def test_tampered_ciphertext_byte() -> None:
    blob = bytearray(_valid())
    blob[-20] ^= 0x01
    assert _reason(bytes(blob)) == "tampered-or-wrong-key"
    blob = bytearray(_valid())
    blob[-1] ^= 0x80  # the tag itself
    assert _reason(bytes(blob)) == "tampered-or-wrong-key"


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (10, "tampered-or-wrong-key"),  # ephemeral public key
        (40, "tampered-or-wrong-key"),  # nonce
        (56, "wrong-run"),  # run id
        (64, "replayed"),  # round
        (72, "wrong-sender"),  # sender id
        (HEADER_SIZE, "wrong-schema"),  # first schema byte
        (HEADER_SIZE + len(CTX.schema_id), "wrong-kind"),  # first kind byte
    ],
)
def test_tampered_header_byte(offset: int, reason: str) -> None:
    blob = bytearray(_valid())
    blob[offset] ^= 0x01
    assert _reason(bytes(blob)) == reason


def test_header_claims_are_authenticated() -> None:
    """A header edited to match what the server expects still fails: every header byte is associated data."""
    blob = bytearray(_valid())
    blob[49:57] = (8).to_bytes(8, "big")  # run id: bytes 49..57 (after magic 4, version 1, key 32, nonce 12)
    assert _reason(bytes(blob), _with(run_id=8)) == "tampered-or-wrong-key"


def test_every_prefix_is_truncated_or_malformed() -> None:
    blob = _valid()
    for length in range(len(blob)):
        assert _reason(blob[:length]) == "truncated", length
    assert _reason(blob + b"\x00") == "malformed"
    assert _reason(b"XXXX" + blob[4:]) == "malformed"
    assert _reason(MAGIC + bytes([VERSION + 1]) + blob[5:]) == "malformed"
    assert _reason("not bytes") == "malformed"  # type: ignore[arg-type]


def test_wrong_key() -> None:
    blob = seal(PLAINTEXT, X25519PrivateKey.generate().public_key(), CTX)
    error_reason = _reason(blob)
    assert error_reason == "tampered-or-wrong-key"


@pytest.mark.parametrize(
    ("expected", "reason"),
    [
        (_with(run_id=8), "wrong-run"),
        (_with(server_round=4), "replayed"),
        (_with(server_round=2), "replayed"),
        (_with(sender_id=99), "wrong-sender"),
        (_with(schema_id="lora-r16-def456"), "wrong-schema"),
        (_with(kind="metrics"), "wrong-kind"),
    ],
)
def test_context_mismatch(expected: EnvelopeContext, reason: str) -> None:
    assert _reason(_valid(), expected) == reason


def test_duplicate_and_new_round() -> None:
    opener = EnvelopeOpener(_server())
    first = seal(PLAINTEXT, _server().public_key(), CTX)
    assert opener.open(first, CTX) == PLAINTEXT
    assert _reason(first, opener=opener) == "duplicate"
    assert _reason(seal(b"other delta", _server().public_key(), CTX), opener=opener) == "duplicate"
    other_sender = _with(sender_id=5)
    assert opener.open(seal(PLAINTEXT, _server().public_key(), other_sender), other_sender) == PLAINTEXT
    other_kind = _with(kind="secagg-masked")  # one envelope per stage: SecAgg+ sends four per round
    assert opener.open(seal(PLAINTEXT, _server().public_key(), other_kind), other_kind) == PLAINTEXT
    assert _reason(seal(PLAINTEXT, _server().public_key(), other_kind), other_kind, opener=opener) == "duplicate"

    opener.start_round(4)
    next_round = _with(server_round=4)
    assert opener.open(seal(PLAINTEXT, _server().public_key(), next_round), next_round) == PLAINTEXT
    assert opener._accepted == {(7, 4, CTX.sender_id, CTX.kind)}  # round 3 forgotten: memory stays bounded
    fresh_old = seal(PLAINTEXT, _server().public_key(), _with(sender_id=6))
    assert _reason(fresh_old, _with(sender_id=6), opener=opener) == "replayed"  # round 3 is closed


def test_failed_open_does_not_use_up_the_slot() -> None:
    opener = EnvelopeOpener(_server())
    blob = bytearray(_valid())
    blob[-3] ^= 0xFF
    assert _reason(bytes(blob), opener=opener) == "tampered-or-wrong-key"
    assert opener.open(_valid(), CTX) == PLAINTEXT


def test_errors_hold_no_secrets() -> None:
    secret = b"SECRET-DELTA-" * 4
    private_raw = _server().private_bytes_raw()
    blob = bytearray(seal(secret, _server().public_key(), CTX))
    blob[-5] ^= 1
    errors = []
    for payload, expected in [(bytes(blob), CTX), (_valid(), _with(run_id=1)), (_valid()[:50], CTX)]:
        with pytest.raises(EnvelopeError) as info:
            EnvelopeOpener(_server()).open(payload, expected)
        errors.append(info.value)
    for error in errors:
        text = str(error) + repr(error)
        for needle in (secret.decode(), private_raw.hex(), repr(private_raw), PLAINTEXT.decode(errors="replace")[:20]):
            assert needle not in text
        assert error.__cause__ is None


def test_context_validation() -> None:
    with pytest.raises(ValueError, match="run_id"):
        EnvelopeContext(-1, 0, 0, "s")
    with pytest.raises(ValueError, match="schema_id"):
        EnvelopeContext(0, 0, 0, "")
    with pytest.raises(ValueError, match="public key"):
        seal(b"x", b"short", CTX)


# --- fuzzing: only EnvelopeError, and success only for the unmodified envelope ------------------------------------

_FUZZ = settings(max_examples=5_000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _open_or_error(blob: bytes) -> bytes | None:
    try:
        return EnvelopeOpener(_server()).open(blob, CTX)
    except EnvelopeError as err:
        assert err.reason in REASONS and err.reason != "duplicate"  # a fresh opener has seen no sender yet
        return None


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    blob = bytearray(_valid())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]))
        at = draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[at] ^= draw(st.integers(1, 255))
        elif op == "set" and blob:
            chunk = draw(st.binary(min_size=1, max_size=16))
            blob[at : at + len(chunk)] = chunk[: len(blob) - at]
        elif op == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del blob[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del blob[at:]
        else:
            blob += draw(st.binary(min_size=1, max_size=16))
    return bytes(blob)


@_FUZZ
@given(_mutated())
def test_fuzz_mutated_envelopes(blob: bytes) -> None:
    result = _open_or_error(blob)
    assert (result is not None) == (blob == _valid())
    if result is not None:
        assert result == PLAINTEXT


_random_bytes = st.one_of(
    st.binary(max_size=256),
    st.binary(min_size=HEADER_SIZE - 5, max_size=300).map(lambda tail: MAGIC + bytes([VERSION]) + tail),
)


@_FUZZ
@given(_random_bytes)
def test_fuzz_random_bytes(blob: bytes) -> None:
    assert _open_or_error(blob) is None


# --- server keys -------------------------------------------------------------------------------------------------


def test_generate_save_load(tmp_path: Path) -> None:
    files = generate_server_keys(tmp_path / "keys")
    assert stat.S_IMODE(files.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.public_path.stat().st_mode) == 0o644
    private = load_private_key(files.private_path)
    public = load_public_key(files.public_path)
    assert public.public_bytes_raw() == private.public_key().public_bytes_raw()
    assert load_public_key(public.public_bytes_raw()).public_bytes_raw() == public.public_bytes_raw()
    assert load_public_key(str(files.public_path)).public_bytes_raw() == public.public_bytes_raw()
    blob = seal(PLAINTEXT, public, CTX)
    assert EnvelopeOpener(private).open(blob, CTX) == PLAINTEXT
    assert len(files.fingerprint) == 16


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    files = generate_server_keys(tmp_path)
    before = files.private_path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_server_keys(tmp_path)
    assert files.private_path.read_bytes() == before
    files.public_path.unlink()
    with pytest.raises(ConfigError, match="already exists"):
        generate_server_keys(tmp_path)  # the private key alone also blocks generation
    assert files.private_path.read_bytes() == before


def test_readable_private_key_is_refused(tmp_path: Path) -> None:
    files = generate_server_keys(tmp_path)
    os.chmod(files.private_path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(files.private_path)


def test_corrupt_and_missing_key_files(tmp_path: Path) -> None:
    files = generate_server_keys(tmp_path)
    files.private_path.chmod(0o600)
    files.private_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM PKCS#8 private key"):
        load_private_key(files.private_path)
    files.public_path.write_bytes(b"nonsense")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(files.public_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")


def test_cli_keys_generate(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    private = load_private_key(tmp_path / "server.key")
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    body = "".join(pem.splitlines()[1:-1])
    assert body not in result.output and "PRIVATE KEY-----" not in result.output
    assert private.private_bytes_raw().hex() not in result.output
    assert "fingerprint:" in result.output and "server.pub" in result.output

    again = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path)])
    assert again.exit_code == 2
    assert "already exists" in again.output


def test_low_order_ephemeral_key_and_absurd_lengths() -> None:
    blob = bytearray(_valid())
    blob[5:37] = bytes(32)  # the all-zero point gives an all-zero shared secret, which X25519 refuses
    assert _reason(bytes(blob)) == "tampered-or-wrong-key"
    blob = bytearray(_valid())
    blob[76:84] = (2**64 - 1).to_bytes(8, "big")  # ciphertext length
    assert _reason(bytes(blob)) == "truncated"
