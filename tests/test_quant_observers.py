import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taq.quant.grid import QuantSpec, fake_quant, grid_from_range
from taq.quant.lp_search import error_table, lp_argmin
from taq.quant.observers import (lp_error, minmax_range, mse_search, observe, percentile_range,
                                 search_candidates)

P = 2.4


def sample(seed: int, shape, kind: str) -> np.ndarray:
    """Test data of several shapes of distribution (heavy tails and one-sided ones stress the search)."""
    rng = np.random.default_rng(seed)
    x = {"normal": lambda: rng.normal(size=shape),
         "heavy": lambda: rng.standard_t(1.5, size=shape),
         "gelu": lambda: _gelu(rng.normal(0, 2, size=shape)),
         "positive": lambda: rng.exponential(size=shape),
         "negative": lambda: -rng.exponential(size=shape) - 0.5,
         "skewed": lambda: rng.lognormal(0, 1, size=shape) - 1.0}[kind]()
    return x.astype(np.float32)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_candidates(row_lo: float, row_hi: float, tensor_lo: float, tensor_hi: float, spec: QuantSpec,
                         num: int) -> list[tuple[float, float]]:
    """TaQ-DiT's candidate grids (scale, zero point) for one row, written from mse_search's docstring."""
    n = spec.steps
    amax = max(abs(row_lo), abs(row_hi))
    if spec.symmetric:
        return [(max(amax / num * i / spec.qmax, 1e-8), 0.0) for i in range(1, num + 1)]
    if tensor_lo >= 0 or tensor_hi <= 0:
        z = 0.0 if tensor_lo >= 0 else float(n)
        return [(max(amax / num * i / n, 1e-8), z) for i in range(1, num + 1)]
    width = max(row_hi, 0.0) - min(row_lo, 0.0)
    return [(max(width / num * i / n, 1e-8), float(z)) for i in range(1, num + 1) for z in range(n + 1)]


def loss64(x: np.ndarray, s: float, z: float, spec: QuantSpec) -> float:
    """Mean |fake_quant(x) - x|^p in float64."""
    x = x.astype(np.float64)
    q = np.clip(np.round(x / s) + z, spec.qmin, spec.qmax)
    return float(np.mean(np.abs((q - z) * s - x) ** P))


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("spec, shape", [(QuantSpec(), (3, 5, 7)), (QuantSpec(granularity="channel"), (6, 40)),
                                         (QuantSpec(granularity="group", group_size=32), (3, 96))])
def test_minmax_is_each_grids_min_and_max(spec, shape):
    x = sample(0, shape, "normal")
    lo, hi = minmax_range(mx.array(x), spec)
    if spec.granularity == "tensor":
        ref = x.reshape(1, -1)
    elif spec.granularity == "channel":
        ref = x
    else:
        ref = x.reshape(-1, 32)
    assert lo.shape == spec.param_shape(shape)
    assert np.array_equal(np.array(lo).reshape(-1), ref.min(axis=1))
    assert np.array_equal(np.array(hi).reshape(-1), ref.max(axis=1))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.floats(0, 100), st.floats(0, 100), st.integers(0, 2**31 - 1),
       st.sampled_from(["normal", "heavy", "gelu"]))
def test_percentile_is_numpys_linear_percentile(n, a, b, seed, kind):
    lower, upper = min(a, b), max(a, b)
    x = sample(seed, (4, n), kind)
    lo, hi = percentile_range(mx.array(x), QuantSpec(granularity="channel"), lower, upper)
    np.testing.assert_allclose(np.array(lo)[:, 0], np.percentile(x, lower, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(hi)[:, 0], np.percentile(x, upper, axis=1), rtol=1e-6, atol=1e-6)


def test_percentile_rejects_bad_percentiles():
    with pytest.raises(ValueError, match="0 <= lower <= upper <= 100"):
        percentile_range(mx.zeros((4,)), QuantSpec(), 99.0, 1.0)
    with pytest.raises(ValueError, match="0 <= lower <= upper <= 100"):
        percentile_range(mx.zeros((4,)), QuantSpec(), -1.0, 50.0)


# --------------------------------------------------------------------------- the L_p search against brute force


CASES = [  # (spec, shape, kind)
    (QuantSpec(bits=4, granularity="channel"), (5, 64), "normal"),
    (QuantSpec(bits=4, granularity="channel"), (5, 300), "heavy"),
    (QuantSpec(bits=3, granularity="channel"), (4, 200), "skewed"),
    (QuantSpec(bits=2, granularity="channel"), (4, 100), "heavy"),
    (QuantSpec(bits=8, granularity="channel"), (3, 120), "heavy"),
    (QuantSpec(bits=4, granularity="group", group_size=32), (2, 128), "normal"),
    (QuantSpec(bits=4, granularity="channel", symmetric=True), (4, 80), "heavy"),
    (QuantSpec(bits=8, symmetric=True), (500,), "normal"),
    (QuantSpec(bits=8), (400,), "gelu"),
    (QuantSpec(bits=6), (300,), "positive"),
    (QuantSpec(bits=5, granularity="channel"), (4, 90), "negative"),
    (QuantSpec(bits=4, granularity="channel"), (6, 12), "normal"),  # rows shorter than the fast path's minimum
]


@pytest.mark.parametrize("spec, shape, kind", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_mse_search_finds_the_argmin_of_taq_dits_candidates(spec, shape, kind, seed):
    x = sample(seed, shape, kind)
    params = mse_search(mx.array(x), spec, num=100)
    assert params.scale.shape == spec.param_shape(shape)
    row_length = {"tensor": x.size, "channel": shape[-1], "group": spec.group_size}[spec.granularity]
    rows = x.reshape(-1, row_length)
    scale, zero = np.array(params.scale).reshape(-1), np.array(params.zero_point).reshape(-1)
    for r, row in enumerate(rows):
        cands = reference_candidates(float(row.min()), float(row.max()), float(x.min()), float(x.max()), spec, 100)
        losses = [loss64(row, s, z, spec) for s, z in cands]
        assert any(abs(s - scale[r]) <= 1e-6 * s and z == zero[r] for s, z in cands), "not one of the candidates"
        assert loss64(row, scale[r], zero[r], spec) <= min(losses) * (1 + 1e-4) + 1e-30


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pruned_search_equals_brute_force(seed, bits):
    # Rows that exercise every path: wide and narrow spread, heavy tails, constant and zero rows.
    rng = np.random.default_rng(seed)
    n = int(rng.choice([16, 40, 130, 257]))
    rows = np.concatenate([sample(seed, (3, n), "heavy"), sample(seed + 1, (2, n), "normal") * 1e-3,
                           sample(seed + 2, (2, n), "skewed"), np.full((1, n), 0.75), np.zeros((1, n))])
    rows = rows.astype(np.float32)
    for spec in (QuantSpec(bits=bits, granularity="channel"),
                 QuantSpec(bits=bits, symmetric=True, granularity="channel")):
        for kind in ("taq-dit", "ratio"):
            x = mx.array(rows)
            s, z = search_candidates(x.min(axis=1), x.max(axis=1), spec, 100, kind)
            fast = np.array(lp_argmin(x, s, z, spec.qmin, spec.qmax, P))
            table = np.array(error_table(x, s, z, spec.qmin, spec.qmax, P)).reshape(rows.shape[0], -1)
            best = table.min(axis=1)
            chosen = table[np.arange(rows.shape[0]), fast]
            assert np.all(chosen <= best * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_mse_search_of_one_group_spanning_the_row_is_per_channel(group):
    w = mx.array(sample(group, (5, group), "heavy"))
    by_group = mse_search(w, QuantSpec(bits=4, granularity="group", group_size=group))
    by_channel = mse_search(w, QuantSpec(bits=4, granularity="channel"))
    assert np.array_equal(np.array(by_group.scale), np.array(by_channel.scale))
    assert np.array_equal(np.array(by_group.zero_point), np.array(by_channel.zero_point))


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_pruned_search_of_one_long_row_equals_brute_force(bits):
    # Per-tensor activations: one long row, whose best grids clip hundreds of values (the longer tails' case).
    x = mx.array(sample(bits, (1, 20_000), "gelu") * np.float32(1.5))
    spec = QuantSpec(bits=bits)
    s, z = search_candidates(x.min(axis=1), x.max(axis=1), spec)
    fast = int(lp_argmin(x, s, z, spec.qmin, spec.qmax, P)[0])
    table = np.array(error_table(x, s, z, spec.qmin, spec.qmax, P)).reshape(-1)
    assert table[fast] <= table.min() * (1 + 1e-5)


def test_mse_search_is_tensor_wide_about_one_sidedness():
    # One all-positive row in a two-sided weight still gets the 2-D candidates, as in TaQ-DiT.
    x = np.concatenate([sample(0, (1, 64), "positive") + 1.0, sample(1, (3, 64), "normal")])
    spec = QuantSpec(bits=4, granularity="channel")
    s, z = search_candidates(mx.array(x).min(axis=1), mx.array(x).max(axis=1), spec)
    assert z.shape == (1, 100, 16)
    s_pos, z_pos = search_candidates(mx.array(x[:1]).min(axis=1), mx.array(x[:1]).max(axis=1), spec)
    assert z_pos.shape == (1, 100, 1) and float(z_pos[0, 0, 0]) == 0.0
    assert float(mse_search(mx.array(-x[:1]), spec).zero_point[0, 0]) == 15.0  # all negative: the top is 0


def test_mse_search_beats_minmax_at_4_bits():
    x = mx.array(sample(3, (8, 512), "normal"))
    spec = QuantSpec(bits=4, granularity="channel")
    searched = lp_error(x, mse_search(x, spec), spec)
    minmax = lp_error(x, grid_from_range(*minmax_range(x, spec), spec), spec)
    assert np.all(np.array(searched) <= np.array(minmax))  # min-max's grid is one of the candidates
    assert np.mean(np.array(searched)) < 0.9 * np.mean(np.array(minmax))


def test_ratio_candidates_shrink_lo_and_hi_together():
    x = mx.array(np.array([[-2.0, -1.0, 0.5, 4.0]], np.float32))
    spec = QuantSpec(bits=4, granularity="channel")
    s, z = search_candidates(x.min(axis=1), x.max(axis=1), spec, 10, "ratio")
    expected = grid_from_range(mx.array([-2.0 * 0.3]), mx.array([4.0 * 0.3]), spec)
    assert float(s[0, 2]) == pytest.approx(float(expected.scale[0]))
    assert float(z[0, 2, 0]) == float(expected.zero_point[0])


def test_all_zero_weights_keep_exact_zeros():
    spec = QuantSpec(bits=4, granularity="channel")
    w = mx.zeros((3, 64))
    for method in ("minmax", "mse"):
        params = observe(w, spec, method)
        assert np.array_equal(np.array(fake_quant(w, params, spec)), np.zeros((3, 64)))


@pytest.mark.parametrize("kwargs, message", [(dict(candidates="grid"), "candidates must be one of"),
                                             (dict(num=0), "num must be a positive integer"),
                                             (dict(p=0.0), "p must be positive")])
def test_mse_search_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mse_search(mx.ones((4,)), QuantSpec(), **kwargs)


def test_observers_reject_nan_and_unknown_methods():
    with pytest.raises(ValueError, match="NaN or Inf"):
        mse_search(mx.array([1.0, np.nan]), QuantSpec())
    with pytest.raises(ValueError, match="finite"):
        observe(mx.array([1.0, np.inf]), QuantSpec(), "minmax")
    with pytest.raises(ValueError, match="method must be"):
        observe(mx.ones((4,)), QuantSpec(), "kl")
    with pytest.raises(ValueError, match="needs lower= and upper="):
        observe(mx.ones((4,)), QuantSpec(), "percentile")


def test_observe_dispatches_to_each_observer():
    x = mx.array(sample(0, (4, 64), "normal"))
    spec = QuantSpec(bits=4, granularity="channel")
    assert np.array_equal(np.array(observe(x, spec, "minmax").scale),
                          np.array(grid_from_range(*minmax_range(x, spec), spec).scale))
    assert np.array_equal(np.array(observe(x, spec, "percentile", lower=1, upper=99).scale),
                          np.array(grid_from_range(*percentile_range(x, spec, 1, 99), spec).scale))
    assert np.array_equal(np.array(observe(x, spec, "mse").scale), np.array(mse_search(x, spec).scale))
