"""Names that are part of a format, not of the code: they travel on the wire, sit in files on devices and
servers, or enter key derivation. Renaming a module must never rename them (the stage restructure once did:
every device's saved personal part stopped loading, and old and new peers could not finish a round)."""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from fedadapt.delta import serialize
from fedadapt.delta.state import AdapterSchema, TensorSpec
from fedadapt.privacy.secagg import client, crypto, identity


def test_the_delta_format_name_is_the_one_devices_have_on_disk() -> None:
    assert serialize.FORMAT == "fedadapt.state.v1"
    spec = TensorSpec("w", (2,), "float32", "shared", "adapter")
    schema = AdapterSchema(method={"name": "lora"}, backbone_fingerprint="0" * 64, tensors=(spec,))
    blob = serialize.serialize_state({"w": torch.zeros(2)}, schema, "shared")
    header_length = struct.unpack("<Q", blob[:8])[0]
    metadata = json.loads(blob[8 : 8 + header_length])["__metadata__"]
    assert "fedadapt.state.v1" in metadata.values()


def test_secagg_key_derivation_labels_are_unchanged() -> None:
    assert client._SHARE_PURPOSE == b"fedadapt.secagg.share-encryption.v1\0"
    assert client._MASK_PURPOSE == b"fedadapt.secagg.pair-mask.v1\0"
    assert client._SHARE_DOMAIN == b"fedadapt.secagg.share.v1\0"
    assert identity._SETUP_DOMAIN == b"fedadapt.secagg.setup-keys.v1\0"
    assert identity._SURVIVORS_DOMAIN == b"fedadapt.secagg.survivors.v1\0"
    # the share check block: SHA-256 over this label and the secret, cut to one block
    secret = bytes(range(32))
    expected = hashlib.sha256(b"fedadapt.secagg.share-check" + secret).digest()[: crypto.BLOCK]
    assert crypto._check_block(secret) == expected
