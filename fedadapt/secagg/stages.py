"""The four stages of a SecAgg+ round, and the neighbour graph both sides agree on.

1. ``setup`` — the server names each sampled client's neighbours; each client answers with two
   fresh P-384 public keys (one to encrypt shares, one to agree pairwise mask seeds).
2. ``share-keys`` — the server forwards the neighbours' public keys; each client draws a self-mask
   seed, Shamir-shares it and its mask private key among itself and those neighbours, and returns
   one share pair per neighbour, encrypted for that neighbour.
3. ``masked`` — the server forwards the encrypted shares with the global adapter; each client
   trains, encodes its example-weighted delta in the field and adds its self-mask and one pairwise
   mask per neighbour that shared (+ towards higher node ids, − towards lower): pairwise masks cancel
   in the sum.
4. ``unmask`` — the server names which neighbours sent a masked vector and which dropped; each
   client returns its share of every survivor's self-mask seed and of every dropout's mask key,
   never both for one client. The server rebuilds them, removes the masks and decodes the sum.
"""

from __future__ import annotations

import random
from typing import Literal

Stage = Literal["secagg-setup", "secagg-share-keys", "secagg-masked", "secagg-unmask"]
SETUP: Stage = "secagg-setup"
SHARE_KEYS: Stage = "secagg-share-keys"
MASKED: Stage = "secagg-masked"
UNMASK: Stage = "secagg-unmask"
STAGES: tuple[Stage, ...] = (SETUP, SHARE_KEYS, MASKED, UNMASK)

# Field names inside stage payloads
NEIGHBOURS = "neighbours"
ENCRYPTION_KEY = "c-pk"  # public key that encrypts shares sent to this client
MASK_KEY = "s-pk"  # public key that agrees pairwise mask seeds
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
    """The node id in a field name such as ``share/17``, or None when it has another form."""
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix) :]
    return int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 20 else None
