"""Claims with bootstrap intervals over trajectory groups: profiling in groups, the grouped stats file, the weighted
merge of groups and the intervals themselves."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx

from taq.analysis.claims import CLAIMS, measure
from taq.analysis.quant_error import group_time_aware_totals, time_aware_mse, time_aware_ratio
from taq.analysis.uncertainty import GroupedStats, claim_intervals
from taq.formats.container import TaqFormatError, save_npz
from taq.formats.stats import KIND, VERSION, StatsFile, load_stats, save_stats
from taq.profiling import profile
from taq.tracing import ActivationStats, CellStats, HistogramSpec

SPEC = HistogramSpec(bins=64, scale=0.25, limit=16.0)
TIMESTEPS = (100.0, 500.0, 900.0)


def grouped_stats(groups: int, seed: int = 0, drop: tuple = ()) -> list[ActivationStats]:
    """`groups` ActivationStats of GELU-like values; `drop` (group, timestep) cells are left empty."""
    rng = np.random.default_rng(seed)
    result = []
    for g in range(groups):
        stats = ActivationStats(SPEC, ["mm_00_img", "mm_00_txt"])
        for layer in stats.layers:
            for t in TIMESTEPS:
                if (g, t) in drop:
                    continue
                x = rng.normal(0.3 + t / 1000, 1 + g / 4, size=(9, 6)).astype(np.float32)
                stats.update(layer, t, CellStats.from_activations(mx.array(np.maximum(x, -0.17)), SPEC))
        result.append(stats)
    return result


def merged(groups: list[ActivationStats]) -> ActivationStats:
    out = groups[0]
    for stats in groups[1:]:
        out = out.merge(stats)
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.data())
def test_a_weighting_of_groups_is_the_merge_of_that_many_copies(groups, data):
    parts = grouped_stats(groups, drop=((0, 500.0),))
    full = merged(parts)
    arrays = [p.to_arrays(full.timesteps) for p in parts]
    weights = np.array(data.draw(st.lists(st.integers(0, 3), min_size=groups, max_size=groups).filter(any)))
    copies = merged([parts[g] for g in range(groups) for _ in range(weights[g])]).to_arrays(full.timesteps)
    result = GroupedStats(arrays).weighted(weights)
    for key in ("count", "hist", "negative", "zero", "min", "max", "present"):
        np.testing.assert_array_equal(result[key], copies[key], err_msg=key)
    for key in ("mean", "m2", "std"):
        np.testing.assert_allclose(result[key], copies[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_time_aware_totals_of_all_groups_give_the_claims_number():
    parts = grouped_stats(4)
    full = merged(parts).to_arrays()
    hists = np.stack([p.to_arrays(tuple(full["timesteps"]))["hist"][0] for p in parts])
    for bits in (4, 8):
        lowest, highest = np.nanmin(full["min"][0]), np.nanmax(full["max"][0])
        totals = group_time_aware_totals(hists, full["bin_edges"], bits, lowest, highest)
        assert time_aware_ratio(totals.sum(axis=0)) == pytest.approx(
            time_aware_mse(full["hist"][0], full["bin_edges"], bits, lowest, highest).ratio, rel=1e-12)


def test_intervals_bracket_the_spread_of_the_groups():
    parts = grouped_stats(6)
    full = merged(parts)
    stats = StatsFile(full, full.to_arrays(), {}, [p.to_arrays(full.timesteps) for p in parts])
    intervals = claim_intervals(stats, n_resamples=99)
    assert set(intervals) == {(claim, layer) for claim in CLAIMS for layer in full.layers}
    for (claim, layer), (low, high) in intervals.items():
        assert low <= high, (claim, layer)
    low, high = intervals["temporal_mean_shift", "mm_00_img"]
    assert low < high  # groups of different spreads: the mean shift varies between resamples
    same = merged([parts[0]] * 3)
    identical = StatsFile(same, same.to_arrays(), {}, [parts[0].to_arrays(same.timesteps)] * 3)
    for (claim, layer), (low, high) in claim_intervals(identical, n_resamples=19).items():
        value = measure(same.to_arrays(), layer, claim).value
        assert low == pytest.approx(value) and high == pytest.approx(value), claim  # no spread, no width
    assert claim_intervals(StatsFile(full, full.to_arrays(), {})) == {}  # no groups, no intervals


def test_a_grouped_file_round_trips_and_refuses_groups_that_do_not_add_up(tmp_path):
    parts = grouped_stats(3, drop=((1, 900.0),))
    full = merged(parts)
    save_stats(tmp_path / "s.npz", full, {"groups": 3}, groups=parts)
    loaded = load_stats(tmp_path / "s.npz")
    assert len(loaded.groups) == 3
    for part, group in zip(parts, loaded.groups):
        for key, value in part.to_arrays(full.timesteps).items():
            np.testing.assert_array_equal(group[key], value, err_msg=key)
    with np.load(tmp_path / "s.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "__taq_meta__"}
    for key, change, message in (("group.hist", (0, 0, 0, 10), "inconsistent counts"),
                                 ("group.max", (2, 0, 0, 0), "'max' do not add up")):
        bad = dict(arrays, **{key: arrays[key].copy()})
        bad[key][change] += 1
        save_npz(tmp_path / "bad.npz", bad, {}, kind=KIND, version=VERSION)
        with pytest.raises(TaqFormatError, match=message):
            load_stats(tmp_path / "bad.npz")


def test_profiling_in_groups_keeps_each_trajectory_groups_statistics(tiny_model, tiny_calibration, tmp_path):
    profile(tiny_model, tiny_calibration, num_samples=16, output=tmp_path / "g.npz", progress=False, groups=2)
    profile(tiny_model, tiny_calibration, num_samples=16, output=tmp_path / "one.npz", progress=False)
    grouped, single = load_stats(tmp_path / "g.npz"), load_stats(tmp_path / "one.npz")
    assert len(grouped.groups) == 2 and grouped.meta["groups"] == 2 and single.groups is None
    np.testing.assert_array_equal(grouped.arrays["count"], single.arrays["count"])
    np.testing.assert_allclose(grouped.arrays["max"], single.arrays["max"], rtol=1e-5)  # other batches: float32
    counts = [g["count"].sum() for g in grouped.groups]
    assert all(c > 0 for c in counts) and sum(counts) == single.arrays["count"].sum()
    with pytest.raises(ValueError, match="groups need points from at least 5 trajectories"):
        profile(tiny_model, tiny_calibration, num_samples=16, output=tmp_path / "x.npz", progress=False, groups=5)
