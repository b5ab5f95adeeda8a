"""Activation grids over time: static, per-timestep (nearest calibrated sigma) and sigma-poly."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.quant.grid import QuantSpec, grid_from_range
from taq.quant.schedules import fit_schedule
from taq.sampling import flow_sigmas, select_steps

FAST = settings(max_examples=60, deadline=None)
SIGMAS = flow_sigmas(100)[select_steps(100, 25)]  # the paper recipe's calibrated sigmas, decreasing


def observed(bits: int, seed: int = 0):
    """Per-timestep grids of made-up ranges that widen as sigma falls (as post-GELU maxima do)."""
    rng = np.random.default_rng(seed)
    lo = np.full(SIGMAS.size, -0.17)
    hi = 2.0 + 6.0 * (1 - SIGMAS) + rng.uniform(0, 0.2, SIGMAS.size)
    scale, zero_point = grid_from_range(lo, hi, QuantSpec(bits=bits))
    return np.array(scale, np.float64), np.array(zero_point, np.float64)


def grid(schedule, sigmas) -> tuple[np.ndarray, np.ndarray]:
    scale, zero_point = schedule.grid_at(mx.array(np.asarray(sigmas, np.float32)))
    return np.array(scale), np.array(zero_point)


def test_per_timestep_gives_each_calibrated_sigma_its_own_grid_exactly():
    scale, zero_point = observed(8)
    schedule = fit_schedule("per-timestep", 8, SIGMAS, scale, zero_point, 1.0, 0.0)
    got_scale, got_zp = grid(schedule, SIGMAS)
    np.testing.assert_array_equal(got_scale, scale.astype(np.float32))
    np.testing.assert_array_equal(got_zp, zero_point)


@FAST
@given(sigma=st.floats(0.0, 1.0, allow_nan=False))
def test_a_step_between_calibrated_sigmas_takes_the_nearest_ones_grid(sigma):
    scale, zero_point = observed(6)
    schedule = fit_schedule("per-timestep", 6, SIGMAS, scale, zero_point, 1.0, 0.0)
    got_scale, _ = grid(schedule, [sigma])
    distance = np.abs(SIGMAS.astype(np.float32) - np.float32(sigma))
    nearest = np.flatnonzero(distance == distance.min())
    assert got_scale[0] == np.float32(scale[nearest[0]])  # ties: the first (larger) sigma


def test_rows_at_different_sigmas_get_different_grids_in_one_call():
    scale, zero_point = observed(8)
    schedule = fit_schedule("per-timestep", 8, SIGMAS, scale, zero_point, 1.0, 0.0)
    got_scale, _ = grid(schedule, [SIGMAS[0], SIGMAS[-1], SIGMAS[0]])
    assert got_scale[0] == got_scale[2] != got_scale[1]


def test_static_is_one_grid_for_every_sigma():
    scale, zero_point = observed(4)
    schedule = fit_schedule("static", 4, SIGMAS, scale, zero_point, 0.5, 3.0)
    got_scale, got_zp = grid(schedule, [1.0, 0.5, 0.01])
    assert np.all(got_scale == 0.5) and np.all(got_zp == 3.0)


@FAST
@given(sigma=st.floats(-0.5, 1.5, allow_nan=False), degree=st.integers(0, 4))
def test_sigma_poly_is_clamped_to_the_calibrated_span_and_always_a_valid_grid(sigma, degree):
    scale, zero_point = observed(8)
    schedule = fit_schedule("sigma-poly", 8, SIGMAS, scale, zero_point, 1.0, 0.0, degree=degree)
    got_scale, got_zp = grid(schedule, [sigma])
    clamped_scale, _ = grid(schedule, [np.clip(sigma, SIGMAS[-1], SIGMAS[0])])
    assert got_scale[0] == clamped_scale[0] > 0
    assert got_zp[0] == np.round(got_zp[0]) and 0 <= got_zp[0] <= 255


def test_sigma_poly_of_full_degree_reproduces_each_calibrated_grid():
    sigmas = SIGMAS[::6]  # 5 sigmas: degree 4 interpolates them
    scale, zero_point = (v[::6] for v in observed(8))
    schedule = fit_schedule("sigma-poly", 8, sigmas, scale, zero_point, 1.0, 0.0, degree=4)
    got_scale, got_zp = grid(schedule, sigmas)
    np.testing.assert_allclose(got_scale, scale, rtol=1e-4)
    assert np.abs(got_zp - zero_point).max() <= 1  # the zero point's rounding may move by a level


def test_sigma_poly_tracks_a_smooth_range_better_than_static():
    scale, zero_point = observed(8)
    poly = fit_schedule("sigma-poly", 8, SIGMAS, scale, zero_point, float(scale.max()), 0.0, degree=3)
    fitted, _ = grid(poly, SIGMAS)
    assert np.abs(fitted / scale - 1).max() < 0.05 < np.abs(scale.max() / scale - 1).max()


@pytest.mark.parametrize("mode, message", [("per-step", "mode must be one of"), ("sigma-poly", "degree")])
def test_bad_modes_and_degrees_are_refused(mode, message):
    scale, zero_point = observed(8)
    with pytest.raises(ValueError, match=message):
        fit_schedule(mode, 8, SIGMAS, scale, zero_point, 1.0, 0.0, degree=-1)
