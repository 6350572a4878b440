"""The ServerApp's SecAgg+ round: five message exchanges that drive ``fedadapt.privacy.secagg.server.SecAggRound``.

Each client payload arrives sealed (``fedadapt.privacy.transport``) and is opened against the node Flower
names as its source; a payload that fails to open, a client error or a missing reply counts as a
dropout at that stage. Only the unmasked *sum* leaves ``SecAggRound``: this module turns its mean
into the schema's tensors for the server optimizer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedadapt.aggregate.validation import REASON_LIMIT
from fedadapt.delta.state import AdapterSchema, State, unflatten_state
from fedadapt.errors import EnvelopeError, ReplyError, SecAggError
from fedadapt.fleet import protocol
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.envelope import HEADER_SIZE, TAG_SIZE
from fedadapt.privacy.secagg import masking, stages, wire
from fedadapt.privacy.secagg.server import SecAggRound
from fedadapt.privacy.transport import ServerOpener
from server.replies import (
    bytes_to_array,
    envelope_reason,
    read_stage_reply,
    reply_stream,
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
    vector: np.ndarray | None = None  # the decoded flat mean, with any extra values (None when the round failed)
    record: dict[str, Any] = field(default_factory=dict)
    client_metrics: list[dict[str, Any]] = field(default_factory=list)


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
    extra_values: int = 0,
    stage_config: dict[str, float] | None = None,
) -> SecureRoundOutcome:
    """One SecAgg+ round over ``sampled``; SecAggError inside is caught and recorded as a failed round.

    ``seed`` draws the neighbour ring; ``run_id`` is bound into the clients' signatures;
    ``max_examples_per_client`` bounds the decoded example total (contributors × it). ``extra_values`` follow
    the delta's in every vector (DP's adaptive clip: the centred bit); ``stage_config`` goes into every message's
    config (DP's clip norm).
    """
    specs = schema.specs("shared")
    length = schema.num_params("shared") + extra_values
    limits = stage_limits(privacy, length, schema.schema_id)
    talk = _Talk(grid, server_round, schema.schema_id, opener, timeout, limits, stage_config or {})
    outcome = SecureRoundOutcome()
    try:
        secagg = SecAggRound(
            privacy,
            server_round,
            sampled,
            length,
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
        requests = _fold_masked(secagg, talk, requests, global_blob)
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
    outcome.vector = result.mean
    outcome.mean = unflatten_state(torch.from_numpy(result.mean[: length - extra_values]), specs)
    outcome.record = talk.record(secagg) | {
        "accepted": len(result.contributors),
        "total_examples": result.total_examples,
        "clipped_values": result.clipped_values,
        "recovered": [talk.label(n) for n in result.recovered],
    }
    outcome.client_metrics = talk.client_metrics()
    return outcome


def _fold_masked(secagg: SecAggRound, talk: _Talk, requests: dict[int, bytes], global_blob: bytes) -> dict[int, bytes]:
    """Stage 3: each masked vector goes into SecAggRound's running sum as it arrives and is dropped, so the
    server holds a pull's worth of vectors (``PULL_BATCH``), not one per client; consistency requests out."""
    failed: dict[int, str] = {}
    try:
        return secagg.masked_received(_Arrivals(talk.stream(stages.MASKED, requests, failed, global_blob)), {})
    finally:
        # Known only once the stream has ended: recorded as masked_received records the failures it is given.
        for node, reason in failed.items():
            if node not in secagg.dropped:
                secagg.dropped[node] = f"{stages.MASKED}: {reason}"
                logger.info("secagg round %d: node %d left at %s: %s", secagg.server_round, node, stages.MASKED, reason)


class _Arrivals(Mapping[int, bytes]):
    """A stage's replies as a one-pass mapping: ``items()`` yields each as it arrives and nothing is kept."""

    def __init__(self, stream: Iterator[tuple[int, bytes]]) -> None:
        self._stream = stream

    def items(self) -> Iterator[tuple[int, bytes]]:  # type: ignore[override]
        return self._stream

    def __getitem__(self, node: int) -> bytes:
        raise KeyError(node)  # no reply is kept to look up

    def __iter__(self) -> Iterator[int]:
        raise TypeError("the replies stream by: read them once, through items()")

    def __len__(self) -> int:
        raise TypeError("the replies stream by: their number is known only at the end")


class _Talk:
    """Sends one stage's requests, opens each reply as it arrives (pulled a few at a time) and keeps the figures."""

    def __init__(
        self,
        grid: Grid,
        server_round: int,
        schema_id: str,
        opener: ServerOpener,
        timeout: float,
        limits: dict[str, int],
        extra_config: dict[str, float] | None = None,
    ) -> None:
        self.grid, self.server_round, self.schema_id = grid, server_round, schema_id
        self.opener, self.timeout, self.limits = opener, timeout, limits
        self.extra_config = extra_config or {}
        self.stages: dict[str, dict[str, float | int]] = {}
        self._metrics: dict[int, dict[str, Any]] = {}

    def __call__(
        self, stage: str, requests: dict[int, bytes], global_blob: bytes | None = None
    ) -> tuple[dict[int, bytes], dict[int, str]]:
        """One stage's opened replies by node, and the nodes that failed with their reasons."""
        failed: dict[int, str] = {}
        replies = dict(self.stream(stage, requests, failed, global_blob))
        return replies, failed

    def stream(
        self, stage: str, requests: dict[int, bytes], failed: dict[int, str], global_blob: bytes | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """Send ``stage``'s requests and yield ``(node, opened payload)`` as each reply arrives; a node whose reply
        fails, is late or is missing goes to ``failed`` with its reason. The stage's figures are kept at the end."""
        start = time.perf_counter()
        figures = {"bytes_down": 0, "bytes_up": 0, "replies": 0}
        shared = bytes_to_array(global_blob) if global_blob is not None else None  # one copy for every message
        messages = []
        for node, payload in requests.items():
            arrays = {protocol.SECAGG_PAYLOAD: bytes_to_array(payload)}
            if shared is not None:
                arrays[protocol.ADAPTER_STATE] = shared
            config = ConfigRecord(
                {
                    protocol.SERVER_ROUND: self.server_round,
                    protocol.SCHEMA_ID: self.schema_id,
                    protocol.SECAGG_STAGE: stage,
                    **self.extra_config,
                }
            )
            content = RecordDict({protocol.ARRAYS: ArrayRecord(arrays), protocol.CONFIG: config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
            figures["bytes_down"] += len(payload) + (len(global_blob) if global_blob is not None else 0)
        late = f"no reply within the round timeout ({self.timeout:g} s)"
        for node, reply in reply_stream(self.grid, messages, self.timeout):
            if reply is None:
                failed.setdefault(node, late)
                continue
            opened = self._take(stage, reply, node, failed, figures)
            del reply  # only the opened payload goes on
            if opened is not None:
                figures["replies"] += 1
                yield node, opened
        self.stages[stage] = {"seconds": time.perf_counter() - start, **figures}

    def _take(
        self, stage: str, reply: Message, node: int, failed: dict[int, str], figures: dict[str, int]
    ) -> bytes | None:
        """Read, bound-check and open one reply: its opened payload, or None with the node's reason in ``failed``."""
        try:
            read = read_stage_reply(reply, node, self.limits[stage])
            figures["bytes_up"] += len(read.payload)
            opened = self.opener.open(read.payload, self.server_round, node, self.schema_id, stage)
        except ReplyError as err:
            failed[node] = str(err)[:REASON_LIMIT]
            return None
        except EnvelopeError as err:
            failed[node] = envelope_reason(err)
            return None
        except Exception as err:  # last resort: a client's bytes must never end the round
            logger.exception("round %d: unexpected error in the %s reply of node %d", self.server_round, stage, node)
            failed[node] = unexpected_reason(err)
            return None
        if read.metrics:
            self._metrics[node] = read.metrics
        return opened

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
