"""Issue 22: a clipped delta's global L2 norm is ≤ C for every finite delta; NaN and inf are refused by name."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedadapt.errors import ConfigError, NonFiniteDeltaError, StateError
from fedadapt.privacy.dp.clipping import clip_delta, global_norm

CLIPS = st.floats(min_value=1e-6, max_value=1e6)


def _finite(dtype: type[np.floating], width: Literal[16, 32, 64]) -> st.SearchStrategy[np.ndarray]:
    # every finite value of the dtype: subnormals, the largest magnitudes, signed zeros
    elements = st.floats(allow_nan=False, allow_infinity=False, width=width)
    return hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=2, max_side=40), elements=elements)


def _norm64(values: np.ndarray) -> float:
    """The reference norm: exact Python floats (math.hypot does not overflow)."""
    return math.hypot(*(float(x) for x in values.reshape(-1)))


@settings(max_examples=300, deadline=None)
@given(delta=st.one_of(_finite(np.float32, 32), _finite(np.float64, 64), _finite(np.float16, 16)), clip=CLIPS)
def test_the_clip_bound_holds_for_every_finite_vector(delta: np.ndarray, clip: float) -> None:
    result = clip_delta(delta, clip)
    assert result.delta.shape == delta.shape and result.delta.dtype == delta.dtype
    assert _norm64(result.delta) <= clip
    assert result.norm == pytest.approx(_norm64(delta), rel=1e-12)
    assert result.clipped == (result.norm > clip)
    if result.norm <= clip * (1 - 1e-9):
        assert result.delta is delta
    elif np.finfo(delta.dtype).bits > 16:
        # the direction is kept: each value scaled by C / norm (up to rounding and flush of subnormals)
        expected = delta.astype(np.float64) / result.norm * (clip * (1 - 1e-9))
        info = np.finfo(delta.dtype)
        tolerance = 8 * float(info.eps) * np.abs(expected) + float(info.smallest_normal)
        assert np.all(np.abs(result.delta.astype(np.float64) - expected) <= tolerance)


@settings(max_examples=100, deadline=None)
@given(
    a=_finite(np.float32, 32),
    b=_finite(np.float32, 32),
    c=hnp.arrays(np.float16, 5, elements=st.floats(-65504, 65504, width=16)),
    clip=CLIPS,
)
def test_the_clip_bound_holds_over_all_tensors_of_a_state(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, clip: float
) -> None:
    state = {"a": torch.from_numpy(a.copy()), "b": torch.from_numpy(b.copy()), "c": torch.from_numpy(c.copy())}
    state["d"] = state["c"].to(torch.bfloat16)
    result = clip_delta(state, clip)
    assert list(result.delta) == ["a", "b", "c", "d"]
    assert [(t.dtype, t.shape) for t in result.delta.values()] == [(t.dtype, t.shape) for t in state.values()]
    everything = np.concatenate([t.double().numpy().reshape(-1) for t in result.delta.values()])
    assert _norm64(everything) <= clip
    before = np.concatenate([t.double().numpy().reshape(-1) for t in state.values()])
    assert result.norm == pytest.approx(_norm64(before), rel=1e-12)
    assert result.clipped == (result.norm > clip)


def test_the_largest_float32_values_clip_without_overflow() -> None:
    delta = np.full(10_000, np.finfo(np.float32).max, dtype=np.float32)
    result = clip_delta(delta, 1.0)
    assert result.clipped and result.norm == pytest.approx(float(np.finfo(np.float32).max) * 100)
    assert global_norm([result.delta]) <= 1.0
    assert np.allclose(result.delta, 0.01, rtol=1e-6)


def test_a_state_within_the_bound_comes_back_unchanged() -> None:
    state = {"w": torch.tensor([3.0, 4.0])}
    result = clip_delta(state, 5.1)
    assert not result.clipped and result.norm == 5.0 and result.delta["w"] is state["w"]
    # exactly at C: not "clipped" (norm > C is false), but shrunk by 1e-9 so rounding cannot carry it over
    at_bound = clip_delta(state, 5.0)
    assert not at_bound.clipped and torch.allclose(at_bound.delta["w"], state["w"], rtol=1e-6)
    scaled = clip_delta(state, 1.0)
    assert scaled.clipped and torch.allclose(scaled.delta["w"], torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_by_name(bad: float) -> None:
    vector = np.ones(100, dtype=np.float32)
    vector[57] = bad
    with pytest.raises(NonFiniteDeltaError, match="NaN or inf") as raised:
        clip_delta(vector, 1.0)
    assert raised.value.reason == "non-finite-delta"
    state = {"ok": torch.ones(3), "bad": torch.from_numpy(vector)}
    with pytest.raises(NonFiniteDeltaError):
        clip_delta(state, 1.0)


def test_what_cannot_be_clipped_is_refused() -> None:
    with pytest.raises(StateError, match="only floating-point"):
        clip_delta(np.arange(4), 1.0)
    with pytest.raises(StateError, match="not a torch tensor"):
        clip_delta({"w": [1.0, 2.0]}, 1.0)  # type: ignore[dict-item]
    for clip in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ConfigError, match="clip norm"):
            clip_delta(np.ones(3), clip)  # type: ignore[arg-type]


def test_an_empty_delta_has_norm_zero() -> None:
    assert clip_delta(np.zeros(0, dtype=np.float32), 1.0).norm == 0.0
    assert global_norm([np.zeros(3), np.zeros(0)]) == 0.0
