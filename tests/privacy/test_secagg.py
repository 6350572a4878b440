"""SecAgg+ end to end in process: exact FedAvg means, masking, clipping, dropouts, refusals, configuration."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedadapt.errors import ConfigError, PayloadError, SecAggError
from fedadapt.privacy.config import PrivacyConfig
from fedadapt.privacy.secagg import client, identity, masking, stages, wire
from fedadapt.privacy.secagg.identity import Identity
from fedadapt.privacy.secagg.server import SecAggResult, SecAggRound

ROUND = 3
RUN_ID = 77
GONE = "connection lost"
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973


@functools.lru_cache(maxsize=4096)
def identity_key(node: int) -> ec.EllipticCurvePrivateKey:
    """A device identity key per node id, derived so tests need not store them (never do this for real keys)."""
    return ec.derive_private_key(node % (_P384_ORDER - 1) + 1, ec.SECP384R1())


def device(node: int, roster: Iterable[int] = ()) -> Identity:
    """Node ``node``'s identity in run ``RUN_ID``, trusting the identities of ``roster`` (node ids)."""
    keys = frozenset(identity.openssh_public(identity_key(n).public_key()) for n in {node, *roster})
    return Identity(RUN_ID, identity_key(node), keys)


def secagg(num_shares: int = 3, threshold: int = 2, **changes: object) -> PrivacyConfig:
    # The dropout tests use thresholds below num-shares - 1 on sparse rings (two dropouts per neighbourhood):
    # the config accepts those only under the honest-server assumption, which these protocol tests make.
    changes.setdefault("assume_honest_server", threshold < num_shares - 1)
    return PrivacyConfig(mode="secagg+", num_shares=num_shares, reconstruction_threshold=threshold, **changes)  # type: ignore[arg-type]


Tamper = Callable[[str, int, bytes], bytes]
"""``tamper(stage, node, reply)``: the reply the server gets instead of ``reply`` (stage names as in ``stages``)."""


@dataclass
class Trace:
    """One driven round: inputs, what each side sent, and the result (None when stopped early)."""

    config: PrivacyConfig
    server: SecAggRound
    nodes: list[int]
    deltas: dict[int, np.ndarray]
    counts: dict[int, int]
    sessions: dict[int, bytes] = field(default_factory=dict)
    requests: dict[str, dict[int, bytes]] = field(default_factory=dict)  # stage → what the clients were asked
    replies: dict[str, dict[int, bytes]] = field(default_factory=dict)  # stage → what the server received
    devices: dict[int, Identity] = field(default_factory=dict)  # each client's identity and roster
    encoded: dict[int, np.ndarray] = field(default_factory=dict)  # each client's vector before masking
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # the masked vectors the server received
    result: SecAggResult | None = None


def make_inputs(
    n: int, length: int, seed: int = 0, scale: float = 0.3, count_range: tuple[int, int] = (1, 200)
) -> tuple[list[int], dict[int, np.ndarray], dict[int, int]]:
    """``n`` distinct large node ids, a delta of ``length`` values and an example count for each."""
    rng = np.random.default_rng(seed)
    nodes: list[int] = []
    while len(nodes) < n:
        node = int(rng.integers(1, 2**63))
        if node not in nodes:
            nodes.append(node)
    deltas = {node: rng.normal(0.0, scale, length) for node in nodes}
    counts = {node: int(rng.integers(*count_range)) for node in nodes}
    return nodes, deltas, counts


def run_round(
    n: int = 5,
    length: int = 64,
    config: PrivacyConfig | None = None,
    *,
    drop_at: Mapping[str, Iterable[int]] | None = None,
    tamper: Tamper | None = None,
    stop_before: str | None = None,
    inputs: tuple[list[int], dict[int, np.ndarray], dict[int, int]] | None = None,
    seed: int = 0,
    max_examples: int | None = None,
) -> Trace:
    """Drive one round between a ``SecAggRound`` and ``n`` in-process clients.

    ``drop_at[stage]``: nodes that never answer ``stage`` (reported to the server as failed).
    ``tamper``: rewrites replies before the server sees them. ``max_examples``: the server's per-client cap.
    ``stop_before``: return once the
    clients hold the requests of that stage (``stages.MASKED`` is the forwarded shares), before
    they answer it: the sessions and requests then let a test call the client functions itself.
    """
    config = config or secagg()
    nodes, deltas, counts = inputs or make_inputs(n, length, seed)
    drops = {stage: set(lost) for stage, lost in (drop_at or {}).items()}
    server = SecAggRound(
        config,
        ROUND,
        nodes,
        len(next(iter(deltas.values()))),
        seed=seed,
        run_id=RUN_ID,
        max_examples_per_client=max_examples,
    )
    trace = Trace(config, server, nodes, deltas, counts, devices={node: device(node, nodes) for node in nodes})

    def answer(stage: str, requests: dict[int, bytes], respond: Callable[[int, bytes], bytes]) -> tuple:
        trace.requests[stage] = requests
        if stage == stop_before:
            return None
        replies, failed = {}, {}
        for node, request in requests.items():
            if node in drops.get(stage, ()):
                failed[node] = GONE
                continue
            reply = respond(node, request)
            replies[node] = tamper(stage, node, reply) if tamper else reply
        trace.replies[stage] = replies
        return replies, failed

    def setup(node: int, request: bytes) -> bytes:
        step = client.setup(config, ROUND, node, request, trace.devices[node])
        trace.sessions[node] = step.session
        return step.reply

    def share_keys(node: int, request: bytes) -> bytes:
        step = client.share_keys(config, ROUND, trace.sessions[node], request, trace.devices[node])
        trace.sessions[node] = step.session
        return step.reply

    def train_and_mask(node: int, request: bytes) -> bytes:
        trace.sessions[node] = client.receive_shares(config, ROUND, trace.sessions[node], request)
        # Quantization rounds stochastically with NumPy's global generator: the same seed twice
        # gives the exact vector the client encodes before masking it.
        np.random.seed(node % 2**32)
        trace.encoded[node] = masking.encode(trace.deltas[node], trace.counts[node], config).vector
        np.random.seed(node % 2**32)
        step = client.mask(config, ROUND, trace.sessions[node], trace.deltas[node], trace.counts[node])
        trace.sessions[node] = step.session
        return step.reply

    def consistency(node: int, request: bytes) -> bytes:
        step = client.consistency(ROUND, trace.sessions[node], request, trace.devices[node])
        trace.sessions[node] = step.session
        return step.reply

    def unmask(node: int, request: bytes) -> bytes:
        step = client.unmask(config, ROUND, trace.sessions[node], request)
        trace.sessions[node] = step.session
        return step.reply

    got = answer(stages.SETUP, server.setup_requests(), setup)
    if got is None:
        return trace
    got = answer(stages.SHARE_KEYS, server.keys_received(*got), share_keys)
    if got is None:
        return trace
    got = answer(stages.MASKED, server.shares_received(*got), train_and_mask)
    if got is None:
        return trace
    dtype = masking.field_dtype(config)
    for node, blob in got[0].items():
        with contextlib.suppress(PayloadError, KeyError, ValueError):  # a tampered reply: the server drops it
            trace.masked[node] = np.frombuffer(wire.unpack(blob)[stages.MASKED_VECTOR], dtype=dtype)
    got = answer(stages.CONSISTENCY, server.masked_received(*got), consistency)
    if got is None:
        return trace
    got = answer(stages.UNMASK, server.consistency_received(*got), unmask)
    if got is None:
        return trace
    trace.result = server.unmask_received(*got)
    return trace


def fedavg(trace: Trace, members: list[int]) -> tuple[np.ndarray, int]:
    """The plain example-weighted mean of the clipped deltas of ``members``, and their example total."""
    clip = trace.config.clipping_range
    total = sum(trace.counts[node] for node in members)
    mean = sum(trace.counts[node] * np.clip(trace.deltas[node], -clip, clip) for node in members) / total
    return mean, total


def assert_mean_of(trace: Trace, members: list[int]) -> None:
    """The round's result is the FedAvg mean of exactly ``members``, within one quantization step."""
    result = trace.result
    assert result is not None
    expected, total = fedavg(trace, members)
    assert sorted(result.contributors) == sorted(members)
    assert result.total_examples == total
    assert result.mean.shape == expected.shape
    assert result.mean.dtype == np.float64
    error = np.abs(result.mean - expected).max()
    assert error <= trace.config.quantization_step * (1 + 1e-9), (error, trace.config.quantization_step)


def expect_refusal(call: Callable[[], object], *words: str) -> str:
    with pytest.raises(SecAggError) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


# --- 1. the mean ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize(
    ("n", "num_shares", "threshold"),
    [(3, 3, 2), (7, 5, 3), (20, 3, 2)],
    ids=["3-complete", "7-shares5-t3", "20-shares3"],
)
def test_mean_equals_plain_fedavg(n: int, num_shares: int, threshold: int, bits: int) -> None:
    config = secagg(num_shares, threshold, modulus_bits=bits)
    trace = run_round(n, 300, config, seed=n)
    assert_mean_of(trace, trace.nodes)
    result = trace.result
    assert result is not None
    assert result.total_examples == sum(trace.counts.values())
    assert result.recovered == []
    assert result.dropped == {}
    clip = config.clipping_range
    assert result.clipped_values == sum(int(np.count_nonzero(np.abs(d) > clip)) for d in trace.deltas.values())
    # The mean is informative, not a blur: it tracks the deltas far closer than their spread.
    assert np.abs(result.mean).max() > 10 * config.quantization_step


def test_mean_with_coarse_quantization_stays_within_the_step() -> None:
    """A coarse grid (256 levels) shows the bound is the real one, not hidden by a tiny step."""
    config = secagg(quantization_range=256, clipping_range=0.5)
    trace = run_round(6, 500, config, seed=11)
    assert_mean_of(trace, trace.nodes)
    expected, _ = fedavg(trace, trace.nodes)
    assert trace.result is not None
    assert np.abs(trace.result.mean - expected).max() > config.quantization_step / 100  # it is a quantized answer


def test_two_clients_with_two_shares() -> None:
    trace = run_round(2, 40, secagg(2, 2), seed=5)
    assert_mean_of(trace, trace.nodes)


# --- 2. the server sees only masked vectors --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_server_never_receives_an_unmasked_vector(bits: int) -> None:
    config = secagg(modulus_bits=bits)
    length = 2000
    trace = run_round(5, length, config, seed=3)
    assert_mean_of(trace, trace.nodes)
    assert set(trace.masked) == set(trace.nodes)
    modulus = 2.0**bits
    for node in trace.nodes:
        masked, encoded = trace.masked[node], trace.encoded[node]
        assert masked.shape == encoded.shape == (length + masking.EXTRA_ENTRIES,)
        assert np.mean(masked != encoded) > 0.99
        # Uniform over the field: mean near 1/2, about 1/2 of the values above 2**(bits-1).
        assert abs(np.mean(masked / modulus) - 0.5) < 0.05
        assert abs(np.mean(masked >= modulus / 2) - 0.5) < 0.05
        # whereas the encoded values are small multiples of quantization levels
        assert np.mean(encoded / modulus) < 0.01
        # The example count and the clipped count travel masked too.
        assert masked[-2] != trace.counts[node]
    # Masks differ between clients: no two masked vectors share many positions.
    first, second = (trace.masked[node] for node in trace.nodes[:2])
    assert np.mean(first == second) < 0.01


def test_the_masks_cancel_only_in_the_sum() -> None:
    """The sum of the masked vectors is not the sum of the encoded ones: the self-masks are still on it."""
    trace = run_round(4, 200, secagg(), seed=4)
    dtype = masking.field_dtype(trace.config)
    masked_sum = np.zeros(202, dtype=dtype)
    encoded_sum = np.zeros(202, dtype=dtype)
    for node in trace.nodes:
        masked_sum += trace.masked[node]
        encoded_sum += trace.encoded[node]
    assert np.mean(masked_sum != encoded_sum) > 0.99
    assert_mean_of(trace, trace.nodes)


# --- 3. clipping -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_clipped_values_are_counted_exactly(bits: int) -> None:
    config = secagg(clipping_range=0.5, modulus_bits=bits)
    nodes, deltas, counts = make_inputs(5, 400, seed=9, scale=0.4)
    deltas[nodes[0]][:3] = [0.5, -0.5, 0.4999]  # on the boundary: not clipped
    deltas[nodes[1]][:4] = [7.0, -3.0, 0.5000001, -1e9]
    outside = sum(int(np.count_nonzero(np.abs(delta) > 0.5)) for delta in deltas.values())
    assert outside > 20  # the normal draws cross the range too
    trace = run_round(config=config, inputs=(nodes, deltas, counts))
    assert trace.result is not None
    assert trace.result.clipped_values == outside
    assert_mean_of(trace, nodes)  # against the clipped deltas
    # and clipping does change the answer: the unclipped mean is further away than the bound
    unclipped = sum(counts[node] * deltas[node] for node in nodes) / sum(counts.values())
    assert np.abs(trace.result.mean - unclipped).max() > 100 * config.quantization_step


# --- 4. dropouts -----------------------------------------------------------------------------------------------


def test_client_lost_after_sharing_before_masking_is_removed_from_the_sum() -> None:
    config = secagg(5, 3)
    nodes, deltas, counts = make_inputs(7, 120, seed=21)
    lost = nodes[2]
    trace = run_round(config=config, inputs=(nodes, deltas, counts), drop_at={stages.MASKED: [lost]})
    survivors = [node for node in nodes if node != lost]
    assert_mean_of(trace, survivors)
    result = trace.result
    assert result is not None
    assert list(result.dropped) == [lost]
    assert result.dropped[lost].startswith(stages.MASKED)
    assert GONE in result.dropped[lost]
    assert result.recovered == []
    assert result.total_examples == sum(counts.values()) - counts[lost]


def test_client_lost_after_masking_stays_in_the_sum() -> None:
    config = secagg(5, 3)
    nodes, deltas, counts = make_inputs(7, 120, seed=22)
    lost = nodes[4]
    trace = run_round(config=config, inputs=(nodes, deltas, counts), drop_at={stages.UNMASK: [lost]})
    assert_mean_of(trace, nodes)
    assert trace.result is not None
    assert trace.result.recovered == [lost]
    assert trace.result.dropped == {}


@pytest.mark.parametrize("stage", [stages.SETUP, stages.SHARE_KEYS])
def test_client_lost_before_sharing_simply_leaves(stage: str) -> None:
    nodes, deltas, counts = make_inputs(5, 80, seed=23)
    lost = nodes[0]
    trace = run_round(inputs=(nodes, deltas, counts), drop_at={stage: [lost]})
    assert_mean_of(trace, nodes[1:])
    assert trace.result is not None
    assert list(trace.result.dropped) == [lost]
    assert trace.result.dropped[lost] == f"{stage}: {GONE}"
    assert trace.result.recovered == []


def test_dropouts_at_every_stage_in_one_round() -> None:
    """20 clients, 7 shares, threshold 4: each neighbourhood may lose 3; one client leaves at each stage."""
    config = secagg(7, 4, modulus_bits=64)
    nodes, deltas, counts = make_inputs(20, 150, seed=24)
    at_setup, at_keys, at_mask, at_unmask = nodes[0], nodes[5], nodes[10], nodes[15]
    drop_at = {
        stages.SETUP: [at_setup],
        stages.SHARE_KEYS: [at_keys],
        stages.MASKED: [at_mask],
        stages.UNMASK: [at_unmask],
    }
    graph = SecAggRound(config, ROUND, nodes, 150, seed=1).neighbours
    lost = {at_setup, at_keys, at_mask, at_unmask}
    assert all(len(lost & {node, *graph[node]}) <= 3 for node in nodes)  # no neighbourhood loses all four
    trace = run_round(config=config, inputs=(nodes, deltas, counts), drop_at=drop_at, seed=1)
    assert_mean_of(trace, [node for node in nodes if node not in (at_setup, at_keys, at_mask)])
    result = trace.result
    assert result is not None
    assert result.recovered == [at_unmask]
    assert {node: reason.split(":")[0] for node, reason in result.dropped.items()} == {
        at_setup: stages.SETUP,
        at_keys: stages.SHARE_KEYS,
        at_mask: stages.MASKED,
    }


def test_several_dropouts_before_and_after_masking() -> None:
    config = secagg(5, 3)
    nodes, deltas, counts = make_inputs(9, 100, seed=25)
    server = SecAggRound(config, ROUND, nodes, 100, seed=0)
    # two clients that are not neighbours: each neighbourhood loses at most one
    first = nodes[0]
    second = next(node for node in nodes if node != first and node not in server.neighbours[first])
    trace = run_round(
        config=config, inputs=(nodes, deltas, counts), drop_at={stages.MASKED: [first], stages.UNMASK: [second]}
    )
    assert_mean_of(trace, [node for node in nodes if node != first])
    assert trace.result is not None
    assert trace.result.recovered == [second]
    assert list(trace.result.dropped) == [first]


def test_too_many_dropouts_before_masking_fail_the_round() -> None:
    """Two neighbours lost after sharing: the mask key of one has a single holder left of 2 needed."""
    nodes, deltas, counts = make_inputs(5, 50, seed=26)
    graph = SecAggRound(secagg(), ROUND, nodes, 50).neighbours
    lost = [nodes[0], graph[nodes[0]][0]]
    with pytest.raises(SecAggError) as info:
        run_round(inputs=(nodes, deltas, counts), drop_at={stages.MASKED: lost})
    message = str(info.value)
    assert "mask key" in message
    assert "cannot be rebuilt" in message
    assert "reconstruction-threshold is 2" in message


def test_too_many_dropouts_after_masking_fail_the_round() -> None:
    nodes, deltas, counts = make_inputs(5, 50, seed=27)
    graph = SecAggRound(secagg(), ROUND, nodes, 50).neighbours
    lost = [nodes[1], graph[nodes[1]][1]]
    with pytest.raises(SecAggError) as info:
        run_round(inputs=(nodes, deltas, counts), drop_at={stages.UNMASK: lost})
    assert "self-mask seed" in str(info.value)
    assert "cannot be rebuilt" in str(info.value)
    assert "threshold" in str(info.value)


def test_fewer_than_two_masked_vectors_fail_the_round() -> None:
    nodes, deltas, counts = make_inputs(3, 30, seed=28)
    with pytest.raises(SecAggError, match="only 1 masked vectors .*fewer than 2"):
        run_round(inputs=(nodes, deltas, counts), drop_at={stages.MASKED: nodes[:2]})


@pytest.mark.parametrize("stage", [stages.SETUP, stages.SHARE_KEYS])
def test_fewer_than_two_clients_left_early_fail_the_round(stage: str) -> None:
    nodes, deltas, counts = make_inputs(3, 30, seed=29)
    with pytest.raises(SecAggError, match=f"only 1 of 3 clients completed {stage}.*at least 2"):
        run_round(inputs=(nodes, deltas, counts), drop_at={stage: nodes[1:]})


def test_a_round_needs_two_clients() -> None:
    with pytest.raises(SecAggError, match="at least 2 clients"):
        SecAggRound(secagg(2, 2), ROUND, [7], 10)


def test_a_client_left_with_too_few_holders_stops_sharing() -> None:
    """With 3 shares and threshold 3 a client whose neighbour left at setup cannot share its secrets."""
    config = secagg(3, 3)
    inputs = make_inputs(5, 10, seed=30)
    victim = inputs[0][0]
    gone = SecAggRound(config, ROUND, inputs[0], 10).neighbours[victim][0]
    trace = run_round(config=config, inputs=inputs, drop_at={stages.SETUP: [gone]}, stop_before=stages.SHARE_KEYS)
    request = trace.requests[stages.SHARE_KEYS][victim]
    expect_refusal(
        lambda: client.share_keys(config, ROUND, trace.sessions[victim], request, trace.devices[victim]),
        "only 1 neighbours are left",
        "reconstruction-threshold 3",
        "could never be rebuilt",
    )


# --- 5. client refusals ----------------------------------------------------------------------------------------


def test_client_refuses_a_neighbour_count_that_does_not_match_num_shares() -> None:
    config = secagg(5, 3)
    request = wire.pack({stages.NEIGHBOURS: wire.pack_ids([2, 3])})
    expect_refusal(
        lambda: client.setup(config, ROUND, 1, request, device(1)), "2 neighbours", "num-shares (5)", "[privacy]"
    )
    # the same round seen by a client configured with other settings than the server
    trace = run_round(5, 10, secagg(3, 2), stop_before=stages.SETUP)
    node = trace.nodes[0]
    expect_refusal(
        lambda: client.setup(config, ROUND, node, trace.requests[stages.SETUP][node], device(node)), "calls for 4"
    )


def test_client_refuses_to_be_its_own_neighbour() -> None:
    request = wire.pack({stages.NEIGHBOURS: wire.pack_ids([1, 2])})
    expect_refusal(lambda: client.setup(secagg(), ROUND, 1, request, device(1)), "its own neighbour")


def test_client_setup_rejects_malformed_requests() -> None:
    with pytest.raises(PayloadError, match="lacks the fields"):
        client.setup(secagg(), ROUND, 1, wire.pack({}), device(1))
    with pytest.raises(PayloadError, match="twice"):
        client.setup(secagg(), ROUND, 1, wire.pack({stages.NEIGHBOURS: wire.pack_ids([2, 2])}), device(1))


@pytest.fixture(scope="module")
def before_unmask() -> Trace:
    """A 5-client round stopped when the clients hold the unmask requests (one client dropped before masking)."""
    nodes, deltas, counts = make_inputs(5, 40, seed=31)
    return run_round(inputs=(nodes, deltas, counts), drop_at={stages.MASKED: [nodes[0]]}, stop_before=stages.UNMASK)


def _unmask_request(survivors: list[int], dropped: list[int]) -> bytes:
    return wire.pack({stages.SURVIVORS: wire.pack_ids(survivors), stages.DROPPED: wire.pack_ids(dropped)})


def _victim(trace: Trace) -> tuple[int, list[int]]:
    """A client that answered masking, and its neighbours."""
    node = next(iter(trace.requests[stages.UNMASK]))
    return node, trace.server.neighbours[node]


def test_client_answers_the_servers_unmask_request(before_unmask: Trace) -> None:
    for node, request in before_unmask.requests[stages.UNMASK].items():
        fields = wire.unpack(request)
        survivors = wire.unpack_ids(fields[stages.SURVIVORS])
        dropped = wire.unpack_ids(fields[stages.DROPPED])
        reply = wire.unpack(client.unmask(before_unmask.config, ROUND, before_unmask.sessions[node], request).reply)
        assert set(reply) == {stages.SEED_SHARE + str(o) for o in survivors} | {
            stages.KEY_SHARE + str(o) for o in dropped
        }


def test_client_refuses_a_node_named_both_survivor_and_dropout(before_unmask: Trace) -> None:
    node, neighbours = _victim(before_unmask)
    request = _unmask_request([node, *neighbours], [neighbours[0]])
    expect_refusal(
        lambda: client.unmask(before_unmask.config, ROUND, before_unmask.sessions[node], request),
        "both survivor and dropout",
    )


def test_client_refuses_to_be_named_a_dropout(before_unmask: Trace) -> None:
    node, neighbours = _victim(before_unmask)
    request = _unmask_request(neighbours, [node])
    expect_refusal(
        lambda: client.unmask(before_unmask.config, ROUND, before_unmask.sessions[node], request),
        "named this client a dropout",
    )


@pytest.mark.parametrize("change", ["missing", "stranger-survivor", "stranger-dropout"])
def test_client_refuses_lists_that_do_not_cover_its_neighbours(before_unmask: Trace, change: str) -> None:
    node, neighbours = _victim(before_unmask)
    survivors, dropped = [node, *neighbours], []
    if change == "missing":
        survivors = survivors[:-1]
    elif change == "stranger-survivor":
        survivors.append(123456789)
    else:
        dropped.append(123456789)
    request = _unmask_request(survivors, dropped)
    expect_refusal(
        lambda: client.unmask(before_unmask.config, ROUND, before_unmask.sessions[node], request),
        "do not cover exactly",
    )


def test_the_server_request_itself_is_consistent(before_unmask: Trace) -> None:
    for node, request in before_unmask.requests[stages.UNMASK].items():
        fields = wire.unpack(request)
        survivors = wire.unpack_ids(fields[stages.SURVIVORS])
        dropped = wire.unpack_ids(fields[stages.DROPPED])
        assert node in survivors
        assert not set(survivors) & set(dropped)
        assert before_unmask.nodes[0] not in survivors
        assert {f"{stages.SURVIVOR_SIGNATURE}/{o}" for o in survivors if o != node} <= set(fields)


def test_unmask_answers_once(before_unmask: Trace) -> None:
    node = next(iter(before_unmask.requests[stages.UNMASK]))
    request = before_unmask.requests[stages.UNMASK][node]
    config = before_unmask.config
    closed = client.unmask(config, ROUND, before_unmask.sessions[node], request).session
    assert set(wire.unpack(closed)) == {"round", "node", "run", "done"}  # no secret is kept after the round
    expect_refusal(lambda: client.unmask(config, ROUND, closed, request), "must follow", stages.CONSISTENCY)


def test_a_client_signs_one_survivor_set_per_round(before_unmask: Trace) -> None:
    node = next(iter(before_unmask.requests[stages.UNMASK]))
    other_set = wire.pack({stages.SURVIVORS: wire.pack_ids([node])})
    signed_once = before_unmask.sessions[node]  # it has signed the server's set already
    expect_refusal(
        lambda: client.consistency(ROUND, signed_once, other_set, before_unmask.devices[node]),
        "must follow",
        stages.MASKED,
    )


def test_stages_out_of_order_are_refused() -> None:
    trace = run_round(3, 20, stop_before=stages.MASKED)
    node = trace.nodes[0]
    after_share_keys = trace.sessions[node]
    delta = trace.deltas[node]
    expect_refusal(lambda: client.mask(trace.config, ROUND, after_share_keys, delta, 5), "must follow")
    expect_refusal(
        lambda: client.unmask(trace.config, ROUND, after_share_keys, _unmask_request([node], [])), "must follow"
    )
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, after_share_keys, wire.pack({}), trace.devices[node]),
        "must follow",
    )
    forwarded = trace.requests[stages.MASKED][node]
    after_shares = client.receive_shares(trace.config, ROUND, after_share_keys, forwarded)
    expect_refusal(lambda: client.receive_shares(trace.config, ROUND, after_shares, forwarded), "must follow")
    # a session of another round, an empty session, an unreadable session
    expect_refusal(
        lambda: client.receive_shares(trace.config, ROUND + 1, after_share_keys, forwarded), f"round {ROUND + 1}"
    )
    expect_refusal(lambda: client.mask(trace.config, ROUND, b"", delta, 5), "out of order")
    expect_refusal(lambda: client.mask(trace.config, ROUND, b"garbage", delta, 5), "unreadable")
    step = client.mask(trace.config, ROUND, after_shares, delta, 5)
    expect_refusal(lambda: client.mask(trace.config, ROUND, step.session, delta, 5), "must follow")


def test_receive_shares_refuses_an_altered_share() -> None:
    trace = run_round(3, 20, stop_before=stages.MASKED)
    node = trace.nodes[1]
    fields = wire.unpack(trace.requests[stages.MASKED][node])
    name = sorted(fields)[0]
    token = fields[name]
    middle = len(token) // 2
    fields[name] = token[:middle] + (b"A" if token[middle : middle + 1] != b"A" else b"B") + token[middle + 1 :]
    sender = stages.node_of(name, stages.SHARE)
    expect_refusal(
        lambda: client.receive_shares(trace.config, ROUND, trace.sessions[node], wire.pack(fields)),
        f"node {sender}",
        "does not decrypt",
    )


def test_receive_shares_refuses_a_share_under_the_wrong_sender() -> None:
    trace = run_round(3, 20, stop_before=stages.MASKED)
    node = trace.nodes[2]
    fields = wire.unpack(trace.requests[stages.MASKED][node])
    first, second = sorted(fields)
    swapped = {first: fields[second], second: fields[first]}
    expect_refusal(
        lambda: client.receive_shares(trace.config, ROUND, trace.sessions[node], wire.pack(swapped)), "does not decrypt"
    )
    # a share the client receives from another client's neighbourhood (a node it never exchanged keys with)
    other = trace.nodes[0]
    foreign = wire.unpack(trace.requests[stages.MASKED][other])
    stranger = wire.pack({stages.share_name(999): next(iter(foreign.values()))})
    expect_refusal(
        lambda: client.receive_shares(trace.config, ROUND, trace.sessions[node], stranger),
        "not a share from a neighbour",
    )
    unnamed = wire.pack({"bogus": b"x"})
    expect_refusal(
        lambda: client.receive_shares(trace.config, ROUND, trace.sessions[node], unnamed),
        "not a share from a neighbour",
    )


def test_share_keys_refuses_inconsistent_key_lists() -> None:
    trace = run_round(3, 20, stop_before=stages.SHARE_KEYS)
    node = trace.nodes[0]
    session = trace.sessions[node]
    fields = wire.unpack(trace.requests[stages.SHARE_KEYS][node])
    half = dict(fields)
    del half[sorted(name for name in half if name.startswith(stages.MASK_KEY))[0]]
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, session, wire.pack(half), trace.devices[node]),
        "only some of the signed",
    )
    extra = fields | {"c-pk/999": fields[sorted(fields)[0]]}
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, session, wire.pack(extra), trace.devices[node]),
        "not keys of neighbours",
    )
    bad = dict(fields)
    garbage = b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"
    other = trace.server.neighbours[node][0]
    bad[f"{stages.ENCRYPTION_KEY}/{other}"] = garbage
    # a key the server swapped in fails the neighbour's signature ...
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, session, wire.pack(bad), trace.devices[node]),
        f"neighbour {other} do not carry a valid signature",
    )
    # ... and a garbage key its owner signed is still refused as a key
    signed = identity.setup_message(RUN_ID, ROUND, other, garbage, bad[f"{stages.MASK_KEY}/{other}"])
    bad[f"{stages.SETUP_SIGNATURE}/{other}"] = identity.sign(identity_key(other), signed)
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, session, wire.pack(bad), trace.devices[node]),
        "not a PEM public key",
    )


# --- 6. malformed replies at the server ------------------------------------------------------------------------


def _replace(stage: str, victim: int, blob: bytes) -> Tamper:
    return lambda at, node, reply: blob if (at, node) == (stage, victim) else reply


@pytest.mark.parametrize(
    "blob",
    [
        b"garbage",
        wire.pack({stages.ENCRYPTION_KEY: b"not a key", stages.MASK_KEY: b"not a key"}),
        wire.pack({stages.ENCRYPTION_KEY: b"x"}),
    ],
    ids=["unframed", "unparsable-keys", "one-key"],
)
def test_server_drops_garbage_public_keys(blob: bytes) -> None:
    nodes, deltas, counts = make_inputs(5, 60, seed=40)
    bad = nodes[3]
    trace = run_round(inputs=(nodes, deltas, counts), tamper=_replace(stages.SETUP, bad, blob))
    assert trace.result is not None
    assert list(trace.result.dropped) == [bad]
    assert trace.result.dropped[bad].startswith(f"{stages.SETUP}: bad public keys")
    assert_mean_of(trace, [node for node in nodes if node != bad])


def _other_curve_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_server_drops_a_public_key_on_another_curve() -> None:
    nodes, deltas, counts = make_inputs(5, 60, seed=41)
    bad = nodes[3]
    blob = wire.pack({stages.ENCRYPTION_KEY: _other_curve_key(), stages.MASK_KEY: _other_curve_key()})
    trace = run_round(inputs=(nodes, deltas, counts), tamper=_replace(stages.SETUP, bad, blob))
    assert trace.result is not None
    assert list(trace.result.dropped) == [bad]
    assert_mean_of(trace, [node for node in nodes if node != bad])


def test_server_drops_a_shares_reply_missing_a_neighbour() -> None:
    nodes, deltas, counts = make_inputs(5, 60, seed=42)
    bad = nodes[1]

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        if (stage, node) != (stages.SHARE_KEYS, bad):
            return reply
        fields = wire.unpack(reply)
        del fields[sorted(fields)[0]]
        return wire.pack(fields)

    trace = run_round(inputs=(nodes, deltas, counts), tamper=tamper)
    assert trace.result is not None
    assert list(trace.result.dropped) == [bad]
    assert trace.result.dropped[bad].startswith(f"{stages.SHARE_KEYS}: bad shares")
    assert_mean_of(trace, [node for node in nodes if node != bad])


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("change", ["short", "long", "unframed", "no-vector"])
def test_server_drops_a_malformed_masked_vector(change: str, bits: int) -> None:
    config = secagg(5, 3, modulus_bits=bits)
    nodes, deltas, counts = make_inputs(7, 60, seed=43)
    bad = nodes[5]

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        if (stage, node) != (stages.MASKED, bad):
            return reply
        vector = wire.unpack(reply)[stages.MASKED_VECTOR]
        return {
            "short": wire.pack({stages.MASKED_VECTOR: vector[:-1]}),
            "long": wire.pack({stages.MASKED_VECTOR: vector + bytes(8)}),
            "unframed": vector,
            "no-vector": wire.pack({"other": vector}),
        }[change]

    trace = run_round(config=config, inputs=(nodes, deltas, counts), tamper=tamper)
    assert trace.result is not None
    assert list(trace.result.dropped) == [bad]
    assert trace.result.dropped[bad].startswith(f"{stages.MASKED}: bad masked vector")
    assert_mean_of(trace, [node for node in nodes if node != bad])


def test_server_ignores_a_masked_vector_from_a_node_that_shared_no_keys() -> None:
    nodes, deltas, counts = make_inputs(5, 30, seed=44)
    late = nodes[0]
    trace = run_round(inputs=(nodes, deltas, counts), drop_at={stages.SHARE_KEYS: [late]}, stop_before=stages.MASKED)
    assert late not in trace.requests[stages.MASKED]
    replies = {}
    for node, request in trace.requests[stages.MASKED].items():
        session = client.receive_shares(trace.config, ROUND, trace.sessions[node], request)
        replies[node] = client.mask(trace.config, ROUND, session, deltas[node], counts[node]).reply
    replies[late] = replies[nodes[1]]  # a well-formed vector, but its sender left the round
    requests = trace.server.masked_received(replies, {})
    assert late not in requests
    assert trace.server.dropped[late] == f"{stages.SHARE_KEYS}: {GONE}"


def test_a_malformed_unmask_reply_is_ignored_when_enough_others_answer() -> None:
    config = secagg(5, 3)
    nodes, deltas, counts = make_inputs(7, 60, seed=45)
    bad = nodes[2]
    trace = run_round(config=config, inputs=(nodes, deltas, counts), tamper=_replace(stages.UNMASK, bad, b"garbage"))
    assert_mean_of(trace, nodes)  # its vector was summed: its self-mask seed is rebuilt from the others


def test_an_unmask_reply_with_unrequested_shares_is_ignored() -> None:
    """A share of a node the server did not ask about (or a key share of a survivor) is rejected."""
    config = secagg(5, 3)
    nodes, deltas, counts = make_inputs(7, 60, seed=46)
    bad = nodes[2]

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        if (stage, node) != (stages.UNMASK, bad):
            return reply
        fields = wire.unpack(reply)
        return wire.pack(fields | {stages.KEY_SHARE + str(bad): b"\x01" * 40})  # its own key: would expose it

    trace = run_round(config=config, inputs=(nodes, deltas, counts), tamper=tamper)
    assert_mean_of(trace, nodes)


def test_an_unmask_reply_with_a_superscript_node_id_is_ignored() -> None:
    config = secagg(5, 3)
    nodes, deltas, counts = make_inputs(7, 60, seed=47)
    bad = nodes[2]

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        return wire.pack(wire.unpack(reply) | {"b/\u00b2": b"x"}) if (stage, node) == (stages.UNMASK, bad) else reply

    trace = run_round(config=config, inputs=(nodes, deltas, counts), tamper=tamper)
    assert_mean_of(trace, nodes)


def test_node_of_reads_decimal_ids() -> None:
    assert stages.node_of("share/17", stages.SHARE) == 17
    assert stages.node_of("share/", stages.SHARE) is None
    assert stages.node_of("share/-1", stages.SHARE) is None
    assert stages.node_of("share/1x", stages.SHARE) is None
    assert stages.node_of("share/" + "9" * 21, stages.SHARE) is None
    assert stages.node_of("b/17", stages.SHARE) is None


def test_node_of_returns_none_for_non_ascii_digits() -> None:
    assert stages.node_of("share/\u00b2", stages.SHARE) is None


def test_receive_shares_refuses_a_superscript_share_name() -> None:
    trace = run_round(3, 10, stop_before=stages.MASKED)
    node = trace.nodes[0]
    request = wire.pack({"share/\u00b2": b"x"})
    expect_refusal(
        lambda: client.receive_shares(trace.config, ROUND, trace.sessions[node], request),
        "not a share from a neighbour",
    )


def test_a_rejected_unmask_reply_contributes_no_shares() -> None:
    config = secagg(5, 3)
    nodes, deltas, counts = make_inputs(7, 60, seed=48)
    first: list[int] = []

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        if stage != stages.UNMASK:
            return reply
        first[:] = first or [node]
        if node != first[0]:
            return reply
        fields = {name: share[:-1] + bytes([share[-1] ^ 1]) for name, share in wire.unpack(reply).items()}
        return wire.pack(fields | {"unexpected": b""})  # malformed: the server must reject all of it

    trace = run_round(config=config, inputs=(nodes, deltas, counts), tamper=tamper)
    assert_mean_of(trace, nodes)


# --- 7. encoding and decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
def test_decode_refuses_a_sum_that_may_have_wrapped(bits: int) -> None:
    config = secagg(modulus_bits=bits, quantization_range=2**16)
    limit = 2**bits // 2**16  # total_examples at which total · range reaches the modulus
    total = np.zeros(5, dtype=masking.field_dtype(config))
    total[-2] = limit - 1
    assert masking.decode_sum(total, config).total_examples == limit - 1
    total[-2] = limit
    with pytest.raises(SecAggError, match=rf"2\*\*{bits}.*modulus-bits"):
        masking.decode_sum(total, config)
    total[-2] = 0
    with pytest.raises(SecAggError, match="no examples"):
        masking.decode_sum(total, config)


def test_a_round_with_too_many_examples_for_32_bits_fails_and_64_bits_succeeds() -> None:
    nodes, deltas, counts = make_inputs(3, 50, seed=50)
    counts = dict.fromkeys(nodes, 30_000)  # 90 000 examples · 2**16 levels > 2**32
    with pytest.raises(SecAggError, match="modulus-bits"):
        run_round(config=secagg(3, 2, modulus_bits=32), inputs=(nodes, deltas, counts))
    trace = run_round(config=secagg(3, 2, modulus_bits=64), inputs=(nodes, deltas, counts))
    assert_mean_of(trace, nodes)


def test_decode_of_a_single_encoded_vector() -> None:
    config = secagg(clipping_range=2.0, quantization_range=1000)
    delta = np.array([-2.0, -1.0, 0.0, 0.5, 1.996, 2.0, 9.0])
    encoded = masking.encode(delta, 7, config)
    assert encoded.clipped == 1
    assert encoded.vector.dtype == np.dtype("<u4")
    assert list(encoded.vector[-2:]) == [7, 1]
    assert encoded.vector[0] == 0  # -clip is level 0
    assert encoded.vector[5] == encoded.vector[6] == 7 * 1000  # +clip is the top level
    assert all(int(value) % 7 == 0 for value in encoded.vector[:-2])
    decoded = masking.decode_sum(encoded.vector, config)
    assert decoded.total_examples == 7 and decoded.clipped == 1
    assert np.abs(decoded.mean - np.clip(delta, -2, 2)).max() <= config.quantization_step


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_deltas(bad: float) -> None:
    delta = np.zeros(10)
    delta[4] = bad
    with pytest.raises(SecAggError, match="NaN or inf"):
        masking.encode(delta, 3, secagg())


@pytest.mark.parametrize("count", [0, -1, True, 1.5, "3", np.int64(4)])
def test_encode_refuses_bad_example_counts(count: object) -> None:
    with pytest.raises(SecAggError, match="example count must be a positive int"):
        masking.encode(np.zeros(3), count, secagg())  # type: ignore[arg-type]


def test_encode_refuses_an_example_count_beyond_the_field() -> None:
    with pytest.raises(SecAggError):
        masking.encode(np.zeros(3), 2**32 + 1, secagg(modulus_bits=32))


def test_client_mask_refuses_bad_deltas_before_sending() -> None:
    trace = run_round(3, 10, stop_before=stages.MASKED)
    node = trace.nodes[0]
    session = client.receive_shares(trace.config, ROUND, trace.sessions[node], trace.requests[stages.MASKED][node])
    delta = trace.deltas[node].copy()
    delta[0] = np.nan
    expect_refusal(lambda: client.mask(trace.config, ROUND, session, delta, 5), "NaN or inf")
    expect_refusal(lambda: client.mask(trace.config, ROUND, session, trace.deltas[node], 0), "example count")


# --- 8. configuration ------------------------------------------------------------------------------------------


def test_privacy_config_defaults_and_derived_values() -> None:
    plain = PrivacyConfig()
    assert plain.mode == "none" and not plain.sealed and not plain.secure_aggregation
    assert PrivacyConfig(mode="aead").sealed and not PrivacyConfig(mode="aead").secure_aggregation
    config = secagg(clipping_range=0.25, quantization_range=1000)
    assert config.sealed and config.secure_aggregation
    assert config.quantization_step == pytest.approx(0.0005)
    PrivacyConfig(mode="secagg+", num_shares=2, reconstruction_threshold=2)
    PrivacyConfig(mode="secagg+", num_shares=7, reconstruction_threshold=4, modulus_bits=64)
    PrivacyConfig(quantization_range=2**31 - 1, clipping_range=3)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"mode": "secagg"}, ["privacy mode must be one of", "'secagg'"]),
        ({"mode": "AEAD"}, ["privacy mode"]),
        ({"num_shares": 3, "reconstruction_threshold": 4}, ["cannot exceed num-shares", "never be rebuilt"]),
        ({"num_shares": 4, "reconstruction_threshold": 2}, ["more than half", "use at least 3"]),
        ({"num_shares": 5, "reconstruction_threshold": 2}, ["more than half", "use at least 3"]),
        (
            {"num_shares": 1, "reconstruction_threshold": 1},
            ["'privacy.num-shares' must be", "in [2, 1000], got 1"],
        ),
        ({"num_shares": 0}, ["'privacy.num-shares' must be an integer in [2, 1000], got 0"]),
        ({"num_shares": True}, ["'privacy.num-shares' must be an integer", "got True"]),
        ({"num_shares": 3.0}, ["'privacy.num-shares' must be an integer", "got 3.0"]),
        (
            {"reconstruction_threshold": 0},
            ["'privacy.reconstruction-threshold'", "in [2, 1000], got 0"],
        ),
        ({"modulus_bits": 16}, ["modulus-bits must be one of (32, 64)"]),
        ({"modulus_bits": 128}, ["modulus-bits must be one of"]),
        ({"modulus_bits": "32"}, ["modulus-bits must be one of"]),
        ({"quantization_range": 1}, ["'privacy.quantization-range' must be an integer in [2, 2147483647], got 1"]),
        ({"quantization_range": 2**31}, ["'privacy.quantization-range' must be an integer in"]),
        ({"quantization_range": 0}, ["'privacy.quantization-range' must be an integer"]),
        ({"quantization_range": 2.0**16}, ["'privacy.quantization-range' must be an integer"]),
        ({"clipping_range": 0}, ["'privacy.clipping-range' must be a finite number in [1e-06, 1000000], got 0"]),
        ({"clipping_range": -1.0}, ["'privacy.clipping-range' must be a finite number"]),
        ({"clipping_range": float("inf")}, ["clipping-range"]),
        ({"clipping_range": float("nan")}, ["clipping-range"]),
        ({"clipping_range": True}, ["clipping-range"]),
        ({"clipping_range": "1.0"}, ["clipping-range"]),
    ],
)
def test_privacy_config_validation(changes: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        PrivacyConfig(**{"mode": "secagg+", **changes})  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value), str(info.value)


def test_modulus_bits_rejects_a_bool() -> None:
    with pytest.raises(ConfigError, match="modulus-bits"):
        PrivacyConfig(modulus_bits=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_shares", "threshold", "sample_size", "words"),
    [
        (3, 2, 1, ["at least 2 clients per round"]),
        (2, 2, 1, ["at least 2 clients per round"]),
        (5, 3, 4, ["num-shares (5) cannot exceed", "(4)"]),
        (4, 3, 6, ["must be odd", "got 4"]),
        (6, 4, 10, ["must be odd"]),
    ],
)
def test_check_fleet_refuses_what_the_round_cannot_satisfy(
    num_shares: int, threshold: int, sample_size: int, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        secagg(num_shares, threshold).check_fleet(sample_size)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize(("num_shares", "threshold", "sample_size"), [(5, 3, 9), (7, 4, 20), (7, 5, 8), (5, 3, 5)])
def test_thresholds_below_num_shares_minus_one_need_the_honest_server_assumption(
    num_shares: int, threshold: int, sample_size: int
) -> None:
    """docs/privacy.md: a malicious server defeats t <= n - 2; such configs are refused by default.

    Also when num-shares equals the clients per round: a client cannot tell how many the server really sampled."""
    with pytest.raises(ConfigError, match="does not hold against a malicious server") as info:
        secagg(num_shares, threshold, assume_honest_server=False).check_fleet(sample_size)
    assert f"at least num-shares - 1 = {num_shares - 1}" in str(info.value) and "assume-honest-server" in str(
        info.value
    )
    secagg(num_shares, threshold, assume_honest_server=True).check_fleet(sample_size)
    secagg(num_shares, num_shares - 1, assume_honest_server=False).check_fleet(sample_size)


def test_check_fleet_accepts_what_works() -> None:
    secagg(4, 3).check_fleet(4)  # even is fine when every client neighbours every other
    secagg(3, 2).check_fleet(3)
    secagg(3, 2).check_fleet(100)
    secagg(2, 2).check_fleet(2)
    PrivacyConfig(mode="none", num_shares=5, reconstruction_threshold=3).check_fleet(1)
    PrivacyConfig(mode="aead").check_fleet(0)


# --- 9. the neighbour graph ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "num_shares"), [(2, 2), (3, 3), (4, 4), (5, 3), (7, 5), (20, 3), (20, 7), (21, 21)])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_neighbour_graph_is_symmetric_and_regular(count: int, num_shares: int, seed: int) -> None:
    nodes = [int(node) for node in np.random.default_rng(count).choice(2**62, size=count, replace=False)]
    graph = stages.neighbour_graph(nodes, num_shares, seed)
    assert set(graph) == set(nodes)
    for node, neighbours in graph.items():
        assert node not in neighbours
        assert len(neighbours) == len(set(neighbours)) == num_shares - 1
        assert set(neighbours) <= set(nodes)
        for other in neighbours:
            assert node in graph[other]
    assert graph == stages.neighbour_graph(nodes, num_shares, seed)
    shuffled = {node: set(others) for node, others in stages.neighbour_graph(nodes[::-1], num_shares, seed).items()}
    assert shuffled == {node: set(others) for node, others in graph.items()}  # the seed decides, not the order
    if num_shares == count:
        assert all(set(graph[node]) == set(nodes) - {node} for node in nodes)


def test_neighbour_graph_depends_on_the_seed() -> None:
    nodes = list(range(100, 120))
    graphs = {str(stages.neighbour_graph(nodes, 3, seed)) for seed in range(5)}
    assert len(graphs) == 5


def test_neighbour_graph_refuses_more_shares_than_nodes() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        stages.neighbour_graph([1, 2, 3], 4, 0)


def test_server_and_clients_agree_on_the_graph() -> None:
    trace = run_round(9, 5, secagg(5, 3), stop_before=stages.SETUP)
    for node, request in trace.requests[stages.SETUP].items():
        neighbours = wire.unpack_ids(wire.unpack(request)[stages.NEIGHBOURS])
        assert neighbours == trace.server.neighbours[node]
        assert len(neighbours) == 4


# --- 10. the key stages stay light -----------------------------------------------------------------------------


def test_key_and_share_stages_do_not_import_torch() -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from fedadapt.privacy.config import PrivacyConfig
        from cryptography.hazmat.primitives.asymmetric import ec
        from fedadapt.privacy.secagg import client, identity
        from fedadapt.privacy.secagg.server import SecAggRound

        config = PrivacyConfig(mode="secagg+", num_shares=3, reconstruction_threshold=2)
        nodes = [11, 22, 33]
        keys = {node: ec.generate_private_key(ec.SECP384R1()) for node in nodes}
        roster = frozenset(identity.openssh_public(key.public_key()) for key in keys.values())
        devices = {node: identity.Identity(5, keys[node], roster) for node in nodes}
        deltas = {node: np.full(8, node / 100) for node in nodes}
        server = SecAggRound(config, 1, nodes, 8, run_id=5)
        sessions, replies = {}, {}
        for node, request in server.setup_requests().items():
            step = client.setup(config, 1, node, request, devices[node])
            sessions[node], replies[node] = step.session, step.reply
        requests = server.keys_received(replies, {})
        replies = {}
        for node, request in requests.items():
            step = client.share_keys(config, 1, sessions[node], request, devices[node])
            sessions[node], replies[node] = step.session, step.reply
        requests = server.shares_received(replies, {})
        replies = {}
        for node, request in requests.items():
            sessions[node] = client.receive_shares(config, 1, sessions[node], request)
            step = client.mask(config, 1, sessions[node], deltas[node], 2)
            sessions[node], replies[node] = step.session, step.reply
        requests = server.masked_received(replies, {})
        replies = {}
        for node, request in requests.items():
            step = client.consistency(1, sessions[node], request, devices[node])
            sessions[node], replies[node] = step.session, step.reply
        requests = server.consistency_received(replies, {})
        replies = {node: client.unmask(config, 1, sessions[node], request).reply for node, request in requests.items()}
        result = server.unmask_received(replies, {})
        assert abs(result.mean - 0.22).max() < 1e-4, result.mean
        heavy = sorted(name for name in ("torch", "transformers", "peft") if name in sys.modules)
        print("HEAVY", heavy)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout


# --- 11. the mask generator ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "dtype"), [(32, np.dtype("<u4")), (64, np.dtype("<u8"))])
def test_mask_is_a_deterministic_stream_per_seed(bits: int, dtype: np.dtype) -> None:
    config = secagg(modulus_bits=bits)
    seed = bytes(range(32))
    first = masking.mask(seed, 1000, config)
    assert first.dtype == dtype and first.shape == (1000,)
    assert first.flags.writeable
    assert np.array_equal(first, masking.mask(seed, 1000, config))
    assert np.array_equal(masking.mask(seed, 10, config), first[:10])  # a prefix of the same keystream
    other = masking.mask(bytes(31) + b"\x01", 1000, config)
    assert np.mean(first == other) < 0.01
    assert abs(np.mean(first / 2.0**bits) - 0.5) < 0.05
    assert masking.mask(seed, 0, config).shape == (0,)
    assert masking.field_dtype(config) == dtype


def test_mask_wants_a_32_byte_seed() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        masking.mask(bytes(16), 10, secagg())
