"""The server's peak memory in one plain round with 10 and 100 fake clients: replies folded as they arrive.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/round_memory.py [--compression fp16] [--per-poll 4]
      (``--per-poll 100``: every reply ready at once; the server still pulls at most 4 message ids at a time)

No Flower deployment and no model: a fake grid hands out replies (the MiniLM-L6 LoRA r=8 schema of
``aggregate_deltas.py``, 103,373 values, serialized as clients send them) a few per pull, as a SuperLink
does while devices finish, and the server's own code handles them: ``server.replies.reply_stream`` feeding
``server.federation.fold_plain_replies``. "collect first" is what the server did before issue 16 (the whole
``list(grid.send_and_receive(...))``, then the fold), measured in the same run for contrast.
Memory: tracemalloc's peak during the round, above what was allocated before it (every reply's bytes,
arrays and messages are Python or numpy allocations; torch's float64 sums are O(model) either way and not
counted). The ratio of the 100-client peak to the 10-client peak is the figure: ~1 means O(model).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from aggregate_deltas import minilm_lora_schema, synthetic_delta  # noqa: E402

from fedadapt.aggregate.server_optimizers import FedAvgConfig, ServerOptimizer  # noqa: E402
from fedadapt.aggregate.validation import DeltaValidator  # noqa: E402
from fedadapt.delta.serialize import Compression, max_blob_size, serialize_state  # noqa: E402
from fedadapt.delta.state import AdapterSchema, State  # noqa: E402
from fedadapt.fleet import protocol  # noqa: E402
from fedadapt.privacy.config import PrivacyConfig  # noqa: E402
from fedadapt.privacy.transport import ServerOpener  # noqa: E402
from server.federation import ReplyPlan, fold_plain_replies  # noqa: E402
from server.replies import reply_stream  # noqa: E402


class FakeGrid:
    """Answers each pushed message with a fresh copy of a client's delta, ``per_poll`` replies per pull."""

    def __init__(self, blob: bytes, per_poll: int) -> None:
        self.blob = blob
        self.per_poll = per_poll
        self.pushed: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
            self.pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ready = [i for i in message_ids if i in self.pushed][: self.per_poll]
        return [self._reply(self.pushed.pop(i)) for i in ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        replies: list[Message] = []
        while pending := [i for i in ids if i in self.pushed]:
            replies += self.pull_messages(pending)
        return replies

    def _reply(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(
                    {protocol.ADAPTER_DELTA: Array(np.frombuffer(self.blob, np.uint8).copy())}
                ),
                protocol.METRICS: MetricRecord({"partition-id": node, protocol.NUM_EXAMPLES: 100}),
            }
        )
        return Message(content=content, reply_to=message)


def _plan(schema: AdapterSchema, compression: Compression) -> ReplyPlan:
    limit = max_blob_size(schema, "shared", compression)
    return ReplyPlan(
        opener=ServerOpener(PrivacyConfig(mode="none"), 1, None),
        validator=DeltaValidator(schema, max_bytes=limit),
        optimizer=ServerOptimizer(FedAvgConfig(), schema),
        server_round=1,
        timeout=60.0,
        max_payload=limit,
        max_examples=10_000,
    )


def _messages(clients: int) -> list[Message]:
    return [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=100 + n) for n in range(clients)]


def _collected(grid: FakeGrid, messages: list[Message]) -> Iterator[tuple[int, Message | None]]:
    """Before issue 16: every reply received first, then handled."""
    replies = list(grid.send_and_receive(messages, timeout=60.0))
    return iter([(reply.metadata.src_node_id, reply) for reply in replies])


def peak_bytes(
    schema: AdapterSchema, state: State, blob: bytes, clients: int, per_poll: int, stream: bool
) -> tuple[int, int]:
    """(peak bytes above the start, accepted clients) of one round."""
    grid, messages, plan = FakeGrid(blob, per_poll), _messages(clients), _plan(schema, "fp16")
    gc.collect()
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    arrivals = reply_stream(grid, messages, 60.0, poll_seconds=0.0) if stream else _collected(grid, messages)
    _, fields, _ = fold_plain_replies(arrivals, state, plan)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - start, fields["accepted"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compression", default="fp16", choices=["none", "fp16", "int8"])
    parser.add_argument("--per-poll", type=int, default=4, help="replies one pull returns (devices finishing together)")
    args = parser.parse_args()
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        setattr(TaskIdentity, name, value)
    schema = minilm_lora_schema()
    state = synthetic_delta(schema, 0)  # the global state: any state of the schema
    blob = serialize_state(synthetic_delta(schema, 1), schema, "shared", args.compression)
    print(f"schema: {schema.num_params('shared'):,} values; one {args.compression} delta: {len(blob):,} bytes")
    print(f"{'server':<16}{'10 clients':>14}{'100 clients':>14}{'ratio':>8}")
    for label, stream in (("streaming", True), ("collect first", False)):
        small, accepted_small = peak_bytes(schema, state, blob, 10, args.per_poll, stream)
        large, accepted_large = peak_bytes(schema, state, blob, 100, args.per_poll, stream)
        if (accepted_small, accepted_large) != (10, 100):
            raise RuntimeError(f"expected every fake client accepted, got {accepted_small} and {accepted_large}")
        print(f"{label:<16}{small / 2**20:>11.1f} MB{large / 2**20:>11.1f} MB{large / small:>8.2f}")


if __name__ == "__main__":
    main()
