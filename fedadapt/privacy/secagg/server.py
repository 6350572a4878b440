"""The server's side of a SecAgg+ round: route keys and shares, sum masked vectors, remove the masks.

``SecAggRound`` is transport-free: each ``*_received`` method takes the round's replies (opened
payloads by node id, plus the nodes that failed and why) and returns the requests for the next
stage. The server never holds an individual unmasked vector: each masked vector is added to a
running sum mod 2**bits and dropped, and the masks come off only the sum. It can check a masked
vector's structure (its length) but not its values: finiteness and norm bounds run on the client
before masking, and the clipping count comes back summed.

Dropouts: a node lost before it sent its shares simply leaves the round. A node lost after that
still has pairwise masks in its neighbours' vectors: its mask key is rebuilt from its neighbours'
shares. A node that sent its masked vector and was lost afterwards stays in the sum: its self-mask
seed is rebuilt the same way. Either needs ``reconstruction_threshold`` of the node's share holders
to answer the last stage; otherwise the round fails with SecAggError rather than a wrong sum.

Hostile replies: any bytes a client sends end as that client's drop with a reason (or, when too
few clients are left, as the round's SecAggError); nothing else escapes a stage method. The server
checks the setup signatures (so one client with a bad signature cannot make its neighbours refuse)
and the decoded sum: a mean outside ±(clipping range + one quantization step), or more examples
than ``max_examples_per_client`` per contributor, fails the round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedadapt.errors import ConfigError, PayloadError, SecAggError
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.secagg import crypto, identity, masking, stages, wire
from fedadapt.privacy.secagg.client import pair_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggResult:
    """The round's weighted mean delta (flat float64) and what the protocol saw."""

    mean: np.ndarray
    total_examples: int
    clipped_values: int
    contributors: list[int]  # nodes whose vectors are in the sum
    recovered: list[int]  # nodes lost after masking whose contribution was recovered (self-mask rebuilt)
    dropped: dict[int, str]  # nodes left out of the sum, with the stage and reason


@dataclass
class SecAggRound:
    """One round's protocol state on the server (in memory; a crashed round is rerun from its checkpoint)."""

    config: PrivacyConfig
    server_round: int
    nodes: list[int]
    vector_length: int  # values of the delta, before the two totals
    seed: int = 0
    run_id: int = 0  # bound into every signature of the round
    max_examples_per_client: int | None = None  # the decoded total may not exceed contributors × this
    dropped: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = [
            ("round", self.server_round),
            ("run id", self.run_id),
            ("seed", self.seed),
            ("vector length", self.vector_length),
            *(("node id", n) for n in self.nodes),
        ]
        for name, value in named:
            wire.uint64(value, f"a secure round's {name}", SecAggError)
        cap = self.max_examples_per_client
        if cap is not None and wire.uint64(cap, "a secure round's max-examples-per-client", SecAggError) < 1:
            raise SecAggError(f"a secure round's max-examples-per-client must be at least 1 or None, got {cap}")
        if len(set(self.nodes)) != len(self.nodes):
            raise SecAggError("a secure round's sampled nodes must be distinct")
        if len(self.nodes) < 2:
            raise SecAggError("secure aggregation needs at least 2 clients: one client's sum is its delta")
        try:
            self.config.check_fleet(len(self.nodes))
        except ConfigError as err:
            raise SecAggError(f"round {self.server_round} has {len(self.nodes)} clients: {err}") from None
        self.neighbours = stages.neighbour_graph(sorted(self.nodes), self.config.num_shares, self.seed)
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # node → (encryption key, mask key)
        self._identity: dict[int, tuple[bytes, bytes]] = {}  # node → (identity key, its setup signature)
        self._signatures: dict[int, bytes] = {}  # node → its signature over the survivor set
        self._shared: dict[int, dict[int, bytes]] = {}  # sender → {receiver: encrypted share}
        self._maskers: dict[int, list[int]] = {}  # node → neighbours whose masks it added
        self._sum = np.zeros(self.vector_length + masking.EXTRA_ENTRIES, dtype=masking.field_dtype(self.config))
        self._masked: list[int] = []

    # --- stages ---------------------------------------------------------------------------------------------

    def setup_requests(self) -> dict[int, bytes]:
        """Stage 1 requests: each node's neighbour list."""
        return {node: wire.pack({stages.NEIGHBOURS: wire.pack_ids(self.neighbours[node])}) for node in self.nodes}

    def keys_received(self, replies: Mapping[int, bytes], failed: Mapping[int, str]) -> dict[int, bytes]:
        """Stage 1 replies in; stage 2 requests (the answering neighbours' public keys) out."""
        self._drop(failed, stages.SETUP)
        owners: dict[bytes, int] = {}
        for node, blob in self._asked(replies, self.nodes, stages.SETUP).items():
            try:
                fields = wire.unpack(blob, "public keys")
                names = [stages.ENCRYPTION_KEY, stages.MASK_KEY, stages.IDENTITY_KEY, stages.SETUP_SIGNATURE]
                wire.require(fields, names, "public keys")
                for name in (stages.ENCRYPTION_KEY, stages.MASK_KEY):
                    crypto.load_public(fields[name])  # refuse a bad key here, or every neighbour would abort on it
                key = self._check_setup_signature(node, fields, owners)
            except (PayloadError, SecAggError, ValueError, TypeError) as err:
                self._drop({node: f"bad public keys: {err}"}, stages.SETUP)
                continue
            owners[key] = node
            self._keys[node] = (fields[stages.ENCRYPTION_KEY], fields[stages.MASK_KEY])
            self._identity[node] = (key, fields[stages.SETUP_SIGNATURE])
        self._check_enough(self._keys, stages.SETUP)
        requests = {}
        for node in self._keys:
            fields = {}
            for other in self.neighbours[node]:
                if other in self._keys:
                    fields[f"{stages.ENCRYPTION_KEY}/{other}"] = self._keys[other][0]
                    fields[f"{stages.MASK_KEY}/{other}"] = self._keys[other][1]
                    fields[f"{stages.IDENTITY_KEY}/{other}"] = self._identity[other][0]
                    fields[f"{stages.SETUP_SIGNATURE}/{other}"] = self._identity[other][1]
            requests[node] = wire.pack(fields)
        return requests

    def shares_received(self, replies: Mapping[int, bytes], failed: Mapping[int, str]) -> dict[int, bytes]:
        """Stage 2 replies in; stage 3 requests (the encrypted shares addressed to each node) out."""
        self._drop(failed, stages.SHARE_KEYS)
        for node, blob in self._asked(replies, self._keys, stages.SHARE_KEYS).items():
            expected = {stages.share_name(o) for o in self.neighbours[node] if o in self._keys}
            try:
                fields = wire.unpack(blob, "encrypted shares")
                if set(fields) != expected:
                    raise PayloadError(f"it holds {len(fields)} shares for the wrong neighbours")
            except PayloadError as err:
                self._drop({node: f"bad shares: {err}"}, stages.SHARE_KEYS)
                continue
            self._shared[node] = {int(name[len(stages.SHARE) :]): ct for name, ct in fields.items()}
        self._check_enough(self._shared, stages.SHARE_KEYS)
        requests = {}
        for node in self._shared:
            # A node masks with exactly the neighbours whose shares it receives: those that completed stage 2.
            senders = [o for o in self.neighbours[node] if o in self._shared]
            self._maskers[node] = senders
            requests[node] = wire.pack({stages.share_name(o): self._shared[o][node] for o in senders})
        return requests

    def masked_received(self, replies: Mapping[int, bytes], failed: Mapping[int, str]) -> dict[int, bytes]:
        """Stage 3 replies in (each added to the running sum, then dropped); consistency requests out."""
        self._drop(failed, stages.MASKED)
        dtype = masking.field_dtype(self.config)
        size = self._sum.size * dtype.itemsize
        for node, blob in replies.items():
            if node not in self._maskers:
                if node in self.nodes:
                    self._drop({node: "a masked vector from a node that shared no keys this round"}, stages.MASKED)
                else:
                    logger.info("secagg round %d: ignored a reply from node %r, not asked", self.server_round, node)
                continue
            try:
                fields = wire.unpack(blob, "masked vector")
                wire.require(fields, [stages.MASKED_VECTOR], "masked vector")
                if len(fields[stages.MASKED_VECTOR]) != size:
                    raise PayloadError(f"it has {len(fields[stages.MASKED_VECTOR])} bytes, this round's vector {size}")
            except PayloadError as err:
                self._drop({node: f"bad masked vector: {err}"}, stages.MASKED)
                continue
            self._sum += np.frombuffer(fields[stages.MASKED_VECTOR], dtype=dtype)
            self._masked.append(node)
        if len(self._masked) < 2:
            raise SecAggError(
                f"only {len(self._masked)} masked vectors arrived in round {self.server_round}: a sum of fewer "
                "than 2 would reveal a client's delta, so the round fails"
            )
        request = wire.pack({stages.SURVIVORS: wire.pack_ids(sorted(self._masked))})
        return {node: request for node in self._masked}

    def consistency_received(self, replies: Mapping[int, bytes], failed: Mapping[int, str]) -> dict[int, bytes]:
        """Stage 4 replies in (signatures over the survivor set, checked); unmask requests out.

        The survivor set stays the set the clients signed: a client lost here is still in the sum, but
        its neighbours get no signature of it and refuse to unmask (a rare loss: this stage does no work).
        """
        message = identity.survivors_message(self.run_id, self.server_round, self._masked)
        # Recorded with a reason; such a node's vector stays in the sum, but its neighbours will refuse.
        self._drop(failed, stages.CONSISTENCY)
        for node, blob in self._asked(replies, self._masked, stages.CONSISTENCY).items():
            try:
                fields = wire.unpack(blob, "survivor-set signature")
                wire.require(fields, [stages.SURVIVOR_SIGNATURE], "survivor-set signature")
                if not identity.verify(self._identity[node][0], fields[stages.SURVIVOR_SIGNATURE], message):
                    raise PayloadError("it is not a valid signature of the survivor set by the node's identity key")
            except PayloadError as err:
                self._drop({node: f"bad survivor-set signature: {err}"}, stages.CONSISTENCY)
                continue
            self._signatures[node] = fields[stages.SURVIVOR_SIGNATURE]
        masked = set(self._masked)
        requests = {}
        for node in self._signatures:
            holders = [node, *self._maskers[node]]
            fields = {
                stages.SURVIVORS: wire.pack_ids(sorted(n for n in holders if n in masked)),
                stages.DROPPED: wire.pack_ids(sorted(n for n in holders if n not in masked)),
            }
            for other in holders:
                if other != node and other in self._signatures:
                    fields[f"{stages.SURVIVOR_SIGNATURE}/{other}"] = self._signatures[other]
            requests[node] = wire.pack(fields)
        return requests

    def unmask_received(self, replies: Mapping[int, bytes], failed: Mapping[int, str]) -> SecAggResult:
        """Stage 5 replies in: rebuild the seeds and keys, strip the masks off the sum and decode it."""
        unmask_failed = dict(failed)
        seed_shares: dict[int, list[bytes]] = {}
        key_shares: dict[int, list[bytes]] = {}
        masked = set(self._masked)
        answered = []
        for node, blob in self._asked(replies, self._signatures, stages.UNMASK).items():
            try:
                seeds, keys = self._unmask_shares(node, blob, masked)
            except PayloadError as err:
                unmask_failed[node] = f"bad unmask shares: {err}"
                continue
            # Only a reply that is valid as a whole contributes shares.
            for store, shares in ((seed_shares, seeds), (key_shares, keys)):
                for owner, share in shares.items():
                    store.setdefault(owner, []).append(share)
            answered.append(node)
        for node, reason in unmask_failed.items():
            logger.info("secagg round %d: node %d sent no usable shares (%s)", self.server_round, node, reason)
        total = self._sum.copy()
        for node in self._masked:
            seed = self._rebuild(node, seed_shares.get(node, []), "self-mask seed")
            total -= masking.mask(seed, total.size, self.config)
        lost_after_sharing = sorted(set(self._shared) - masked)
        for node in lost_after_sharing:
            private = self._rebuild_key(node, key_shares.get(node, []))
            for other in self._maskers[node]:
                if other in masked:
                    # ``other`` added +mask towards higher ids, −mask towards lower ones: take it off again.
                    pair = masking.mask(
                        pair_seed(private, crypto.load_public(self._keys[other][1])), total.size, self.config
                    )
                    if other < node:
                        total -= pair
                    else:
                        total += pair
        decoded = masking.decode_sum(total, self.config)
        self._check_decoded(decoded)
        recovered = sorted(n for n in self._masked if n not in answered)
        return SecAggResult(
            mean=decoded.mean,
            total_examples=decoded.total_examples,
            clipped_values=decoded.clipped,
            contributors=sorted(self._masked),
            recovered=recovered,
            dropped=dict(self.dropped),
        )

    # --- helpers --------------------------------------------------------------------------------------------

    def _asked(self, replies: Mapping[int, bytes], asked: object, stage: str) -> dict[int, bytes]:
        """The replies of nodes this stage asked (``asked`` supports ``in``); others are logged and ignored."""
        kept = {}
        for node, blob in replies.items():
            if node in asked:  # type: ignore[operator]
                kept[node] = blob
            else:
                logger.info("secagg round %d: ignored a %s reply from node %r", self.server_round, stage, node)
        return kept

    def _check_setup_signature(self, node: int, fields: Mapping[str, bytes], owners: Mapping[bytes, int]) -> bytes:
        """The node's canonical identity key; SecAggError if its keys are not signed by it or it is taken."""
        key = identity.normalize_public(fields[stages.IDENTITY_KEY])
        if key in owners:
            raise SecAggError(f"its identity key is already node {owners[key]}'s")
        signed = identity.setup_message(
            self.run_id, self.server_round, node, fields[stages.ENCRYPTION_KEY], fields[stages.MASK_KEY]
        )
        if not identity.verify(key, fields[stages.SETUP_SIGNATURE], signed):
            raise SecAggError("its public keys do not carry a valid signature by its identity key")
        return key

    def _check_decoded(self, decoded: masking.DecodedSum) -> None:
        """SecAggError when the decoded sum cannot come from honest clients (a client encoded out of range)."""
        limit = self.config.clipping_range + self.config.quantization_step
        worst = float(np.max(np.abs(decoded.mean))) if decoded.mean.size else 0.0
        if not np.isfinite(worst) or worst > limit * (1 + 1e-9):
            raise SecAggError(
                f"round {self.server_round}: the decoded mean reaches {worst:.6g}, outside ±{limit:.6g} "
                "(clipping-range plus one quantization step): a client encoded values out of range, so the round fails"
            )
        cap = self.max_examples_per_client
        if cap is not None and decoded.total_examples > len(self._masked) * cap:
            raise SecAggError(
                f"round {self.server_round}: the decoded example total {decoded.total_examples} exceeds "
                f"{len(self._masked)} contributors × max-examples-per-client {cap}: a client over-claimed its weight"
            )

    def _unmask_shares(self, node: int, blob: bytes, masked: set[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """The seed shares and key shares in one unmask reply; PayloadError if any field was not asked for."""
        fields = wire.unpack(blob, "unmask shares")
        holders = {node, *self._maskers.get(node, [])}
        seeds: dict[int, bytes] = {}
        keys: dict[int, bytes] = {}
        for name, share in fields.items():
            seed_owner = stages.node_of(name, stages.SEED_SHARE)
            key_owner = stages.node_of(name, stages.KEY_SHARE)
            if seed_owner is not None and seed_owner in holders and seed_owner in masked:
                seeds[seed_owner] = share
            elif (
                key_owner is not None and key_owner in holders and key_owner in self._shared and key_owner not in masked
            ):
                keys[key_owner] = share
            else:
                raise PayloadError(f"it holds {name[:40]!r}, which it was not asked for")
        return seeds, keys

    def _rebuild(self, node: int, shares: list[bytes], what: str) -> bytes:
        threshold = self.config.reconstruction_threshold
        if len(shares) < threshold:
            raise SecAggError(
                f"round {self.server_round}: the {what} of node {node} cannot be rebuilt: {len(shares)} of its "
                f"share holders answered, reconstruction-threshold is {threshold}. Too many clients dropped out "
                f"(at most num-shares - threshold = {self.config.num_shares - threshold} per neighbourhood); "
                "the round fails rather than return a wrong sum"
            )
        try:
            secret = crypto.combine_shares(shares[:threshold])
        except ValueError:
            raise SecAggError(f"round {self.server_round}: the shares of node {node}'s {what} do not combine") from None
        if what == "self-mask seed" and len(secret) != masking.SEED_SIZE:
            raise SecAggError(f"round {self.server_round}: node {node}'s rebuilt {what} has the wrong size")
        return secret

    def _rebuild_key(self, node: int, shares: list[bytes]) -> ec.EllipticCurvePrivateKey:
        secret = self._rebuild(node, shares, "mask key")
        try:
            return crypto.load_private(secret)
        except ValueError:
            raise SecAggError(f"round {self.server_round}: node {node}'s rebuilt mask key is not a P-384 key") from None

    def _drop(self, failed: Mapping[int, str], stage: str) -> None:
        for node, reason in failed.items():
            if node not in self.dropped:
                self.dropped[node] = f"{stage}: {reason}"
                logger.info("secagg round %d: node %d left at %s: %s", self.server_round, node, stage, reason)

    def _check_enough(self, remaining: Mapping[int, object], stage: str) -> None:
        if len(remaining) < 2:
            raise SecAggError(
                f"only {len(remaining)} of {len(self.nodes)} clients completed {stage} in round {self.server_round}: "
                "secure aggregation needs at least 2"
            )
