"""fedadapt.aggregate.fedavg: weighted means by hand, server optimizers by hand, resume, and bad clients left out."""

from __future__ import annotations

import gc
import json
import logging
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedadapt.aggregate.fedavg import EmptyAggregateError, ReceivedDelta, StreamingFedAvg, aggregate_round
from fedadapt.aggregate.server_optimizers import (
    FedAdamConfig,
    FedAvgConfig,
    FedAvgMConfig,
    FedYogiConfig,
    OptimizerState,
    ServerOptConfig,
    ServerOptimizer,
)
from fedadapt.aggregate.validation import DeltaValidator, state_norm
from fedadapt.delta.serialize import Compression, read_metadata, serialize_state
from fedadapt.delta.state import AdapterSchema, State, TensorSpec
from fedadapt.errors import ConfigError, SchemaMismatch, StateError

SHAPES = {"lora_A": (2, 3), "lora_B": (3, 2), "head.bias": (4,)}


def make_schema(shapes: dict[str, tuple[int, ...]] = SHAPES, fingerprint: str = "fp-test") -> AdapterSchema:
    """A hand-made schema: ``shapes`` shared, plus one personal tensor that never travels."""
    shared = tuple(TensorSpec(n, s, "float32", "shared", "adapter") for n, s in shapes.items())
    personal = TensorSpec("personal.head", (2,), "float32", "personal", "head")
    return AdapterSchema({"name": "lora", "r": 2}, fingerprint, (*shared, personal))


SCHEMA = make_schema()


def filled(value: float, shapes: dict[str, tuple[int, ...]] = SHAPES) -> State:
    return {n: torch.full(s, value) for n, s in shapes.items()}


def random_state(seed: int, scale: float = 1.0) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=gen) for n, s in SHAPES.items()}


def blob_of(delta: State, compression: Compression = "none", schema: AdapterSchema = SCHEMA) -> bytes:
    return serialize_state(delta, schema, "shared", compression)


def craft(tensors: State) -> bytes:
    """A blob with a valid header for SCHEMA but arbitrary tensors (what a faulty client could send)."""
    return safetensors_save(dict(tensors), metadata=read_metadata(blob_of(filled(0.0))))


def fedavg_optimizer(config: ServerOptConfig | None = None) -> ServerOptimizer:
    return ServerOptimizer(config or FedAvgConfig(), SCHEMA)


def close(a: State, b: State, atol: float = 1e-6) -> bool:
    return list(a) == list(b) and all(torch.allclose(a[n], b[n], atol=atol, rtol=0) for n in a)


# --- weighted mean -------------------------------------------------------------------------------------------


def test_fedavg_matches_hand_computation() -> None:
    shapes = {"w": (2,)}
    schema = make_schema(shapes)
    deltas = [[1.0, 2.0], [4.0, -1.0], [1.0, 6.0]]
    replies = [(f"c{n}", serialize_state({"w": torch.tensor(d)}, schema), n) for n, d in enumerate(deltas, start=1)]
    result = aggregate_round(
        {"w": torch.tensor([10.0, 20.0])}, replies, DeltaValidator(schema), ServerOptimizer(FedAvgConfig(), schema)
    )
    # (1·[1,2] + 2·[4,−1] + 3·[1,6]) / 6 = [12, 18] / 6 = [2, 3]
    assert torch.equal(result.state["w"], torch.tensor([12.0, 23.0]))
    assert (result.accepted, result.total_examples, result.rejected, result.clipped) == (3, 6, [], [])
    assert result.bytes_received == sum(len(b) for _, b, _ in replies)


def test_streaming_equals_batch_mean_for_50_clients() -> None:
    gen = torch.Generator().manual_seed(7)
    deltas = [random_state(seed) for seed in range(50)]
    counts = torch.randint(1, 500, (50,), generator=gen).tolist()
    fedavg = StreamingFedAvg(SCHEMA)
    for delta, n in zip(deltas, counts, strict=True):
        fedavg.add(delta, n)
    weights = torch.tensor(counts, dtype=torch.float64)
    for name in SHAPES:
        stacked = torch.stack([d[name].double() for d in deltas])  # (clients, *shape)
        batch = torch.einsum("c,c...->...", weights, stacked) / weights.sum()
        assert torch.allclose(fedavg.result()[name].double(), batch, atol=1e-6, rtol=0)
    assert fedavg.result()["lora_A"].dtype == torch.float32
    assert (fedavg.num_clients, fedavg.num_examples) == (50, sum(counts))


def test_aggregator_holds_no_per_client_tensors() -> None:
    fedavg = StreamingFedAvg(SCHEMA)
    last = random_state(0)
    watched = weakref.ref(last["lora_A"])
    for seed in range(100):
        last = random_state(seed)
        fedavg.add(last, 1 + seed)
    assert len(_reachable_tensors(fedavg)) == len(SCHEMA.specs("shared"))
    assert not {id(t) for t in last.values()} & set(_reachable_tensors(fedavg))
    gc.collect()
    assert watched() is None  # the first client's tensor is gone: nothing kept it


def _reachable_tensors(root: object) -> dict[int, torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, dict):
            stack.extend([*obj.keys(), *obj.values()])
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return found


def test_zero_clients_is_a_clear_error() -> None:
    with pytest.raises(EmptyAggregateError, match="at least one"):
        StreamingFedAvg(SCHEMA).result()
    with pytest.raises(EmptyAggregateError, match="no client delta was accepted"):
        aggregate_round(filled(0.0), [], DeltaValidator(SCHEMA), fedavg_optimizer())


@pytest.mark.parametrize("count", [0, -3, 2.5, True, "7", None])
def test_num_examples_must_be_a_positive_int(count: object) -> None:
    with pytest.raises(ValueError, match="num_examples must be a positive int"):
        StreamingFedAvg(SCHEMA).add(filled(1.0), count)  # type: ignore[arg-type]


def test_add_checks_the_delta_against_the_schema() -> None:
    with pytest.raises(StateError, match="shape"):
        StreamingFedAvg(SCHEMA).add({**filled(1.0), "lora_A": torch.ones(3, 2)}, 1)
    with pytest.raises(StateError, match="non-finite"):
        StreamingFedAvg(SCHEMA).add({**filled(1.0), "head.bias": torch.full((4,), math.inf)}, 1)
    # A CheckedDelta skips the value check it already passed, never the layout check.
    other = DeltaValidator(make_schema({"w": (2,)})).check(
        serialize_state({"w": torch.ones(2)}, make_schema({"w": (2,)}))
    )
    with pytest.raises(StateError, match="does not know"):
        StreamingFedAvg(SCHEMA).add(other, 1)


def test_state_norm_survives_overflow_of_the_squares() -> None:
    half = {"a": torch.full((4,), 1000.0, dtype=torch.float16)}  # Σx² = 4e6 > fp16's 65504
    big = {"a": torch.full((4,), 1e30)}  # Σx² overflows float32
    assert state_norm(half) == pytest.approx(2000.0) and state_norm(big) == pytest.approx(2e30)


@settings(max_examples=15, deadline=None)
@given(
    clients=st.lists(
        st.tuples(st.integers(1, 10_000), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3)), min_size=1, max_size=12
    )
)
def test_weighted_mean_lies_within_per_coordinate_min_and_max(clients: list[tuple[int, int, float]]) -> None:
    deltas = [random_state(seed, scale) for _, seed, scale in clients]
    fedavg = StreamingFedAvg(SCHEMA)
    for (n, _, _), delta in zip(clients, deltas, strict=True):
        fedavg.add(delta, n)
    mean = fedavg.result()
    for name in SHAPES:
        stacked = torch.stack([d[name] for d in deltas])
        lo, hi = stacked.min(dim=0).values, stacked.max(dim=0).values
        slack = 1e-6 * stacked.abs().max()  # float32 rounding of the float64 mean
        assert bool(((mean[name] >= lo - slack) & (mean[name] <= hi + slack)).all())


# --- server optimizers ---------------------------------------------------------------------------------------


def test_server_lr_scales_the_mean_delta() -> None:
    new = fedavg_optimizer(FedAvgConfig(server_lr=0.25)).step(filled(1.0), filled(2.0))
    assert close(new, filled(1.5))


def test_fedavgm_two_rounds_by_hand() -> None:
    optimizer = fedavg_optimizer(FedAvgMConfig(server_lr=0.1, momentum=0.9))
    x1 = optimizer.step(filled(1.0), filled(1.0))  # u = 1; x = 1 + 0.1·1
    x2 = optimizer.step(x1, filled(2.0))  # u = 0.9·1 + 2 = 2.9; x = 1.1 + 0.29
    assert close(x1, filled(1.1)) and close(x2, filled(1.39))
    assert optimizer.steps == 2


def test_fedadam_one_step_by_hand() -> None:
    config = FedAdamConfig(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    new = fedavg_optimizer(config).step(filled(1.0), filled(0.02))
    m = (1 - 0.9) * 0.02  # m₋₁ = 0
    v = 0.99 * 1e-3**2 + (1 - 0.99) * 0.02**2  # v₋₁ = τ² (v₋₁ = 0 would give 1.0667)
    assert close(new, filled(1.0 + 0.1 * m / (math.sqrt(v) + 1e-3)))  # 1.0618


def test_fedyogi_two_steps_by_hand() -> None:
    """Reddi et al. Alg. 2 on a three-value tensor, in float64 by hand: v ← v − (1−β₂)·Δ²·sign(v − Δ²).

    The three entries take the three branches: Δ² above v (v grows), Δ² below v (v shrinks by
    (1−β₂)·Δ², where Adam's would shrink by (1−β₂)·(v − Δ²)), and Δ = 0 (v stays).
    """
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    schema = AdapterSchema({"name": "lora"}, "fp", (TensorSpec("w", (3,), "float32", "shared", "adapter"),))
    optimizer = ServerOptimizer(FedYogiConfig(server_lr=lr, beta1=b1, beta2=b2, tau=tau), schema)
    deltas = [[0.02, -0.5, 0.0], [0.001, -0.5, 0.0]]
    x, m, v = [1.0, 1.0, 1.0], [0.0] * 3, [tau**2] * 3  # v₋₁ = τ², as in the paper and FedAdam
    state = {"w": torch.tensor(x)}
    for delta in deltas:
        for i, d in enumerate(delta):
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = v[i] - (1 - b2) * d * d * math.copysign(1.0, v[i] - d * d) * (v[i] != d * d)
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        state = optimizer.step(state, {"w": torch.tensor(delta)})
        torch.testing.assert_close(state["w"], torch.tensor(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(optimizer.state_dict().tensors["v/w"], torch.tensor(v), atol=0, rtol=1e-6)
    # Round 1: v grew by (1−β₂)·Δ² where Δ² > τ²; round 2 the first entry's Δ² = 1e-6 < v = 5e-6 shrinks it by 1e-8.
    assert v[0] == pytest.approx(5e-6 - 1e-8) and v[1] == pytest.approx(1e-6 + 2 * 0.0025) and v[2] == tau**2
    adam_v0 = b2 * (b2 * tau**2 + (1 - b2) * 0.02**2) + (1 - b2) * 0.001**2  # 4.96e-6: Adam's differs
    assert abs(adam_v0 - v[0]) > 2e-8


def test_step_leaves_its_inputs_alone() -> None:
    x, delta = filled(1.0), filled(0.5)
    fedavg_optimizer(FedAdamConfig()).step(x, delta)
    assert close(x, filled(1.0), atol=0) and close(delta, filled(0.5), atol=0)


def test_half_precision_state_is_averaged_and_stepped_in_float32() -> None:
    schema = AdapterSchema({"name": "lora"}, "fp", (TensorSpec("w", (3,), "float16", "shared", "adapter"),))
    fedavg = StreamingFedAvg(schema)
    for value, n in [(1e-4, 1), (3e-4, 3)]:  # (1e-4 + 9e-4) / 4 = 2.5e-4
        fedavg.add({"w": torch.full((3,), value, dtype=torch.float16)}, n)
    mean = fedavg.result()
    assert mean["w"].dtype == torch.float16 and torch.allclose(mean["w"].float(), torch.full((3,), 2.5e-4), rtol=1e-3)
    optimizer = ServerOptimizer(FedAdamConfig(), schema)
    new = optimizer.step({"w": torch.ones(3, dtype=torch.float16)}, mean)
    assert new["w"].dtype == torch.float16 and optimizer.state_dict().tensors["v/w"].dtype == torch.float32


CONFIGS = [FedAvgConfig(0.7), FedAvgMConfig(server_lr=0.5, momentum=0.8), FedAdamConfig(), FedYogiConfig()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
def test_state_dict_round_trip_resumes_exactly(config: ServerOptConfig) -> None:
    first, x = fedavg_optimizer(config), filled(0.0)
    for seed in range(2):
        x = first.step(x, random_state(seed))
    saved = first.state_dict()
    # As a checkpoint would store it: safetensors bytes for the tensors, JSON for the scalars.
    tensors = safetensors_load(safetensors_save(saved.tensors)) if saved.tensors else {}
    resumed = fedavg_optimizer(config)
    resumed.load_state_dict(OptimizerState(tensors, json.loads(json.dumps(saved.scalars))))
    assert resumed.steps == 2
    x_a = x_b = x
    for seed in range(2, 5):
        x_a, x_b = first.step(x_a, random_state(seed)), resumed.step(x_b, random_state(seed))
    assert close(x_a, x_b, atol=0)


def test_state_dict_is_a_copy() -> None:
    optimizer = fedavg_optimizer(FedAvgMConfig(server_lr=1.0))
    saved = optimizer.state_dict()
    optimizer.step(filled(0.0), filled(1.0))
    assert all(bool((t == 0).all()) for t in saved.tensors.values())


def test_load_state_dict_refuses_what_does_not_fit(caplog: pytest.LogCaptureFixture) -> None:
    adam = fedavg_optimizer(FedAdamConfig())
    adam.step(filled(0.0), filled(1.0))
    saved = adam.state_dict()
    with pytest.raises(ConfigError, match="'fedadam'"):
        fedavg_optimizer(FedAvgMConfig(server_lr=1.0)).load_state_dict(saved)
    with pytest.raises(ConfigError, match="optimizer state is for 'fedadam', this optimizer is 'fedyogi'"):
        fedavg_optimizer(FedYogiConfig()).load_state_dict(saved)  # the same buffers, another update rule
    with pytest.raises(SchemaMismatch, match="schema"):
        ServerOptimizer(FedAdamConfig(), make_schema(fingerprint="other")).load_state_dict(saved)
    broken = {**saved.tensors, "m/lora_A": torch.zeros(3, 3)}
    with pytest.raises(StateError, match="m/lora_A"):
        fedavg_optimizer(FedAdamConfig()).load_state_dict(OptimizerState(broken, saved.scalars))
    with caplog.at_level(logging.WARNING, logger="fedadapt.aggregate.fedavg"):
        fedavg_optimizer(FedAdamConfig(server_lr=0.5)).load_state_dict(saved)
    assert "the checkpoint had" in caplog.text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FedAvgConfig(server_lr=0.0), "server_lr"),
        (lambda: FedAvgConfig(server_lr=math.inf), "server_lr"),
        (lambda: FedAvgMConfig(server_lr=1.0, momentum=1.0), "momentum"),
        (lambda: FedAdamConfig(beta1=-0.1), "beta1"),
        (lambda: FedAdamConfig(beta2=1.0), "beta2"),
        (lambda: FedAdamConfig(tau=0.0), "tau"),
        (lambda: FedYogiConfig(beta2=1.0), "beta2"),
        (lambda: FedYogiConfig(server_lr=-1.0), "server_lr"),
        (lambda: DeltaValidator(SCHEMA, max_norm=0.0), "max_norm"),
        (lambda: DeltaValidator(SCHEMA, max_norm=1.0, norm_policy="drop"), "norm_policy"),  # type: ignore[arg-type]
    ],
)
def test_bad_configs_are_refused(make: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()  # type: ignore[operator]


# --- validation and one round --------------------------------------------------------------------------------

SECRET = 1234.5678  # a value that must never appear in a reason or a log line


def test_bad_clients_are_left_out_and_the_round_completes(caplog: pytest.LogCaptureFixture) -> None:
    good = [("good-1", blob_of(filled(1.0)), 1), ("good-2", blob_of(filled(4.0)), 2)]
    nan = {**filled(SECRET), "lora_A": torch.tensor([[SECRET, math.nan, 0.0], [0.0, 0.0, 0.0]])}
    bad = [
        ("nan", craft(nan), 5),
        ("wrong-shape", craft({**filled(SECRET), "lora_A": torch.full((3, 2), SECRET)}), 5),
        ("other-schema", blob_of(filled(SECRET), schema=make_schema(fingerprint="another-backbone")), 5),
        ("garbage", b"\x00" * 40, 5),
        ("zero-examples", blob_of(filled(SECRET)), 0),
        ("good-1", blob_of(filled(SECRET)), 5),
    ]
    with caplog.at_level(logging.INFO, logger="fedadapt.aggregate.fedavg"):
        result = aggregate_round(filled(0.0), good[:1] + bad + good[1:], DeltaValidator(SCHEMA), fedavg_optimizer())
    assert close(result.state, filled(3.0))  # (1·1 + 2·4) / 3
    assert (result.accepted, result.total_examples) == (2, 3)
    reasons = dict(result.rejected)
    assert list(reasons) == ["nan", "wrong-shape", "other-schema", "garbage", "zero-examples", "good-1"]
    assert "non-finite" in reasons["nan"] and "shape" in reasons["wrong-shape"]
    assert reasons["other-schema"].startswith("SchemaMismatch") and "second reply" in reasons["good-1"]
    assert "num_examples" in reasons["zero-examples"]
    assert all("1234" not in r for r in reasons.values()) and "1234" not in caplog.text
    assert caplog.text.count("leaving client") == len(bad)


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_compressed_deltas_average_within_their_error(compression: Compression) -> None:
    deltas = [random_state(seed, 0.01) for seed in range(8)]
    replies = [ReceivedDelta(f"c{i}", blob_of(d, compression), i + 1) for i, d in enumerate(deltas)]
    result = aggregate_round(filled(0.0), replies, DeltaValidator(SCHEMA), fedavg_optimizer())
    exact = StreamingFedAvg(SCHEMA)
    for i, delta in enumerate(deltas):
        exact.add(delta, i + 1)
    largest = max(float(t.abs().max()) for d in deltas for t in d.values())
    bound = 1.01 * largest * (1 / 254 if compression == "int8" else 2**-11)  # half a quantization step
    assert close(result.state, exact.result(), atol=bound)


def test_norm_over_the_limit_is_rejected() -> None:
    validator = DeltaValidator(SCHEMA, max_norm=1.0)
    with pytest.raises(StateError, match=r"norm .* exceeds max_norm 1"):
        validator.validate(blob_of(filled(1.0)))  # norm √16 = 4
    replies = [("big", blob_of(filled(1.0)), 1), ("small", blob_of(filled(0.1)), 1)]
    result = aggregate_round(filled(0.0), replies, validator, fedavg_optimizer())
    assert result.accepted == 1 and [c for c, _ in result.rejected] == ["big"] and result.clipped == []
    assert close(result.state, filled(0.1))


def test_norm_over_the_limit_is_clipped() -> None:
    validator = DeltaValidator(SCHEMA, max_norm=1.0, norm_policy="clip")
    checked = validator.check(blob_of(filled(1.0)))
    assert checked.clipped and checked.norm == pytest.approx(4.0)
    assert state_norm(checked.state) == pytest.approx(1.0) and close(checked.state, filled(0.25))
    replies = [("big", blob_of(filled(1.0)), 1), ("small", blob_of(filled(0.2)), 1)]  # norms 4 and 0.8
    result = aggregate_round(filled(0.0), replies, validator, fedavg_optimizer())
    assert result.clipped == ["big"] and result.rejected == [] and close(result.state, filled(0.225))


def test_a_round_with_every_client_rejected_raises() -> None:
    replies = [("nan", craft({**filled(0.0), "head.bias": torch.full((4,), math.nan)}), 1)]
    with pytest.raises(EmptyAggregateError, match="1 rejected") as raised:
        aggregate_round(filled(0.0), replies, DeltaValidator(SCHEMA), fedavg_optimizer())
    assert [client for client, _ in raised.value.rejected] == ["nan"] and "non-finite" in raised.value.rejected[0][1]


def test_validator_and_optimizer_must_share_the_schema() -> None:
    other = ServerOptimizer(FedAvgConfig(), make_schema(fingerprint="other"))
    with pytest.raises(SchemaMismatch, match="same adapter schema"):
        aggregate_round(filled(0.0), [("c", blob_of(filled(1.0)), 1)], DeltaValidator(SCHEMA), other)


# --- min_clients ---------------------------------------------------------------------------------------------


def _same_optimizer_state(a: OptimizerState, b: OptimizerState) -> bool:
    return a.scalars == b.scalars and close(a.tensors, b.tensors, atol=0)


def test_fewer_accepted_deltas_than_min_clients_raise_and_leave_the_optimizer_alone() -> None:
    optimizer = fedavg_optimizer(FedAvgMConfig(server_lr=1.0, momentum=0.9))
    optimizer.step(filled(0.0), filled(0.5))  # non-zero momentum a failed round must not touch
    saved = optimizer.state_dict()
    replies = [ReceivedDelta("a", blob_of(filled(1.0)), 1), ReceivedDelta("b", blob_of(filled(3.0)), 1)]
    with pytest.raises(EmptyAggregateError, match=r"only 2 client deltas .* fewer than min-clients \(3\)") as raised:
        aggregate_round(filled(0.0), replies, DeltaValidator(SCHEMA), optimizer, min_clients=3)
    assert isinstance(raised.value.rejected, list) and raised.value.rejected == []
    assert optimizer.steps == 1 and _same_optimizer_state(optimizer.state_dict(), saved)


def test_rejected_clients_count_against_min_clients() -> None:
    optimizer = fedavg_optimizer(FedAdamConfig())
    saved = optimizer.state_dict()
    replies = [
        ReceivedDelta("a", blob_of(filled(1.0)), 1),
        ReceivedDelta("garbage", b"\x00" * 40, 1),
        ReceivedDelta("b", blob_of(filled(3.0)), 1),
    ]
    with pytest.raises(EmptyAggregateError, match="1 rejected") as raised:
        aggregate_round(filled(0.0), replies, DeltaValidator(SCHEMA), optimizer, min_clients=3)
    assert isinstance(raised.value.rejected, list) and [c for c, _ in raised.value.rejected] == ["garbage"]
    assert optimizer.steps == 0 and _same_optimizer_state(optimizer.state_dict(), saved)


def test_exactly_min_clients_aggregates() -> None:
    optimizer = fedavg_optimizer(FedAvgMConfig(server_lr=1.0, momentum=0.9))
    replies = [ReceivedDelta("a", blob_of(filled(1.0)), 1), ReceivedDelta("b", blob_of(filled(3.0)), 3)]
    result = aggregate_round(filled(0.0), replies, DeltaValidator(SCHEMA), optimizer, min_clients=2)
    assert (result.accepted, result.total_examples, result.rejected) == (2, 4, [])
    assert close(result.state, filled(2.5))  # (1·1 + 3·3) / 4; first momentum step u = Δ̄
    assert optimizer.steps == 1 and close(
        optimizer.state_dict().tensors, {f"momentum/{n}": t for n, t in filled(2.5).items()}
    )


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_min_clients_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="min_clients must be a positive integer"):
        aggregate_round(filled(0.0), iter(()), DeltaValidator(SCHEMA), fedavg_optimizer(), bad)  # type: ignore[arg-type]


# --- bounded influence and hostile counts (issue 16) -----------------------------------------------------------


def test_a_client_over_claiming_its_count_is_rejected_and_the_mean_stays_the_honest_mean() -> None:
    honest = [(f"c{i}", blob_of(random_state(i)), 50 + i) for i in range(99)]
    liar = ("liar", blob_of(filled(100.0)), 10**15)
    result = aggregate_round(filled(0.0), iter([*honest, liar]), DeltaValidator(SCHEMA), fedavg_optimizer(), 1, 10_000)
    expected = StreamingFedAvg(SCHEMA)
    for i in range(99):
        expected.add(random_state(i), 50 + i)
    mean = expected.result()
    assert result.accepted == 99 and result.total_examples == sum(50 + i for i in range(99))
    assert result.rejected == [("liar", "num-examples 1000000000000000 exceeds limit 10000")]
    for name in SHAPES:
        assert torch.allclose(result.state[name], mean[name], atol=1e-6)


def test_a_count_at_the_limit_is_accepted() -> None:
    replies = [("a", blob_of(filled(1.0)), 10_000), ("b", blob_of(filled(3.0)), 10_000)]
    result = aggregate_round(filled(0.0), replies, DeltaValidator(SCHEMA), fedavg_optimizer(), 1, 10_000)
    assert result.accepted == 2 and torch.allclose(result.state["lora_A"], torch.full((2, 3), 2.0))


@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 2**53 + 1, 10**400])
def test_a_count_too_large_for_the_sums_is_a_rejection_not_an_overflow(count: int) -> None:
    """Without a per-client limit the stream still refuses counts that torch's alpha or float64 cannot hold."""
    replies = [("a", blob_of(filled(1.0)), 3), ("huge", blob_of(filled(9.0)), count)]
    result = aggregate_round(filled(0.0), replies, DeltaValidator(SCHEMA), fedavg_optimizer())
    assert result.accepted == 1 and torch.equal(result.state["lora_A"], torch.full((2, 3), 1.0))
    ((client, reason),) = result.rejected
    assert client == "huge" and "exceeds limit 9007199254740992 (2**53)" in reason


def test_an_oversize_blob_is_rejected_before_it_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedadapt.aggregate import validation
    from fedadapt.delta.serialize import max_blob_size

    cap = max_blob_size(SCHEMA, "shared", "none")
    parsed: list[int] = []
    monkeypatch.setattr(validation, "deserialize_state", lambda blob, *a, **k: parsed.append(len(blob)))
    validator = DeltaValidator(SCHEMA, max_bytes=cap)
    with pytest.raises(StateError, match=f"blob of {cap + 1} bytes exceeds the {cap} the largest legal delta takes"):
        validator.check(blob_of(filled(0.0)) + b" " * (cap + 1 - len(blob_of(filled(0.0)))))
    assert parsed == []
