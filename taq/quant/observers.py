"""Observers: a tensor -> the range or grid of each of its quantization grids (min-max, percentile, L_p search).

Every observer works on `rows_view(x, spec)`, (R, N) with one row per grid, and returns arrays of
`spec.param_shape(x.shape)`. Ranges (lo, hi) become grids with `grid_from_range` (spec.anchor's rule); the L_p
search returns grids directly, because its candidates are grids.

The L_p search is TaQ-DiT's `MSEObserver` (6xy-liu/Taq-DiT, quant/quantization/observer.py), which initialises
both its weight (4-bit, per channel) and activation (8-bit, per tensor) quantizers: minimise mean |x_hat - x|^p,
p = 2.4, over a grid of candidates built from the min-max range. Its candidates are not "lo and hi shrunk by
one ratio" but, for two-sided data, a 2-D grid: 100 widths times every integer zero point (`mse_search`).
"""

from __future__ import annotations

import math

import mlx.core as mx

from taq.quant.grid import EPS, QParams, QuantSpec, as_float32, fake_quant, grid_from_range, rows_view
from taq.quant.lp_search import lp_argmin, sum_last

P_DEFAULT = 2.4  # TaQ-DiT's exponent (MSEObserver.p)
NUM_DEFAULT = 100  # TaQ-DiT's number of widths (MSEObserver.num)
CANDIDATES = ("taq-dit", "ratio")


# --------------------------------------------------------------------------- ranges


def minmax_range(x: mx.array, spec: QuantSpec) -> tuple[mx.array, mx.array]:
    """(min, max) of each grid's elements, in spec.param_shape(x.shape)."""
    rows = rows_view(as_float32(x), spec)
    shape = spec.param_shape(x.shape)
    return rows.min(axis=1).reshape(shape), rows.max(axis=1).reshape(shape)


def percentile_range(x: mx.array, spec: QuantSpec, lower: float, upper: float) -> tuple[mx.array, mx.array]:
    """The `lower` and `upper` percentiles (0..100) of each grid's elements, as numpy.percentile's default
    ("linear": sorted a, h = (N - 1) * q / 100, a[floor h] + (h - floor h) * (a[floor h + 1] - a[floor h])).

    Sorts every row: O(N log N). For large activation tensors use the histogram version
    (`taq.quant.histogram.histogram_percentile_range`).
    """
    if not (0.0 <= lower <= upper <= 100.0):
        raise ValueError(f"percentile_range needs 0 <= lower <= upper <= 100, got lower={lower!r}, upper={upper!r}")
    rows = mx.sort(rows_view(as_float32(x), spec), axis=1)
    shape = spec.param_shape(x.shape)
    return _sorted_percentile(rows, lower).reshape(shape), _sorted_percentile(rows, upper).reshape(shape)


def _sorted_percentile(rows: mx.array, q: float) -> mx.array:
    n = rows.shape[1]
    h = (n - 1) * q / 100.0
    i0 = min(int(math.floor(h)), n - 1)
    i1 = min(i0 + 1, n - 1)
    t = h - i0
    a, b = rows[:, i0], rows[:, i1]
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)  # numpy's _lerp, for its rounding


# --------------------------------------------------------------------------- L_p error


def lp_error(x: mx.array, params: QParams, spec: QuantSpec, p: float = P_DEFAULT) -> mx.array:
    """Mean |fake_quant(x) - x|^p over each grid's elements, in spec.param_shape(x.shape)."""
    x = as_float32(x)
    err = rows_view(mx.abs(fake_quant(x, params, spec) - x) ** p, spec)
    return (sum_last(err) / err.shape[1]).reshape(spec.param_shape(x.shape))


# --------------------------------------------------------------------------- the L_p search


def mse_search(x: mx.array, spec: QuantSpec, p: float = P_DEFAULT, num: int = NUM_DEFAULT,
               candidates: str = "taq-dit") -> QParams:
    """The grid of each row that minimises mean |x_hat - x|^p over a fixed candidate set (TaQ-DiT's MSEObserver).

    Per row, with lo = min, hi = max of its elements and n = qmax - qmin, and i = 1..num:

    candidates="taq-dit" (the official code; lo and hi are *not* shrunk together):
      asymmetric, two-sided tensor (the whole tensor has values < 0 and > 0): a 2-D grid, num * 2^b candidates.
          width_i = (max(hi, 0) - min(lo, 0)) / num * i, scale = width_i / n, and every zero point z = 0..n:
          the windows [-z * scale, (n - z) * scale] of width_i at every integer offset that keeps 0 a level.
      asymmetric, tensor >= 0 (or <= 0): scale = amax / num * i / n with amax = max(|lo|, |hi|), z = 0 (or n):
          [0, amax * i / num] (or its mirror).
      symmetric: scale = amax / num * i / qmax, z = 0: [-amax * i / num, amax * i / num].
      (TaQ-DiT decides "one-sided" once for the whole tensor, as here; its symmetric grid has the extra level
      -2^(b-1), ours does not, see taq.quant.grid.)
    candidates="ratio" (cheaper, num candidates): lo and hi shrunk together towards 0,
      [min(lo, 0) * i / num, max(hi, 0) * i / num], made a grid by spec.anchor's rule (`grid_from_range`).

    Scales are at least EPS, so an all-zero row keeps exact zeros. Ties go to the first candidate in the order
    (i ascending, then z ascending), as in the official loop. The result is the argmin of this candidate set to
    float32 rounding of the sums (a candidate within a relative 1e-6 of the best may win instead).

    The argmin is exact but not found by brute force (`taq.quant.lp_search`: bounds from each row's extreme
    values skip candidates that cannot win).
    """
    if candidates not in CANDIDATES:
        raise ValueError(f"mse_search: candidates must be one of {CANDIDATES}, got {candidates!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"mse_search: num must be a positive integer, got {num!r}")
    if not p > 0:
        raise ValueError(f"mse_search: p must be positive, got {p!r}")
    x = as_float32(x)
    rows = rows_view(x, spec)
    if rows.size == 0:
        raise ValueError("mse_search: empty tensor")
    if not mx.all(mx.isfinite(rows)).item():
        raise ValueError("mse_search: the tensor has NaN or Inf values")
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    scales, zero_points = search_candidates(lo, hi, spec, num, candidates)
    best = lp_argmin(rows, scales, zero_points, spec.qmin, spec.qmax, p)  # (R,) flat index into (num, Zc)
    zc = zero_points.shape[-1]
    width, offset = best // zc, best % zc
    scale = mx.take_along_axis(scales, width[:, None], axis=1)[:, 0]
    which = mx.arange(rows.shape[0]) if zero_points.shape[0] > 1 else mx.zeros_like(width)
    zero_point = zero_points[which, width, offset]
    shape = spec.param_shape(x.shape)
    return QParams(scale.reshape(shape), zero_point.reshape(shape))


def search_candidates(lo: mx.array, hi: mx.array, spec: QuantSpec, num: int = NUM_DEFAULT,
                      candidates: str = "taq-dit", per_row_side: bool = False) -> tuple[mx.array, mx.array]:
    """The candidate grids of `mse_search` for rows with ranges lo, hi (R,): scales (R, num), widest last, and
    zero points (R or 1, num, Zc) (Zc = 2^b for the 2-D grid, else 1; a first axis of 1 is shared by all rows).

    "One-sided" is decided for all rows together (TaQ-DiT: per tensor), or per row with per_row_side=True
    (rows that are separate tensors, e.g. histograms of different layers); there a one-sided row's zero points
    are all its one value, the 1-D candidates repeated, which leaves its argmin unchanged.
    """
    n = spec.steps
    ratios = mx.arange(1, num + 1, dtype=mx.float32)  # (num,)
    lo0, hi0 = mx.minimum(lo, 0.0), mx.maximum(hi, 0.0)
    if candidates == "ratio":
        scales, zero_points = grid_from_range(lo0[:, None] / num * ratios, hi0[:, None] / num * ratios, spec)
        return scales, zero_points[..., None]
    if spec.symmetric:
        amax = mx.maximum(mx.abs(lo), mx.abs(hi))
        return mx.maximum(amax[:, None] / num * ratios / spec.qmax, EPS), mx.zeros((1, num, 1), dtype=mx.float32)
    # One-sided rows: [0, amax * i / num] (or its mirror) with amax = hi0 - lo0, so the 2-D formula serves both.
    scales = mx.maximum((hi0 - lo0)[:, None] / num * ratios / n, EPS)
    pos, neg = lo >= 0, hi <= 0
    neg = neg & ~pos  # an all-zero row counts as non-negative
    if per_row_side:
        if mx.all(pos | neg).item():
            return scales, mx.broadcast_to(mx.where(neg, n, 0).astype(mx.float32)[:, None, None], (lo.shape[0], num, 1))
        grid = mx.broadcast_to(mx.arange(0, n + 1, dtype=mx.float32), (lo.shape[0], num, n + 1))
        one = mx.where(neg, float(n), 0.0)[:, None, None]
        return scales, mx.where((pos | neg)[:, None, None], one, grid)
    if mx.all(lo >= 0).item():
        return scales, mx.zeros((1, num, 1), dtype=mx.float32)
    if mx.all(hi <= 0).item():
        return scales, mx.full((1, num, 1), n, dtype=mx.float32)
    return scales, mx.broadcast_to(mx.arange(0, n + 1, dtype=mx.float32), (1, num, n + 1))


# --------------------------------------------------------------------------- one entry point


def observe(x: mx.array, spec: QuantSpec, method: str = "minmax", *, lower: float | None = None,
            upper: float | None = None, p: float = P_DEFAULT, num: int = NUM_DEFAULT,
            candidates: str = "taq-dit") -> QParams:
    """The grids of x under spec by `method`: "minmax", "percentile" (needs lower, upper) or "mse"."""
    if method == "minmax":
        return grid_from_range(*minmax_range(x, spec), spec)
    if method == "percentile":
        if lower is None or upper is None:
            raise ValueError("observe(method='percentile') needs lower= and upper= percentiles")
        return grid_from_range(*percentile_range(x, spec, lower, upper), spec)
    if method == "mse":
        return mse_search(x, spec, p=p, num=num, candidates=candidates)
    raise ValueError(f"observe: method must be 'minmax', 'percentile' or 'mse', got {method!r}")
