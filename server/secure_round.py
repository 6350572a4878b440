"""The ServerApp's SecAgg+ round: five message exchanges that drive ``fedadapt.secagg.server.SecAggRound``.

Each client payload arrives sealed (``fedadapt.transport``) and is opened against the node Flower
names as its source; a payload that fails to open, a client error or a missing reply counts as a
dropout at that stage. Only the unmasked *sum* leaves ``SecAggRound``: this module turns its mean
into the schema's tensors for the server optimizer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedadapt import protocol
from fedadapt.aggregate import REASON_LIMIT
from fedadapt.envelope import HEADER_SIZE, TAG_SIZE
from fedadapt.errors import EnvelopeError, ReplyError, SecAggError
from fedadapt.privacy import PrivacyConfig
from fedadapt.secagg import masking, stages, wire
from fedadapt.secagg.server import SecAggRound
from fedadapt.state import AdapterSchema, State
from fedadapt.transport import ServerOpener
from server.replies import (
    bytes_to_array,
    destinations,
    envelope_reason,
    read_stage_reply,
    reply_node,
    unexpected_reason,
)

logger = logging.getLogger(__name__)

# The key stages' payloads are small and do not grow with the model: measured 0.8 KB (setup), 0.65 KB per
# neighbour (share-keys), 0.13 KB (consistency) and 0.09 KB per share holder (unmask); the caps leave room.
_SETUP_BYTES = 4096
_SHARE_BYTES = 2048  # per neighbour, share-keys
_SIGNATURE_BYTES = 1024
_UNMASK_SHARE_BYTES = 512  # per share holder, unmask
_FRAMING_BYTES = 1024  # the framing of a key stage's fields beside their data


def stage_limits(privacy: PrivacyConfig, vector_length: int, schema_id: str) -> dict[str, int]:
    """The most bytes a client's sealed payload may have at each stage: the masked stage's cap follows from
    the vector, (values + 2) field elements and their framing; the key stages' from ``num-shares``."""
    element = masking.field_dtype(privacy).itemsize
    plain = {
        stages.SETUP: _SETUP_BYTES,
        stages.SHARE_KEYS: _SHARE_BYTES * (privacy.num_shares - 1) + _FRAMING_BYTES,
        stages.MASKED: len(wire.pack({stages.MASKED_VECTOR: b""})) + (vector_length + masking.EXTRA_ENTRIES) * element,
        stages.CONSISTENCY: _SIGNATURE_BYTES,
        stages.UNMASK: _UNMASK_SHARE_BYTES * privacy.num_shares + _FRAMING_BYTES,
    }
    return {stage: size + _envelope_overhead(privacy, schema_id, stage) for stage, size in plain.items()}


def _envelope_overhead(privacy: PrivacyConfig, schema_id: str, stage: str) -> int:
    """Bytes the sealer adds to a stage payload: header, schema id, kind (the stage) and tag."""
    return HEADER_SIZE + len(schema_id.encode()) + len(stage.encode()) + TAG_SIZE if privacy.sealed else 0


@dataclass
class SecureRoundOutcome:
    """What a secure round produced: the mean delta (None when the round failed) and its record fields."""

    mean: State | None = None
    record: dict[str, Any] = field(default_factory=dict)
    client_metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Exchange:
    """One stage's opened replies, failures and the bytes both ways."""

    replies: dict[int, bytes] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0


def run_secure_round(
    grid: Grid,
    sampled: list[int],
    server_round: int,
    *,
    privacy: PrivacyConfig,
    schema: AdapterSchema,
    opener: ServerOpener,
    global_blob: bytes,
    timeout: float,
    seed: int,
    run_id: int = 0,
    max_examples_per_client: int | None = None,
) -> SecureRoundOutcome:
    """One SecAgg+ round over ``sampled``; SecAggError inside is caught and recorded as a failed round.

    ``seed`` draws the neighbour ring; ``run_id`` is bound into the clients' signatures;
    ``max_examples_per_client`` bounds the decoded example total (contributors × it).
    """
    import torch

    from fedadapt.state import unflatten_state

    specs = schema.specs("shared")
    limits = stage_limits(privacy, schema.num_params("shared"), schema.schema_id)
    talk = _Talk(grid, server_round, schema.schema_id, opener, timeout, limits)
    outcome = SecureRoundOutcome()
    try:
        secagg = SecAggRound(
            privacy,
            server_round,
            sampled,
            schema.num_params("shared"),
            seed=seed,
            run_id=run_id,
            max_examples_per_client=max_examples_per_client,
        )
    except SecAggError as err:  # too few clients for the configured shares: this round cannot be secure
        logger.warning("round %d: %s; the global state stays as it was", server_round, err)
        outcome.record = talk.record(None, error=str(err))
        return outcome
    try:
        requests = secagg.keys_received(*talk(stages.SETUP, secagg.setup_requests()))
        requests = secagg.shares_received(*talk(stages.SHARE_KEYS, requests))
        requests = secagg.masked_received(*talk(stages.MASKED, requests, global_blob))
        requests = secagg.consistency_received(*talk(stages.CONSISTENCY, requests))
        result = secagg.unmask_received(*talk(stages.UNMASK, requests))
    except SecAggError as err:
        logger.warning("round %d: secure aggregation failed: %s; the global state stays as it was", server_round, err)
        outcome.record = talk.record(secagg, error=str(err))
        outcome.client_metrics = talk.client_metrics()
        return outcome
    except Exception as err:  # last resort: whatever a client's bytes cause, the run goes on without this round
        logger.exception("round %d: secure aggregation failed unexpectedly", server_round)
        error = f"secure aggregation failed: unexpected {type(err).__name__}: {err}"[:REASON_LIMIT]
        outcome.record = talk.record(secagg, error=error)
        outcome.client_metrics = talk.client_metrics()
        return outcome
    outcome.mean = unflatten_state(torch.from_numpy(result.mean), specs)
    outcome.record = talk.record(secagg) | {
        "accepted": len(result.contributors),
        "total_examples": result.total_examples,
        "clipped_values": result.clipped_values,
        "recovered": [talk.label(n) for n in result.recovered],
    }
    outcome.client_metrics = talk.client_metrics()
    return outcome


class _Talk:
    """Sends one stage's requests, collects and opens the replies, and keeps the stage's figures."""

    def __init__(
        self,
        grid: Grid,
        server_round: int,
        schema_id: str,
        opener: ServerOpener,
        timeout: float,
        limits: dict[str, int],
    ) -> None:
        self.grid, self.server_round, self.schema_id = grid, server_round, schema_id
        self.opener, self.timeout, self.limits = opener, timeout, limits
        self.stages: dict[str, dict[str, float | int]] = {}
        self._metrics: dict[int, dict[str, Any]] = {}

    def __call__(
        self, stage: str, requests: dict[int, bytes], global_blob: bytes | None = None
    ) -> tuple[dict[int, bytes], dict[int, str]]:
        start = time.perf_counter()
        exchange = _Exchange()
        messages = []
        for node, payload in requests.items():
            arrays = {protocol.SECAGG_PAYLOAD: bytes_to_array(payload)}
            if global_blob is not None:
                arrays[protocol.ADAPTER_STATE] = bytes_to_array(global_blob)
            config = ConfigRecord(
                {
                    protocol.SERVER_ROUND: self.server_round,
                    protocol.SCHEMA_ID: self.schema_id,
                    protocol.SECAGG_STAGE: stage,
                }
            )
            content = RecordDict({protocol.ARRAYS: ArrayRecord(arrays), protocol.CONFIG: config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
            exchange.bytes_down += len(payload) + (len(global_blob) if global_blob is not None else 0)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        sent_to = destinations(messages)
        for reply in replies:
            self._take(stage, reply, exchange, reply_node(reply, sent_to))
        late = f"no reply within the round timeout ({self.timeout:g} s)"
        exchange.failed |= {n: late for n in requests if n not in exchange.replies and n not in exchange.failed}
        self.stages[stage] = {
            "seconds": time.perf_counter() - start,
            "bytes_down": exchange.bytes_down,
            "bytes_up": exchange.bytes_up,
            "replies": len(exchange.replies),
        }
        return exchange.replies, exchange.failed

    def _take(self, stage: str, reply: Message, exchange: _Exchange, node: int) -> None:
        """Read, bound-check and open one reply: it ends in ``exchange.replies`` or as the node's named failure."""
        try:
            read = read_stage_reply(reply, node, self.limits[stage])
            exchange.bytes_up += len(read.payload)
            exchange.replies[node] = self.opener.open(read.payload, self.server_round, node, self.schema_id, stage)
        except ReplyError as err:
            exchange.failed[node] = str(err)[:REASON_LIMIT]
            return
        except EnvelopeError as err:
            exchange.failed[node] = envelope_reason(err)
            return
        except Exception as err:  # last resort: a client's bytes must never end the round
            logger.exception("round %d: unexpected error in the %s reply of node %d", self.server_round, stage, node)
            exchange.failed[node] = unexpected_reason(err)
            return
        if read.metrics:
            self._metrics[node] = read.metrics

    def label(self, node: int) -> str:
        partition = self._metrics.get(node, {}).get("partition-id")
        return f"node {node}" if partition is None else f"client {partition} (node {node})"

    def client_metrics(self) -> list[dict[str, Any]]:
        return [{"client": self.label(node), **metrics} for node, metrics in self._metrics.items()]

    def record(self, secagg: SecAggRound | None, error: str | None = None) -> dict[str, Any]:
        """The round's protocol figures for metrics.json (never a key, share or vector)."""
        dropped = [
            {"client": self.label(node), "stage": reason.split(":", 1)[0], "reason": reason.split(": ", 1)[-1]}
            for node, reason in (secagg.dropped.items() if secagg is not None else ())
        ]
        record: dict[str, Any] = {
            "bytes_down": sum(int(s["bytes_down"]) for s in self.stages.values()),
            "bytes_up": sum(int(s["bytes_up"]) for s in self.stages.values()),
            "uploads": int(self.stages.get(stages.MASKED, {}).get("replies", 0)),
            "accepted": 0,
            "clipped": [],
            "dropped": dropped,
            "recovered": [],
            "clipped_values": None,
            "stages": self.stages,
        }
        if error is not None:
            record["error"] = error
        return record
