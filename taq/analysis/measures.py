"""The quantities behind the claims and the summary table, one definition each (pure NumPy).

Asymmetry (max / |min|, wasted levels of a symmetric grid), temporal drift (per-timestep range ratio, per-channel
mean shift) and channel outliers (ratio, fraction, which channels). The report and the claims take their numbers
from here, so one name always means one number.
"""

from __future__ import annotations

import math

import numpy as np

from taq.analysis.cells import histogram_quantile, nan_max, nan_min

OUTLIER_FRACTION = 0.02  # the seed's "top 2%"; TaQ-DiT's own lists mark 5.4%-21.7% of DiT-XL/2's FFN channels
MEAN_SHIFT_FRACTION = 0.02  # "some channels": the top 2% of channels by mean shift
RANGE_QUANTILES = (0.001, 0.999)  # the per-timestep range p0.1 .. p99.9
WASTED_LEVELS_BITS = 8
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the outer edges of the statistics' end bins


# --------------------------------------------------------------------------- one layer of the statistics


def layer_extremes(arrays: dict, layer: int) -> tuple[float, float]:
    """(min, max) of one layer over all its timesteps and channels; NaN when it has no data."""
    return float(nan_min(arrays["min"][layer])), float(nan_max(arrays["max"][layer]))


def layer_clipped_extremes(arrays: dict, layer: int) -> tuple[float, float]:
    """(p0.1, p99.9) of one layer over all its timesteps and channels, from its summed histograms (kept within
    the exact min and max): the range a percentile observer would clip to. NaN when it has no data."""
    lowest, highest = layer_extremes(arrays, layer)
    low, high = histogram_quantile(np.asarray(arrays["hist"][layer]).sum(axis=0), arrays["bin_edges"],
                                   np.array(RANGE_QUANTILES), lowest, highest)
    return float(low), float(high)


def layer_timestep_ranges(arrays: dict, layer: int) -> np.ndarray:
    """(T,) one layer's per-timestep p0.1 .. p99.9 range, from its histograms (`per_timestep_ranges`), each
    quantile kept within the timestep's exact min and max."""
    return per_timestep_ranges(arrays["hist"][layer], arrays["bin_edges"], lowest=nan_min(arrays["min"][layer], -1),
                               highest=nan_max(arrays["max"][layer], -1))


# --------------------------------------------------------------------------- asymmetry


def asymmetry_ratio(lowest: float, highest: float) -> float:
    """highest / |lowest|; inf when nothing is negative (lowest >= 0 < highest), NaN for NaN input."""
    if math.isnan(lowest) or math.isnan(highest):
        return float("nan")
    if lowest > highest:
        raise ValueError(f"lowest {lowest} is above highest {highest}")
    if lowest >= 0:
        return float("inf") if highest > 0 else float("nan")
    return highest / -lowest


def symmetric_levels(magnitude: float, bits: int) -> np.ndarray:
    """(2**bits - 1,) levels of a signed symmetric grid over [-magnitude, magnitude], zero included."""
    if not (isinstance(bits, (int, np.integer)) and bits >= 2):
        raise ValueError(f"a signed grid needs an integer bits >= 2, got {bits!r}")
    n = 2 ** (bits - 1) - 1
    return np.arange(-n, n + 1) / n * magnitude  # k / n first: the end levels are exactly +-magnitude


def wasted_levels_fraction(lowest: float, highest: float, bits: int = WASTED_LEVELS_BITS) -> float:
    """Fraction of the levels of a symmetric signed `bits`-bit grid over [-M, M], M = max(|lowest|, |highest|),
    that lie strictly below `lowest`: levels no observed value can round to."""
    if math.isnan(lowest) or math.isnan(highest):
        return float("nan")
    if lowest > highest:
        raise ValueError(f"lowest {lowest} is above highest {highest}")
    magnitude = max(abs(lowest), abs(highest))
    if magnitude == 0:
        return float("nan")
    levels = symmetric_levels(magnitude, bits)
    return float(np.count_nonzero(levels < lowest) / levels.size)


# --------------------------------------------------------------------------- temporal drift


def per_timestep_ranges(hist: np.ndarray, bin_edges: np.ndarray, quantiles=RANGE_QUANTILES, lowest=None,
                        highest=None) -> np.ndarray:
    """(T,) width of the quantile range of each timestep's histogram (T, bins); NaN for empty timesteps.
    `lowest` / `highest` (T,): the exact extremes, see `histogram_quantile`."""
    lo_q, hi_q = quantiles
    if not 0 <= lo_q < hi_q <= 1:
        raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
    low = histogram_quantile(hist, bin_edges, lo_q, lowest, highest)
    high = histogram_quantile(hist, bin_edges, hi_q, lowest, highest)
    return high - low


def temporal_range_factor(ranges: np.ndarray) -> float:
    """Largest / smallest of the per-timestep ranges that have data (NaN entries skipped)."""
    ranges = np.asarray(ranges, dtype=np.float64)
    ranges = ranges[~np.isnan(ranges)]
    if ranges.size == 0:
        return float("nan")
    if np.any(ranges < 0):
        raise ValueError(f"ranges must be >= 0, got {ranges.min()}")
    smallest = ranges.min()
    return float(ranges.max() / smallest) if smallest > 0 else float("inf")


def top_fraction_floor(values: np.ndarray, fraction: float) -> float:
    """The smallest value among the top ceil(fraction * n) of the finite `values` (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    values = np.asarray(values, dtype=np.float64)
    finite = np.sort(values[~np.isnan(values)])[::-1]
    if finite.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * values.size))
    return float(finite[min(k, finite.size) - 1])


def channel_mean_shifts(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(C,) per channel: (max over timesteps - min over timesteps) of its mean (T, C), divided by the root mean
    square over timesteps of its std (T, C). A constant channel (std 0) that still moves is inf; one that never
    moves is 0; a channel without data is NaN."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if mean.shape != std.shape or mean.ndim != 2:
        raise ValueError(f"mean and std must both be (T, C), got {mean.shape} and {std.shape}")
    shift = nan_max(mean, axis=0) - nan_min(mean, axis=0)
    filled = ~np.isnan(mean) & ~np.isnan(std)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.sqrt(np.where(filled, std**2, 0.0).sum(axis=0) / filled.sum(axis=0))
        result = shift / spread
    return np.where(shift == 0, 0.0, result)


# --------------------------------------------------------------------------- channel outliers


def outlier_ratio(ranges: np.ndarray, fraction: float = OUTLIER_FRACTION) -> float:
    """Smallest range among the top `fraction` of channels by range / the median channel range."""
    ranges = np.asarray(ranges, dtype=np.float64)
    if not np.isfinite(ranges).any():
        return float("nan")
    widest = ranges[outlier_channels(ranges, fraction)]
    median = float(np.nanmedian(ranges))
    return float(widest.min() / median) if median > 0 else float("inf")


def outlier_fraction(ranges: np.ndarray, multiple: float) -> float:
    """Fraction of the channels with data whose range exceeds `multiple` x the median channel range."""
    ranges = np.asarray(ranges, dtype=np.float64)
    ranges = ranges[np.isfinite(ranges)]
    if ranges.size == 0:
        return float("nan")
    return float(np.count_nonzero(ranges > multiple * np.median(ranges)) / ranges.size)


def outlier_channels(ranges: np.ndarray, fraction: float = OUTLIER_FRACTION) -> np.ndarray:
    """Indices of the ceil(fraction * C) channels with the widest finite range (at least one unless none is
    finite), widest first."""
    if not 0 < fraction <= 1:
        raise ValueError(f"outlier fraction must lie in (0, 1], got {fraction}")
    finite = np.flatnonzero(np.isfinite(ranges))
    k = min(max(1, math.ceil(fraction * ranges.shape[0])), finite.size)
    return finite[np.argsort(-ranges[finite], kind="stable")[:k]]


# --------------------------------------------------------------------------- histogram distance


def wasserstein_distance(p: np.ndarray, q: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """(...) earth mover's distance between histograms p and q (..., bins) over the same bins, each normalized
    to total 1, with every bin's mass at its centre: sum over bins of |CDF_p - CDF_q| x distance to the next
    centre. In the activation's units; robust to tiny shifts, unlike bin-by-bin distances. An end bin that reaches
    float32's max (the statistics' catch-all bins) has its mass at its finite edge: a centre near 1e38 would turn
    the CDFs' rounding into astronomic distances."""
    p, q = (np.asarray(a, dtype=np.float64) for a in (p, q))
    edges = np.array(bin_edges, dtype=np.float64)
    if edges.size > 2:
        edges[0], edges[-1] = (edges[1] if edges[0] <= -FLOAT32_MAX else edges[0],
                               edges[-2] if edges[-1] >= FLOAT32_MAX else edges[-1])
    if p.shape != q.shape or edges.shape != (p.shape[-1] + 1,):
        raise ValueError(f"histograms {p.shape} and {q.shape} do not share bins with edges {edges.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf_gap = np.cumsum(p / p.sum(axis=-1, keepdims=True) - q / q.sum(axis=-1, keepdims=True), axis=-1)
    centres = (edges[:-1] + edges[1:]) / 2
    return np.abs(cdf_gap[..., :-1]) @ np.diff(centres)
