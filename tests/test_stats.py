import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from taq.tracing.histogram import FLOAT32_MAX, MAX_BINS, HistogramSpec, HistogramSpecError
import taq.tracing.stats as stats_module
from taq.tracing.stats import (CELL_COUNTERS, ActivationStats, BatchReduction, CellStats, PackedMerger,
                               compiled_reducer, pack_reductions, reduce_batch, unpack_reductions)

RTOL = 1e-5
SPEC = HistogramSpec()


def cell_of(x, spec: HistogramSpec = SPEC) -> CellStats:
    return CellStats.from_activations(mx.array(np.asarray(x, dtype=np.float32)), spec)


def reference(x) -> dict[str, np.ndarray]:
    """float64 NumPy two-pass statistics per channel of the finite float32 values of x (..., C)."""
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    finite = np.isfinite(flat)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, flat, 0).sum(axis=0) / count
        std = np.sqrt((np.where(finite, flat - mean, 0) ** 2).sum(axis=0) / count)
    empty = count == 0
    return {"count": count, "mean": mean, "std": std,
            "min": np.where(empty, np.nan, np.where(finite, flat, np.inf).min(axis=0)),
            "max": np.where(empty, np.nan, np.where(finite, flat, -np.inf).max(axis=0))}


def assert_matches_reference(cell: CellStats, x) -> None:
    ref = reference(x)
    np.testing.assert_array_equal(cell.count, ref["count"])
    filled = ref["count"] > 0
    mean, std = ref["mean"][filled], ref["std"][filled]
    # A mean near 0 has no relative accuracy of its own: its error is measured against the channel's spread.
    assert np.all(np.abs(cell.mean[filled] - mean) <= RTOL * np.maximum(np.abs(mean), std))
    assert np.all(np.abs(cell.std[filled] - std) <= RTOL * std)
    np.testing.assert_array_equal(cell.min[filled], ref["min"][filled])  # min and max are exact
    np.testing.assert_array_equal(cell.max[filled], ref["max"][filled])


def assert_histogram_is_numpys(cell: CellStats, x, spec: HistogramSpec = SPEC) -> None:
    """The cell's histogram is numpy.histogram's over the spec's float32 edges, and holds every finite value."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    finite = x[np.isfinite(x)]
    np.testing.assert_array_equal(cell.hist, np.histogram(finite, bins=spec.bin_edges)[0])
    assert cell.hist.sum() == finite.size


# --------------------------------------------------------------------------- the histogram layout


def test_the_default_bins_are_fine_on_gelus_negative_side_and_a_fixed_fraction_wide_in_the_tail():
    edges = SPEC.bin_edges.astype(np.float64)
    assert edges[0] == -FLOAT32_MAX and edges[-1] == FLOAT32_MAX and edges[SPEC.bins // 2] == 0
    np.testing.assert_array_equal(edges, -edges[::-1])  # symmetric around 0
    assert np.count_nonzero((edges > -0.17) & (edges < 0)) >= 390  # the seed's [-8, 8] x 512 had 5 here
    inner = edges[1:-1]
    assert inner[0] == -SPEC.limit and inner[-1] == SPEC.limit
    width = np.diff(inner)
    tail = inner[1:] > 1  # beyond the linear core the width is a constant fraction of the value
    np.testing.assert_allclose(width[tail] / inner[1:][tail], width[tail][-1] / inner[-1], rtol=0.02)
    assert width[tail][-1] / inner[-1] < 0.008 and width.min() < 2e-4


@settings(max_examples=60, deadline=None)
@given(half=st.integers(2, 2048), scale=st.floats(1e-4, 10.0), ratio=st.floats(1.0, 1e6))
def test_any_spec_has_increasing_edges_from_minus_to_plus_float32_max(half, scale, ratio):
    spec = HistogramSpec(2 * half, scale, scale * ratio)
    edges = spec.bin_edges
    assert edges.dtype == np.float32 and edges.shape == (spec.bins + 1,) and np.all(np.diff(edges) > 0)
    assert (edges[0], edges[-1]) == (-FLOAT32_MAX, FLOAT32_MAX) and edges[half] == 0


def test_every_finite_float32_lands_in_a_bin():
    x = np.array([0.0, -0.0, 1e-45, -1e-45, 65536.0, -65536.0, 65537.0, 1e30, -3e38, FLOAT32_MAX, -FLOAT32_MAX,
                  np.nextafter(np.float32(65536), np.float32(0))], np.float32)[:, None]
    cell = cell_of(x)
    assert_histogram_is_numpys(cell, x)
    assert cell.hist[0] == 2 and cell.hist[-1] == 4  # the end bins: below -limit, and from +limit (an edge) up


def edges_and_neighbours(spec: HistogramSpec) -> np.ndarray:
    """Every edge with its float32 neighbours (those beyond float32's max are inf)."""
    edges = spec.bin_edges
    with np.errstate(over="ignore"):
        return np.concatenate([edges, np.nextafter(edges, np.float32(-np.inf)),
                               np.nextafter(edges, np.float32(np.inf))])


@pytest.mark.parametrize("spec", [SPEC, HistogramSpec(4, 1.0, 2.0), HistogramSpec(1000, 1e-3, 1e4),
                                  HistogramSpec(6, 0.5, 0.5),
                                  HistogramSpec(MAX_BINS, 1 / 64, 65536.0)])
def test_values_on_bin_edges_land_where_numpy_puts_them(spec):
    x = edges_and_neighbours(spec)
    x = x[np.isfinite(x)][:, None]  # every edge with its float32 neighbours
    assert_histogram_is_numpys(cell_of(x, spec), x, spec)


@settings(max_examples=100, deadline=None)
@given(half=st.integers(2, 300), scale=st.floats(1e-4, 100.0), ratio=st.floats(1.0, 1e7), data=st.data())
def test_histogram_equals_numpy_for_any_spec(half, scale, ratio, data):
    spec = HistogramSpec(2 * half, scale, scale * ratio)
    pool = edges_and_neighbours(spec)
    pool = pool[np.isfinite(pool)]
    picks = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=60))
    noise = data.draw(arrays(np.float32, st.integers(0, 20), elements=st.floats(width=32, allow_nan=False,
                                                                                allow_infinity=False)))
    x = np.concatenate([pool[picks], noise])[:, None]
    assert_histogram_is_numpys(cell_of(x, spec), x, spec)


def test_non_finite_values_are_counted_and_excluded_from_everything_else():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 5)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.05] = np.inf
    x[rng.random(x.shape) < 0.05] = -np.inf
    cell = cell_of(x)
    assert (cell.nan, cell.posinf, cell.neginf) == (np.isnan(x).sum(), np.isposinf(x).sum(), np.isneginf(x).sum())
    assert_matches_reference(cell, x)
    assert_histogram_is_numpys(cell, x)  # +-Inf are in no bin
    finite = x[np.isfinite(x)]
    assert cell.negative == np.count_nonzero(finite < 0)
    assert cell.negative_fraction == pytest.approx(np.mean(finite < 0))


def test_an_all_nan_channel_has_count_zero_and_reports_nan():
    x = np.random.default_rng(3).standard_normal((50, 3)).astype(np.float32)
    x[:, 1] = np.nan
    cell = cell_of(x)
    assert cell.count[1] == 0 and cell.nan == 50
    assert np.isnan(cell.std[1]) and not np.isnan(cell.std[[0, 2]]).any()
    stats = ActivationStats()
    stats.update("layer", 0, cell)
    arrays_ = stats.to_arrays()
    for key in ("mean", "std", "min", "max", "m2"):
        assert np.isnan(arrays_[key][0, 0, 1]) and np.isfinite(arrays_[key][0, 0, [0, 2]]).all()
    assert_matches_reference(cell, x)


@pytest.mark.parametrize("value", [0.0, -3.7, 0.1, 1e30, -3e38, 1e-30])
def test_constant_channels_have_zero_std_and_their_value_as_mean(value):
    cell = cell_of(np.full((2, 333, 4), value))
    c = float(np.float32(value))
    assert np.all(np.abs(cell.mean - c) <= 1e-7 * abs(c))
    assert np.all(cell.std <= 1e-7 * abs(c))
    assert np.all(cell.min == c) and np.all(cell.max == c)


def test_huge_values_neither_overflow_nor_lose_accuracy():
    rng = np.random.default_rng(4)
    x = (np.array([1e30, -2e37, 1e20]) * (1 + rng.standard_normal((300, 3)))).astype(np.float32)
    assert np.isfinite(x).all()
    cell = cell_of(x)
    assert np.isfinite(cell.std).all()
    assert_matches_reference(cell, x)
    assert cell.hist[0] + cell.hist[-1] == x.size  # all beyond the fine bins: the two end bins


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4)])
def test_an_empty_batch_is_the_identity_of_merge(shape):
    empty = cell_of(np.zeros(shape))
    assert empty.channels == 4 and empty.finite_count == 0 and empty.hist.sum() == 0
    x = np.random.default_rng(5).standard_normal((10, 4))
    one = cell_of(x)
    for merged in (one.merge(empty), empty.merge(one)):
        for name in ("count", "mean", "m2", "min", "max", "hist"):
            np.testing.assert_array_equal(getattr(merged, name), getattr(one, name))


@pytest.mark.parametrize("shape", [(), (3, 0)])
def test_activations_without_channels_are_rejected(shape):
    with pytest.raises(ValueError, match="channel"):
        cell_of(np.zeros(shape))


@pytest.mark.parametrize("kwargs, field", [(dict(bins=0), "bins"), (dict(bins=2.5), "bins"), (dict(bins=7), "bins"),
                                           (dict(bins=MAX_BINS + 2), "bins"), (dict(scale=0.0), "scale"),
                                           (dict(scale=float("nan")), "scale"), (dict(limit=float("inf")), "limit"),
                                           (dict(limit=-1.0), "limit"), (dict(scale=1e-31), "scale"),
                                           (dict(limit=1e31), "limit")])
def test_bad_histogram_specs_are_rejected_naming_the_field(kwargs, field):
    with pytest.raises(HistogramSpecError, match=f"HistogramSpec.{field} ") as error:
        HistogramSpec(**kwargs)
    assert error.value.field == field


def test_exact_zeros_are_counted_apart_from_negative_values():
    x = np.array([[-0.0, 0.0, -1e-30, 1e-30, -0.17, 3.0]], np.float32)
    cell = cell_of(x)
    assert (cell.negative, cell.zero) == (2, 2) and cell.zero_fraction == pytest.approx(2 / 6)


def test_float32_gelu_turns_far_negative_inputs_into_zeros_not_negatives():
    pre = mx.array(np.linspace(-8.0, -6.0, 64, dtype=np.float32))[None]
    cell = CellStats.from_activations(nn.gelu_approx(pre))
    assert (cell.negative, cell.zero) == (0, 64)  # in float64 all 64 would be negative


def test_mixed_precision_activations_are_reduced_in_float32():
    x = np.random.default_rng(6).standard_normal((64, 8)).astype(np.float16)
    cell = CellStats.from_activations(mx.array(x).astype(mx.bfloat16))
    as_f32 = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    assert_matches_reference(cell, as_f32)
    assert_histogram_is_numpys(cell, as_f32)


# --------------------------------------------------------------------------- merging


def assert_cells_equal(a: CellStats, b: CellStats) -> None:
    for name in ("count", "hist", "min", "max"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in CELL_COUNTERS:
        assert getattr(a, name) == getattr(b, name), name
    filled = a.count > 0
    scale = np.maximum(np.abs(a.mean), a.std)[filled]
    # Squared deviations of subnormal values underflow in float32: below float32's smallest normal only
    # an absolute agreement is possible.
    tiny = np.finfo(np.float32).tiny
    assert np.all(np.abs(a.mean - b.mean)[filled] <= 1e-5 * scale + tiny)
    assert np.all(np.abs(a.std - b.std)[filled] <= 1e-5 * scale + tiny)


values = st.one_of(st.floats(-20, 20, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 8.0, -8.0, 0.0]))


@settings(max_examples=100, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(0, 40), st.integers(1, 3)), elements=values),
       cuts=st.lists(st.integers(0, 40), max_size=4))
def test_merging_disjoint_parts_equals_one_pass_over_the_union(x, cuts):
    parts = np.split(x, sorted(min(c, len(x)) for c in cuts))  # empty parts included
    merged = cell_of(parts[0])
    for part in parts[1:]:
        merged = merged.merge(cell_of(part))
    assert_cells_equal(merged, cell_of(x))


def test_streaming_many_batches_keeps_float64_accuracy():
    rng = np.random.default_rng(7)
    batches = (1000.0 + 0.01 * rng.standard_normal((60, 50, 4))).astype(np.float32)
    stats = ActivationStats()
    for batch in batches:
        stats.update("layer", 1.0, cell_of(batch))
    assert_matches_reference(stats["layer", 1.0], batches.reshape(-1, 4))


def test_cells_of_different_shape_or_spec_do_not_merge():
    a = cell_of(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="channels"):
        a.merge(cell_of(np.zeros((2, 4))))
    with pytest.raises(ValueError, match="histograms"):
        a.merge(cell_of(np.zeros((2, 3)), HistogramSpec(bins=8)))


# --------------------------------------------------------------------------- the container


def filled_stats(seed=0, layers=("mm_00_img", "mm_00_txt", "mm_01_img"), timesteps=(1000.0, 20.5, 500), skip=()):
    rng = np.random.default_rng(seed)
    stats = ActivationStats(layers=layers)
    for layer in layers:
        for t in timesteps:
            if (layer, t) not in skip:
                stats.update(layer, t, cell_of(rng.standard_normal((2, 9, 5)) * (1 + t / 100)))
    return stats


def test_export_stacks_layers_by_sorted_timesteps_and_leaves_missing_cells_empty():
    stats = filled_stats(skip={("mm_00_txt", 500)})
    arrays_ = stats.to_arrays()
    assert list(arrays_["layers"]) == ["mm_00_img", "mm_00_txt", "mm_01_img"]
    np.testing.assert_array_equal(arrays_["timesteps"], [20.5, 500.0, 1000.0])
    L, T, C, B = 3, 3, 5, SPEC.bins
    shapes = {"count": (L, T, C), "mean": (L, T, C), "std": (L, T, C), "min": (L, T, C), "max": (L, T, C),
              "hist": (L, T, B), "bin_edges": (B + 1,), "negative_fraction": (L, T), "zero_fraction": (L, T),
              "zero": (L, T), "negative": (L, T), "nan": (L, T), "posinf": (L, T), "neginf": (L, T),
              "present": (L, T), "hist_scale": (), "hist_limit": ()}
    assert {k: arrays_[k].shape for k in shapes} == shapes
    assert not arrays_["present"][1, 1] and arrays_["present"].sum() == 8
    assert arrays_["count"][1, 1].sum() == 0 and arrays_["hist"][1, 1].sum() == 0
    assert np.isnan(arrays_["mean"][1, 1]).all() and np.isnan(arrays_["negative_fraction"][1, 1])
    cell = stats["mm_01_img", 1000]
    np.testing.assert_array_equal(arrays_["std"][2, 2], cell.std)
    assert arrays_["negative_fraction"][2, 2] == cell.negative_fraction


def test_arrays_round_trip_exactly():
    stats = filled_stats(skip={("mm_00_img", 20.5)})
    stats.update("mm_00_txt", 20.5, cell_of(np.full((3, 5), np.nan)))  # a visited cell with no finite value
    stats.add_layers(["mm_02_img"])  # declared, never visited
    arrays_ = stats.to_arrays()
    again = ActivationStats.from_arrays(arrays_).to_arrays()
    assert again.keys() == arrays_.keys()
    for key in arrays_:
        assert again[key].dtype == arrays_[key].dtype, key
        np.testing.assert_array_equal(again[key], arrays_[key], err_msg=key)


def test_loaded_stats_keep_merging_as_the_original():
    loaded = ActivationStats.from_arrays(filled_stats(seed=1).to_arrays())
    more = filled_stats(seed=2)
    expected, got = filled_stats(seed=1).merge(more), loaded.merge(more)
    for key, cell in expected.items():
        assert_cells_equal(got[key], cell)


def test_merging_containers_equals_updating_one():
    a = filled_stats(seed=3, layers=("mm_00_img",), timesteps=(1.0, 2.0))
    b = filled_stats(seed=4, layers=("mm_00_img", "mm_05_txt"), timesteps=(2.0, 3.0))
    merged = a.merge(b)
    assert merged.layers == ("mm_00_img", "mm_05_txt") and merged.timesteps == (1.0, 2.0, 3.0)
    assert_cells_equal(merged["mm_00_img", 2.0], a["mm_00_img", 2.0].merge(b["mm_00_img", 2.0]))
    assert_cells_equal(merged["mm_05_txt", 3.0], b["mm_05_txt", 3.0])
    assert len(a) == 2 and len(b) == 4  # merge builds a new container


def test_timesteps_of_any_numeric_type_share_one_cell():
    stats = ActivationStats()
    for t in (500, 500.0, np.float32(500.0), np.int64(500)):
        stats.update("layer", t, cell_of(np.ones((1, 2))))
    assert stats.timesteps == (500.0,) and stats["layer", 500].count.tolist() == [4, 4]


@pytest.mark.parametrize("t", [float("nan"), float("inf"), "soon", True])
def test_bad_timesteps_are_rejected(t):
    with pytest.raises(ValueError, match="timestep"):
        ActivationStats().update("layer", t, cell_of(np.ones((1, 2))))


def test_layers_must_share_channel_count_and_histogram():
    stats = filled_stats()
    with pytest.raises(ValueError, match="'mm_09_img' has 7 channels"):
        stats.update("mm_09_img", 1.0, cell_of(np.ones((1, 7))))
    with pytest.raises(ValueError, match="histogram"):
        stats.update("mm_09_img", 1.0, cell_of(np.ones((1, 5)), HistogramSpec(bins=4)))


def test_missing_cell_is_a_key_error_naming_it():
    with pytest.raises(KeyError, match="mm_00_img.*7"):
        filled_stats()["mm_00_img", 7]


@pytest.mark.parametrize("corrupt", ["shape", "absent_with_counts", "nan_mean", "edges", "missing_key"])
def test_inconsistent_arrays_are_rejected(corrupt):
    arrays_ = filled_stats(skip={("mm_00_img", 500)}).to_arrays()
    if corrupt == "shape":
        arrays_["mean"] = arrays_["mean"][:, :2]
    elif corrupt == "absent_with_counts":
        arrays_["nan"][0, 1] = 3
    elif corrupt == "nan_mean":
        arrays_["mean"][0, 0, 0] = np.nan
    elif corrupt == "edges":
        arrays_["bin_edges"] = arrays_["bin_edges"] / 2
    else:
        del arrays_["hist"]
    with pytest.raises(ValueError):
        ActivationStats.from_arrays(arrays_)


def test_the_compiled_reduction_equals_the_eager_one():
    x = np.random.default_rng(8).standard_normal((3, 40, 6)).astype(np.float32) * 5
    x[0, 0, :3] = [np.nan, np.inf, -np.inf]
    compiled = compiled_reducer(SPEC)(mx.array(x))
    eager = reduce_batch(mx.array(x), SPEC)
    for name, got, expected in zip(("count", "scale", "scaled_mean", "residual_sum", "residual_sq_sum", "min", "max",
                                    "slots", "signs"), compiled.arrays(), eager.arrays()):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6, atol=1e-6, err_msg=name)
    assert compiled_reducer(SPEC) is compiled_reducer(HistogramSpec())  # one compiled function per spec


@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 7)), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_packed_reductions_unpack_to_the_same_fields(shapes, seed):
    rng = np.random.default_rng(seed)
    reductions = [reduce_batch(mx.array(rng.standard_normal((rows, channels)).astype(np.float32)), HistogramSpec(8))
                  for rows, channels in shapes]
    floats, ints = pack_reductions(reductions)
    sizes = [(r.count.shape[0], r.slots.shape[0]) for r in reductions]
    for original, unpacked in zip(reductions, unpack_reductions(np.array(floats), np.array(ints), sizes)):
        for name in BatchReduction.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(unpacked, name), np.array(getattr(original, name)), err_msg=name)


# --------------------------------------------------------------------------- many cells per merge (the tracer's)


def assert_stats_bit_identical(a: ActivationStats, b: ActivationStats) -> None:
    assert a.layers == b.layers and a.channels == b.channels and list(a.items()) and len(a) == len(b)
    assert [key for key, _ in a.items()] == [key for key, _ in b.items()]  # also the order cells were first seen
    for key, cell in a.items():
        other = b[key]
        for name in ("count", "mean", "m2", "min", "max", "hist"):
            x, y = np.ascontiguousarray(getattr(cell, name)), np.ascontiguousarray(getattr(other, name))
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (key, name)  # -0.0 and NaN bits included
        for name in CELL_COUNTERS:
            assert getattr(cell, name) == getattr(other, name), (key, name)


signed_values = st.one_of(values, st.just(-0.0), st.floats(-2.0**100, 2.0**100, width=32))
LAYERS = ("mm_00_img", "mm_00_txt", "mm_01_img", "mm_01_txt")


@settings(max_examples=60, deadline=None)
@given(data=st.data(), channels=st.integers(1, 5), chunk=st.sampled_from([1, 3, 2**16]),
       seeded=st.lists(st.sampled_from(LAYERS), max_size=2, unique=True))
def test_merging_a_flush_at_once_equals_updating_its_cells_one_by_one(data, channels, chunk, seeded):
    """PackedMerger (the tracer's vectorised merge) against CellStats.from_reduction + update per reduction, bit
    for bit: cells seen first, seeded from the stats, merged again, in any layer order, synced in between."""
    spec = HistogramSpec(8)
    one_by_one, at_once = ActivationStats(spec), ActivationStats(spec)
    for layer in seeded:  # cells the stats hold before tracing starts
        x = data.draw(arrays(np.float32, (data.draw(st.integers(0, 4)), channels), elements=signed_values))
        for stats in (one_by_one, at_once):
            stats.update(layer, 1.0, cell_of(x, spec))
    merger = PackedMerger(at_once)
    flushes = data.draw(st.lists(st.tuples(st.sampled_from([1.0, 2.0]), st.permutations(LAYERS),
                                           st.integers(1, len(LAYERS)), st.booleans()), min_size=1, max_size=5))
    previous, stats_module.CHUNK_ELEMENTS = stats_module.CHUNK_ELEMENTS, chunk
    try:
        for timestep, order, k, sync in flushes:
            layers = list(order[:k])
            xs = [data.draw(arrays(np.float32, (data.draw(st.integers(0, 6)), channels), elements=signed_values))
                  for _ in layers]
            reductions = [reduce_batch(mx.array(x), spec) for x in xs]
            floats, ints = (np.array(a) for a in pack_reductions(reductions))
            sizes = [(channels, spec.bins + 1)] * len(layers)
            for layer, r in zip(layers, unpack_reductions(floats, ints, sizes)):
                one_by_one.update(layer, timestep, CellStats.from_reduction(r, spec))
            merger.merge(layers, timestep, floats, ints, channels, spec.bins + 1)
            if sync:
                merger.write_back()
        merger.write_back()
    finally:
        stats_module.CHUNK_ELEMENTS = previous
    assert_stats_bit_identical(one_by_one, at_once)


def test_a_flush_of_the_wrong_shape_is_rejected_before_anything_is_merged():
    stats = ActivationStats(HistogramSpec(8))
    stats.update("a", 1.0, cell_of(np.ones((2, 3)), HistogramSpec(8)))
    floats, ints = (np.array(a) for a in pack_reductions([reduce_batch(mx.ones((2, 4)), HistogramSpec(8))]))
    merger = PackedMerger(stats)
    with pytest.raises(ValueError, match="'b' has 4 channels, these stats hold 3"):
        merger.merge(["b"], 1.0, floats, ints, 4, 9)
    with pytest.raises(ValueError, match="histogram bins"):
        merger.merge(["b"], 1.0, floats, ints, 4, 17)
    with pytest.raises(ValueError, match="each layer once"):
        merger.merge(["b", "b"], 1.0, floats, ints, 4, 9)
    merger.write_back()
    assert len(stats) == 1
