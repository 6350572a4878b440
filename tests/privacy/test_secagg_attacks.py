"""SecAgg+ against a malicious server and hostile clients: each test is an attack that must be refused."""

from __future__ import annotations

import base64
import contextlib
import copy
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_secagg import (
    ROUND,
    RUN_ID,
    Trace,
    device,
    expect_refusal,
    identity_key,
    make_inputs,
    run_round,
    secagg,
)

from fedadapt.errors import PayloadError, SecAggError
from fedadapt.privacy.secagg import client, identity, stages, wire
from fedadapt.privacy.secagg.server import SecAggRound

# --- the two-stories attack (consistency check) ---------------------------------------------------------------


def _sign_sets(trace: Trace, sets: dict[int, list[int]]) -> dict[int, bytes]:
    """Each client signs the survivor set the (malicious) server chose for it; their signatures."""
    signatures = {}
    for node, survivors in sets.items():
        request = wire.pack({stages.SURVIVORS: wire.pack_ids(survivors)})
        step = client.consistency(ROUND, trace.sessions[node], request, trace.devices[node])
        trace.sessions[node] = step.session
        signatures[node] = wire.unpack(step.reply)[stages.SURVIVOR_SIGNATURE]
    return signatures


def _story(trace: Trace, node: int, survivors: set[int], signatures: dict[int, bytes]) -> bytes:
    """An unmask request telling ``node`` that, of its neighbourhood, exactly ``survivors`` survived."""
    known = {node, *trace.server._maskers[node]}
    fields = {
        stages.SURVIVORS: wire.pack_ids(sorted(known & survivors)),
        stages.DROPPED: wire.pack_ids(sorted(known - survivors)),
    }
    for other in sorted((known & survivors) - {node}):
        fields[f"{stages.SURVIVOR_SIGNATURE}/{other}"] = signatures[other]
    return wire.pack(fields)


def _released(trace: Trace, requests: dict[int, bytes]) -> tuple[dict[str, list[bytes]], dict[int, str]]:
    """The shares the clients release for ``requests`` (by field name), and each refusal's message."""
    shares: dict[str, list[bytes]] = {}
    refusals = {}
    for node, request in requests.items():
        try:
            reply = client.unmask(trace.config, ROUND, trace.sessions[node], request).reply
        except SecAggError as err:
            refusals[node] = str(err)
            continue
        for name, share in wire.unpack(reply).items():
            shares.setdefault(name, []).append(share)
    return shares, refusals


@pytest.fixture
def masked_round() -> Trace:
    """Seven honest clients (ring of 3 shares, threshold 2) whose masked vectors all reached the server."""
    return run_round(7, 16, secagg(3, 2), stop_before=stages.CONSISTENCY, seed=5)


def test_two_stories_target_told_its_neighbours_dropped_refuses_before_any_share_leaves(masked_round: Trace) -> None:
    trace = masked_round
    target = trace.nodes[0]
    neighbours = set(trace.server.neighbours[target])
    everyone = set(trace.nodes)
    # The target hears "all your neighbours dropped"; everyone else hears "everyone survived".
    sets = {node: sorted(everyone - neighbours if node == target else everyone) for node in trace.nodes}
    signatures = _sign_sets(trace, sets)
    requests = {node: _story(trace, node, set(sets[node]), signatures) for node in trace.nodes}
    # The target's own story is consistent with what it signed, but too few of its neighbourhood survive it.
    expect_refusal(
        lambda: client.unmask(trace.config, ROUND, trace.sessions[target], requests[target]),
        "only 1 members of this client's neighbourhood survived",
        "reconstruction-threshold is 2",
    )
    # Telling the neighbours the other story ("the target dropped") is refused too: they signed another set.
    for node in neighbours:
        lie = _story(trace, node, everyone - {target}, signatures)
        expect_refusal(
            lambda lie=lie, node=node: client.unmask(trace.config, ROUND, trace.sessions[node], lie),
            "differ from the survivor set this client signed",
        )


def test_two_stories_with_two_signed_sets_never_yields_both_secrets_of_the_target(masked_round: Trace) -> None:
    """The strongest version: the neighbours sign a set without the target, the target a set without them.

    The neighbours then pass every check and release shares of the target's mask key, but the target
    refuses, so fewer than threshold shares of its self-mask seed exist: its masked vector stays masked.
    """
    trace = masked_round
    target = trace.nodes[0]
    neighbours = set(trace.server.neighbours[target])
    everyone = set(trace.nodes)
    sets = {node: sorted(everyone - neighbours if node == target else everyone - {target}) for node in trace.nodes}
    signatures = _sign_sets(trace, sets)
    requests = {node: _story(trace, node, set(sets[node]), signatures) for node in trace.nodes}
    shares, refusals = _released(trace, requests)
    assert target in refusals and "only 1 members" in refusals[target]
    seed_shares = shares.get(stages.SEED_SHARE + str(target), [])
    key_shares = shares.get(stages.KEY_SHARE + str(target), [])
    assert len(key_shares) >= trace.config.reconstruction_threshold  # the server has the target's mask key ...
    assert len(seed_shares) < trace.config.reconstruction_threshold  # ... but never its self-mask seed


def test_a_forged_or_foreign_survivor_signature_is_refused(masked_round: Trace) -> None:
    trace = masked_round
    node = trace.nodes[2]
    everyone = sorted(trace.nodes)
    signatures = _sign_sets(trace, {n: everyone for n in trace.nodes})
    neighbour = sorted(set(trace.server._maskers[node]))[0]
    # the neighbour's signature over a set it did not sign (made with its real key by the test: the server has none)
    other_set = identity.survivors_message(RUN_ID, ROUND, everyone[:-1])
    forged = signatures | {neighbour: identity.sign(identity_key(neighbour), other_set)}
    expect_refusal(
        lambda: client.unmask(trace.config, ROUND, trace.sessions[node], _story(trace, node, set(everyone), forged)),
        f"neighbour {neighbour} did not sign the survivor set",
    )
    # a signature missing for a surviving neighbour
    request = wire.unpack(_story(trace, node, set(everyone), signatures))
    del request[f"{stages.SURVIVOR_SIGNATURE}/{neighbour}"]
    expect_refusal(
        lambda: client.unmask(trace.config, ROUND, trace.sessions[node], wire.pack(request)),
        "one survivor-set signature per surviving neighbour",
    )
    # a set that leaves the client itself out is never signed
    fresh = run_round(5, 8, secagg(3, 2), stop_before=stages.CONSISTENCY, seed=6)
    target = fresh.nodes[0]
    leave_out = wire.pack({stages.SURVIVORS: wire.pack_ids(sorted(set(fresh.nodes) - {target}))})
    expect_refusal(
        lambda: client.consistency(ROUND, fresh.sessions[target], leave_out, fresh.devices[target]),
        "leaves out this client",
    )


def test_the_honest_round_survives_a_dropout_at_unmask() -> None:
    """The consistency stage keeps the dropout tolerance: a client lost after signing stays in the sum."""
    trace = run_round(7, 16, secagg(3, 2), drop_at={stages.UNMASK: [make_inputs(7, 16, seed=5)[0][3]]}, seed=5)
    assert trace.result is not None
    assert trace.result.recovered == [trace.nodes[3]]
    assert sorted(trace.result.contributors) == sorted(trace.nodes)


# --- withheld shares --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_shares", "threshold", "kept", "refused"), [(3, 2, 0, True), (5, 3, 1, True), (5, 3, 2, False)]
)
def test_a_client_refuses_to_mask_when_the_server_withholds_neighbour_shares(
    num_shares: int, threshold: int, kept: int, refused: bool
) -> None:
    trace = run_round(7, 16, secagg(num_shares, threshold), stop_before=stages.MASKED, seed=8)
    node = trace.nodes[1]
    forwarded = wire.unpack(trace.requests[stages.MASKED][node])
    withheld = wire.pack({name: forwarded[name] for name in sorted(forwarded)[:kept]})

    def receive() -> bytes:
        return client.receive_shares(trace.config, ROUND, trace.sessions[node], withheld)

    if refused:
        expect_refusal(receive, f"only {kept} neighbours' shares reached this client", f"at least {threshold - 1}")
    else:
        session = receive()
        assert len(wire.unpack_ids(wire.unpack(session)["maskers"])) == kept


# --- identities in setup -----------------------------------------------------------------------------------------


def _share_keys_request(trace: Trace, node: int, neighbour: int, change: Callable[[dict[str, bytes]], None]) -> bytes:
    fields = wire.unpack(trace.requests[stages.SHARE_KEYS][node])
    view = {name.split("/")[0]: fields[name] for name in fields if name.endswith(f"/{neighbour}")}
    change(view)
    fields |= {f"{name}/{neighbour}": value for name, value in view.items()}
    return wire.pack(fields)


def _signed_by(key: ec.EllipticCurvePrivateKey, node: int) -> Callable[[dict[str, bytes]], None]:
    """The neighbour's keys presented under identity ``key``, correctly signed by it."""

    def change(view: dict[str, bytes]) -> None:
        view[stages.IDENTITY_KEY] = identity.openssh_public(key.public_key())
        message = identity.setup_message(RUN_ID, ROUND, node, view[stages.ENCRYPTION_KEY], view[stages.MASK_KEY])
        view[stages.SETUP_SIGNATURE] = identity.sign(key, message)

    return change


@pytest.fixture
def keyed_round() -> Trace:
    return run_round(5, 8, secagg(3, 2), stop_before=stages.SHARE_KEYS, seed=9)


def test_a_neighbour_identity_outside_the_roster_is_refused(keyed_round: Trace) -> None:
    trace = keyed_round
    node = trace.nodes[0]
    neighbour = trace.server.neighbours[node][0]
    sybil = ec.generate_private_key(ec.SECP384R1())  # a key the server made: validly signed, not in the roster
    request = _share_keys_request(trace, node, neighbour, _signed_by(sybil, neighbour))
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, trace.sessions[node], request, trace.devices[node]),
        f"neighbour {neighbour}",
        "not in this device's roster",
    )


def test_one_identity_for_two_neighbours_is_refused(keyed_round: Trace) -> None:
    trace = keyed_round
    node = trace.nodes[0]
    first, second = trace.server.neighbours[node]
    request = _share_keys_request(trace, node, second, _signed_by(identity_key(first), second))
    trace.sessions[node] = trace.sessions[node]
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, trace.sessions[node], request, trace.devices[node]),
        f"identity key of node {first}",
    )
    own = _share_keys_request(trace, node, second, _signed_by(identity_key(node), second))
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, trace.sessions[node], own, trace.devices[node]),
        f"identity key of node {node}",
    )


@pytest.mark.parametrize("change", ["other-round", "other-node", "other-run", "garbage"])
def test_a_neighbours_keys_without_a_valid_signature_are_refused(keyed_round: Trace, change: str) -> None:
    trace = keyed_round
    node = trace.nodes[0]
    neighbour = trace.server.neighbours[node][0]
    key = identity_key(neighbour)

    def resign(view: dict[str, bytes]) -> None:
        run, server_round, signer = RUN_ID, ROUND, neighbour
        if change == "other-round":
            server_round += 1
        elif change == "other-node":
            signer = node
        elif change == "other-run":
            run += 1
        message = identity.setup_message(run, server_round, signer, view[stages.ENCRYPTION_KEY], view[stages.MASK_KEY])
        view[stages.SETUP_SIGNATURE] = b"\x30\x00" if change == "garbage" else identity.sign(key, message)

    request = _share_keys_request(trace, node, neighbour, resign)
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, trace.sessions[node], request, trace.devices[node]),
        f"neighbour {neighbour} do not carry a valid signature",
    )


def test_the_server_drops_a_setup_reply_with_a_bad_signature_or_a_taken_identity() -> None:
    nodes, deltas, counts = make_inputs(6, 12, seed=12)
    liar, copycat = nodes[2], nodes[4]

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        if stage != stages.SETUP or node not in (liar, copycat):
            return reply
        fields = wire.unpack(reply)
        if node == liar:
            fields[stages.SETUP_SIGNATURE] = identity.sign(identity_key(liar), b"something else")
        else:  # presents node 0's identity, signing with it (as a device holding two roster keys could)
            message = identity.setup_message(
                RUN_ID, ROUND, node, fields[stages.ENCRYPTION_KEY], fields[stages.MASK_KEY]
            )
            fields[stages.IDENTITY_KEY] = identity.openssh_public(identity_key(nodes[0]).public_key())
            fields[stages.SETUP_SIGNATURE] = identity.sign(identity_key(nodes[0]), message)
        return wire.pack(fields)

    trace = run_round(inputs=(nodes, deltas, counts), tamper=tamper, config=secagg(5, 3))
    assert trace.result is not None
    assert sorted(trace.result.dropped) == sorted([liar, copycat])
    assert "valid signature by its identity key" in trace.result.dropped[liar]
    assert f"already node {nodes[0]}'s" in trace.result.dropped[copycat]
    assert sorted(trace.result.contributors) == sorted(set(nodes) - {liar, copycat})


def test_roster_and_identity_files(tmp_path: pytest.TempPathFactory) -> None:
    folder = tmp_path  # type: ignore[assignment]
    key_file = folder / "identity.key"  # type: ignore[operator]
    line = identity.generate_private_key(key_file)
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    roster = folder / "roster.pub"  # type: ignore[operator]
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    roster.write_bytes(b"# the fleet\n" + line + b" device-0\n\n" + identity.openssh_public(other) + b"\n")
    loaded = identity.load_identity(key_file, roster, run_id=3)
    assert loaded.public_key == line
    assert loaded.roster == {line, identity.openssh_public(other)}
    assert "private_key" not in repr(loaded) and "roster" not in repr(loaded)
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_file = folder / "ed.key"  # type: ignore[operator]
    ed_file.write_bytes(
        ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    with pytest.raises(ValueError, match="not an ECDSA P-384 key"):
        identity.load_private_key(ed_file)
    roster.write_bytes(line + b"\nnot a key\n")
    with pytest.raises(ValueError, match="line 2"):
        identity.load_roster(roster)
    with pytest.raises(ValueError, match="cannot read the device roster"):
        identity.load_roster(folder / "missing.pub")  # type: ignore[operator]


# --- hostile setup keys, ids and rounds ---------------------------------------------------------------------------


def _sect163k1_pem() -> bytes:
    """A PEM public key on the binary curve sect163k1, which this build of OpenSSL cannot load."""

    def tlv(tag: int, body: bytes) -> bytes:
        return bytes([tag, len(body)]) + body

    point = b"\x04" + bytes(range(1, 22)) + bytes(range(2, 23))
    algorithm = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d0201")) + tlv(0x06, bytes.fromhex("2b81040001")))
    der = tlv(0x30, algorithm + tlv(0x03, b"\x00" + point))
    return b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der) + b"-----END PUBLIC KEY-----\n"


def _ed25519_pem() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("pem", [_sect163k1_pem(), _ed25519_pem()], ids=["sect163k1", "ed25519"])
def test_a_setup_key_on_an_unsupported_curve_is_that_senders_rejection(pem: bytes) -> None:
    nodes, deltas, counts = make_inputs(5, 12, seed=13)
    bad = nodes[1]

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        return wire.pack(wire.unpack(reply) | {stages.MASK_KEY: pem}) if (stage, node) == (stages.SETUP, bad) else reply

    trace = run_round(inputs=(nodes, deltas, counts), tamper=tamper)
    assert trace.result is not None
    assert list(trace.result.dropped) == [bad]
    assert trace.result.dropped[bad].startswith(f"{stages.SETUP}: bad public keys")


def test_a_neighbour_key_on_an_unsupported_curve_is_a_client_refusal(keyed_round: Trace) -> None:
    trace = keyed_round
    node = trace.nodes[0]
    neighbour = trace.server.neighbours[node][0]

    def swap(view: dict[str, bytes]) -> None:
        view[stages.MASK_KEY] = _sect163k1_pem()
        _signed_by(identity_key(neighbour), neighbour)(view)

    request = _share_keys_request(trace, node, neighbour, swap)
    expect_refusal(
        lambda: client.share_keys(trace.config, ROUND, trace.sessions[node], request, trace.devices[node]),
        "not a PEM public key",
    )


@pytest.mark.parametrize("value", [-1, 2**64, -(2**70), 2**100])
def test_negative_or_huge_rounds_and_ids_are_refused_as_secagg_errors(value: int) -> None:
    config = secagg()
    request = wire.pack({stages.NEIGHBOURS: wire.pack_ids([2, 3])})
    expect_refusal(lambda: client.setup(config, value, 1, request, device(1)), "[0, 2**64)")
    expect_refusal(lambda: client.setup(config, ROUND, value, request, device(1)), "[0, 2**64)")
    expect_refusal(lambda: SecAggRound(config, value, [1, 2, 3], 4), "[0, 2**64)")
    expect_refusal(lambda: SecAggRound(config, ROUND, [1, value, 3], 4), "[0, 2**64)")
    with pytest.raises(PayloadError, match="node id"):
        wire.pack_ids([1, value])
    trace = run_round(3, 8, stop_before=stages.MASKED)
    node = trace.nodes[0]
    # a later stage asked for a round outside the protocol's range: refused as that, before the session is read
    expect_refusal(lambda: client.receive_shares(trace.config, value, trace.sessions[node], b""), "[0, 2**64)")


# --- the decoded sum ------------------------------------------------------------------------------------------------


def _add_to_masked(victim: int, entry: int, amount: int) -> Callable[[str, int, bytes], bytes]:
    """A client that adds ``amount`` to one entry of its vector before masking (the server sees only the sum)."""

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        if (stage, node) != (stages.MASKED, victim):
            return reply
        fields = wire.unpack(reply)
        vector = np.frombuffer(fields[stages.MASKED_VECTOR], dtype="<u4").copy()
        vector[entry] = (int(vector[entry]) + amount) % 2**32  # field addition, as masking does
        return wire.pack({stages.MASKED_VECTOR: vector.tobytes()})

    return tamper


def test_a_decoded_mean_outside_the_clipping_range_fails_the_round() -> None:
    nodes, deltas, counts = make_inputs(5, 10, seed=14)
    tamper = _add_to_masked(nodes[2], 3, 2**16 * 200 * 5)  # levels far above quantization-range in entry 3
    with pytest.raises(SecAggError, match=r"decoded mean reaches .* outside ±1\.00003"):
        run_round(inputs=(nodes, deltas, counts), tamper=tamper)


def test_a_decoded_example_total_above_the_cap_fails_the_round() -> None:
    nodes, deltas, counts = make_inputs(5, 10, seed=15)
    tamper = _add_to_masked(nodes[2], -2, 5 * 10_000)  # the sealed count entry: claims 50,000 more examples
    with pytest.raises(SecAggError, match="exceeds 5 contributors × max-examples-per-client 10000"):
        run_round(inputs=(nodes, deltas, counts), tamper=tamper, max_examples=10_000)
    honest = run_round(inputs=(nodes, deltas, counts), max_examples=max(counts.values()))
    assert honest.result is not None and honest.result.total_examples == sum(counts.values())


# --- fuzz: hostile replies at every stage -------------------------------------------------------------------------

_FIELD_NAMES = [
    stages.ENCRYPTION_KEY,
    stages.MASK_KEY,
    stages.IDENTITY_KEY,
    stages.SETUP_SIGNATURE,
    stages.MASKED_VECTOR,
    stages.SURVIVOR_SIGNATURE,
    stages.SEED_SHARE + "1",
    stages.KEY_SHARE + "1",
    stages.share_name(1),
    "share/18446744073709551616",
    "b/-1",
    "x",
]


def _snapshots() -> tuple[list[int], dict[str, tuple[SecAggRound, dict[int, bytes]]]]:
    """The server's state before each stage's replies arrive, with the honest replies of that stage."""
    nodes, deltas, counts = make_inputs(4, 6, seed=16)
    trace = run_round(inputs=(nodes, deltas, counts), config=secagg(3, 2))
    config = trace.config
    server = SecAggRound(config, ROUND, nodes, 6, run_id=RUN_ID, max_examples_per_client=1000)
    states = {}
    advance = [
        (stages.SETUP, server.keys_received),
        (stages.SHARE_KEYS, server.shares_received),
        (stages.MASKED, server.masked_received),
        (stages.CONSISTENCY, server.consistency_received),
    ]
    for stage, method in advance:
        states[stage] = (copy.deepcopy(server), trace.replies[stage])
        method(trace.replies[stage], {})  # the same identities and keys: the recorded replies still fit
    states[stages.UNMASK] = (copy.deepcopy(server), trace.replies[stages.UNMASK])
    return nodes, states


_NODES, _STATES = _snapshots()
_METHODS = {
    stages.SETUP: SecAggRound.keys_received,
    stages.SHARE_KEYS: SecAggRound.shares_received,
    stages.MASKED: SecAggRound.masked_received,
    stages.CONSISTENCY: SecAggRound.consistency_received,
    stages.UNMASK: SecAggRound.unmask_received,
}


def _hostile_blob() -> st.SearchStrategy[bytes]:
    field_name = st.one_of(st.sampled_from(_FIELD_NAMES), st.text(min_size=1, max_size=12))
    value = st.one_of(
        st.binary(max_size=64),
        st.sampled_from([_sect163k1_pem(), _ed25519_pem(), b"\x00" * 32, b"\xff" * 40]),
        st.lists(st.integers(0, 2**64 - 1), max_size=4).map(wire.pack_ids),
    )
    framed = st.dictionaries(field_name, value, max_size=5).map(wire.pack)
    return st.one_of(st.binary(max_size=120), framed)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("stage", list(_METHODS))
@given(
    data=st.data(),
    blob=_hostile_blob(),
    sender=st.one_of(st.sampled_from(_NODES), st.integers(0, 2**64 - 1)),
)
def test_fuzz_hostile_replies_end_as_rejections_never_as_other_exceptions(
    stage: str, data: st.DataObject, blob: bytes, sender: int
) -> None:
    """10,000 cases in all (5 stages × 2,000): only the round's own SecAggError may escape."""
    server, honest = _STATES[stage]
    server = copy.deepcopy(server)
    # Mostly the hostile reply alone (fast: the other replies' signatures are not checked again), sometimes
    # among the honest replies, so the stage also runs to its end (sums, reconstruction) with it.
    replies = dict(honest) if data.draw(st.integers(0, 3), label="with the honest replies") == 0 else {}
    if data.draw(st.booleans(), label="mutate an honest reply"):
        original = replies.get(sender, b"")
        cut = data.draw(st.integers(0, max(len(original) - 1, 0)), label="at")
        blob = original[:cut] + blob + original[cut + len(blob) :]
    replies[sender] = blob
    # SecAggError fails the round as a whole (run_secure_round records it and the run goes on); any other
    # exception escapes here and fails the test.
    with contextlib.suppress(SecAggError):
        _METHODS[stage](server, replies, {})


def test_a_bad_survivor_set_signature_is_recorded_and_its_neighbours_refuse() -> None:
    nodes, deltas, counts = make_inputs(5, 8, seed=17)
    liar = nodes[1]

    def tamper(stage: str, node: int, reply: bytes) -> bytes:
        if (stage, node) != (stages.CONSISTENCY, liar):
            return reply
        return wire.pack({stages.SURVIVOR_SIGNATURE: identity.sign(identity_key(liar), b"another set")})

    trace = run_round(inputs=(nodes, deltas, counts), tamper=tamper, stop_before=stages.UNMASK)
    reason = trace.server.dropped[liar]
    assert reason.startswith(f"{stages.CONSISTENCY}: bad survivor-set signature"), reason
    assert liar not in trace.requests[stages.UNMASK]
    for node in trace.server.neighbours[liar]:
        expect_refusal(
            lambda node=node: client.unmask(
                trace.config, ROUND, trace.sessions[node], trace.requests[stages.UNMASK][node]
            ),
            f"missing ['{stages.SURVIVOR_SIGNATURE}/{liar}']",
        )


_BEFORE_CONSISTENCY = run_round(4, 6, secagg(3, 2), stop_before=stages.CONSISTENCY, seed=18)


@settings(max_examples=400, deadline=None)
@given(blob=_hostile_blob(), survivors=st.lists(st.integers(0, 2**64 - 1), max_size=6), with_self=st.booleans())
def test_fuzz_hostile_consistency_requests_end_as_refusals(blob: bytes, survivors: list[int], with_self: bool) -> None:
    """A malicious server's consistency request: the client signs a set with itself in it, or refuses."""
    trace = _BEFORE_CONSISTENCY
    node = trace.nodes[0]
    chosen = sorted(set(survivors) | ({node} if with_self else set()))
    for request in (blob, wire.pack({stages.SURVIVORS: wire.pack_ids(chosen)})):
        try:
            step = client.consistency(ROUND, trace.sessions[node], request, trace.devices[node])
        except (PayloadError, SecAggError):
            continue
        signed = wire.unpack_ids(wire.unpack(step.session)["signed"])
        assert node in signed and signed == sorted(signed)


# --- one setup per round (review of issue 16: a repeated setup made a device sign two survivor sets) -----------


@pytest.mark.parametrize("stop_before", [stages.SHARE_KEYS, stages.MASKED, stages.CONSISTENCY, stages.UNMASK, None])
def test_a_repeated_setup_of_a_round_is_refused_whatever_stage_the_device_reached(stop_before: str | None) -> None:
    trace = run_round(5, 16, secagg(3, 2), stop_before=stop_before, seed=5)
    node = trace.nodes[0]
    request = trace.requests[stages.SETUP][node]
    saved = trace.sessions[node]
    for server_round in (ROUND, ROUND - 1):  # the same round again, or an earlier one
        expect_refusal(
            lambda r=server_round: client.setup(trace.config, r, node, request, trace.devices[node], saved=saved),
            f"round {server_round}",
            f"already set up round {ROUND}",
        )


def test_the_second_setup_cannot_yield_a_second_survivor_set_signature() -> None:
    """The reviewer's attack: a re-sent setup wiped the session and the device signed a second set for the round."""
    trace = run_round(7, 16, secagg(3, 2), stop_before=stages.CONSISTENCY, seed=5)
    node = trace.nodes[1]
    first = client.consistency(
        ROUND, trace.sessions[node], wire.pack({stages.SURVIVORS: wire.pack_ids(sorted(trace.nodes))}), device(node)
    )
    with pytest.raises(SecAggError, match="already set up round"):
        client.setup(
            trace.config, ROUND, node, trace.requests[stages.SETUP][node], trace.devices[node], saved=first.session
        )


def test_setup_goes_on_for_a_later_round_another_run_or_a_device_without_a_session() -> None:
    trace = run_round(5, 16, secagg(3, 2), seed=5)  # a whole round: every session is closed
    assert trace.result is not None
    node = trace.nodes[0]
    request, closed = trace.requests[stages.SETUP][node], trace.sessions[node]
    later = client.setup(trace.config, ROUND + 1, node, request, trace.devices[node], saved=closed)
    assert client._int(wire.unpack(later.session)["round"]) == ROUND + 1
    other_run = identity.Identity(RUN_ID + 1, identity_key(node), trace.devices[node].roster)
    again = client.setup(trace.config, ROUND, node, request, other_run, saved=closed)
    assert client._int(wire.unpack(again.session)["run"]) == RUN_ID + 1
    fresh = client.setup(trace.config, ROUND, node, request, trace.devices[node], saved=b"")  # context state lost
    keys = {stages.ENCRYPTION_KEY, stages.MASK_KEY, stages.IDENTITY_KEY, stages.SETUP_SIGNATURE}
    assert set(wire.unpack(fresh.reply)) == keys
    expect_refusal(
        lambda: client.setup(trace.config, ROUND + 1, node, request, trace.devices[node], saved=b"garbage"),
        "unreadable",
    )
