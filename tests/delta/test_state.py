"""Adapter state: deltas, the schema and its id, and AdapterModel.state / load_state checks."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import build_lora, perturbed

from fedadapt import (
    AdapterModel,
    AdapterSchema,
    StateSplit,
    apply_delta,
    compute_delta,
)
from fedadapt.delta.state import State, TensorSpec, check_state
from fedadapt.errors import StateError


def dyadic(shapes: dict[str, tuple[int, ...]], seed: int) -> State:
    """Tensors of multiples of 1/256 in [-4, 4]: float32 add/subtract on them is exact."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randint(-1024, 1025, s, generator=gen).float() / 256 for n, s in shapes.items()}


def cloned(state: State) -> State:
    return {n: t.clone() for n, t in state.items()}


def assert_states_equal(a: State, b: State) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# --- compute_delta / apply_delta -------------------------------------------------------------------------------


def test_delta_round_trip_is_exact_on_a_model_state(lora: AdapterModel) -> None:
    old = lora.state("shared")
    new = perturbed(old)
    delta = compute_delta(new, old)
    assert list(delta) == list(new)
    assert all(delta[n].dtype == torch.float32 for n in delta)
    assert_states_equal(apply_delta(old, delta), new)


def test_delta_round_trip_is_exact_on_exactly_representable_values() -> None:
    shapes = {"w": (7, 5), "b": (5,), "s": ()}
    old, new = dyadic(shapes, seed=1), dyadic(shapes, seed=2)
    assert_states_equal(apply_delta(old, compute_delta(new, old)), new)


def test_delta_round_trip_of_unrelated_random_states_is_within_rounding() -> None:
    # For arbitrary float32 values old + (new - old) can differ from new by rounding (one ulp
    # of the larger operand), so only closeness is guaranteed there.
    gen = torch.Generator().manual_seed(3)
    old = {"w": torch.randn(64, 64, generator=gen)}
    new = {"w": 10 * torch.randn(64, 64, generator=gen)}
    torch.testing.assert_close(apply_delta(old, compute_delta(new, old))["w"], new["w"], rtol=0, atol=1e-5)


def test_delta_values_are_new_minus_old() -> None:
    old = {"w": torch.tensor([1.0, 2.0, -3.0])}
    new = {"w": torch.tensor([1.5, 0.0, -3.0])}
    assert torch.equal(compute_delta(new, old)["w"], torch.tensor([0.5, -2.0, 0.0]))


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0, -1.0])
def test_apply_delta_scales_the_delta(scale: float) -> None:
    shapes = {"w": (4, 3), "b": (3,)}
    old, new = dyadic(shapes, seed=4), dyadic(shapes, seed=5)
    result = apply_delta(old, compute_delta(new, old), scale=scale)
    for name in shapes:
        assert torch.equal(result[name], old[name] + scale * (new[name] - old[name])), name


def test_apply_delta_with_half_scale_lands_halfway() -> None:
    old = {"w": torch.tensor([0.0, 2.0, -4.0])}
    new = {"w": torch.tensor([1.0, 4.0, 0.0])}
    halfway = apply_delta(old, compute_delta(new, old), scale=0.5)
    assert torch.equal(halfway["w"], torch.tensor([0.5, 3.0, -2.0]))


def test_delta_functions_do_not_modify_their_inputs(lora: AdapterModel) -> None:
    old = lora.state("shared")
    new = perturbed(old)
    old_copy, new_copy = cloned(old), cloned(new)
    delta = compute_delta(new, old)
    delta_copy = cloned(delta)
    result = apply_delta(old, delta, scale=0.5)
    assert_states_equal(old, old_copy)
    assert_states_equal(new, new_copy)
    assert_states_equal(delta, delta_copy)
    for name in result:
        assert result[name].data_ptr() not in (old[name].data_ptr(), delta[name].data_ptr()), name


def test_apply_delta_keeps_the_base_dtype() -> None:
    base = {"w": torch.zeros(3, dtype=torch.float32)}
    delta = {"w": torch.ones(3, dtype=torch.float16)}
    assert apply_delta(base, delta)["w"].dtype == torch.float32


@pytest.mark.parametrize("function", [compute_delta, apply_delta])
def test_mismatched_names_are_named_in_the_error(function: Callable[..., State]) -> None:
    a = {"shared.w": torch.zeros(2), "only_in_a": torch.zeros(2)}
    b = {"shared.w": torch.zeros(2), "only_in_b": torch.zeros(2)}
    with pytest.raises(StateError, match="only_in_a") as info:
        function(a, b)
    assert "only_in_b" in str(info.value)


@pytest.mark.parametrize("function", [compute_delta, apply_delta])
def test_missing_tensor_is_named_in_the_error(function: Callable[..., State]) -> None:
    a = {"w": torch.zeros(2), "b": torch.zeros(2)}
    b = {"w": torch.zeros(2)}
    with pytest.raises(StateError, match=r"only in first: \['b'\]"):
        function(a, b)


@pytest.mark.parametrize("function", [compute_delta, apply_delta])
def test_mismatched_shapes_are_named_in_the_error(function: Callable[..., State]) -> None:
    a = {"w": torch.zeros(2, 3), "layer.bias": torch.zeros(3)}
    b = {"w": torch.zeros(2, 3), "layer.bias": torch.zeros(4)}
    with pytest.raises(StateError, match=r"'layer\.bias'.*\(3,\).*\(4,\)"):
        function(a, b)


def test_same_names_in_another_order_are_reported_as_an_order_problem() -> None:
    a = {"x": torch.zeros(1), "y": torch.zeros(1)}
    b = {"y": torch.zeros(1), "x": torch.zeros(1)}
    with pytest.raises(StateError, match="order.*'x'.*'y'"):
        compute_delta(a, b)


# --- AdapterSchema ---------------------------------------------------------------------------------------------


def test_schema_id_is_stable_across_builds(tiny_bert: Path, lora: AdapterModel) -> None:
    again = build_lora(tiny_bert)
    assert again.schema == lora.schema
    assert again.schema_id == lora.schema_id
    assert re.fullmatch(r"[0-9a-f]{32}", lora.schema_id)


def test_schema_id_changes_with_the_method_config(tiny_bert: Path, lora: AdapterModel) -> None:
    rank4 = build_lora(tiny_bert, r=4)
    assert rank4.schema.method["r"] == 4
    assert rank4.schema_id != lora.schema_id


def test_schema_id_changes_with_the_method_config_alone(lora: AdapterModel) -> None:
    method = {**lora.schema.method, "alpha": 32.0}
    assert dataclasses.replace(lora.schema, method=method).schema_id != lora.schema_id


def test_schema_id_changes_with_the_backbone_fingerprint(lora: AdapterModel) -> None:
    other = dataclasses.replace(lora.schema, backbone_fingerprint="0" * 64)
    assert other.tensors == lora.schema.tensors
    assert other.schema_id != lora.schema_id


def test_schema_id_changes_when_the_head_becomes_personal(tiny_bert: Path, lora: AdapterModel) -> None:
    personal_head = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    assert [t.name for t in personal_head.schema.tensors] == [t.name for t in lora.schema.tensors]
    assert personal_head.schema_id != lora.schema_id


def test_schema_id_changes_with_extras(lora: AdapterModel) -> None:
    assert dataclasses.replace(lora.schema, extras={"a_seed": 1}).schema_id != lora.schema_id


@pytest.mark.parametrize("split", [StateSplit(), StateSplit(personal=("head",))])
def test_schema_dict_round_trip_keeps_the_id(tiny_bert: Path, split: StateSplit) -> None:
    schema = build_lora(tiny_bert, split=split).schema
    restored = AdapterSchema.from_dict(schema.to_dict())
    assert restored == schema
    assert restored.schema_id == schema.schema_id


def test_schema_counts_parameters_per_part(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    # BERT default LoRA targets query and value: 2 layers × 2 modules × (A: 8×32 + B: 32×8).
    assert model.schema.num_params("shared") == 2 * 2 * (8 * 32 + 32 * 8)
    assert model.schema.num_params("personal") == 3 * 32 + 3
    assert model.schema.num_params() == model.num_parameters()[1]


# --- AdapterModel.state / load_state ---------------------------------------------------------------------------


def test_state_matches_the_schema(lora: AdapterModel) -> None:
    state = lora.state("shared")
    assert list(state) == [s.name for s in lora.schema.specs("shared")]
    for spec in lora.schema.specs("shared"):
        assert tuple(state[spec.name].shape) == spec.shape
        assert not state[spec.name].requires_grad


def test_state_is_a_copy(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert)
    state = model.state("shared")
    name = next(iter(state))
    state[name].add_(1.0)
    assert not torch.equal(model.state("shared")[name], state[name])


def test_load_state_round_trip(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert)
    original = model.state("shared")
    target = perturbed(original, seed=7)
    model.load_state(target, "shared")
    assert_states_equal(model.state("shared"), target)
    model.load_state(original, "shared")
    assert_states_equal(model.state("shared"), original)


def test_load_state_moves_state_between_models(tiny_bert: Path) -> None:
    sender, receiver = build_lora(tiny_bert), build_lora(tiny_bert)
    sender.load_state(perturbed(sender.state("shared"), seed=8), "shared")
    receiver.load_state(sender.state("shared"), "shared")
    assert_states_equal(receiver.state("shared"), sender.state("shared"))


def _first_name(state: State) -> str:
    return next(iter(state))


def test_load_state_rejects_an_unknown_tensor(lora: AdapterModel) -> None:
    state = lora.state("shared")
    state["base_model.model.not_a_layer.weight"] = torch.zeros(2)
    with pytest.raises(StateError, match=re.escape("base_model.model.not_a_layer.weight")):
        lora.load_state(state, "shared")


def test_load_state_rejects_a_missing_tensor(lora: AdapterModel) -> None:
    state = lora.state("shared")
    name = _first_name(state)
    del state[name]
    with pytest.raises(StateError, match=re.escape(name)):
        lora.load_state(state, "shared")


def test_load_state_rejects_a_wrong_shape(lora: AdapterModel) -> None:
    state = lora.state("shared")
    name = _first_name(state)
    state[name] = torch.zeros(3, 3)
    with pytest.raises(StateError, match=re.escape(name) + r".*shape \(3, 3\)"):
        lora.load_state(state, "shared")


def test_load_state_rejects_a_wrong_dtype(lora: AdapterModel) -> None:
    state = lora.state("shared")
    name = _first_name(state)
    state[name] = state[name].double()
    with pytest.raises(StateError, match=re.escape(name) + ".*dtype float64"):
        lora.load_state(state, "shared")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_load_state_rejects_non_finite_values(tiny_bert: Path, bad_value: float) -> None:
    model = build_lora(tiny_bert)
    before = model.state("shared")
    state = cloned(before)
    name = list(state)[-1]
    state[name].view(-1)[0] = bad_value
    with pytest.raises(StateError, match=re.escape(name) + ".*non-finite"):
        model.load_state(state, "shared")
    assert_states_equal(model.state("shared"), before)


def test_load_state_rejects_a_full_state_as_a_part(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    head = model.schema.specs("personal")[0].name
    with pytest.raises(StateError, match=re.escape(head)):
        model.load_state(model.state(), "shared")


def test_personal_head_split_separates_roles(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    roles = {t.name: t.role for t in model.schema.tensors}
    shared, personal = model.state("shared"), model.state("personal")
    assert shared and personal
    assert {roles[n] for n in shared} == {"adapter"}
    assert {roles[n] for n in personal} == {"head"}
    assert all("classifier" not in n for n in shared)
    assert set(shared) | set(personal) == set(roles)
    assert list(model.state()) == [t.name for t in model.schema.tensors]


def test_default_split_shares_everything(lora: AdapterModel) -> None:
    assert lora.state("personal") == {}
    assert {t.role for t in lora.schema.specs("shared")} == {"adapter", "head"}


def test_personal_state_round_trip(tiny_bert: Path) -> None:
    model = build_lora(tiny_bert, split=StateSplit(personal=("head",)))
    shared_before = model.state("shared")
    target = perturbed(model.state("personal"), seed=9)
    model.load_state(target, "personal")
    assert_states_equal(model.state("personal"), target)
    assert_states_equal(model.state("shared"), shared_before)


def test_squared_norms_flag_nan_and_inf_but_not_large_finite_values() -> None:
    from fedadapt.delta.state import squared_norms

    large = torch.full((4,), 1e20)  # its squares overflow float32; they are redone in float64
    half = torch.full((3,), 300.0, dtype=torch.float16)  # squares above float16's range
    nan_last = torch.zeros(5)
    nan_last[-1] = float("nan")
    inf_first = torch.zeros(5)
    inf_first[0] = -float("inf")
    squares = squared_norms({"large": large, "half": half, "nan": nan_last, "inf": inf_first, "ids": torch.ones(2)})
    assert squares["large"] == pytest.approx(4e40, rel=1e-6)
    assert squares["half"] == pytest.approx(3 * 300.0**2)
    assert math.isnan(squares["nan"]) and math.isinf(squares["inf"])
    spec = TensorSpec("large", (4,), "float32", "shared", "adapter")
    check_state({"large": large}, (spec,))  # large but finite: accepted
    with pytest.raises(StateError, match="'nan' has non-finite"):
        check_state({"nan": nan_last}, (TensorSpec("nan", (5,), "float32", "shared", "adapter"),))
