"""Quantization error estimated from histograms: uniform fake quantization integrated exactly over each bin.

Each bin's values are taken as spread evenly over the bin and the squared error of uniform fake quantization is
integrated over it in closed form (`binned_mse`). Taking the bin centres as the values instead is wrong at 8 bits:
when the quantization step is smaller than the bin width, centre errors alias with the grid (one pocket layer came
out with per-timestep ranges 0.63x "better" than a shared range that contains them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    candidates, so the per-timestep MSE is never above the shared one. Given the layer's exact extremes, they
    replace the outer edges of the lowest and highest occupied bins (the values lie within them), so lo is the
    minimum itself and no value is spread over the part of an end bin it cannot be in.
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


@dataclass(frozen=True)
class _Candidates:
    """Every candidate range [lo, hi] of one layer and each timestep's summed squared error under it."""

    lo: float
    his: np.ndarray  # (H,)
    totals: np.ndarray  # (T, H)
    count: float
    bins: slice  # the occupied bins, first .. last
    errors: np.ndarray  # (H, occupied bins) mean squared error of a value spread over each bin, per candidate


def _candidate_totals(hist: np.ndarray, bin_edges: np.ndarray, bits: int, lowest: float | None,
                      highest: float | None) -> _Candidates:
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.array(bin_edges, dtype=np.float64)
    if hist.ndim != 2 or edges.shape != (hist.shape[1] + 1,):
        raise ValueError(f"expected hist (T, bins) and bin_edges (bins + 1,), got {hist.shape} and {edges.shape}")
    occupied = np.flatnonzero(hist.sum(axis=0) > 0)
    if occupied.size == 0:
        raise ValueError("the histogram is empty: no values to quantize")
    first, last = occupied[0], occupied[-1] + 1
    if lowest is not None and edges[first] < lowest < edges[first + 1]:
        edges[first] = lowest
    if highest is not None and edges[last - 1] < highest < edges[last]:
        edges[last] = highest
    lo = float(edges[first])
    candidates = edges[occupied + 1]  # (H,) each > lo
    # Bins outside [first, last) are empty at every timestep: leave them out of the (H, bins) error matrix.
    errors = binned_squared_errors(edges[first:last + 1], lo, candidates[:, None], bits)  # (H, last - first)
    return _Candidates(lo, candidates, hist[:, first:last] @ errors.T, float(hist.sum()), slice(first, last), errors)


def group_time_aware_totals(hist_groups: np.ndarray, bin_edges: np.ndarray, bits: int, lowest: float | None = None,
                            highest: float | None = None) -> np.ndarray:
    """(G, T, H) each group's summed squared error per timestep and candidate range, the candidates and lo those of
    all groups together (as `time_aware_mse` sees them): the error is linear in the histogram, so the totals of a
    resample that takes group g w_g times are sum_g w_g totals[g] (`time_aware_ratio`)."""
    hist_groups = np.asarray(hist_groups, dtype=np.float64)
    c = _candidate_totals(hist_groups.sum(axis=0), bin_edges, bits, lowest, highest)
    return hist_groups[..., c.bins] @ c.errors.T


def time_aware_ratio(totals: np.ndarray) -> float:
    """Shared over per-timestep MSE from (T, H) summed squared errors (the time-aware claims' number)."""
    shared, per_timestep = totals.sum(axis=0).min(), totals.min(axis=1).sum()
    if per_timestep == 0:
        return float("inf") if shared > 0 else float("nan")
    return float(shared / per_timestep)


def time_aware_mse(hist: np.ndarray, bin_edges: np.ndarray, bits: int, lowest: float | None = None,
                   highest: float | None = None) -> TimeAwareMSE:
    """Shared vs per-timestep range MSE of `bits`-bit fake quantization of the values in hist (T, bins), whose
    exact smallest and largest values are `lowest` and `highest` where known."""
    c = _candidate_totals(hist, bin_edges, bits, lowest, highest)
    shared = c.totals.sum(axis=0)  # same reduction order as below, so per-timestep <= shared holds exactly
    per_timestep = c.totals.min(axis=1, keepdims=True).sum(axis=0)[0]
    has_data = np.asarray(hist).sum(axis=1) > 0
    return TimeAwareMSE(bits=bits, lo=c.lo, shared_hi=float(c.his[shared.argmin()]),
                        per_timestep_hi=np.where(has_data, c.his[c.totals.argmin(axis=1)], np.nan),
                        shared_mse=float(shared.min() / c.count), per_timestep_mse=float(per_timestep / c.count))


def contiguous_groups(timesteps: int, groups: int) -> list[np.ndarray]:
    """`groups` runs of consecutive timestep indices 0 .. timesteps - 1, as equal in length as they can be."""
    if not 1 <= groups <= timesteps:
        raise ValueError(f"groups must be in 1 .. {timesteps} (the timesteps), got {groups}")
    return np.array_split(np.arange(timesteps), groups)


def grouped_mse(hist: np.ndarray, bin_edges: np.ndarray, bits: int, partitions: list[list[np.ndarray]],
                lowest: float | None = None, highest: float | None = None) -> np.ndarray:
    """(len(partitions),) MSE of `bits`-bit fake quantization with one MSE-optimal range per group of timesteps
    (rows of hist (T, bins)), for each partition of the timesteps. The one-group partition gives
    `time_aware_mse`'s shared MSE and the all-singletons one its per-timestep MSE; every group chooses from the
    same candidate ranges, so refining a partition never raises the MSE."""
    c = _candidate_totals(hist, bin_edges, bits, lowest, highest)
    return np.array([sum(c.totals[group].sum(axis=0).min() for group in partition) / c.count
                     for partition in partitions])
