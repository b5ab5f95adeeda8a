import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.sampling.schedule import (
    SD3_SHIFT,
    flow_sigmas,
    shift_sigma,
    sigma_to_timestep,
    timestep_to_sigma,
)

steps = st.integers(min_value=1, max_value=300)
shifts = st.floats(min_value=0.25, max_value=10.0, allow_nan=False)


@given(num_steps=steps, shift=shifts)
def test_sigmas_run_strictly_down_from_one_to_zero(num_steps, shift):
    sigmas = flow_sigmas(num_steps, shift)
    assert sigmas.shape == (num_steps + 1,)
    assert sigmas[0] == pytest.approx(1.0, abs=1e-12)
    assert sigmas[-1] == 0.0
    assert np.all(np.diff(sigmas) < 0)


@given(num_steps=st.integers(min_value=2, max_value=300))
def test_shift_one_spaces_sigmas_linearly_down_to_one_thousandth(num_steps):
    sigmas = flow_sigmas(num_steps, shift=1.0)
    np.testing.assert_allclose(sigmas[:-1], np.linspace(1.0, 0.001, num_steps), atol=1e-12)


@settings(max_examples=200)
@given(num_steps=st.integers(min_value=3, max_value=300), low=shifts, factor=st.floats(1.01, 4.0))
def test_larger_shift_gives_larger_sigma_at_every_interior_step(num_steps, low, factor):
    smaller, larger = flow_sigmas(num_steps, low), flow_sigmas(num_steps, low * factor)
    assert np.all(larger[1:-1] > smaller[1:-1])


@given(sigma=st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_timestep_sigma_round_trip(sigma):
    assert timestep_to_sigma(sigma_to_timestep(sigma)) == pytest.approx(sigma, rel=1e-12, abs=1e-15)
    assert sigma_to_timestep(sigma) == pytest.approx(1000.0 * sigma)


def test_smallest_nonzero_sigma_is_the_shift_applied_twice_to_one_thousandth():
    # The reference sampler ends its unshifted linspace at the smallest *shifted* trained sigma.
    sigmas = flow_sigmas(28, SD3_SHIFT)
    once = shift_sigma(0.001, SD3_SHIFT)
    assert once == pytest.approx(0.0029940, abs=1e-7)
    assert sigmas[-2] == pytest.approx(shift_sigma(once, SD3_SHIFT))
    assert sigmas[-2] == pytest.approx(0.0089286, abs=1e-7)


def test_known_values_for_five_sd3_steps():
    # Shifted linspace(1, 0.0029940, 5): hand-computed from sigma(t) = 3t / (1 + 2t).
    expected = [1.0, 0.9003591, 0.7511211, 0.5029851, 0.0089286, 0.0]
    np.testing.assert_allclose(flow_sigmas(5, 3.0), expected, atol=1e-7)


def test_one_step_goes_straight_from_one_to_zero():
    np.testing.assert_array_equal(flow_sigmas(1), [1.0, 0.0])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_step_count_is_rejected(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(bad)


def test_non_positive_shift_is_rejected():
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, shift=0.0)


@pytest.mark.diffusionkit
@pytest.mark.parametrize("num_steps", [1, 2, 28, 50, 100])
@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 6.0])
def test_sigmas_match_diffusionkit(num_steps, shift):
    dk = pytest.importorskip("diffusionkit.mlx", reason="DiffusionKit is not installed")
    sampler = dk.ModelSamplingDiscreteFlow(shift=shift)
    # get_sigmas never reads its pipeline instance, so the unbound call with None is enough.
    theirs = np.array(dk.DiffusionPipeline.get_sigmas(None, sampler, num_steps))
    np.testing.assert_allclose(flow_sigmas(num_steps, shift), theirs, atol=2e-6)
