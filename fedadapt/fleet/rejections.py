"""Rejection reasons folded into a few short classes: bounded labels for metrics, counts for ``fedadapt status``.

The server words every reason itself (server/replies.py, fedadapt/aggregate); a client-chosen string inside one
can only move it between these classes, never add a class.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

# The first pattern that matches names the class.
REASON_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("timeout", re.compile(r"^no reply within the round timeout")),
    ("client_error", re.compile(r"^client error")),
    ("envelope", re.compile(r"^envelope rejected")),
    ("malformed", re.compile(r"^malformed reply")),
    ("too_large", re.compile(r"^(payload|StateError: blob) of \d+ bytes exceeds")),
    ("duplicate", re.compile(r"^a second reply from the same client")),
    ("examples", re.compile(r"^num[-_]examples ")),
    ("norm", re.compile(r"^StateError: delta L2 norm")),
    ("schema", re.compile(r"^[A-Za-z]*(Error|Mismatch): ")),
    ("unexpected", re.compile(r"^unexpected ")),
)
OTHER = "other"
# secagg+ records a device lost in a protocol stage under "dropped", with the stage (fedadapt.privacy.secagg.stages).
SECAGG_STAGES = ("secagg-setup", "secagg-share-keys", "secagg-masked", "secagg-consistency", "secagg-unmask")
DROPPED_CLASSES = tuple(f"dropped_{stage.removeprefix('secagg-')}" for stage in SECAGG_STAGES)
CLASSES = (*(name for name, _ in REASON_CLASSES), *DROPPED_CLASSES, OTHER)


def reason_class(reason: object) -> str:
    """The class of a rejection reason, one of ``CLASSES``."""
    text = reason if isinstance(reason, str) else ""
    return next((name for name, pattern in REASON_CLASSES if pattern.search(text)), OTHER)


def dropped_class(stage: object) -> str:
    """The class of a secagg+ device lost at ``stage``: ``dropped_<stage>`` for a protocol stage, else other."""
    if isinstance(stage, str) and stage in SECAGG_STAGES:
        return f"dropped_{stage.removeprefix('secagg-')}"
    return OTHER


def round_rejections(record: object) -> Counter[str]:
    """One metrics.json round's rejected and dropped devices, counted by class (anything malformed: other)."""
    counts: Counter[str] = Counter()
    if not isinstance(record, dict):
        return counts
    for entry in _entries(record.get("rejected")):
        counts[reason_class(entry.get("reason"))] += 1
    for entry in _entries(record.get("dropped")):
        counts[dropped_class(entry.get("stage"))] += 1
    return counts


def _entries(value: object) -> Iterable[dict[str, Any]]:
    if isinstance(value, list):
        yield from (entry if isinstance(entry, dict) else {} for entry in value)
