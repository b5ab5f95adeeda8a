"""Observers from histograms: ranges and L_p-optimal grids of activations known only by their binned counts.

Phase 2 keeps, per (layer, timestep), a histogram of the post-GELU values (`taq.tracing.histogram`: bins uniform in
asinh whose two end bins reach float32's max, plus per-channel min/max that bound them: `histogram_with_tails`).
Calibrating activation grids from those, instead of from raw tensors, needs the L_p error of a grid on a histogram.
Here every bin's count is taken as spread evenly over the bin, and the error is integrated in closed form: for a
grid with step s and levels g_q = (q - z) s, q = qmin..qmax, the error density |u - Q(u)|^p has the antiderivative
(from the bottom level lo = g_qmin)

    G(u) = (k - qmin) C + h(u - g_k),    k = clip(round(u / s) + z, qmin, qmax),
    h(t) = sign(t) |t|^(p+1) / (p+1),    C = 2 (s/2)^(p+1) / (p+1)   (one full cell's integral),

continuous across cell boundaries, so a bin [a, b] with count c contributes c * (G(b) - G(a)) / (b - a)
(computed without cancellation for narrow bins far from the grid, see `lp_integral`).

Histograms are (..., bins) with edges (bins + 1,) shared or (..., bins + 1); each histogram gets one grid, of
shape counts.shape[:-1] (spec.granularity is not used: a histogram already is the set of values sharing a grid).
Values outside the binned range must be given bins of their own (`histogram_with_tails`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from taq.quant.grid import QParams, QuantSpec, as_float32, grid_from_range
from taq.quant.lp_search import _CHUNK, sum_last
from taq.quant.observers import CANDIDATES, NUM_DEFAULT, P_DEFAULT, search_candidates


def histogram_with_tails(counts, edges, underflow: int = 0, overflow: int = 0, data_min: float | None = None,
                         data_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One histogram (bins,) over `edges` restricted to the data's support [data_min, data_max], with the
    underflow and overflow counts as bins [data_min, edges[0]] and [edges[-1], data_max].

    Clipping the edges to the support keeps "evenly spread over the bin" from putting mass where there is none
    (e.g. below GELU's floor inside the bin that holds it). Returns float64 counts and edges (NumPy).
    """
    counts, edges = np.asarray(counts, np.float64), np.asarray(edges, np.float64)
    if counts.ndim != 1 or edges.shape != (counts.size + 1,):
        raise ValueError(f"histogram_with_tails needs counts (bins,) and edges (bins + 1,), got {counts.shape} "
                         f"and {edges.shape}")
    if np.any(counts < 0) or underflow < 0 or overflow < 0:
        raise ValueError("histogram counts must be non-negative")
    if np.any(np.diff(edges) <= 0):
        raise ValueError("histogram edges must increase")
    lo = edges[0] if data_min is None else float(data_min)
    hi = edges[-1] if data_max is None else float(data_max)
    if underflow and not lo < edges[0]:
        raise ValueError(f"{underflow} values lie below the first edge {edges[0]}: data_min (< that edge) is needed")
    if overflow and not hi > edges[-1]:
        raise ValueError(f"{overflow} values lie above the last edge {edges[-1]}: data_max (> that edge) is needed")
    if not lo <= hi:
        raise ValueError(f"histogram_with_tails needs data_min <= data_max, got {lo} and {hi}")
    clipped = np.clip(edges, lo, hi)
    outside = (edges[1:] < lo) | (edges[:-1] > hi)  # bins wholly below the data's min or above its max
    if np.any((counts > 0) & outside):
        raise ValueError("histogram has counts outside [data_min, data_max]")
    if underflow:
        counts, clipped = np.concatenate([[underflow], counts]), np.concatenate([[lo], clipped])
    if overflow:
        counts, clipped = np.concatenate([counts, [overflow]]), np.concatenate([clipped, [hi]])
    return counts, clipped


def lp_integral(a: mx.array, b: mx.array, scale, zero_point, qmin: int, qmax: int, p: float) -> mx.array:
    """The integral over [a, b] of |u - Q(u)|^p for the grid (scale, zero_point, qmin..qmax), broadcasting."""
    c = 2 * (scale / 2) ** (p + 1) / (p + 1)

    def cell(u):  # level index and the offset from its level
        k = mx.clip(mx.round(u / scale) + zero_point, qmin, qmax)
        return k, u - (k - zero_point) * scale

    def h(t):
        return mx.sign(t) * mx.abs(t) ** (p + 1) / (p + 1)

    (ka, ta), (kb, tb) = cell(a), cell(b)
    direct = (kb - ka) * c + h(tb) - h(ta)  # G(b) - G(a), the level counts subtracted first
    # Within one cell and on one side of its level, h(tb) - h(ta) cancels when |ta| ~ |tb| (a narrow bin far out
    # in a clipped tail): there, with t the smaller of |ta|, |tb| and w = b - a,
    # |t + w|^(p+1) - |t|^(p+1) = t^(p+1) expm1((p+1) log1p(w / t)).
    t = mx.minimum(mx.abs(ta), mx.abs(tb))
    w = b - a
    narrow = (ka == kb) & (ta * tb > 0) & (t > w)
    ratio = w / mx.where(narrow, t, 1.0)
    stable = t ** (p + 1) * mx.expm1((p + 1) * mx.log1p(ratio)) / (p + 1)
    return mx.where(narrow, stable, direct)


def histogram_lp_error(counts, edges, params: QParams, spec: QuantSpec, p: float = P_DEFAULT) -> mx.array:
    """Mean |x_hat - x|^p of each histogram's values, each bin's taken as spread evenly over it (zero-width bins
    as points); shape counts.shape[:-1]."""
    counts, edges = _histograms(counts, edges)
    scale, zero_point = (as_float32(a).reshape(-1, 1) for a in params)
    errors = _bin_errors(counts, edges[..., :-1], edges[..., 1:], scale, zero_point, spec, p)
    return (errors / sum_last(counts)).reshape(_batch_shape(params))


def _bin_errors(counts: mx.array, a: mx.array, b: mx.array, scale, zero_point, spec: QuantSpec, p: float) -> mx.array:
    """Sum over bins of count * (mean error in the bin): counts (..., B), bins [a, b] (..., B), grids broadcasting."""
    width = b - a
    mean = lp_integral(a, b, scale, zero_point, spec.qmin, spec.qmax, p) / mx.where(width > 0, width, 1.0)
    k = mx.clip(mx.round(a / scale) + zero_point, spec.qmin, spec.qmax)
    point = mx.abs(a - (k - zero_point) * scale) ** p  # zero-width bins hold their values at one point
    return sum_last(counts * mx.where(width > 0, mean, point))


def histogram_minmax_range(counts, edges) -> tuple[mx.array, mx.array]:
    """The lower edge of each histogram's first non-empty bin and the upper edge of its last."""
    shape = _batch_shape_of(counts)
    lo, hi = _minmax(*_histograms(counts, edges))
    return lo.reshape(shape), hi.reshape(shape)


def _minmax(counts: mx.array, edges: mx.array) -> tuple[mx.array, mx.array]:
    """histogram_minmax_range of validated counts (H, B) and edges (1 or H, B + 1): (H,) each."""
    filled = counts > 0
    bins = counts.shape[-1]
    first = mx.argmax(filled, axis=-1)
    last = bins - 1 - mx.argmax(filled[..., ::-1], axis=-1)
    edges = mx.broadcast_to(edges, (counts.shape[0], bins + 1))
    lo = mx.take_along_axis(edges, first[:, None], axis=-1)[:, 0]
    hi = mx.take_along_axis(edges, last[:, None] + 1, axis=-1)[:, 0]
    return lo, hi


def histogram_percentile_range(counts, edges, lower: float, upper: float) -> tuple[mx.array, mx.array]:
    """The `lower` and `upper` percentiles (0..100) of each histogram, values spread evenly over their bins: the
    inverse of the piecewise-linear CDF through (edges, cumulative counts); 0 and 100 give the min-max range."""
    if not (0.0 <= lower <= upper <= 100.0):
        raise ValueError(f"needs 0 <= lower <= upper <= 100, got lower={lower!r}, upper={upper!r}")
    shape = _batch_shape_of(counts)
    counts, edges = _histograms(counts, edges)
    h, bins = counts.shape
    first = _minmax(counts, edges)[0][:, None]
    edges = mx.broadcast_to(edges, (h, bins + 1))
    cdf = mx.concatenate([mx.zeros((h, 1)), mx.cumsum(counts, axis=-1)], axis=-1)  # (H, B + 1)

    def inverse(q):
        target = cdf[:, -1:] * (q / 100.0)  # (H, 1)
        # the bin in which the CDF reaches the target: after the last edge strictly below it
        j = mx.clip(mx.sum(cdf < target, axis=-1, keepdims=True) - 1, 0, bins - 1)
        c0, c1 = mx.take_along_axis(cdf, j, axis=-1), mx.take_along_axis(cdf, j + 1, axis=-1)
        e0, e1 = mx.take_along_axis(edges, j, axis=-1), mx.take_along_axis(edges, j + 1, axis=-1)
        t = mx.where(c1 > c0, (target - c0) / mx.where(c1 > c0, c1 - c0, 1.0), 0.0)
        return mx.where(target > 0, e0 + t * (e1 - e0), first).reshape(shape)  # q = 0: the first filled edge

    return inverse(lower), inverse(upper)


def histogram_mse_search(counts, edges, spec: QuantSpec, p: float = P_DEFAULT, num: int = NUM_DEFAULT,
                         candidates: str = "taq-dit") -> QParams:
    """`mse_search` on histograms: the same candidates (from each histogram's min-max range,
    `histogram_minmax_range`; one-sided decided per histogram) and the argmin of `histogram_lp_error` among
    them, ties to the first.

    Brute force over candidates x bins, which is cheap at histogram sizes (8 bits: 25,600 candidates x 513 edges).
    """
    if candidates not in CANDIDATES:
        raise ValueError(f"histogram_mse_search: candidates must be one of {CANDIDATES}, got {candidates!r}")
    counts_in = counts
    counts, edges = _histograms(counts, edges)
    lo, hi = _minmax(counts, edges)
    # (H, num), (H or 1, num, Zc)
    scales, zero_points = search_candidates(lo, hi, spec, num, candidates, per_row_side=True)
    h, zc = counts.shape[0], zero_points.shape[-1]
    edges = mx.broadcast_to(edges, (h, counts.shape[-1] + 1))
    filled = np.nonzero(np.array(mx.any(counts > 0, axis=0)))[0]  # empty bins add nothing: leave them out
    counts = counts[:, mx.array(filled)]
    a, b = edges[:, mx.array(filled)], edges[:, mx.array(filled + 1)]
    best = mx.full((h,), mx.inf)
    best_scale, best_zero = mx.zeros((h,)), mx.zeros((h,))
    rows_per = max(1, _CHUNK // (zc * filled.size))
    for i in range(num):  # ascending width, so a strict < keeps the first of ties
        s = scales[:, i]
        z = mx.broadcast_to(zero_points[:, i], (h, zc))
        errs = []
        for start in range(0, h, rows_per):
            part = slice(start, start + rows_per)
            errs.append(_bin_errors(counts[part, None, :], a[part, None, :], b[part, None, :], s[part, None, None],
                                    z[part, :, None], spec, p))  # (rows, Zc)
        errs = mx.concatenate(errs)
        j = mx.argmin(errs, axis=-1)
        e = mx.take_along_axis(errs, j[:, None], axis=-1)[:, 0]
        better = e < best
        best = mx.where(better, e, best)
        best_scale = mx.where(better, s, best_scale)
        best_zero = mx.where(better, mx.take_along_axis(z, j[:, None], axis=-1)[:, 0], best_zero)
        mx.eval(best, best_scale, best_zero)
    shape = _batch_shape_of(counts_in)
    return QParams(best_scale.reshape(shape), best_zero.reshape(shape))


def histogram_observe(counts, edges, spec: QuantSpec, method: str = "minmax", *, lower: float | None = None,
                      upper: float | None = None, p: float = P_DEFAULT, num: int = NUM_DEFAULT,
                      candidates: str = "taq-dit") -> QParams:
    """The grid of each histogram by `method`: "minmax", "percentile" (needs lower, upper) or "mse"."""
    shape = _batch_shape_of(counts)
    if method == "minmax":
        lo, hi = histogram_minmax_range(counts, edges)
    elif method == "percentile":
        if lower is None or upper is None:
            raise ValueError("histogram_observe(method='percentile') needs lower= and upper= percentiles")
        lo, hi = histogram_percentile_range(counts, edges, lower, upper)
    elif method == "mse":
        return histogram_mse_search(counts, edges, spec, p=p, num=num, candidates=candidates)
    else:
        raise ValueError(f"histogram_observe: method must be 'minmax', 'percentile' or 'mse', got {method!r}")
    return QParams(*(a.reshape(shape) for a in grid_from_range(lo, hi, spec)))


def _batch_shape_of(counts) -> tuple[int, ...]:
    return tuple(np.shape(counts)[:-1])


def _batch_shape(params: QParams) -> tuple[int, ...]:
    return tuple(params.scale.shape)


def _histograms(counts, edges) -> tuple[mx.array, mx.array]:
    """counts as (H, B) float32 and edges as (1 or H, B + 1), validated."""
    counts_np, edges_np = np.asarray(counts, np.float64), np.asarray(edges, np.float64)
    if counts_np.ndim < 1 or counts_np.shape[-1] < 1:
        raise ValueError(f"histogram counts need shape (..., bins), got {counts_np.shape}")
    bins = counts_np.shape[-1]
    if edges_np.shape != (bins + 1,) and edges_np.shape != counts_np.shape[:-1] + (bins + 1,):
        raise ValueError(f"histogram edges need shape ({bins + 1},) or {counts_np.shape[:-1] + (bins + 1,)}, "
                         f"got {edges_np.shape}")
    if not (np.all(np.isfinite(counts_np)) and np.all(np.isfinite(edges_np))):
        raise ValueError("histogram counts and edges must be finite")
    if np.any(counts_np < 0):
        raise ValueError("histogram counts must be non-negative")
    if np.any(np.diff(edges_np, axis=-1) < 0):
        raise ValueError("histogram edges must not decrease")
    if np.any(counts_np.sum(axis=-1) <= 0):
        raise ValueError("every histogram needs a positive total count")
    counts = mx.array(counts_np.reshape(-1, bins), dtype=mx.float32)
    edges = mx.array(edges_np.reshape(-1, bins + 1), dtype=mx.float32)
    return counts, edges
