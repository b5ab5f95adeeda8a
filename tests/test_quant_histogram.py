import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taq.quant.grid import QParams, QuantSpec
from taq.quant.histogram import (histogram_lp_error, histogram_minmax_range, histogram_mse_search, histogram_observe,
                                 histogram_percentile_range, histogram_with_tails, lp_integral)
from taq.quant.observers import lp_error, mse_search, search_candidates
from taq.tracing.stats import HistogramSpec

P = 2.4
GELU_TANH_FLOOR = -0.170041


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def spread_evenly(counts: np.ndarray, edges: np.ndarray, per_bin: int = 400) -> np.ndarray:
    """Raw values with the histogram's counts spread evenly over each bin: per_bin midpoints, weighted by repetition."""
    u = (np.arange(per_bin) + 0.5) / per_bin
    points = edges[:-1, None] + u[None, :] * np.diff(edges)[:, None]  # (bins, per_bin)
    return np.repeat(points.reshape(-1), np.repeat(counts.astype(np.int64), per_bin)).astype(np.float32)


# --------------------------------------------------------------------------- the closed form


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.floats(0.01, 2.0), st.integers(-2, 260), st.floats(-300, 300), st.floats(1e-3, 50))
def test_bin_integral_matches_quadrature(bits, scale, zero_point, a, width):
    spec = QuantSpec(bits=bits)
    z = float(np.clip(zero_point, spec.qmin - 2, spec.qmax + 2))
    a, b = float(np.float32(a)), float(np.float32(a + width))  # the bin as float32 holds it
    if not b > a:
        return
    exact = float(lp_integral(mx.array(a), mx.array(b), scale, z, spec.qmin, spec.qmax, P))
    u = np.linspace(a, b, 200_001)  # trapezoid rule on a fine grid, in float64
    q = np.clip(np.round(u / scale) + z, spec.qmin, spec.qmax)
    f = np.abs(u - (q - z) * scale) ** P
    quad = float(np.sum((f[1:] + f[:-1]) / 2) * (u[1] - u[0]))
    assert exact == pytest.approx(quad, rel=1e-3, abs=1e-9 * width)


@pytest.mark.parametrize("bits", [4, 8])
def test_histogram_error_is_the_error_of_values_spread_over_the_bins(bits):
    rng = np.random.default_rng(bits)
    counts, edges = np.histogram(gelu(rng.normal(0, 2, 20_000)), bins=64)
    spec = QuantSpec(bits=bits)
    for s, z in ((0.05, 7.0), (0.5, 2.0), (0.013, 30.0)):
        params = QParams(mx.array(s), mx.array(z))
        raw = float(lp_error(mx.array(spread_evenly(counts, edges)), params, spec))
        assert float(histogram_lp_error(counts, edges, params, spec)) == pytest.approx(raw, rel=2e-3)


def test_zero_width_bins_count_as_points():
    counts, edges = np.array([3.0, 1.0]), np.array([0.3, 0.3, 1.0])
    spec = QuantSpec(bits=4)
    params = QParams(mx.array(0.25), mx.array(0.0))
    point = 3 * abs(0.3 - 0.25) ** P
    spread = float(lp_integral(mx.array(0.3), mx.array(1.0), 0.25, 0.0, 0, 15, P)) / 0.7
    assert float(histogram_lp_error(counts, edges, params, spec)) == pytest.approx((point + spread) / 4, rel=1e-5)


# --------------------------------------------------------------------------- ranges


def test_minmax_is_the_outer_edges_of_the_filled_bins():
    counts = np.array([[0, 2, 0, 5, 0], [1, 0, 0, 0, 0]])
    edges = np.linspace(-1, 1, 6)
    lo, hi = histogram_minmax_range(counts, edges)
    np.testing.assert_allclose(np.array(lo), [-0.6, -1.0], atol=1e-7)
    np.testing.assert_allclose(np.array(hi), [0.6, -0.6], atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 100), st.floats(0, 100), st.integers(0, 2**31 - 1))
def test_percentile_inverts_the_piecewise_linear_cdf(a, b, seed):
    lower, upper = min(a, b), max(a, b)
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, 12).astype(np.float64)
    counts[rng.integers(0, 12)] += 1
    edges = np.cumsum(rng.uniform(0.1, 1.0, 13)) - 3
    lo, hi = histogram_percentile_range(counts, edges, lower, upper)
    cdf = np.concatenate([[0], np.cumsum(counts)]) / counts.sum()
    for q, v in ((lower, float(lo)), (upper, float(hi))):
        assert np.interp(v, edges, cdf) == pytest.approx(q / 100, abs=1e-5)  # v is where the CDF reaches q
        if q > 0:
            assert v >= histogram_minmax_range(counts, edges)[0].item() - 1e-6


def test_percentile_of_fine_bins_is_numpys_to_a_bin_width():
    x = np.random.default_rng(0).standard_t(4, 50_000).astype(np.float32)
    counts, edges = np.histogram(x, bins=2048)
    lo, hi = histogram_percentile_range(counts, edges, 0.5, 99.5)
    width = edges[1] - edges[0]
    assert abs(float(lo) - np.percentile(x, 0.5)) <= width
    assert abs(float(hi) - np.percentile(x, 99.5)) <= width


# --------------------------------------------------------------------------- the search


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=4), QuantSpec(bits=6, symmetric=True)])
def test_histogram_search_finds_the_argmin_of_its_candidates(spec):
    counts, edges = np.histogram(gelu(np.random.default_rng(1).normal(0, 2, 5000)), bins=48)
    params = histogram_mse_search(counts, edges, spec, num=30)
    lo, hi = histogram_minmax_range(counts, edges)
    s, z = search_candidates(lo.reshape(1), hi.reshape(1), spec, 30, per_row_side=True)
    s, z = np.array(s)[0], np.array(mx.broadcast_to(z, (1,) + z.shape[1:]))[0]  # (30,), (30, Zc)
    every = QParams(mx.array(np.repeat(s, z.shape[1])), mx.array(z.reshape(-1)))  # all candidates at once
    errors = np.array(histogram_lp_error(np.tile(counts, (every.scale.size, 1)), edges, every, spec))
    found = float(histogram_lp_error(counts, edges, params, spec))
    assert found <= np.min(errors) * (1 + 1e-5)
    assert any(np.isclose(float(params.scale), s[i]) and float(params.zero_point) in z[i] for i in range(30))


@pytest.mark.parametrize("bits", [4, 8])
def test_fine_histograms_give_the_raw_searchs_grid_quality(bits):
    x = gelu(np.random.default_rng(bits).normal(0, 2, 20_000)).astype(np.float32)
    counts, edges = np.histogram(x, bins=2048)
    spec = QuantSpec(bits=bits)
    from_hist = histogram_mse_search(counts, edges, spec)
    from_raw = mse_search(mx.array(x), spec)
    assert float(lp_error(mx.array(x), from_hist, spec)) <= float(lp_error(mx.array(x), from_raw, spec)) * 1.01


def test_one_sidedness_is_decided_per_histogram():
    rng = np.random.default_rng(0)
    edges = np.linspace(-4, 4, 65)
    positive = np.histogram(rng.exponential(size=3000), bins=edges)[0]
    both = np.histogram(rng.normal(size=3000), bins=edges)[0]
    spec = QuantSpec(bits=4)
    together = histogram_mse_search(np.stack([positive, both]), edges, spec)
    alone = [histogram_mse_search(h, edges, spec) for h in (positive, both)]
    assert float(together.zero_point[0]) == 0.0
    for i in range(2):
        assert float(together.scale[i]) == float(alone[i].scale)
        assert float(together.zero_point[i]) == float(alone[i].zero_point)


def test_phase_2_histograms_calibrate_gelus_floor_with_their_tails():
    # A Phase 2 cell: asinh bins whose end bins reach float32's max, the true min and max from the per-channel ones.
    spec_h = HistogramSpec()
    x = gelu(np.random.default_rng(2).normal(-0.5, 3, 30_000)).astype(np.float32)
    x[:20] = np.linspace(9, 30, 20)  # outliers far in the tail, still in the fine bins
    counts = np.histogram(x, bins=spec_h.bin_edges)[0]
    c, e = histogram_with_tails(counts, spec_h.bin_edges, data_min=x.min(), data_max=x.max())
    assert c.sum() == x.size and e[0] == np.float32(x.min()) and e[-1] == np.float32(x.max())
    params = histogram_observe(c, e, QuantSpec(bits=8, anchor="min"), "minmax")
    floor = float(mx.array(e[0], dtype=mx.float32))
    assert abs(float(-params.zero_point * params.scale) - floor) <= abs(np.spacing(np.float32(floor)))
    assert float((255 - params.zero_point) * params.scale) >= x.max() * (1 - 1e-6)
    spec8 = QuantSpec(bits=8)
    searched = histogram_observe(c, e, spec8, "mse")
    assert float(lp_error(mx.array(x), searched, spec8)) < float(lp_error(mx.array(x), params, spec8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(underflow=3), "below the first edge"),
    (dict(overflow=3, data_max=0.5), "above the last edge"),
    (dict(data_min=0.1), "counts outside"),
    (dict(data_min=2.0, data_max=1.0), "data_min <= data_max"),
])
def test_with_tails_rejects_inconsistent_histograms(kwargs, message):
    counts, edges = np.array([1, 2, 3]), np.array([-1.0, 0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match=message):
        histogram_with_tails(counts, edges, **kwargs)


@pytest.mark.parametrize("counts, edges, message", [
    (np.array([1, -1]), np.array([0.0, 1.0, 2.0]), "non-negative"),
    (np.array([1, 1]), np.array([0.0, 1.0]), "edges need shape"),
    (np.array([0, 0]), np.array([0.0, 1.0, 2.0]), "positive total"),
    (np.array([1, 1]), np.array([0.0, 2.0, 1.0]), "must not decrease"),
    (np.array([1, 1]), np.array([0.0, np.nan, 1.0]), "finite"),
])
def test_bad_histograms_raise(counts, edges, message):
    with pytest.raises(ValueError, match=message):
        histogram_mse_search(counts, edges, QuantSpec())
