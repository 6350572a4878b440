"""Turning Flower messages into bytes and reasons: payload arrays and the client's own error message."""

from __future__ import annotations

import re

import numpy as np
from flwr.app import Array, Message

from fedadapt.aggregate import REASON_LIMIT
from fedadapt.errors import EnvelopeError


def bytes_to_array(blob: bytes) -> Array:
    """Bytes as a uint8 Array (Flower chunks large arrays on the wire; np.save format, no pickle)."""
    return Array(np.frombuffer(blob, dtype=np.uint8))


def array_to_bytes(array: Array) -> bytes:
    return array.numpy().tobytes()


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


def malformed_reason(err: Exception) -> str:
    """The rejection reason of a reply that lacks a record or holds a wrong one."""
    return f"malformed reply: missing or bad {err}"[:REASON_LIMIT]
