"""Reading the statistics arrays: layer names and order, and per-(layer, timestep) aggregates.

Everything here reads the arrays of `ActivationStats.to_arrays()` (`stats_arrays` accepts a stats file, the
container or the dict): per-channel statistics (L, T, C) with NaN where a channel saw no finite value, histograms
(L, T, bins) over fixed edges that hold every finite value, counters (L, T). Cells without data give NaN, never an
exception. Pure NumPy.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

LAYER_NAME = re.compile(r"mm_(\d+)_(img|txt)(?::(?:cond|uncond))?")  # a CFG branch of a layer keeps its stream


# --------------------------------------------------------------------------- input


def stats_arrays(stats) -> dict[str, np.ndarray]:
    """The to_arrays() dict of a stats file (`.arrays`), an ActivationStats (`.to_arrays()`) or the dict itself."""
    if isinstance(stats, dict):
        arrays = stats
    elif hasattr(stats, "arrays"):
        arrays = stats.arrays
    elif hasattr(stats, "to_arrays"):
        arrays = stats.to_arrays()
    else:
        raise ValueError(f"expected a stats file, ActivationStats or its arrays, got {type(stats).__name__}")
    missing = [k for k in ("layers", "timesteps", "count", "mean", "m2", "min", "max", "hist", "bin_edges",
                           "negative", "zero") if k not in arrays]
    if missing:
        raise ValueError(f"activation stats arrays lack {missing}")
    return arrays


def layer_names(arrays: dict) -> list[str]:
    return [str(name) for name in np.asarray(arrays["layers"]).reshape(-1)]


def select_layers(arrays: dict, layers: Sequence[str] | None) -> list[int]:
    """Row indices of `layers` (a name or names; all layers when None), in the order given; unknown names raise
    ValueError listing the known ones."""
    known = layer_names(arrays)
    if layers is None:
        return list(range(len(known)))
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; these stats hold: {', '.join(known) or 'no layers'}")
    return [known.index(name) for name in dict.fromkeys(layers)]


def layer_stream(name: str) -> str:
    """'img' or 'txt' for names like mm_03_img; 'other' for anything else."""
    match = LAYER_NAME.fullmatch(name)
    return match.group(2) if match else "other"


def layer_block(name: str, fallback: int) -> int:
    match = LAYER_NAME.fullmatch(name)
    return int(match.group(1)) if match else fallback


def display_order(names: Sequence[str]) -> list[int]:
    """Indices ordering layers image stream first, then text, then others; by block within a stream."""
    rank = {"img": 0, "txt": 1, "other": 2}
    return sorted(range(len(names)), key=lambda i: (rank[layer_stream(names[i])], layer_block(names[i], i), i))



# --------------------------------------------------------------------------- percentiles from histograms


def histogram_quantile(hist, bin_edges, q, lowest=None, highest=None) -> np.ndarray:
    """Quantile q in [0, 1] of the values binned in `hist` (..., bins), interpolating linearly inside a bin.

    Values are taken as spread evenly over their bin (bins of any widths): the result for q is where the
    cumulative count reaches q * N. `lowest` / `highest` (shape of hist[..., 0]), the exact extremes of the binned
    values where known, keep the result within them: interpolating inside the first and last occupied bins can
    overshoot, most of all in the end bins that reach float32's max. NaN where the histogram is empty. Shape:
    broadcast of hist[..., 0] and q.
    """
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(bin_edges, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if hist.ndim < 1 or edges.shape != (hist.shape[-1] + 1,):
        raise ValueError(f"bin_edges of shape {edges.shape} do not fit a histogram of shape {hist.shape}")
    if np.any((q < 0) | (q > 1)) or np.any(np.isnan(q)):
        raise ValueError(f"quantile levels must lie in [0, 1], got {q}")
    cum = np.cumsum(hist, axis=-1)  # (..., bins)
    total = cum[..., -1]
    target = np.broadcast_to(q * total, np.broadcast_shapes(total.shape, q.shape))  # rank in the hist
    cum_b = np.broadcast_to(cum, target.shape + cum.shape[-1:])
    # First bin whose cumulative count reaches the target; at target 0, the first non-empty bin.
    reached = np.where(target[..., None] > 0, cum_b < target[..., None], cum_b <= 0)
    b = np.minimum(reached.sum(axis=-1), hist.shape[-1] - 1)
    in_bin = np.take_along_axis(np.broadcast_to(hist, cum_b.shape), b[..., None], axis=-1)[..., 0]
    before = np.take_along_axis(cum_b, b[..., None], axis=-1)[..., 0] - in_bin
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.clip((target - before) / in_bin, 0.0, 1.0)
    value = edges[b] + fraction * (edges[b + 1] - edges[b])
    if lowest is not None:
        value = np.maximum(value, lowest)
    if highest is not None:
        value = np.minimum(value, highest)
    return np.where(total > 0, value, np.nan)


# --------------------------------------------------------------------------- per (layer, timestep) aggregates


def nan_min(values, axis=None) -> np.ndarray:
    """np.nanmin without the all-NaN warning: all-NaN or empty slices give NaN."""
    values = np.asarray(values, dtype=np.float64)
    lowest = np.min(np.where(np.isnan(values), np.inf, values), axis=axis, initial=np.inf)
    return np.where(np.all(np.isnan(values), axis=axis), np.nan, lowest)


def nan_max(values, axis=None) -> np.ndarray:
    """np.nanmax without the all-NaN warning: all-NaN or empty slices give NaN."""
    return -nan_min(-np.asarray(values, dtype=np.float64), axis=axis)


def pooled_moments(count: np.ndarray, mean: np.ndarray, m2: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of the union of the groups along `axis` (per-group count, mean, M2; NaN-safe)."""
    count = np.asarray(count, dtype=np.float64)
    mean, m2 = np.nan_to_num(mean), np.nan_to_num(m2)  # empty groups have count 0: they weigh nothing
    n = count.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        grand = (count * mean).sum(axis=axis) / n
        spread = (count * (mean - np.expand_dims(grand, axis)) ** 2).sum(axis=axis)
        std = np.sqrt((m2.sum(axis=axis) + spread) / n)
    return np.where(n > 0, grand, np.nan), np.where(n > 0, std, np.nan)


def cell_min(arrays: dict) -> np.ndarray:
    """(L, T) smallest finite activation of each cell."""
    return nan_min(arrays["min"], axis=-1)


def cell_max(arrays: dict) -> np.ndarray:
    """(L, T) largest finite activation of each cell."""
    return nan_max(arrays["max"], axis=-1)


def cell_moments(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    """(L, T) mean and std over all channels' values of each cell (pooled, not an average of channel stds)."""
    return pooled_moments(arrays["count"], arrays["mean"], arrays["m2"], axis=-1)


def cell_quantile(arrays: dict, q: float) -> np.ndarray:
    """(L, T) quantile q of each cell's histogram, kept within the cell's exact [min, max]."""
    return histogram_quantile(arrays["hist"], arrays["bin_edges"], q, cell_min(arrays), cell_max(arrays))


def cell_fraction(arrays: dict, counter: str) -> np.ndarray:
    """(L, T) fraction of each cell's finite values counted by `counter` ("negative": < 0, "zero": == 0)."""
    total = np.asarray(arrays["count"]).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, arrays[counter] / np.maximum(total, 1), np.nan)


def channel_ranges(arrays: dict, layer: int) -> np.ndarray:
    """(C,) each channel's span over the whole calibration set of one layer: max over timesteps of its max minus
    min over timesteps of its min (what one static per-channel quantization range must cover); NaN if empty."""
    return nan_max(arrays["max"][layer], axis=0) - nan_min(arrays["min"][layer], axis=0)
