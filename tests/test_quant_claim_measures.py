"""The statistics behind the quantizer's claims: held-out points, the paired error reduction and the rank
correlation of a diagnostic with the damage."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taq.analysis.claims import DOES_NOT_HOLD, HOLDS, UNDECIDED
from taq.quant.claims import held_out_points, paired_reduction
from taq.quant.damage import rank_correlation
from taq.tracing.plan import sample_points


class _Cal:  # held_out_points needs only the set's length
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 400), a=st.integers(1, 10), b=st.integers(1, 10), count=st.integers(1, 30),
       seed=st.integers(0, 2**16))
def test_held_out_points_avoid_every_calibration_sample(n, a, b, count, seed):
    points = held_out_points(_Cal(n), (a, b), count, seed)
    used = set(sample_points(n, a, seed)) | set(sample_points(n, b, seed))
    assert not used & set(points.tolist())
    assert len(points) == min(count, n - len(used)) and len(set(points.tolist())) == len(points)
    np.testing.assert_array_equal(points, held_out_points(_Cal(n), (a, b), count, seed))


def test_paired_reduction_of_a_halved_error_is_one_half_and_holds():
    baseline = np.random.default_rng(0).uniform(1.0, 2.0, 40)
    m = paired_reduction("shifting_post_gelu_error", "A4:fc2", baseline, baseline / 2, seed=0)
    assert m.value == pytest.approx(0.5) and m.interval == pytest.approx((0.5, 0.5)) and m.outcome == HOLDS


def test_paired_reduction_separates_a_worse_method_from_noise():
    rng = np.random.default_rng(1)
    baseline = rng.uniform(1.0, 2.0, 48)
    worse = paired_reduction("c", "r", baseline, baseline * 1.3, seed=0)
    noisy = paired_reduction("c", "r", baseline, baseline * rng.uniform(0.7, 1.3, 48), seed=0)
    assert worse.outcome == DOES_NOT_HOLD and worse.value == pytest.approx(-0.3)
    assert noisy.outcome == UNDECIDED and noisy.interval[0] < noisy.value < noisy.interval[1]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=6, max_size=15, unique=True))
def test_rank_correlation_sees_only_the_order(values):
    x = np.array(values, dtype=np.float64)
    rho, low, high = rank_correlation(x, np.exp(x / 1e3) * 5, seed=0)  # an increasing map of x
    assert rho == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    rho, low, high = rank_correlation(x, -x ** 3, seed=0)
    assert rho == pytest.approx(-1.0) and high == pytest.approx(-1.0)


def test_rank_correlation_of_unrelated_layers_is_undecided():
    rng = np.random.default_rng(2)
    rho, low, high = rank_correlation(rng.normal(size=11), rng.normal(size=11), seed=0)
    assert low < 0 < high and low <= rho <= high
