import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import csv
import io
import math
from dataclasses import astuple

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from taq.analysis.claims import measure
from taq.analysis.cells import cell_max, cell_min, cell_quantile, histogram_quantile, pooled_moments, select_layers
from taq.analysis.measures import outlier_channels
from taq.analysis.summary import LayerSummary, summarize
from taq.report.tables import format_console, format_csv, format_markdown, write_summary
from taq.tracing.stats import ActivationStats, CellStats, HistogramSpec

@pytest.fixture(scope="module")
def fixture_stats(post_gelu_stats_and_values):
    return post_gelu_stats_and_values


# --------------------------------------------------------------------------- histogram_quantile


def histogram_of(x, bins, lo, hi):
    hist, edges = np.histogram(x, bins=bins, range=(lo, hi))
    return hist, edges


samples = arrays(np.float64, st.integers(1, 300), elements=st.floats(-5, 5, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(x=samples, bins=st.integers(1, 40), qs=st.lists(st.floats(0, 1), min_size=2, max_size=6))
def test_histogram_quantile_is_monotone_and_within_the_occupied_bins(x, bins, qs):
    hist, edges = histogram_of(x, bins, -5, 5)
    values = histogram_quantile(hist, edges, np.sort(qs))
    assert np.all(np.diff(values) >= 0)
    occupied = np.flatnonzero(hist)
    assert edges[occupied[0]] <= values.min() and values.max() <= edges[occupied[-1] + 1]


@settings(max_examples=60, deadline=None)
@given(x=samples, bins=st.integers(1, 40), q=st.floats(0, 1))
def test_histogram_quantile_is_within_one_bin_of_numpys_order_statistics(x, bins, q):
    """np.quantile (linear) lies between the 'lower' and 'higher' order statistics; the histogram's estimate
    lies in the bin of one of them, so within one bin width of that bracket."""
    hist, edges = histogram_of(x, bins, -5, 5)
    width = edges[1] - edges[0]
    value = float(histogram_quantile(hist, edges, q))
    lower, higher = np.quantile(x, q, method="lower"), np.quantile(x, q, method="higher")
    assert lower - width - 1e-9 <= value <= higher + width + 1e-9


def test_histogram_quantile_matches_numpy_within_a_bin_on_dense_samples():
    x = np.random.default_rng(3).gamma(2.0, 1.0, 20_000)
    hist, edges = histogram_of(x, 200, 0, 20)
    q = np.array([0.001, 0.01, 0.25, 0.5, 0.9, 0.999])
    np.testing.assert_allclose(histogram_quantile(hist, edges, q), np.quantile(x, q), atol=edges[1] - edges[0])


def test_histogram_quantile_interpolates_linearly_inside_a_bin():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    hist = np.array([0, 4, 0])  # four values spread over [1, 2]
    np.testing.assert_allclose(histogram_quantile(hist, edges, [0, 0.25, 0.5, 1]), [1.0, 1.25, 1.5, 2.0])


def test_histogram_quantile_stays_within_given_extremes_empty_and_batched():
    edges = np.array([-3e38, 0.0, 1.0, 3e38])  # wide end bins, as the stats' are
    hist = np.array([[0, 2, 2], [0, 0, 0]])  # (2, 3): second histogram empty
    values = histogram_quantile(hist, edges, [1.0, 1.0])
    assert values[0] == 3e38 and np.isnan(values[1])  # interpolated across the whole end bin
    bounded = histogram_quantile(hist, edges, 1.0, lowest=np.array([0.1, np.nan]), highest=np.array([1.5, np.nan]))
    assert bounded[0] == 1.5 and np.isnan(bounded[1])
    assert histogram_quantile(hist[0], edges, 0.0, lowest=0.1) == 0.1


@pytest.mark.parametrize("q", [-0.1, 1.5, float("nan")])
def test_histogram_quantile_rejects_levels_outside_0_1(q):
    with pytest.raises(ValueError, match="quantile levels"):
        histogram_quantile(np.ones(3), np.arange(4.0), q)


def test_histogram_quantile_rejects_edges_that_do_not_fit():
    with pytest.raises(ValueError, match="bin_edges"):
        histogram_quantile(np.ones(3), np.arange(3.0), 0.5)


# --------------------------------------------------------------------------- aggregates


@settings(max_examples=40, deadline=None)
@given(groups=st.lists(arrays(np.float64, st.integers(0, 20), elements=st.floats(-100, 100)), min_size=1,
                       max_size=5))
def test_pooled_moments_equal_the_moments_of_the_union(groups):
    count = np.array([g.size for g in groups])
    mean = np.array([g.mean() if g.size else np.nan for g in groups])
    m2 = np.array([((g - g.mean()) ** 2).sum() if g.size else np.nan for g in groups])
    pooled_mean, pooled_std = pooled_moments(count, mean, m2, axis=0)
    union = np.concatenate(groups)
    if union.size == 0:
        assert np.isnan(pooled_mean) and np.isnan(pooled_std)
    else:
        scale = max(1.0, np.abs(union).max())
        assert abs(pooled_mean - union.mean()) <= 1e-9 * scale
        assert abs(pooled_std - union.std()) <= 1e-6 * scale


def test_cell_quantiles_stay_within_the_cells_min_and_max(fixture_stats):
    arrays_ = fixture_stats[0].to_arrays()
    for q in (0.0, 0.001, 0.5, 0.999, 1.0):
        value = cell_quantile(arrays_, q)
        finite = np.isfinite(value)
        assert np.all(value[finite] >= cell_min(arrays_)[finite])
        assert np.all(value[finite] <= cell_max(arrays_)[finite])


def test_outlier_channels_are_the_widest_ceil_fraction():
    ranges = np.array([1.0, 9.0, np.nan, 3.0, 8.0, 2.0])
    np.testing.assert_array_equal(outlier_channels(ranges, 0.3), [1, 4])  # ceil(0.3 * 6) = 2
    np.testing.assert_array_equal(outlier_channels(ranges, 0.01), [1])  # at least one
    assert outlier_channels(np.full(4, np.nan), 0.5).size == 0
    with pytest.raises(ValueError, match="outlier fraction"):
        outlier_channels(ranges, 0.0)


# --------------------------------------------------------------------------- the summary table


def direct_summary(raw: dict, layer: str, timesteps, fraction: float = 0.02) -> dict:
    """The table's exact columns computed from the raw activations (float64 NumPy)."""
    cells = [raw[layer, t].astype(np.float64) for t in timesteps]
    values = np.concatenate([c.ravel() for c in cells])
    per_channel = np.concatenate(cells, axis=0)  # (T * tokens, C)
    ranges = per_channel.max(axis=0) - per_channel.min(axis=0)
    top = np.sort(ranges)[::-1][: math.ceil(fraction * ranges.size)]
    return {"min": values.min(), "max": values.max(), "mean": values.mean(), "std": values.std(),
            "negative_fraction": np.mean(values < 0), "asymmetry": values.max() / abs(values.min()),
            "outlier_ratio": top.min() / np.median(ranges)}


def test_summary_equals_direct_computation_on_the_activations(fixture_stats, synthetic_timesteps):
    stats, raw = fixture_stats
    rows = {row.layer: row for row in summarize(stats)}
    assert set(rows) == set(stats.layers)
    for layer in stats.layers:
        expected = direct_summary(raw, layer, synthetic_timesteps)
        for column, value in expected.items():
            assert getattr(rows[layer], column) == pytest.approx(value, rel=1e-5), (layer, column)


def test_summary_ratios_are_the_claims_numbers(fixture_stats, synthetic_timesteps):
    """One definition per quantity: the table's asymmetry, outlier and temporal ratios are the claims' values; where
    the p99.9 lies inside the histogram's range, the temporal ratio (from histogram percentiles) is within a few
    percent of the exact p0.1..p99.9 ranges' ratio."""
    stats, raw = fixture_stats
    arrays = stats.to_arrays()
    compared = 0
    for row in summarize(stats):
        for column, claim in (("asymmetry", "asymmetry_ratio"), ("outlier_ratio", "channel_outliers"),
                              ("temporal_ratio", "temporal_range_drift")):
            assert getattr(row, column) == measure(arrays, row.layer, claim).value, (row.layer, column)
        if np.isfinite(row.temporal_ratio):
            exact = [np.subtract(*np.quantile(raw[row.layer, t], [0.999, 0.001])) for t in synthetic_timesteps]
            assert row.temporal_ratio == pytest.approx(max(exact) / min(exact), rel=0.05)
            compared += 1
    assert compared >= 3


def test_summary_orders_image_layers_first_unless_layers_are_given(fixture_stats):
    stats, _ = fixture_stats
    layers = [row.layer for row in summarize(stats)]
    assert layers[:6] == [f"mm_{b:02d}_img" for b in range(6)] and layers[6:] == [f"mm_{b:02d}_txt" for b in range(5)]
    assert [row.layer for row in summarize(stats, ["mm_03_txt", "mm_00_img"])] == ["mm_03_txt", "mm_00_img"]


def test_unknown_layers_are_named_with_the_known_ones(fixture_stats):
    with pytest.raises(ValueError, match=r"unknown layers \['mm_99_img'\].*mm_00_img"):
        summarize(fixture_stats[0], ["mm_00_img", "mm_99_img"])
    with pytest.raises(ValueError, match="unknown layers"):
        select_layers(fixture_stats[0].to_arrays(), ["nope"])


def test_empty_layers_cells_and_nan_values_give_na_rows_not_errors():
    spec = HistogramSpec(64, scale=0.25, limit=8.0)
    stats = ActivationStats(spec, ["mm_00_img", "mm_01_img"])  # mm_01_img never gets data
    x = np.clip(np.random.default_rng(0).standard_normal((32, 8)), -0.9, 6.9).astype(np.float32)  # inside the fine bins
    x[:, 3] = np.nan  # a channel without a single finite value
    stats.update("mm_00_img", 500.0, CellStats.from_activations(mx.array(x), spec))
    stats.update("mm_00_img", 100.0, CellStats.from_activations(mx.array(x[:0]), spec))  # an empty cell
    filled, empty = summarize(stats)
    finite = np.delete(x, 3, axis=1)
    assert filled.min == pytest.approx(finite.min()) and filled.max == pytest.approx(finite.max())
    assert filled.temporal_ratio == 1.0  # the empty step is left out, one step remains
    assert all(np.isnan(v) for v in astuple(empty)[1:])
    table = format_console([filled, empty])
    assert "n/a" in table.splitlines()[-1]
    assert summarize(ActivationStats(spec, ["mm_00_img"]))[0].layer == "mm_00_img"  # no cells at all


# --------------------------------------------------------------------------- rendering


def test_console_table_is_aligned(fixture_stats):
    lines = format_console(summarize(fixture_stats[0])).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[0].split()[0] == "layer" and set(lines[1]) <= {"-", " "}


def test_markdown_has_a_row_per_layer_and_a_footnote_per_column(fixture_stats):
    rows = summarize(fixture_stats[0])
    text = format_markdown(rows, outlier_fraction=0.05)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == 11 for line in table)
    for header in ("min", "max", "mean", "std", "neg. frac.", "zero frac.", "asymmetry", "outlier ratio",
                   "temporal ratio"):
        assert f"- **{header}**:" in text
    assert "top 5% channels" in text


def test_csv_round_trips_at_full_precision(fixture_stats, tmp_path):
    rows = summarize(fixture_stats[0])
    md, csv_path = write_summary(rows, tmp_path)
    assert md.read_text() == format_markdown(rows)
    records = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["layer"] for r in records] == [row.layer for row in rows]
    for record, row in zip(records, rows):
        assert LayerSummary(record.pop("layer"), **{k: float(v) for k, v in record.items()}) == row
    assert format_csv(rows) == csv_path.read_text()
