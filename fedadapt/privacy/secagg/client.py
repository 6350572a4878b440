"""A client's side of a SecAgg+ round: pure functions from (saved session, request) to (session, reply).

The session holds this round's secrets (private keys, self-mask seed, received shares) as one
framed blob that the ClientApp keeps in ``context.state`` between messages (in deployment every
message runs in a fresh process). Nothing here imports torch or loads a model: the stages that
only move keys, shares and masks stay light. The client checks what the server asks for against
its own configuration and its own view of the round, and refuses inconsistent requests: the
server may be malicious. Neighbours prove who they are with device identity keys from the client's
roster (``identity``), and the consistency stage makes every survivor commit, by signature, to one
survivor set before any share of a secret leaves a client (see docs/privacy.md for the argument).

Building blocks are in ``crypto``: P-384 ECDH key agreement with HKDF-SHA256, AES-256-GCM for the
shares (bound to sender and receiver), Shamir secret sharing.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedadapt.errors import PayloadError, SecAggError
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.secagg import crypto, identity, masking, stages, wire
from fedadapt.privacy.secagg.identity import Identity

# Session fields
_ROUND, _NODE, _DONE, _RUN = "round", "node", "done", "run"
_ID_PK = "id-pk/"  # + neighbour id (own id included): the identity key that node presented in setup
_SIGNED = "signed"  # the survivor set this client signed (one per round)
_NEIGHBOURS, _HOLDERS, _MASKERS = "neighbours", "holders", "maskers"
_C_SK, _S_SK, _SEED = "c-sk", "s-sk", "seed"
_C_PK, _S_PK = "c-pk/", "s-pk/"  # + neighbour id
_B_SHARE, _SK_SHARE = "b-share/", "sk-share/"  # + node id (own id included)
_SHARES_RECEIVED = "secagg-shares"  # the step between the masked stage's two halves (before training)

# Key-derivation purposes: one ECDH secret never serves both (and the two key pairs differ anyway)
_SHARE_PURPOSE = b"fedadapt.secagg.share-encryption.v1\0"
_MASK_PURPOSE = b"fedadapt.secagg.pair-mask.v1\0"
_SHARE_DOMAIN = b"fedadapt.secagg.share.v1\0"  # + sender and receiver ids: a share's associated data
_SEED_PART, _KEY_PART = "b", "sk"  # the two shares inside one encrypted share pair


@dataclass(frozen=True)
class Step:
    """What a stage returns: the session to keep and the payload to send to the server."""

    session: bytes
    reply: bytes


def setup(
    config: PrivacyConfig, server_round: int, node_id: int, request: bytes, device: Identity, saved: bytes = b""
) -> Step:
    """Stage 1: check the neighbour list, make this round's two key pairs, return their public halves, signed.

    ``saved`` is the session the device kept (empty when it has none): a setup for a round this device
    has already set up, or for an earlier one, is refused, so a device answers each round's setup once
    and signs at most one survivor set per (run, round).
    """
    round_bytes, node_bytes = _int_bytes(server_round, "the round"), _int_bytes(node_id, "the node id")
    _check_new_round(saved, server_round, device.run_id)
    fields = wire.unpack(request, "setup request")
    wire.require(fields, [stages.NEIGHBOURS], "setup request")
    neighbours = wire.unpack_ids(fields[stages.NEIGHBOURS], "neighbour list")
    if node_id in neighbours:
        raise SecAggError("the server named this client as its own neighbour")
    if len(neighbours) != config.num_shares - 1:
        raise SecAggError(
            f"the server named {len(neighbours)} neighbours, this client's num-shares ({config.num_shares}) "
            f"calls for {config.num_shares - 1}: client and server must use the same [privacy] settings"
        )
    c_sk, s_sk = crypto.generate_private_key(), crypto.generate_private_key()
    own_identity = device.public_key
    session = {
        _ROUND: round_bytes,
        _NODE: node_bytes,
        _RUN: _int_bytes(device.run_id, "the run id"),
        _DONE: stages.SETUP.encode(),
        _NEIGHBOURS: wire.pack_ids(neighbours),
        _C_SK: crypto.private_bytes(c_sk),
        _S_SK: crypto.private_bytes(s_sk),
        _ID_PK + str(node_id): own_identity,
    }
    c_raw, s_raw = crypto.public_bytes(c_sk.public_key()), crypto.public_bytes(s_sk.public_key())
    signed = identity.setup_message(device.run_id, server_round, node_id, c_raw, s_raw)
    reply = {
        stages.ENCRYPTION_KEY: c_raw,
        stages.MASK_KEY: s_raw,
        stages.IDENTITY_KEY: own_identity,
        stages.SETUP_SIGNATURE: identity.sign(device.private_key, signed),
    }
    return Step(wire.pack(session), wire.pack(reply))


_KEY_FIELDS = (stages.ENCRYPTION_KEY, stages.MASK_KEY, stages.IDENTITY_KEY, stages.SETUP_SIGNATURE)


def share_keys(config: PrivacyConfig, server_round: int, saved: bytes, request: bytes, device: Identity) -> Step:
    """Stage 2: check each neighbour's identity and signed keys, then Shamir-share the self-mask seed and
    the mask key among itself and those neighbours."""
    session = _load(saved, server_round, after=stages.SETUP)
    node = _int(session[_NODE])
    neighbours = set(wire.unpack_ids(session[_NEIGHBOURS]))
    fields = wire.unpack(request, "share-keys request")
    keys: dict[int, tuple[bytes, bytes]] = {}
    identities = {session[_ID_PK + str(node)]: node}
    for other in sorted(neighbours):
        found = tuple(fields.get(f"{prefix}/{other}") for prefix in _KEY_FIELDS)
        if None not in found:
            keys[other] = found[:2]  # type: ignore[assignment]
            session[_ID_PK + str(other)] = _check_identity(device, server_round, other, found, identities)  # type: ignore[arg-type]
        elif found != (None,) * len(_KEY_FIELDS):
            raise SecAggError(f"the share-keys request has only some of the signed public keys of neighbour {other}")
    expected = {f"{prefix}/{other}" for other in keys for prefix in _KEY_FIELDS}
    if set(fields) != expected:
        raise SecAggError(
            f"the share-keys request holds fields that are not keys of neighbours: {sorted(set(fields) - expected)[:3]}"
        )
    holders = [node, *sorted(keys)]
    if len(holders) < config.reconstruction_threshold:
        raise SecAggError(
            f"only {len(holders) - 1} neighbours are left: with reconstruction-threshold "
            f"{config.reconstruction_threshold} this client's secrets could never be rebuilt, so it stops here"
        )
    seed = os.urandom(masking.SEED_SIZE)
    seed_shares = crypto.split_secret(seed, config.reconstruction_threshold, len(holders))
    key_shares = crypto.split_secret(session[_S_SK], config.reconstruction_threshold, len(holders))
    c_sk = crypto.load_private(session[_C_SK])
    reply: dict[str, bytes] = {}
    for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
        if holder == node:
            session[_B_SHARE + str(node)], session[_SK_SHARE + str(node)] = seed_share, key_share
            continue
        c_pk, s_pk = (_public_key(raw, holder) for raw in keys[holder])
        session[_C_PK + str(holder)] = crypto.public_bytes(c_pk)
        session[_S_PK + str(holder)] = crypto.public_bytes(s_pk)
        plaintext = wire.pack({_SEED_PART: seed_share, _KEY_PART: key_share})
        key = crypto.shared_key(c_sk, c_pk, _SHARE_PURPOSE)
        reply[stages.share_name(holder)] = crypto.encrypt(key, plaintext, _share_data(node, holder))
    session |= {_SEED: seed, _HOLDERS: wire.pack_ids(holders), _DONE: stages.SHARE_KEYS.encode()}
    return Step(wire.pack(session), wire.pack(reply))


def receive_shares(config: PrivacyConfig, server_round: int, saved: bytes, request: bytes) -> bytes:
    """Stage 3, before training: decrypt and check the shares forwarded from the neighbours; the new session.

    Refuses when fewer than ``reconstruction_threshold − 1`` neighbours' shares arrived: masked with
    so few pairwise masks, the input would be exposed by the self-mask seed alone.
    """
    session = _load(saved, server_round, after=stages.SHARE_KEYS)
    node = _int(session[_NODE])
    fields = wire.unpack(request, "forwarded shares")
    c_sk = crypto.load_private(session[_C_SK])
    maskers = []
    for name, ciphertext in fields.items():
        other = stages.node_of(name, stages.SHARE)
        if other is None or _C_PK + str(other) not in session:
            raise SecAggError(f"the server forwarded {name[:40]!r}, which is not a share from a neighbour")
        key = crypto.shared_key(c_sk, crypto.load_public(session[_C_PK + str(other)]), _SHARE_PURPOSE)
        try:
            # The associated data names sender and receiver: a share re-addressed by the server fails here too.
            pair = wire.unpack(crypto.decrypt(key, ciphertext, _share_data(other, node)), "share pair")
            wire.require(pair, [_SEED_PART, _KEY_PART], "share pair")
        except (ValueError, PayloadError):
            raise SecAggError(
                f"the share from node {other} does not decrypt: it was altered on the way or is not addressed "
                "from that node to this client"
            ) from None
        session[_B_SHARE + str(other)], session[_SK_SHARE + str(other)] = pair[_SEED_PART], pair[_KEY_PART]
        maskers.append(other)
    if len(maskers) < config.reconstruction_threshold - 1:
        raise SecAggError(
            f"only {len(maskers)} neighbours' shares reached this client, reconstruction-threshold "
            f"{config.reconstruction_threshold} calls for at least {config.reconstruction_threshold - 1}: the server "
            "may be withholding them to strip this client's pairwise masks, so it sends no masked input"
        )
    session |= {_MASKERS: wire.pack_ids(sorted(maskers)), _DONE: _SHARES_RECEIVED.encode()}
    return wire.pack(session)


def mask(config: PrivacyConfig, server_round: int, saved: bytes, delta: np.ndarray, num_examples: int) -> Step:
    """Stage 3, after training: the masked field vector of ``delta`` weighted by ``num_examples``."""
    session = _load(saved, server_round, after=_SHARES_RECEIVED)
    node = _int(session[_NODE])
    encoded = masking.encode(delta, num_examples, config)
    vector = encoded.vector
    vector += masking.mask(session[_SEED], vector.size, config)
    s_sk = crypto.load_private(session[_S_SK])
    for other in wire.unpack_ids(session[_MASKERS]):
        pair = masking.mask(pair_seed(s_sk, crypto.load_public(session[_S_PK + str(other)])), vector.size, config)
        if node < other:
            vector += pair
        else:
            vector -= pair
    session[_DONE] = stages.MASKED.encode()
    return Step(wire.pack(session), wire.pack({stages.MASKED_VECTOR: vector.tobytes()}))


def consistency(server_round: int, saved: bytes, request: bytes, device: Identity) -> Step:
    """Stage 4: sign the round's survivor set with the identity key; a client signs one set per round."""
    session = _load(saved, server_round, after=stages.MASKED)
    node = _int(session[_NODE])
    fields = wire.unpack(request, "consistency request")
    wire.require(fields, [stages.SURVIVORS], "consistency request")
    if set(fields) != {stages.SURVIVORS}:
        raise SecAggError("the consistency request holds fields other than the survivor set")
    survivors = sorted(wire.unpack_ids(fields[stages.SURVIVORS], "survivor set"))
    if node not in survivors:
        raise SecAggError("the server's survivor set leaves out this client although it sent its masked vector")
    if _int(session[_RUN]) != device.run_id:
        raise SecAggError("the consistency request belongs to another run than this client's session")
    signature = identity.sign(device.private_key, identity.survivors_message(device.run_id, server_round, survivors))
    session |= {_SIGNED: wire.pack_ids(survivors), _DONE: stages.CONSISTENCY.encode()}
    return Step(wire.pack(session), wire.pack({stages.SURVIVOR_SIGNATURE: signature}))


def unmask(config: PrivacyConfig, server_round: int, saved: bytes, request: bytes) -> Step:
    """Stage 5: shares of the survivors' seeds and of the dropouts' mask keys, never both for one node.

    Answers only when the lists match the survivor set this client signed, every surviving neighbour
    signed that same set, and at least ``reconstruction_threshold`` of its neighbourhood survived.
    """
    session = _load(saved, server_round, after=stages.CONSISTENCY)
    node = _int(session[_NODE])
    fields = wire.unpack(request, "unmask request")
    wire.require(fields, [stages.SURVIVORS, stages.DROPPED], "unmask request")
    survivors = set(wire.unpack_ids(fields[stages.SURVIVORS], "survivor list"))
    dropped = set(wire.unpack_ids(fields[stages.DROPPED], "dropout list"))
    known = {node, *wire.unpack_ids(session[_MASKERS])}
    if survivors & dropped:
        raise SecAggError("the server named a node both survivor and dropout: answering would reveal its delta")
    if node not in survivors:
        raise SecAggError("the server named this client a dropout although it sent its masked vector")
    if survivors | dropped != known:
        raise SecAggError(
            "the server's survivors and dropouts do not cover exactly the neighbours that shared with this client"
        )
    _check_consistent(config, session, server_round, node, known, survivors, fields)
    reply = {stages.SEED_SHARE + str(n): session[_B_SHARE + str(n)] for n in sorted(survivors)}
    reply |= {stages.KEY_SHARE + str(n): session[_SK_SHARE + str(n)] for n in sorted(dropped)}
    # The round is over for this client: keep nothing but the fact that it answered.
    closed = {_ROUND: session[_ROUND], _NODE: session[_NODE], _RUN: session[_RUN], _DONE: stages.UNMASK.encode()}
    return Step(wire.pack(closed), wire.pack(reply))


def pair_seed(private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 32-byte seed two clients share: ECDH on P-384, then HKDF-SHA256 bound to the mask purpose."""
    return crypto.shared_key(private_key, public_key, _MASK_PURPOSE)


def _share_data(sender: int, receiver: int) -> bytes:
    """The associated data of the share pair ``sender`` encrypts for ``receiver``."""
    return _SHARE_DOMAIN + struct.pack("<QQ", sender, receiver)


def _check_new_round(saved: bytes, server_round: int, run_id: int) -> None:
    """SecAggError unless ``saved`` (the device's kept session) leaves room for a new setup of ``server_round``.

    A second setup of one round would wipe the session that holds the survivor set already signed, and
    the device would sign another: the server could then tell neighbours different stories again. A
    session of another run does not count (rounds restart there); an empty one is a device with no
    session (new, or its context state lost: it can only sign for rounds it has not kept a record of).
    """
    if not saved:
        return
    try:
        session = wire.unpack(saved, "saved session")
    except PayloadError as err:
        # Only this device writes its session: unreadable means damaged, and which round it signed is unknown.
        raise SecAggError(
            f"the saved session is unreadable ({err}); this device cannot tell which rounds it set up"
        ) from None
    if _RUN in session and _int(session[_RUN]) != run_id:
        return
    kept = _int(session.get(_ROUND, b""))
    if kept >= server_round:
        raise SecAggError(
            f"a setup for round {server_round}, but this device already set up round {kept} of this run: "
            "each round's setup is answered once, so the device signs one survivor set per round"
        )


def _load(saved: bytes | None, server_round: int, after: str) -> dict[str, bytes]:
    """The session of ``server_round`` whose last completed step is ``after``; SecAggError otherwise."""
    wire.uint64(server_round, "the round", SecAggError)  # what the server sent, before it is compared or signed
    if not saved:
        raise SecAggError(f"no secure-aggregation session for round {server_round}: the stages came out of order")
    try:
        session = wire.unpack(saved, "saved session")
    except PayloadError as err:
        raise SecAggError(f"the saved session is unreadable ({err}); the round cannot go on") from None
    if _int(session.get(_ROUND, b"")) != server_round:
        raise SecAggError(f"no secure-aggregation session for round {server_round}: the stages came out of order")
    done = session.get(_DONE, b"").decode(errors="replace")
    if done != after:
        raise SecAggError(
            f"round {server_round}: this stage must follow {after!r}, but the last step was {done!r} "
            "(each stage is answered once, in order)"
        )
    return session


def _check_identity(
    device: Identity, server_round: int, other: int, found: tuple[bytes, bytes, bytes, bytes], seen: dict[bytes, int]
) -> bytes:
    """The canonical identity key of neighbour ``other``, after checking roster, uniqueness and signature."""
    c_raw, s_raw, id_raw, signature = found
    try:
        key = identity.normalize_public(id_raw)
    except SecAggError as err:
        raise SecAggError(f"neighbour {other}: {err}") from None
    if key not in device.roster:
        raise SecAggError(
            f"neighbour {other} presents an identity key that is not in this device's roster: refusing a "
            "neighbour the server may have made up"
        )
    if key in seen:
        raise SecAggError(f"neighbour {other} presents the identity key of node {seen[key]}: one device, two nodes")
    seen[key] = other
    if not identity.verify(key, signature, identity.setup_message(device.run_id, server_round, other, c_raw, s_raw)):
        raise SecAggError(f"the public keys of neighbour {other} do not carry a valid signature by its identity key")
    return key


def _check_consistent(
    config: PrivacyConfig,
    session: dict[str, bytes],
    server_round: int,
    node: int,
    known: set[int],
    survivors: set[int],
    fields: dict[str, bytes],
) -> None:
    """SecAggError unless the unmask request agrees with the survivor set this client signed (Bell et al.)."""
    signed = set(wire.unpack_ids(session[_SIGNED]))
    if survivors != known & signed:
        raise SecAggError(
            "the unmask request's survivors differ from the survivor set this client signed: the server tells "
            "clients different stories, so no share leaves this client"
        )
    if len(survivors) < config.reconstruction_threshold:
        raise SecAggError(
            f"only {len(survivors)} members of this client's neighbourhood survived, reconstruction-threshold is "
            f"{config.reconstruction_threshold}: answering could hand the server both secrets of a neighbour"
        )
    expected = {stages.SURVIVORS, stages.DROPPED} | {_signature_name(n) for n in survivors - {node}}
    if set(fields) != expected:
        missing, unexpected = sorted(expected - set(fields))[:3], [f[:40] for f in sorted(set(fields) - expected)[:3]]
        raise SecAggError(
            "the unmask request does not carry exactly one survivor-set signature per surviving neighbour "
            f"(missing {missing}, unexpected {unexpected}): no share leaves this client"
        )
    message = identity.survivors_message(_int(session[_RUN]), server_round, signed)
    for other in sorted(survivors - {node}):
        if not identity.verify(session[_ID_PK + str(other)], fields[_signature_name(other)], message):
            raise SecAggError(f"neighbour {other} did not sign the survivor set this client signed: no share leaves")


def _signature_name(node: int) -> str:
    return f"{stages.SURVIVOR_SIGNATURE}/{node}"


def _public_key(raw: bytes, node: int) -> ec.EllipticCurvePublicKey:
    try:
        return crypto.load_public(raw)
    except ValueError as err:
        raise SecAggError(f"the public key of node {node}: {err}") from None


def _int_bytes(value: int, what: str) -> bytes:
    return wire.uint64(value, what, SecAggError).to_bytes(8, "little")


def _int(raw: bytes) -> int:
    return int.from_bytes(raw, "little") if len(raw) == 8 else -1
