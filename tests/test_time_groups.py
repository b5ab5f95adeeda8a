"""How many time groups: the MSE of one range per group of timesteps, from the histograms."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from taq.analysis.quant_error import contiguous_groups, grouped_mse, time_aware_mse
from taq.analysis.time_groups import TimeGroupCurve, group_counts, time_group_curves

EDGES = np.linspace(-0.5, 8.0, 41)
hists = arrays(np.int64, st.tuples(st.integers(2, 12), st.just(40)), elements=st.integers(0, 50)).filter(
    lambda h: (h.sum(axis=1) > 0).all())


@settings(max_examples=60, deadline=None)
@given(hists, st.sampled_from([2, 4, 8]))
def test_one_group_is_the_shared_range_and_singletons_are_per_timestep(hist, bits):
    reference = time_aware_mse(hist, EDGES, bits)
    t = hist.shape[0]
    one, each = grouped_mse(hist, EDGES, bits, [contiguous_groups(t, 1), contiguous_groups(t, t)])
    assert one == pytest.approx(reference.shared_mse, rel=1e-12)
    assert each == pytest.approx(reference.per_timestep_mse, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(hists, st.sampled_from([2, 4, 8]), st.data())
def test_splitting_a_group_never_raises_the_mse(hist, bits, data):
    t = hist.shape[0]
    cuts = sorted(data.draw(st.sets(st.integers(1, t - 1), max_size=t - 1)))
    extra = data.draw(st.integers(1, t - 1))
    coarse = np.split(np.arange(t), cuts)
    fine = np.split(np.arange(t), sorted(set(cuts) | {extra}))  # the coarse partition with one more cut
    mse_coarse, mse_fine = grouped_mse(hist, EDGES, bits, [coarse, fine])
    assert mse_fine <= mse_coarse * (1 + 1e-12)


@given(st.integers(1, 200))
def test_group_counts_double_up_to_one_per_timestep(t):
    counts = group_counts(t)
    assert counts[0] == 1 and counts[-1] == t and counts == sorted(set(counts))
    assert all(b == 2 * a for a, b in zip(counts[:-2], counts[1:-1]))
    for k in counts:
        groups = contiguous_groups(t, k)
        assert len(groups) == k and np.array_equal(np.concatenate(groups), np.arange(t))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_identical_timesteps_gain_nothing_and_two_regimes_need_two_groups():
    same = np.tile(np.r_[np.zeros(4), np.ones(10), np.zeros(26)], (8, 1))
    assert np.allclose(grouped_mse(same, EDGES, 4, [contiguous_groups(8, k) for k in (1, 2, 8)]),
                       grouped_mse(same, EDGES, 4, [contiguous_groups(8, 1)])[0])
    narrow, wide = np.r_[np.zeros(4), np.ones(6), np.zeros(30)], np.r_[np.zeros(4), np.ones(36)]
    two = np.vstack([np.tile(narrow, (4, 1)), np.tile(wide, (4, 1))])  # the range doubles halfway through
    curve = TimeGroupCurve("x", 4, np.array([1, 2, 4, 8]),
                           grouped_mse(two, EDGES, 4, [contiguous_groups(8, k) for k in (1, 2, 4, 8)]))
    assert curve.mse[1] == pytest.approx(curve.mse[-1]) and curve.mse[1] < curve.mse[0]
    assert curve.groups_for() == 2


def test_curves_come_from_the_stats_arrays(post_gelu_stats):
    arrays = post_gelu_stats.to_arrays() if hasattr(post_gelu_stats, "to_arrays") else post_gelu_stats
    curves = time_group_curves(arrays, 8)
    assert [c.layer for c in curves] == [str(n) for n in arrays["layers"]]
    for c in curves:
        # every partition refines one group, and one group per timestep refines every partition
        assert c.relative[0] == 1.0 and np.all(c.mse <= c.mse[0] * (1 + 1e-12))
        assert np.all(c.mse[-1] <= c.mse * (1 + 1e-12))
        assert c.groups_for() in c.groups
