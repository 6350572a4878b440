"""The FAB signature format, pinned: deploy.fab_signing builds the signed message itself (no flwr internals).

The golden values were computed once with Flower 1.41 and checked then against its own
``flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign``; ed25519 signatures are
deterministic, so the whole record is fixed. tests/deploy/test_gateway.py checks records against a
SuperNode's own verifier (``_verify_fab``) and end to end.
"""

from __future__ import annotations

import hashlib
import json

from cryptography.hazmat.primitives.asymmetric import ed25519

from deploy import fab_signing

_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_FAB = b"PK fedadapt golden FAB"
_SIGNED_AT = 1_700_000_000
_MESSAGE = "000000006553f100dd499b566fd94769b4d8fe2e3140769cd3d0340f364bd74ad18019f34461b1fd"
_RECORDS = {
    "fedadapt-server-c5f713621619ebea": json.dumps(
        {
            "signature": "ek5C-B22XT8EjFJ4l5rrKjRmYsbcRGFKaKyeSpDavqCOOoznUhjry1IXO8Mq49nGGTrfzYk5FdxEY2eEvdXnAA",
            "signed_at": _SIGNED_AT,
        }
    )
}


def test_the_signed_message_is_the_big_endian_timestamp_then_the_fab_digest() -> None:
    message = fab_signing.message_to_sign(_FAB, _SIGNED_AT)
    assert message.hex() == _MESSAGE
    assert message == _SIGNED_AT.to_bytes(8, "big") + hashlib.sha256(_FAB).digest()
    assert fab_signing.message_to_sign(_FAB, 0)[:8] == bytes(8)


def test_the_verification_record_matches_the_recorded_one_byte_for_byte() -> None:
    assert fab_signing.sign_fab(_FAB, _KEY, _SIGNED_AT) == _RECORDS
    assert fab_signing.sign_fab(_FAB + b" ", _KEY, _SIGNED_AT) != _RECORDS
    assert fab_signing.sign_fab(_FAB, _KEY, _SIGNED_AT + 1) != _RECORDS
