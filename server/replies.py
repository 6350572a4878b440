"""Turning Flower messages into bytes and reasons: the stream of a round's replies, payload arrays read
within bounds, and the reason each bad reply is left out for.

``reply_stream`` pushes a round's messages and yields each reply as it arrives (Flower's public
``Grid.push_messages`` / ``pull_messages``, polled at a short interval until the round timeout), so the
server can open, check and fold one reply and drop it before the next: its memory per round is
O(model), not O(clients). ``read_delta_reply`` turns one reply into a payload or a ``ReplyError``:
every record, dtype, shape, size and metric a client sends is checked before it is used.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedadapt.aggregate.validation import REASON_LIMIT
from fedadapt.errors import EnvelopeError, ReplyError
from fedadapt.fleet import protocol

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often the server asks for replies (Flower's send_and_receive waits 3 s between asks)
# Message ids per pull: Flower builds every reply a pull returns in full (all its arrays) before handing any
# over, so one pull for every pending id could hold a whole round's replies at once.
PULL_BATCH = 4
MAX_METRICS = 64  # scalar metrics a reply may carry; each name at most MAX_METRIC_NAME characters
MAX_METRIC_NAME = 64
_NPY_HEADER = 4096  # bytes an .npy header of a 1-D uint8 array takes at most (numpy pads it to 64 bytes)
_SHOWN = 60  # characters of a client-chosen name quoted in a reason


def bytes_to_array(blob: bytes) -> Array:
    """Bytes as a uint8 Array (Flower chunks large arrays on the wire; np.save format, no pickle)."""
    return Array(np.frombuffer(blob, dtype=np.uint8))


def destinations(messages: list[Message]) -> dict[str, int]:
    """Message id → destination node of messages already sent (the grid sets their ids when it pushes them)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def reply_node(reply: Message, sent_to: dict[str, int]) -> int:
    """The node a reply answers for. Errors the SuperLink makes itself ("Node Unavailable") carry the
    SuperLink's own id as their source; the message they reply to names the real node."""
    return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^[\w.]+(?:Error|Exception|Failure|Interrupt)\w*: .+")


def client_error_reason(text: str | None, limit: int = REASON_LIMIT) -> str:
    """The client exception's own message out of the traceback Flower (and Ray) wrap it in."""
    lines = [line.strip() for line in _ANSI.sub("", text or "").splitlines() if line.strip()]
    messages = [line.split("Message: ", 1)[1] for line in lines if "Message: " in line]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    reason = (messages or exceptions or lines or ["(no reason given)"])[-1]
    return reason.rstrip("'\"> ")[:limit]  # Ray wraps the message in "<'...'>"


def envelope_reason(err: EnvelopeError) -> str:
    """The rejection reason of a payload that failed to open (the envelope's own reason first)."""
    return f"envelope rejected ({err.reason}): {err}"[:REASON_LIMIT]


# --- the round's replies, one at a time -------------------------------------------------------------------------


def reply_stream(
    grid: Grid, messages: list[Message], timeout: float, poll_seconds: float = POLL_SECONDS
) -> Iterator[tuple[int, Message | None]]:
    """Push ``messages``, then yield ``(node, reply)`` as each reply arrives, and ``(node, None)`` for each
    message without a reply when ``timeout`` seconds have passed (or that could not be pushed).

    Only the first reply to each message counts; anything else the grid returns is ignored. Replies are
    pulled at most ``PULL_BATCH`` message ids at a time and the caller handles each reply before the next
    pull, so no more than ``PULL_BATCH`` replies are held at once.
    """
    pushed = list(grid.push_messages(messages))
    pending: dict[str, int] = {}
    for message, message_id in zip(messages, pushed, strict=False):
        if message_id:
            pending[str(message_id)] = message.metadata.dst_node_id
    unpushed = [m.metadata.dst_node_id for m in messages[len(pushed) :]]
    unpushed += [m.metadata.dst_node_id for m, i in zip(messages, pushed, strict=False) if not i]
    deadline = time.monotonic() + timeout
    while pending:
        waiting = list(pending)
        for start in range(0, len(waiting), PULL_BATCH):
            replies = list(grid.pull_messages(waiting[start : start + PULL_BATCH]))
            replies.reverse()
            while replies:  # popped, not iterated: no reply of this batch is kept past its turn
                node = pending.pop(replies[-1].metadata.reply_to_message_id, None)
                if node is None:
                    replies.pop()
                    continue
                yield node, replies.pop()
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
    for node in [*pending.values(), *unpushed]:
        yield node, None


@dataclass(frozen=True)
class DeltaReply:
    """One client's plain-round reply, read within bounds: its label, payload, clear count and metrics."""

    client: str
    payload: bytes  # the serialized delta, or its envelope in sealed modes
    num_examples: object  # the clear count as sent (None in sealed modes); aggregation checks it
    metrics: dict[str, int | float]


def _checked_payload(reply: Message, key: str, max_bytes: int) -> tuple[RecordDict, bytes]:
    """The reply's content and its one payload array ``key`` as bytes, within ``max_bytes``; ReplyError otherwise.

    Shared by the plain round's and the SecAgg+ stages' readers: a client error, a missing or extra array or
    record, and an oversize or malformed payload are refused the same way in both.
    """
    if reply.has_error():
        raise ReplyError(f"client error: {client_error_reason(reply.error.reason)}")
    # Records are looked up by key, not through ``content.array_records``: those views reference themselves,
    # so every reply they touched would wait for the garbage collector instead of being freed at once.
    content = reply.content
    arrays = content.get(protocol.ARRAYS)
    if not isinstance(arrays, ArrayRecord) or key not in arrays:
        raise ReplyError(f"malformed reply: no {protocol.ARRAYS}/{key} array")
    only_expected(content, arrays, key)
    return content, payload_bytes(arrays[key], max_bytes)


def read_delta_reply(reply: Message, node: int, max_bytes: int) -> DeltaReply:
    """The delta payload and metrics of ``reply``; ReplyError naming what is wrong otherwise.

    ``max_bytes`` bounds the payload (the largest legal one for the round's schema, compression and
    privacy mode), checked on the array's metadata and its size before the array is decoded.
    """
    content, payload = _checked_payload(reply, protocol.ADAPTER_DELTA, max_bytes)
    record = content.get(protocol.METRICS)
    if not isinstance(record, MetricRecord):
        raise ReplyError(f"malformed reply: no {protocol.METRICS} record")
    metrics = checked_metrics(dict(record))
    num_examples = metrics.pop(protocol.NUM_EXAMPLES, None)  # sealed modes: inside the envelope
    return DeltaReply(client_label(node, metrics), payload, num_examples, metrics)


@dataclass(frozen=True)
class StageReply:
    """One client's SecAgg+ stage reply, read within bounds: its sealed payload and its (checked) metrics."""

    client: str
    payload: bytes
    metrics: dict[str, int | float]


def read_stage_reply(reply: Message, node: int, max_bytes: int) -> StageReply:
    """The sealed payload and metrics of a SecAgg+ stage reply; ReplyError naming what is wrong otherwise.

    Read as ``read_delta_reply`` reads a plain round's reply: ``max_bytes`` is the stage's cap, the
    metrics record is optional (only the masked stage sends one) and checked when present.
    """
    content, payload = _checked_payload(reply, protocol.SECAGG_PAYLOAD, max_bytes)
    metrics: dict[str, int | float] = {}
    if protocol.METRICS in content:
        record = content.get(protocol.METRICS)
        if not isinstance(record, MetricRecord):
            raise ReplyError(f"malformed reply: {protocol.METRICS} is a {type(record).__name__}, not a MetricRecord")
        metrics = checked_metrics(dict(record))
    return StageReply(client_label(node, metrics), payload, metrics)


def only_expected(content: RecordDict, arrays: ArrayRecord, payload: str) -> None:
    """ReplyError unless the reply holds no record but ``arrays`` and ``metrics`` and no array but ``payload``:
    the payload's cap bounds the reply only when nothing rides beside it."""
    extra = [name for name in content if name not in (protocol.ARRAYS, protocol.METRICS)]
    if extra:
        raise ReplyError(f"malformed reply: unexpected record {str(extra[0])[:_SHOWN]!r} beside arrays and metrics")
    extra = [name for name in arrays if name != payload]
    if extra:
        raise ReplyError(f"malformed reply: unexpected array {str(extra[0])[:_SHOWN]!r} beside {payload}")


def client_label(node: int, metrics: dict[str, int | float]) -> str:
    """How reasons and metrics.json name the client: by its partition id when it sends one (checked here)."""
    if "partition-id" not in metrics:
        return f"node {node}"
    partition = metrics["partition-id"]
    if isinstance(partition, float) or partition < 0:
        raise ReplyError(f"malformed reply: partition-id must be a non-negative int, got {partition!r}")
    return f"client {partition} (node {node})"


def payload_bytes(array: Array, max_bytes: int) -> bytes:
    """The bytes of a 1-D uint8 payload array of at most ``max_bytes``; ReplyError otherwise."""
    if not isinstance(array, Array):
        raise ReplyError(f"malformed reply: the payload is a {type(array).__name__}, not an Array")
    shape = list(array.shape) if isinstance(array.shape, list | tuple) else []
    one_dim = len(shape) == 1 and isinstance(shape[0], int) and isinstance(array.data, bytes)
    if array.dtype != "uint8" or not one_dim:
        raise ReplyError(f"malformed reply: the payload must be a 1-D uint8 array, got {str(array.dtype)[:_SHOWN]!r}")
    if shape[0] > max_bytes or len(array.data) > max_bytes + _NPY_HEADER:
        size = max(shape[0], len(array.data) - _NPY_HEADER)
        raise ReplyError(f"payload of {size} bytes exceeds the {max_bytes} the largest legal one takes")
    try:
        decoded = array.numpy()
    except (ValueError, TypeError, EOFError, OSError) as err:  # what np.load raises on a bad .npy
        raise ReplyError(f"malformed reply: the payload array does not decode ({str(err)[:_SHOWN]})") from None
    if not isinstance(decoded, np.ndarray):  # np.load reads an .npz as an NpzFile
        raise ReplyError(f"malformed reply: the payload array's data is a {type(decoded).__name__}, not an .npy array")
    if decoded.dtype != np.uint8 or decoded.ndim != 1 or decoded.size > max_bytes:
        raise ReplyError("malformed reply: the payload array's data is not the 1-D uint8 array its metadata says")
    return decoded.tobytes()


def checked_metrics(metrics: dict[str, object]) -> dict[str, int | float]:
    """Client metrics that may go into metrics.json: at most MAX_METRICS finite scalars with short names."""
    if len(metrics) > MAX_METRICS:
        raise ReplyError(f"malformed reply: {len(metrics)} metrics, at most {MAX_METRICS} are accepted")
    checked: dict[str, int | float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > MAX_METRIC_NAME:
            raise ReplyError(f"malformed reply: metric name {str(name)[:_SHOWN]!r} is longer than {MAX_METRIC_NAME}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ReplyError(f"malformed reply: metric {name!r} is a {type(value).__name__}, not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ReplyError(f"malformed reply: metric {name!r} is {value!r}")
        checked[name] = value
    return checked


def late_reason(timeout: float) -> str:
    return f"no reply within the round timeout ({timeout:g} s): a lost or straggling device"


def unexpected_reason(err: Exception) -> str:
    """The reason for a reply that raised what no check foresaw: the client's bytes caused it, the round goes on."""
    return f"unexpected {type(err).__name__} while reading the reply: {err}"[:REASON_LIMIT]
