"""TaQ-DiT's observations on post-GELU activations (arXiv:2411.14172) as measured numbers with thresholds.

Every claim is one number per layer, computed from the statistics arrays (`ActivationStats.to_arrays()`, a stats
file's `.arrays`) by a pure NumPy function below; a claim *holds* for a layer when its number is >= the claim's
threshold. `THRESHOLDS` is the one place the thresholds live, each with the observation it encodes.
`measure(arrays, layer, claim)` gives a `Measurement` (value, threshold, holds, a note with the supporting
numbers); `measure_all(arrays)` does every claim for every layer.

Quantization error is estimated from the stored histograms: each bin's values are taken as spread evenly over
the bin and the squared error of uniform fake quantization is integrated over it exactly (`binned_mse`). Taking
the bin centres as the values instead is wrong at 8 bits: the pocket model's 8-bit step (about 0.02) is smaller
than the histogram's bin width (16 / 512 = 0.031), and centre errors alias with the grid (one layer came out with
per-timestep ranges 0.63x "better" than a shared range that contains them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from taq.report.summary import (
    channel_ranges, histogram_quantile, layer_names, nan_max, nan_min, outlier_channels,
)

OUTLIER_FRACTION = 0.02  # the seed's "top 2%"; TaQ-DiT's own lists mark 5.4%-21.7% of DiT-XL/2's FFN channels
MEAN_SHIFT_FRACTION = 0.02  # "some channels": the top 2% of channels by mean shift
RANGE_QUANTILES = (0.001, 0.999)  # the per-timestep range p0.1 .. p99.9
WASTED_LEVELS_BITS = 8


@dataclass(frozen=True)
class Threshold:
    value: float
    measure: str  # what the number is
    observation: str  # what TaQ-DiT observed that this threshold encodes


THRESHOLDS: dict[str, Threshold] = {
    "asymmetry_ratio": Threshold(
        10.0, "max / |min| of the layer over all timesteps and channels",
        "Post-GELU activations are asymmetric: the negative side is bounded by GELU's minimum (about -0.17) while "
        "the positive tail is long, so max / |min| is at least 10."),
    "asymmetry_wasted_levels": Threshold(
        0.45, "fraction of a symmetric signed 8-bit grid over [-max, max] (255 levels) lying below the layer's min",
        "Because of that asymmetry a symmetric quantizer wastes its negative half: at least 45% of the levels of a "
        "symmetric 8-bit grid lie below every observed value (a perfectly one-sided layer wastes 127/255 = 50%)."),
    "temporal_range_drift": Threshold(
        1.5, "largest / smallest per-timestep range p0.1 .. p99.9 (from the histograms)",
        "Post-GELU activation ranges vary across denoising timesteps: the widest timestep's range is at least 1.5x "
        "the narrowest's, so one static range fits some timesteps badly."),
    "temporal_mean_shift": Threshold(
        1.0, "mean shift over time (max_t - min_t of a channel's mean, in units of its RMS within-timestep std) "
             "reached by the top 2% of channels",
        "Activation distributions drift with the timestep, channel by channel (TaQ-DiT's momentum-based shifting "
        "tracks a per-channel centre over time): some channels' means move by at least one standard deviation."),
    "channel_outliers": Threshold(
        2.0, "smallest range among the top 2% of channels by range / median channel range (range: max over "
             "timesteps of the max minus min over timesteps of the min)",
        "A few channels have much wider ranges than the rest (TaQ-DiT's reconstruction-driven migration gives "
        "them their own scale): every one of the top 2% spans at least 2x the median channel's range."),
    "time_aware_mse_8bit": Threshold(
        1.1, "MSE of 8-bit fake quantization with one range shared by all timesteps / with one range per timestep",
        "Time-aware quantization pays off: a range per timestep cuts the 8-bit quantization MSE by at least 10% "
        "against one shared range, both ranges chosen to minimize MSE."),
    "time_aware_mse_4bit": Threshold(
        1.1, "MSE of 4-bit fake quantization with one range shared by all timesteps / with one range per timestep",
        "The same at 4 bits: a range per timestep cuts the MSE by at least 10%."),
}
CLAIMS: tuple[str, ...] = tuple(THRESHOLDS)
CLAIM_BITS = {"time_aware_mse_8bit": 8, "time_aware_mse_4bit": 4}


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


def per_timestep_ranges(hist: np.ndarray, bin_edges: np.ndarray, quantiles=RANGE_QUANTILES,
                        underflow=0, overflow=0) -> np.ndarray:
    """(T,) width of the quantile range of each timestep's histogram (T, bins); NaN for empty timesteps, inf
    when a quantile falls outside the histogram range."""
    lo_q, hi_q = quantiles
    if not 0 <= lo_q < hi_q <= 1:
        raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
    low = histogram_quantile(hist, bin_edges, lo_q, underflow=underflow, overflow=overflow)
    high = histogram_quantile(hist, bin_edges, hi_q, underflow=underflow, overflow=overflow)
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


# --------------------------------------------------------------------------- quantization error


def _check_grid(lo, hi, bits) -> None:
    if not (isinstance(bits, (int, np.integer)) and bits >= 1):
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
    if not np.all(np.asarray(hi) > np.asarray(lo)):
        raise ValueError(f"quantization range needs hi > lo, got lo={lo}, hi={hi}")


def fake_quantize(x: np.ndarray, lo, hi, bits: int) -> np.ndarray:
    """Uniform (asymmetric) fake quantization: clip to [lo, hi] and round to the nearest of 2**bits levels
    lo + k * (hi - lo) / (2**bits - 1)."""
    _check_grid(lo, hi, bits)
    step = (np.asarray(hi, np.float64) - lo) / (2**bits - 1)
    return lo + step * np.round((np.clip(x, lo, hi) - lo) / step)


def _squared_error_integral(x: np.ndarray, lo, hi, bits: int) -> np.ndarray:
    """F(x) = integral of (u - fake_quantize(u))^2 du from lo to x (negative below lo), in closed form.

    With step s and k the level nearest to x (clipped to 0 .. n), r = x - (lo + k s): every full cell around a
    level contributes s^3 / 12 and the two half cells at the ends s^3 / 24 each, so F = k s^3 / 12 + r^3 / 3;
    beyond the range (clipping) the error grows linearly and the same formula holds with r = x - hi or x - lo.
    """
    n = 2**bits - 1
    step = (hi - lo) / n
    k = np.clip(np.floor((x - lo) / step + 0.5), 0, n)
    r = x - (lo + k * step)
    return k * step**3 / 12 + r**3 / 3


def binned_squared_errors(bin_edges: np.ndarray, lo, hi, bits: int) -> np.ndarray:
    """(..., bins) mean squared quantization error of a value spread evenly over each bin; lo and hi broadcast
    against a leading shape (trailing axis 1)."""
    _check_grid(lo, hi, bits)
    edges = np.asarray(bin_edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bin_edges must be 1-D and strictly increasing, got shape {edges.shape}")
    integral = _squared_error_integral(edges, np.asarray(lo, np.float64), np.asarray(hi, np.float64), bits)
    return np.diff(integral, axis=-1) / np.diff(edges)


def binned_mse(hist: np.ndarray, bin_edges: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """(...) MSE of fake-quantizing the values binned in hist (..., bins) on [lo, hi]; NaN for empty rows."""
    hist = np.asarray(hist, dtype=np.float64)
    errors = binned_squared_errors(bin_edges, lo, hi, bits)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (hist * errors).sum(axis=-1) / hist.sum(axis=-1)


@dataclass(frozen=True)
class TimeAwareMSE:
    """Quantization MSE of one layer with one range for all timesteps vs one range per timestep.

    Ranges are [lo, hi]: lo is the lower edge of the layer's lowest occupied bin (post-GELU: GELU's floor, the
    same at every timestep); hi is chosen to minimize the MSE among the upper edges of the occupied bins, once for
    all timesteps together (`shared_hi`) and once per timestep (`per_timestep_hi`). Both choose from the same
    candidates, so the per-timestep MSE is never above the shared one.
    """

    bits: int
    lo: float
    shared_hi: float
    per_timestep_hi: np.ndarray  # (T,), NaN where a timestep has no data
    shared_mse: float
    per_timestep_mse: float

    @property
    def ratio(self) -> float:
        if self.per_timestep_mse == 0:
            return float("inf") if self.shared_mse > 0 else float("nan")
        return self.shared_mse / self.per_timestep_mse


def time_aware_mse(hist: np.ndarray, bin_edges: np.ndarray, bits: int) -> TimeAwareMSE:
    """Shared vs per-timestep range MSE of `bits`-bit fake quantization of the values in hist (T, bins)."""
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(bin_edges, dtype=np.float64)
    if hist.ndim != 2 or edges.shape != (hist.shape[1] + 1,):
        raise ValueError(f"expected hist (T, bins) and bin_edges (bins + 1,), got {hist.shape} and {edges.shape}")
    occupied = np.flatnonzero(hist.sum(axis=0) > 0)
    if occupied.size == 0:
        raise ValueError("the histogram is empty: no values to quantize")
    lo = float(edges[occupied[0]])
    candidates = edges[occupied + 1]  # (H,) each > lo
    errors = binned_squared_errors(edges, lo, candidates[:, None], bits)  # (H, bins)
    totals = hist @ errors.T  # (T, H): summed squared error of each timestep under each candidate
    count = hist.sum()
    shared = totals.sum(axis=0)  # same reduction order as below, so per-timestep <= shared holds exactly
    per_timestep = totals.min(axis=1, keepdims=True).sum(axis=0)[0]
    has_data = hist.sum(axis=1) > 0
    return TimeAwareMSE(bits=bits, lo=lo, shared_hi=float(candidates[shared.argmin()]),
                        per_timestep_hi=np.where(has_data, candidates[totals.argmin(axis=1)], np.nan),
                        shared_mse=float(shared.min() / count), per_timestep_mse=float(per_timestep / count))


# --------------------------------------------------------------------------- histogram distance


def wasserstein_distance(p: np.ndarray, q: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """(...) earth mover's distance between histograms p and q (..., bins) over the same bins, each normalized
    to total 1, with every bin's mass at its centre: sum over bins of |CDF_p - CDF_q| x distance to the next
    centre. In the activation's units; robust to tiny shifts, unlike bin-by-bin distances."""
    p, q = (np.asarray(a, dtype=np.float64) for a in (p, q))
    edges = np.asarray(bin_edges, dtype=np.float64)
    if p.shape != q.shape or edges.shape != (p.shape[-1] + 1,):
        raise ValueError(f"histograms {p.shape} and {q.shape} do not share bins with edges {edges.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf_gap = np.cumsum(p / p.sum(axis=-1, keepdims=True) - q / q.sum(axis=-1, keepdims=True), axis=-1)
    centres = (edges[:-1] + edges[1:]) / 2
    return np.abs(cdf_gap[..., :-1]) @ np.diff(centres)


# --------------------------------------------------------------------------- per layer


@dataclass(frozen=True)
class Measurement:
    claim: str
    layer: str
    value: float
    threshold: float
    note: str

    @property
    def holds(self) -> bool:
        return bool(self.value >= self.threshold)  # NaN never holds


def _measure_value(arrays: dict, i: int, claim: str) -> tuple[float, str]:
    lowest, highest = float(nan_min(arrays["min"][i])), float(nan_max(arrays["max"][i]))
    if claim == "asymmetry_ratio":
        return asymmetry_ratio(lowest, highest), f"min {lowest:.4g}, max {highest:.4g}"
    if claim == "asymmetry_wasted_levels":
        value = wasted_levels_fraction(lowest, highest)
        levels = 2**WASTED_LEVELS_BITS - 1
        return value, f"{round(value * levels)} of {levels} levels lie below min {lowest:.4g} (max {highest:.4g})"
    timesteps = np.asarray(arrays["timesteps"], dtype=np.float64)
    if claim == "temporal_range_drift":
        ranges = per_timestep_ranges(arrays["hist"][i], arrays["bin_edges"],
                                     underflow=arrays["underflow"][i], overflow=arrays["overflow"][i])
        if np.isnan(ranges).all():
            return float("nan"), "no timestep has data"
        narrow, wide = np.nanargmin(ranges), np.nanargmax(ranges)
        return temporal_range_factor(ranges), (f"p0.1..p99.9 range {ranges[narrow]:.4g} at t={timesteps[narrow]:.4g}"
                                               f" to {ranges[wide]:.4g} at t={timesteps[wide]:.4g}")
    if claim == "temporal_mean_shift":
        shifts = channel_mean_shifts(arrays["mean"][i], arrays["std"][i])
        if np.isnan(shifts).all():
            return float("nan"), "no channel has data"
        top = int(np.nanargmax(shifts))
        k = max(1, math.ceil(MEAN_SHIFT_FRACTION * shifts.size))
        return top_fraction_floor(shifts, MEAN_SHIFT_FRACTION), (
            f"top {k} of {shifts.size} channels; largest shift {shifts[top]:.3g} std (channel {top})")
    if claim == "channel_outliers":
        ranges = channel_ranges(arrays, i)
        if not np.isfinite(ranges).any():
            return float("nan"), "no channel has data"
        multiple = THRESHOLDS["channel_outliers"].value
        return outlier_ratio(ranges), (f"outlier fraction (range > {multiple:g}x median {np.nanmedian(ranges):.3g}):"
                                       f" {outlier_fraction(ranges, multiple):.1%} of {ranges.size} channels")
    if claim in CLAIM_BITS:
        hist = np.asarray(arrays["hist"][i])
        if hist.sum() == 0:
            return float("nan"), "empty histogram"
        result = time_aware_mse(hist, arrays["bin_edges"], CLAIM_BITS[claim])
        outside = int(np.sum(arrays["underflow"][i]) + np.sum(arrays["overflow"][i]))
        note = (f"MSE {result.shared_mse:.3g} shared (range {result.lo:.3g}..{result.shared_hi:.3g}) vs "
                f"{result.per_timestep_mse:.3g} per timestep (hi {np.nanmin(result.per_timestep_hi):.3g}.."
                f"{np.nanmax(result.per_timestep_hi):.3g})")
        if outside:
            note += f"; {outside} values outside the histogram range not counted"
        return result.ratio, note
    raise ValueError(f"unknown claim {claim!r}; known claims: {', '.join(CLAIMS)}")


def measure(arrays: dict, layer: str, claim: str) -> Measurement:
    """One claim's measurement for one layer of the statistics arrays."""
    names = layer_names(arrays)
    if layer not in names:
        raise ValueError(f"unknown layer {layer!r}; these statistics hold {', '.join(names)}")
    if claim not in THRESHOLDS:
        raise ValueError(f"unknown claim {claim!r}; known claims: {', '.join(CLAIMS)}")
    with np.errstate(invalid="ignore", divide="ignore"):
        value, note = _measure_value(arrays, names.index(layer), claim)
    return Measurement(claim, layer, float(value), THRESHOLDS[claim].value, note)


def measure_all(arrays: dict) -> list[Measurement]:
    """Every claim for every layer, claim-major."""
    return [measure(arrays, layer, claim) for claim in CLAIMS for layer in layer_names(arrays)]
