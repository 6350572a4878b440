"""What a client payload becomes on the wire under the scenario's privacy mode, on both ends.

In mode ``none`` payloads pass through unchanged. Otherwise the client seals each one to the
server's public key (``fedadapt.privacy.envelope``), bound to the run, the round, its own node id, the
adapter schema and the payload kind; the server opens it against the node id Flower reports as
the message's source. In simulation that id is assigned by Flower's engine and nobody
authenticates it; in deployment SuperNode authentication vouches for it (docs/privacy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from fedadapt.errors import ConfigError, EnvelopeError, PayloadError
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.envelope import HEADER_SIZE, TAG_SIZE, EnvelopeContext, EnvelopeOpener, seal
from fedadapt.privacy.keys import load_private_key, parse_public_key, public_key_hex
from fedadapt.privacy.secagg import wire

DELTA_KIND = "delta"
_DELTA, _NUM_EXAMPLES = "delta", "num-examples"

KEYS_HINT = (
    "create a key pair with `fedadapt keys generate --out keys/` and pass "
    "--run-config \"server-key='/abs/keys/server.key' server-public-key='/abs/keys/server.pub'\" "
    "(`fedadapt simulate` makes one in <out>/keys/ by itself)"
)


@dataclass(frozen=True)
class ClientSealer:
    """Seals one client's payloads for the server (or passes them through in mode ``none``)."""

    privacy: PrivacyConfig
    run_id: int
    node_id: int
    server_public: X25519PublicKey | None = None

    @classmethod
    def from_config(cls, privacy: PrivacyConfig, run_id: int, node_id: int, public_key: str) -> ClientSealer:
        """The sealer for a run; ConfigError when the mode needs the server's public key and none is given."""
        if not privacy.sealed:
            return cls(privacy, run_id, node_id)
        if not public_key:
            raise ConfigError(
                f"privacy mode {privacy.mode!r} needs the server's public key (server-public-key): " + KEYS_HINT
            )
        return cls(privacy, run_id, node_id, parse_public_key(public_key))

    def seal(self, payload: bytes, server_round: int, schema_id: str, kind: str) -> bytes:
        if self.server_public is None:
            return payload
        return seal(
            payload, self.server_public, EnvelopeContext(self.run_id, server_round, self.node_id, schema_id, kind)
        )

    def seal_delta(self, blob: bytes, num_examples: int, server_round: int, schema_id: str) -> bytes:
        """A plain round's delta sealed together with its FedAvg weight, so neither can be changed on the way."""
        if self.server_public is None:
            return blob
        payload = wire.pack({_DELTA: blob, _NUM_EXAMPLES: int(num_examples).to_bytes(8, "little")})
        return self.seal(payload, server_round, schema_id, DELTA_KIND)


def sealed_delta_overhead(schema_id: str) -> int:
    """Bytes ``ClientSealer.seal_delta`` adds to a delta blob: the envelope's header, schema id, kind and tag,
    and the framing of the delta with its 8-byte count (a payload cap is the largest blob plus this)."""
    framing = len(wire.pack({_DELTA: b"", _NUM_EXAMPLES: bytes(8)}))
    return HEADER_SIZE + len(schema_id.encode()) + len(DELTA_KIND.encode()) + TAG_SIZE + framing


class ServerOpener:
    """Opens client payloads on the server (or passes them through in mode ``none``); EnvelopeError on rejection."""

    def __init__(self, privacy: PrivacyConfig, run_id: int, key_path: Path | None, public_key: str = "") -> None:
        self.privacy = privacy
        self.run_id = run_id
        self._opener: EnvelopeOpener | None = None
        if not privacy.sealed:
            return
        if key_path is None:
            raise ConfigError(
                f"privacy mode {privacy.mode!r} needs the server's private key (server-key): " + KEYS_HINT
            )
        private = load_private_key(key_path)
        if public_key and public_key_hex(parse_public_key(public_key)) != public_key_hex(private.public_key()):
            raise ConfigError(
                f"server-public-key does not belong to the private key {key_path}: clients would seal for another "
                "server. Pass the server.pub generated with that server.key"
            )
        self._opener = EnvelopeOpener(private)

    @property
    def fingerprint(self) -> str | None:
        return self._opener.fingerprint if self._opener else None

    def start_round(self, server_round: int) -> None:
        if self._opener is not None:
            self._opener.start_round(server_round)

    def open(self, payload: bytes, server_round: int, sender_id: int, schema_id: str, kind: str) -> bytes:
        if self._opener is None:
            return payload
        return self._opener.open(payload, EnvelopeContext(self.run_id, server_round, sender_id, schema_id, kind))

    def open_delta(self, payload: bytes, server_round: int, sender_id: int, schema_id: str) -> tuple[bytes, int | None]:
        """The delta bytes and, when sealed, the example count sealed with them (None in mode ``none``)."""
        if self._opener is None:
            return payload, None
        plaintext = self.open(payload, server_round, sender_id, schema_id, DELTA_KIND)
        try:
            fields = wire.unpack(plaintext, "sealed delta")
            wire.require(fields, [_DELTA, _NUM_EXAMPLES], "sealed delta")
        except PayloadError as err:
            raise EnvelopeError("malformed", f"the envelope opened but its contents are not a delta: {err}") from None
        if len(fields[_NUM_EXAMPLES]) != 8:
            raise EnvelopeError("malformed", "the sealed example count is not 8 bytes")
        return fields[_DELTA], int.from_bytes(fields[_NUM_EXAMPLES], "little")
