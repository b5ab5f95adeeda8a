import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from taq.analysis.claims import CLAIMS, measure, measure_all
from taq.analysis.measures import (
    asymmetry_ratio, channel_mean_shifts, layer_clipped_extremes, outlier_fraction, outlier_ratio, per_timestep_ranges,
    symmetric_levels, temporal_range_factor, top_fraction_floor, wasserstein_distance, wasted_levels_fraction,
)
from taq.analysis.quant_error import binned_mse, binned_squared_errors, fake_quantize, time_aware_mse
from taq.analysis.summary import summarize
from taq.tracing import ActivationStats, CellStats, HistogramSpec

FAST = settings(max_examples=60, deadline=None)
counts = arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(2, 12)), elements=st.integers(0, 50))


# --------------------------------------------------------------------------- asymmetry


def test_asymmetry_ratio_is_max_over_the_magnitude_of_min():
    assert asymmetry_ratio(-0.17, 1.7) == pytest.approx(10.0)
    assert asymmetry_ratio(0.0, 2.0) == math.inf  # nothing negative: unbounded asymmetry
    assert math.isnan(asymmetry_ratio(float("nan"), 1.0))
    with pytest.raises(ValueError, match="above highest"):
        asymmetry_ratio(1.0, 0.5)


def test_symmetric_grid_has_exact_ends_and_zero():
    levels = symmetric_levels(3.7, 8)
    assert levels.size == 255 and levels[0] == -3.7 and levels[-1] == 3.7 and 0.0 in levels
    with pytest.raises(ValueError, match="bits >= 2"):
        symmetric_levels(1.0, 1)


def test_wasted_levels_known_answers():
    assert wasted_levels_fraction(-2.0, 2.0) == 0.0  # symmetric data uses the whole grid
    assert wasted_levels_fraction(0.0, 2.0) == pytest.approx(127 / 255)  # one-sided: the negative half
    assert wasted_levels_fraction(-1.0, 2.0) == pytest.approx(64 / 255)  # k/127 < -1/2 for k = -127 .. -64
    assert wasted_levels_fraction(-0.5, 0.25) == 0.0  # the grid spans the larger magnitude, here the negative one


@FAST
@given(st.floats(0.0, 10.0), st.floats(0.0, 10.0), st.floats(0.01, 10.0))
def test_wasted_levels_never_increase_as_min_goes_down(a, b, highest):
    higher_min, lower_min = -min(a, b, highest), -min(max(a, b), highest)
    assert wasted_levels_fraction(lower_min, highest) <= wasted_levels_fraction(higher_min, highest)
    assert 0 <= wasted_levels_fraction(higher_min, highest) <= 127 / 255


# --------------------------------------------------------------------------- temporal drift


def test_range_factor_of_uniform_timesteps_one_twice_as_wide():
    edges = np.linspace(0.0, 4.0, 401)
    hist = np.zeros((2, 400), np.int64)
    hist[0, :100] = 7  # uniform on [0, 1]
    hist[1, :200] = 7  # uniform on [0, 2]
    ranges = per_timestep_ranges(hist, edges)
    assert ranges == pytest.approx([0.998, 1.996])
    assert temporal_range_factor(ranges) == pytest.approx(2.0)


def test_range_factor_skips_empty_timesteps_and_flags_bad_input():
    assert temporal_range_factor([2.0, np.nan, 1.0]) == 2.0
    assert math.isnan(temporal_range_factor([np.nan]))
    assert temporal_range_factor([0.0, 1.0]) == math.inf
    with pytest.raises(ValueError, match=">= 0"):
        temporal_range_factor([-1.0, 1.0])
    with pytest.raises(ValueError, match="quantiles"):
        per_timestep_ranges(np.ones((1, 4)), np.arange(5.0), quantiles=(0.9, 0.1))


def test_mean_shift_in_units_of_the_channel_std():
    mean = np.array([[0.0, 5.0, 1.0], [1.0, 5.0, 1.0], [2.0, 5.0, 2.0]])  # (T=3, C=3)
    std = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    shifts = channel_mean_shifts(mean, std)
    assert shifts[0] == pytest.approx(2.0) and shifts[1] == 0.0 and shifts[2] == math.inf


@FAST
@given(arrays(np.float64, (4, 3), elements=st.floats(-5, 5)), arrays(np.float64, (4, 3), elements=st.floats(0.1, 3)),
       st.floats(0.1, 10.0), st.floats(-10.0, 10.0))
def test_mean_shift_is_invariant_to_rescaling_a_channel(mean, std, scale, offset):
    assert channel_mean_shifts(scale * mean + offset, scale * std) == pytest.approx(channel_mean_shifts(mean, std),
                                                                                    rel=1e-9, abs=1e-9)


def test_top_fraction_floor_is_the_smallest_of_the_top_values():
    values = np.arange(1.0, 101.0)
    assert top_fraction_floor(values, 0.02) == 99.0  # top 2 of 100
    assert top_fraction_floor(values, 0.001) == 100.0  # at least one
    assert top_fraction_floor(np.array([np.nan, 3.0, 1.0]), 0.5) == 1.0  # ceil(1.5) = 2 of the finite values
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_floor(values, 0.0)


# --------------------------------------------------------------------------- channel outliers


def test_outlier_ratio_and_fraction_on_two_wide_channels():
    ranges = np.array([1.0] * 98 + [5.0, 6.0])
    assert outlier_ratio(ranges, 0.02) == pytest.approx(5.0)  # the narrower of the top 2 over the median
    assert outlier_ratio(ranges, 0.03) == pytest.approx(1.0)  # the top 3 include an ordinary channel
    assert outlier_fraction(ranges, 2.0) == pytest.approx(0.02)
    assert math.isnan(outlier_ratio(np.full(4, np.nan)))


@FAST
@given(arrays(np.float64, st.integers(1, 60), elements=st.floats(0.01, 100)), st.floats(0.01, 100.0))
def test_outlier_measures_are_scale_free(ranges, scale):
    assert outlier_ratio(scale * ranges) == pytest.approx(outlier_ratio(ranges), rel=1e-9)
    assert outlier_fraction(scale * ranges, 2.0) == pytest.approx(outlier_fraction(ranges, 2.0), abs=1e-12)


# --------------------------------------------------------------------------- quantization error


@FAST
@given(st.floats(-10, 10), st.floats(0.01, 20), st.integers(1, 8), st.data())
def test_values_on_the_grid_quantize_exactly(lo, span, bits, data):
    hi = lo + span
    k = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=20)))
    x = lo + (hi - lo) / (2**bits - 1) * k
    assert np.array_equal(fake_quantize(x, lo, hi, bits), x)


@FAST
@given(arrays(np.float64, 30, elements=st.floats(-20, 20)), st.floats(-5, 5), st.floats(0.1, 10), st.integers(1, 8))
def test_fake_quantization_is_idempotent_and_within_half_a_step_inside_the_range(x, lo, span, bits):
    hi = lo + span
    q = fake_quantize(x, lo, hi, bits)
    assert np.allclose(fake_quantize(q, lo, hi, bits), q, rtol=0, atol=1e-12)
    inside = (x >= lo) & (x <= hi)
    assert np.all(np.abs(x - q)[inside] <= span / (2**bits - 1) / 2 * (1 + 1e-9))


def test_binned_errors_known_answers():
    # levels {0, 1}: a value uniform on [0.25, 0.75] rounds to the nearer end, mean squared error 7/48
    assert binned_squared_errors(np.array([0.25, 0.75]), 0.0, 1.0, 1)[0] == pytest.approx(7 / 48)
    # a bin covering whole quantization cells has the textbook error step^2 / 12
    step = 1 / 3
    assert binned_squared_errors(np.array([step / 2, 1 - step / 2]), 0.0, 1.0, 2)[0] == pytest.approx(step**2 / 12)
    # clipped: values uniform on [1, 2] all go to hi = 1, error mean of u^2 on [0, 1]
    assert binned_squared_errors(np.array([1.0, 2.0]), 0.0, 1.0, 4)[0] == pytest.approx(1 / 3)
    assert binned_squared_errors(np.array([-3.0, -1.0]), -1.0, 1.0, 4)[0] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="hi > lo"):
        binned_squared_errors(np.array([0.0, 1.0]), 1.0, 1.0, 8)


@settings(max_examples=20, deadline=None)
@given(st.floats(-3, 3), st.floats(0.05, 3), st.floats(-4, 4), st.floats(0.01, 2), st.integers(1, 6))
def test_closed_form_matches_dense_sampling_of_the_quantizer(a, width, lo, span, bits):
    x = np.linspace(a, a + width, 200_001)
    sampled = np.mean((x - fake_quantize(x, lo, lo + span, bits)) ** 2)
    closed = binned_squared_errors(np.array([a, a + width]), lo, lo + span, bits)[0]
    assert closed == pytest.approx(sampled, rel=2e-3, abs=1e-12)


@FAST
@given(arrays(np.int64, 16, elements=st.integers(0, 100)), st.floats(-2, 2), st.floats(0.1, 6), st.integers(1, 4))
def test_doubling_the_bits_never_increases_the_error(hist, lo, span, bits):
    # 2**(2b) - 1 = (2**b - 1)(2**b + 1): the 2b-bit grid contains the b-bit one, so no value gets worse
    edges = np.linspace(-3.0, 5.0, 17)
    coarse, fine = (binned_mse(hist, edges, lo, lo + span, b) for b in (bits, 2 * bits))
    assert np.isnan(coarse) == (hist.sum() == 0)
    if hist.sum():
        assert fine <= coarse * (1 + 1e-9) + 1e-15


def test_binned_mse_weights_bins_by_count():
    edges = np.array([0.0, 1.0, 2.0])
    per_bin = binned_squared_errors(edges, 0.0, 1.0, 2)
    assert binned_mse(np.array([3, 1]), edges, 0.0, 1.0, 2) == pytest.approx((3 * per_bin[0] + per_bin[1]) / 4)


@FAST
@given(counts, st.sampled_from([4, 8]))
def test_a_range_per_timestep_is_never_worse_than_one_shared_range(hist, bits):
    edges = np.linspace(-0.5, 4.0, hist.shape[1] + 1)
    if hist.sum() == 0:
        with pytest.raises(ValueError, match="empty"):
            time_aware_mse(hist, edges, bits)
        return
    result = time_aware_mse(hist, edges, bits)
    assert result.per_timestep_mse <= result.shared_mse
    assert result.shared_mse == pytest.approx(binned_mse(hist.sum(axis=0), edges, result.lo, result.shared_hi, bits))


def test_identical_timesteps_gain_nothing_and_different_scales_gain_a_lot():
    edges = np.linspace(0.0, 4.0, 257)
    narrow = np.where(edges[1:] <= 1.0, 10, 0)  # uniform on [0, 1]
    wide = np.full(256, 10)  # uniform on [0, 4]
    assert time_aware_mse(np.stack([wide, wide]), edges, 8).ratio == pytest.approx(1.0, rel=1e-12)
    result = time_aware_mse(np.stack([narrow, wide]), edges, 8)
    assert result.per_timestep_hi.tolist() == [1.0, 4.0]
    # step^2 / 12 at each timestep's own scale (exact: whole cells), the wide step for both when shared (nearly:
    # [0, 1] ends inside a cell); the wide timestep holds 4/5 of the values: ratio 1 / (1/5 (1/4)^2 + 4/5) = 80/65
    assert result.per_timestep_mse == pytest.approx(((1 / 255) ** 2 + 4 * (4 / 255) ** 2) / 12 / 5, rel=1e-9)
    assert result.shared_hi == 4.0 and result.shared_mse == pytest.approx((4 / 255) ** 2 / 12, rel=1e-3)
    assert result.ratio == pytest.approx(80 / 65, rel=1e-3)


def test_the_exact_extremes_bound_the_outer_occupied_bins():
    edges = np.array([-3e38, -0.5, 0.0, 1.0, 2.0, 3e38])  # end bins as wide as the stats' own
    hist = np.array([[0, 3, 5, 2, 1], [0, 1, 5, 4, 0]])  # one value beyond 2, in the end bin
    bounded = time_aware_mse(hist, edges, 8, lowest=-0.17, highest=2.5)
    assert bounded.lo == -0.17 and bounded.shared_hi <= 2.5 and np.all(bounded.per_timestep_hi <= 2.5)
    unbounded = time_aware_mse(hist, edges, 8)
    assert unbounded.lo == -0.5 and unbounded.shared_mse > 1e6  # one value spread over [2, 3e38]
    assert bounded.shared_mse < 1e-3


def test_the_time_aware_claim_notes_values_in_the_end_bins():
    spec = HistogramSpec(16, 0.5, 4.0)
    stats = ActivationStats(spec, ["mm_00_img"])
    rng = np.random.default_rng(0)
    for t, far in ((10.0, 0.0), (900.0, 100.0)):
        x = np.abs(rng.standard_normal((50, 4))).astype(np.float32)
        x[0, 0] = far or x[0, 0]
        stats.update("mm_00_img", t, CellStats.from_activations(mx.array(x), spec))
    m = measure(stats.to_arrays(), "mm_00_img", "time_aware_mse_8bit")
    assert "1 values in the coarse end bins beyond +-4" in m.note and np.isfinite(m.value)


# --------------------------------------------------------------------------- histogram distance


def test_wasserstein_distance_puts_an_end_bins_mass_at_its_finite_edge():
    big = float(np.finfo(np.float32).max)
    edges = np.array([-big, -1.0, 0.0, 1.0, big])
    p, q = np.array([0.0, 0.5, 0.5, 1e-9]), np.array([0.0, 0.5, 0.5, 0.0])  # near-equal, as rounding leaves them
    assert wasserstein_distance(p, q, edges) < 1e-8
    assert wasserstein_distance(np.array([0, 0, 0, 1.0]), np.array([0, 0, 1.0, 0]), edges) == 0.5  # 0.5 -> 1


def test_wasserstein_distance_of_a_one_bin_shift_is_the_bin_width():
    edges = np.linspace(0.0, 1.0, 11)
    p, q = np.zeros(10), np.zeros(10)
    p[3], q[4] = 5, 2  # normalization makes the totals irrelevant
    assert wasserstein_distance(p, q, edges) == pytest.approx(0.1)
    assert wasserstein_distance(p, p, edges) == 0.0


@FAST
@given(arrays(np.float64, (3, 8), elements=st.floats(0, 10)))
def test_wasserstein_distance_is_a_metric(h):
    h = h + 1e-3  # non-empty
    edges = np.linspace(-1.0, 3.0, 9)
    d = lambda a, b: wasserstein_distance(h[a], h[b], edges)  # noqa: E731
    assert d(0, 1) == pytest.approx(d(1, 0), abs=1e-12)
    assert d(0, 2) <= d(0, 1) + d(1, 2) + 1e-12
    assert d(0, 0) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- per layer


OUTLIER_GAINS = np.r_[np.ones(98), 3.0, 6.0].astype(np.float32)  # 100 channels: the top 2% are two of different width


@pytest.fixture(scope="module")
def traced_arrays():
    """Two timesteps of GELU activations of two layers: 'wide' has two outlier channels of different widths (so the
    smallest, mean and largest of the top 2% differ) and drifts with time."""
    rng = np.random.default_rng(0)
    stats = ActivationStats(HistogramSpec(bins=256, limit=64.0))
    values = {}
    for t, scale in ((100.0, 1.0), (900.0, 2.5)):
        pre = rng.standard_normal((64, 100)).astype(np.float32)
        for layer, x in (("narrow", pre), ("wide", pre * scale * OUTLIER_GAINS)):
            post = mx.array(x) * 0.5 * (1 + mx.erf(mx.array(x) / math.sqrt(2)))  # exact GELU
            stats.update(layer, t, CellStats.from_activations(post, stats.spec))
            values[layer, t] = np.array(post)
    return stats.to_arrays(), values


def test_measurements_match_direct_computation(traced_arrays):
    arrays, values = traced_arrays
    wide = np.concatenate([values["wide", 100.0], values["wide", 900.0]])
    m = measure(arrays, "wide", "asymmetry_ratio")
    assert m.value == pytest.approx(wide.max() / -wide.min(), rel=1e-6)
    assert m.threshold == CLAIMS["asymmetry_ratio"].threshold and m.holds == (m.value >= m.threshold)
    assert measure(arrays, "wide", "temporal_range_drift").value > measure(arrays, "narrow", "temporal_range_drift").value


def test_wasted_levels_use_the_clipped_range_not_the_extremes(traced_arrays):
    """max / |min| reads the extremes; the wasted levels read p0.1 .. p99.9, so an outlier channel's tail widens
    the first but hardly moves the second's range."""
    arrays, values = traced_arrays
    wide = np.concatenate([values["wide", 100.0], values["wide", 900.0]]).ravel()
    low, high = np.quantile(wide, [0.001, 0.999])
    i = list(arrays["layers"]).index("wide")
    bins = np.diff(arrays["bin_edges"][1:-1]).max()  # the histogram's resolution
    assert layer_clipped_extremes(arrays, i) == pytest.approx((low, high), abs=bins)
    assert high < wide.max() / 2  # the clipped range is far inside the extremes
    m = measure(arrays, "wide", "asymmetry_wasted_levels")
    assert m.value == pytest.approx(wasted_levels_fraction(*layer_clipped_extremes(arrays, i)))
    assert m.value != wasted_levels_fraction(wide.min(), wide.max())


def test_the_outlier_ratio_is_the_narrowest_of_the_widest_channels_everywhere(traced_arrays):
    """The top 2% are channels 98 and 99 (gains 3 and 6): the claim and the summary table give
    the narrower one over the median, not their mean nor the widest."""
    arrays, values = traced_arrays
    wide = np.concatenate([values["wide", 100.0], values["wide", 900.0]])
    ranges = wide.max(axis=0) - wide.min(axis=0)
    median = np.median(ranges)
    expected = ranges[98] / median
    assert abs(ranges[98:].mean() / median - expected) > 0.2 * expected  # the definitions are told apart here
    assert measure(arrays, "wide", "channel_outliers").value == pytest.approx(expected, rel=1e-6)
    (row,) = summarize(arrays, ["wide"])
    assert row.outlier_ratio == pytest.approx(expected, rel=1e-6)


def test_measure_all_covers_every_claim_and_layer_and_rejects_unknown_names(traced_arrays):
    arrays, _ = traced_arrays
    results = measure_all(arrays)
    assert [(m.claim, m.layer) for m in results] == [(c, layer) for c in CLAIMS for layer in ("narrow", "wide")]
    assert all(np.isfinite(m.value) and m.note for m in results)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        measure(arrays, "nope", "asymmetry_ratio")
    with pytest.raises(ValueError, match="unknown claim 'nope'"):
        measure(arrays, "wide", "nope")
