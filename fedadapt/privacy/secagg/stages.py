"""The five stages of a SecAgg+ round, and the neighbour graph both sides agree on.

1. ``setup`` — the server names each sampled client's neighbours; each client answers with two
   fresh P-384 public keys (one to encrypt shares, one to agree pairwise mask seeds), signed with
   its device identity key (``identity``), and that identity's public key.
2. ``share-keys`` — the server forwards the neighbours' public keys and signatures; each client
   checks every neighbour's identity against its roster and signature, draws a self-mask
   seed, Shamir-shares it and its mask private key among itself and those neighbours, and returns
   one share pair per neighbour, encrypted for that neighbour.
3. ``masked`` — the server forwards the encrypted shares with the global adapter; each client
   trains, encodes its example-weighted delta in the field and adds its self-mask and one pairwise
   mask per neighbour that shared (+ towards higher node ids, − towards lower): pairwise masks cancel
   in the sum. A client that received fewer than ``reconstruction_threshold − 1`` shares refuses.
4. ``consistency`` — the server sends every client whose masked vector arrived the round's survivor
   set; each client signs it with its identity key (once per round) and returns the signature.
5. ``unmask`` — the server names which neighbours survived and which dropped and forwards the
   survivors' signatures; each client checks that the lists match the set it signed, that every
   surviving neighbour signed that same set, and that enough of its neighbourhood survived, then
   returns its share of every survivor's self-mask seed and of every dropout's mask key, never both
   for one client. The server rebuilds them, removes the masks and decodes the sum.
"""

from __future__ import annotations

import random
from typing import Literal

Stage = Literal["secagg-setup", "secagg-share-keys", "secagg-masked", "secagg-consistency", "secagg-unmask"]
SETUP: Stage = "secagg-setup"
SHARE_KEYS: Stage = "secagg-share-keys"
MASKED: Stage = "secagg-masked"
CONSISTENCY: Stage = "secagg-consistency"
UNMASK: Stage = "secagg-unmask"
STAGES: tuple[Stage, ...] = (SETUP, SHARE_KEYS, MASKED, CONSISTENCY, UNMASK)

# Field names inside stage payloads
NEIGHBOURS = "neighbours"
ENCRYPTION_KEY = "c-pk"  # public key that encrypts shares sent to this client
MASK_KEY = "s-pk"  # public key that agrees pairwise mask seeds
IDENTITY_KEY = "id-pk"  # the client's device identity (OpenSSH public key line)
SETUP_SIGNATURE = "id-sig"  # its identity's signature over its two fresh public keys
SURVIVOR_SIGNATURE = "sig"  # a client's signature over the survivor set; "sig/" + node id when forwarded
SHARE = "share/"  # + node id: an encrypted share pair (from or to that node)
MASKED_VECTOR = "masked"
SURVIVORS = "survivors"
DROPPED = "dropped"
SEED_SHARE = "b/"  # + node id: a share of that node's self-mask seed
KEY_SHARE = "sk/"  # + node id: a share of that node's mask private key


def neighbour_graph(nodes: list[int], num_shares: int, seed: int) -> dict[int, list[int]]:
    """Each node's ``num_shares - 1`` neighbours: on a seeded random ring, (num_shares − 1)/2 on each side.

    With ``num_shares`` equal to the number of nodes every node neighbours every other (SecAgg).
    """
    if num_shares > len(nodes):
        raise ValueError(f"num_shares ({num_shares}) exceeds the {len(nodes)} nodes of the round")
    if num_shares == len(nodes):
        return {node: sorted(other for other in nodes if other != node) for node in nodes}
    if num_shares % 2 == 0:
        raise ValueError(f"num_shares must be odd when smaller than the number of nodes, got {num_shares}")
    order = sorted(nodes)
    random.Random(seed).shuffle(order)
    half = (num_shares - 1) // 2
    count = len(order)
    return {
        node: sorted({order[(place + step) % count] for step in range(-half, half + 1) if step})
        for place, node in enumerate(order)
    }


def share_name(node: int) -> str:
    return f"{SHARE}{node}"


def node_of(name: str, prefix: str) -> int | None:
    """The node id in a field name such as ``share/17``, or None when it has another form.

    Only the form ``str(node)`` writes counts: ``share/017`` would name node 17 a second time, and a
    server could pass one neighbour's share off as two. Ids are uint64, like every node id on the wire.
    """
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix) :]
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 20) or (digits[0] == "0" and digits != "0"):
        return None
    node = int(digits)
    return node if node < 2**64 else None
