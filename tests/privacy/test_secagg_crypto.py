"""SecAgg+'s building blocks (privacy.secagg.crypto, masking.quantize): shares rebuild, ciphertexts authenticate."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_secagg import ROUND, expect_refusal, run_round, secagg

from fedadapt.privacy.secagg import client, crypto, masking, stages, wire

_P384_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973


# --- Shamir ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "count", "size"), [(2, 3, 32), (3, 5, 48), (1, 2, 16), (4, 4, 64)])
def test_every_threshold_subset_of_shares_rebuilds_the_secret(threshold: int, count: int, size: int) -> None:
    secret = os.urandom(size)
    shares = crypto.split_secret(secret, threshold, count)
    assert len(shares) == count
    assert all(len(share) == crypto.INDEX_SIZE + size + crypto.BLOCK for share in shares)  # + the check block
    for subset in itertools.combinations(shares, threshold):
        assert crypto.combine_shares(list(subset)) == secret


def test_too_few_mixed_or_altered_shares_are_refused_not_rebuilt_into_another_secret() -> None:
    """Shamir rebuilds some value from any shares; the check block makes every wrong rebuild a ValueError."""
    secret = os.urandom(32)
    shares = crypto.split_secret(secret, 3, 5)
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(ValueError, match="do not rebuild one secret"):
            crypto.combine_shares(list(subset))
    # two splits of one secret are independent: mixing them does not rebuild it
    other = crypto.split_secret(secret, 2, 3)
    with pytest.raises(ValueError, match="do not rebuild one secret"):
        crypto.combine_shares([shares[0], other[1]])
    altered = bytearray(shares[2])
    altered[-1] ^= 1  # a dishonest neighbour's share: one bit off
    with pytest.raises(ValueError, match="do not rebuild one secret"):
        crypto.combine_shares([shares[0], shares[1], bytes(altered)])


def test_shares_carry_no_block_of_the_secret_in_clear() -> None:
    secret = bytes(range(32))
    for share in crypto.split_secret(secret, 2, 3):
        assert secret[:16] not in share and secret[16:] not in share


@pytest.mark.parametrize(
    ("shares", "words"),
    [
        ([], "non-empty list of bytes"),
        ([b"\x01\x00\x00\x00" + bytes(16), b"\x02\x00\x00\x00" + bytes(32)], "all of one size"),
        ([b"\x01\x00\x00\x00" + bytes(15)], "whole 16-byte blocks"),
        ([b"\x01\x00\x00"], "whole 16-byte blocks"),
        ([b"\x01\x00\x00\x00" + bytes(16)] * 2, "distinct"),
        ([b"\x00\x00\x00\x00" + bytes(16), b"\x01\x00\x00\x00" + bytes(16)], "nonzero"),
        (["not bytes"], "non-empty list of bytes"),
    ],
)
def test_combine_refuses_malformed_shares_with_a_value_error(shares: list[bytes], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        crypto.combine_shares(shares)


@pytest.mark.parametrize(("secret", "threshold", "count"), [(b"", 2, 3), (bytes(20), 2, 3), (bytes(16), 4, 3)])
def test_split_refuses_what_it_cannot_share(secret: bytes, threshold: int, count: int) -> None:
    with pytest.raises(ValueError):
        crypto.split_secret(secret, threshold, count)


# --- keys and key agreement --------------------------------------------------------------------------------------


def test_private_keys_round_trip_as_48_byte_scalars_and_refuse_out_of_range_ones() -> None:
    key = crypto.generate_private_key()
    raw = crypto.private_bytes(key)
    assert len(raw) == crypto.SCALAR_SIZE
    assert crypto.private_bytes(crypto.load_private(raw)) == raw
    for bad in (bytes(48), _P384_N.to_bytes(48, "big"), b"\xff" * 48, raw[:-1], raw + b"\x00"):
        with pytest.raises(ValueError):
            crypto.load_private(bad)


def test_public_keys_must_be_pem_p384() -> None:
    key = crypto.generate_private_key().public_key()
    assert crypto.load_public(crypto.public_bytes(key)) == key
    p256 = crypto.public_bytes(ec.generate_private_key(ec.SECP256R1()).public_key())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a P-384 key"):
        crypto.load_public(p256)
    for bad in (b"", b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", b"A" * 5000):
        with pytest.raises(ValueError, match="not a PEM public key"):
            crypto.load_public(bad)


def test_shared_keys_agree_across_the_pair_and_differ_by_purpose_and_pair() -> None:
    a, b, c = (crypto.generate_private_key() for _ in range(3))
    ab = crypto.shared_key(a, b.public_key(), b"one")
    assert ab == crypto.shared_key(b, a.public_key(), b"one")
    assert len(ab) == crypto.KEY_SIZE
    assert ab != crypto.shared_key(a, b.public_key(), b"two")
    assert ab != crypto.shared_key(a, c.public_key(), b"one")


# --- authenticated encryption ------------------------------------------------------------------------------------


def test_a_sealed_share_opens_only_unchanged_under_its_key_and_associated_data() -> None:
    key, other_key = os.urandom(32), os.urandom(32)
    sealed = crypto.encrypt(key, b"share pair", b"from 1 to 2")
    assert crypto.decrypt(key, sealed, b"from 1 to 2") == b"share pair"
    assert crypto.encrypt(key, b"share pair", b"from 1 to 2") != sealed  # a fresh nonce each time
    for position in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[position] ^= 0x01
        with pytest.raises(ValueError, match="does not authenticate"):
            crypto.decrypt(key, bytes(flipped), b"from 1 to 2")
    for bad_key, data, blob in [
        (other_key, b"from 1 to 2", sealed),
        (key, b"from 2 to 1", sealed),
        (key, b"from 1 to 2", sealed[:-1]),
    ]:
        with pytest.raises(ValueError, match="does not authenticate"):
            crypto.decrypt(bad_key, blob, data)
    with pytest.raises(ValueError, match="too short"):
        crypto.decrypt(key, sealed[:20], b"from 1 to 2")


def test_a_share_reflected_back_to_its_sender_is_refused() -> None:
    """ECDH is symmetric: the key node A uses to encrypt for B also opens B's shares to A. The server hands
    A its own share for B, labelled as coming from B; only the sender/receiver binding refuses it."""
    trace = run_round(3, 20, stop_before=stages.MASKED)
    node = trace.nodes[0]
    own = wire.unpack(trace.replies[stages.SHARE_KEYS][node])
    forwarded = wire.unpack(trace.requests[stages.MASKED][node])
    neighbour = stages.node_of(sorted(forwarded)[0], stages.SHARE)
    assert neighbour is not None
    reflected = forwarded | {stages.share_name(neighbour): own[stages.share_name(neighbour)]}
    expect_refusal(
        lambda: client.receive_shares(trace.config, ROUND, trace.sessions[node], wire.pack(reflected)),
        f"node {neighbour}",
    )


# --- quantization ------------------------------------------------------------------------------------------------


def test_stochastic_quantization_is_unbiased_and_within_one_level() -> None:
    config = secagg(clipping_range=1.0, quantization_range=10)
    values = np.full(20_000, 0.33)  # 6.65 levels: 6 or 7, 7 with probability 0.65
    np.random.seed(1)
    levels = masking.quantize(values, config)
    assert set(np.unique(levels)) == {6, 7}
    assert abs(levels.mean() - 6.65) < 0.02
    assert abs(float(masking.dequantize(np.array([levels.mean()]), config)[0]) - 0.33) < 0.005
    edges = masking.quantize(np.array([-5.0, -1.0, 0.0, 1.0, 5.0]), config)
    assert list(edges) == [0, 0, 5, 10, 10]
