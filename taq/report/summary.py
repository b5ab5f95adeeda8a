"""Numbers behind the report: per-(layer, timestep) aggregates, histogram percentiles, the per-layer summary table.

Everything here reads the arrays of `ActivationStats.to_arrays()` (`stats_arrays` accepts a stats file, the
container or the dict): per-channel statistics (L, T, C) with NaN where a channel saw no finite value, histograms
(L, T, bins) over a fixed range, counters (L, T). Cells without data give NaN, never an exception.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from taq.io import atomic_path

DEFAULT_OUTLIER_FRACTION = 0.02  # the seed's "top 2%" highlight; a display choice, not TaQ-DiT's number
LAYER_NAME = re.compile(r"mm_(\d+)_(img|txt)")


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
                           "negative", "underflow", "overflow") if k not in arrays]
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


def histogram_quantile(hist, bin_edges, q, *, underflow=0, overflow=0) -> np.ndarray:
    """Quantile q in [0, 1] of the values binned in `hist` (..., bins), interpolating linearly inside a bin.

    Values are taken as spread evenly over their bin: the result for q is where the cumulative count reaches
    q * N. With `underflow`/`overflow` counts (values below/above the histogram range, shape of hist[..., 0]),
    N includes them, and a quantile that falls among them is -inf/+inf (it lies outside the range). NaN where
    the histogram is empty. Shape: broadcast of hist[..., 0] and q.
    """
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(bin_edges, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if hist.ndim < 1 or edges.shape != (hist.shape[-1] + 1,):
        raise ValueError(f"bin_edges of shape {edges.shape} do not fit a histogram of shape {hist.shape}")
    if np.any((q < 0) | (q > 1)) or np.any(np.isnan(q)):
        raise ValueError(f"quantile levels must lie in [0, 1], got {q}")
    under = np.asarray(underflow, dtype=np.float64)
    over = np.asarray(overflow, dtype=np.float64)
    cum = np.cumsum(hist, axis=-1)  # (..., bins)
    inside = cum[..., -1]
    total = under + inside + over
    target = np.broadcast_to(q * total - under, np.broadcast_shapes(inside.shape, q.shape))  # rank in the hist
    cum_b = np.broadcast_to(cum, target.shape + cum.shape[-1:])
    # First bin whose cumulative count reaches the target; at target 0, the first non-empty bin.
    reached = np.where(target[..., None] > 0, cum_b < target[..., None], cum_b <= 0)
    b = np.minimum(reached.sum(axis=-1), hist.shape[-1] - 1)
    in_bin = np.take_along_axis(np.broadcast_to(hist, cum_b.shape), b[..., None], axis=-1)[..., 0]
    before = np.take_along_axis(cum_b, b[..., None], axis=-1)[..., 0] - in_bin
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.clip((target - before) / in_bin, 0.0, 1.0)
    value = edges[b] + fraction * (edges[b + 1] - edges[b])
    value = np.where(target < 0, -np.inf, np.where(target > inside, np.inf, value))
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
    """(L, T) quantile q of each cell's histogram, kept within the cell's exact [min, max] (interpolation inside
    the first and last occupied bins can overshoot them); -inf/+inf where q falls outside the histogram range."""
    value = histogram_quantile(arrays["hist"], arrays["bin_edges"], q,
                               underflow=arrays["underflow"], overflow=arrays["overflow"])
    lowest, highest = cell_min(arrays), cell_max(arrays)
    inside = np.isfinite(value) & np.isfinite(lowest) & np.isfinite(highest)
    return np.where(inside, np.clip(value, np.where(inside, lowest, 0), np.where(inside, highest, 0)), value)


def cell_negative_fraction(arrays: dict) -> np.ndarray:
    """(L, T) fraction of each cell's finite values that are < 0."""
    total = np.asarray(arrays["count"]).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, arrays["negative"] / np.maximum(total, 1), np.nan)


def channel_ranges(arrays: dict, layer: int) -> np.ndarray:
    """(C,) each channel's span over the whole calibration set of one layer: max over timesteps of its max minus
    min over timesteps of its min (what one static per-channel quantization range must cover); NaN if empty."""
    return nan_max(arrays["max"][layer], axis=0) - nan_min(arrays["min"][layer], axis=0)


def outlier_channels(ranges: np.ndarray, fraction: float = DEFAULT_OUTLIER_FRACTION) -> np.ndarray:
    """Indices of the ceil(fraction * C) channels with the widest finite range (at least one unless none is
    finite), widest first."""
    if not 0 < fraction <= 1:
        raise ValueError(f"outlier fraction must lie in (0, 1], got {fraction}")
    finite = np.flatnonzero(np.isfinite(ranges))
    k = min(max(1, math.ceil(fraction * ranges.shape[0])), finite.size)
    return finite[np.argsort(-ranges[finite], kind="stable")[:k]]


# --------------------------------------------------------------------------- per-layer summary


@dataclass(frozen=True)
class LayerSummary:
    """One layer over all its timesteps and channels (finite values only; NaN where there are none).

    - min, max: smallest and largest activation.
    - mean, std: mean and population standard deviation of all values (pooled over channels and timesteps).
    - negative_fraction: fraction of values < 0.
    - asymmetry: max / |min|; post-GELU values are bounded below by -0.17, so a large ratio means most of a
      symmetric quantization grid is wasted on the negative side.
    - outlier_ratio: mean range of the top `fraction` channels / median channel range, where a channel's range
      is its max over timesteps minus its min over timesteps (`channel_ranges`).
    - temporal_ratio: largest / smallest per-timestep range (max - min over the layer's channels at one
      timestep), over the timesteps with data: how far a single static range is from the per-step ones.
    """

    layer: str
    min: float
    max: float
    mean: float
    std: float
    negative_fraction: float
    asymmetry: float
    outlier_ratio: float
    temporal_ratio: float


COLUMN_NOTES = {
    "min": "smallest finite activation over all timesteps and channels",
    "max": "largest finite activation over all timesteps and channels",
    "mean": "mean of all values (pooled over channels and timesteps)",
    "std": "population standard deviation of all values (pooled)",
    "negative_fraction": "fraction of values < 0",
    "asymmetry": "max / |min|; post-GELU values stop near -0.17, so a large ratio means a range lopsided to the "
                 "positive side",
    "outlier_ratio": "mean range of the top {pct} channels / median channel range; a channel's range is its "
                     "max over timesteps minus its min over timesteps",
    "temporal_ratio": "largest / smallest per-timestep range (max - min over all channels at one timestep)",
}


def _ratio(numerator: float, denominator: float) -> float:
    if not (np.isfinite(numerator) and np.isfinite(denominator)):
        return float("nan")
    if denominator == 0:
        return float("inf") if numerator > 0 else float("nan")
    return float(numerator / denominator)


def summarize(stats, layers: Sequence[str] | None = None,
              outlier_fraction: float = DEFAULT_OUTLIER_FRACTION) -> list[LayerSummary]:
    """One LayerSummary per layer: all layers when `layers` is None (image stream, then text, by block), else
    those named, in the order given."""
    arrays = stats_arrays(stats)
    names = layer_names(arrays)
    order = display_order(names) if layers is None else select_layers(arrays, layers)
    rows = []
    with np.errstate(invalid="ignore", divide="ignore"):
        per_step_range = cell_max(arrays) - cell_min(arrays)  # (L, T)
    for i in order:
        lo, hi = float(nan_min(arrays["min"][i])), float(nan_max(arrays["max"][i]))
        mean, std = (float(v) for v in pooled_moments(arrays["count"][i].reshape(-1), arrays["mean"][i].reshape(-1),
                                                      arrays["m2"][i].reshape(-1), axis=0))
        total = int(np.asarray(arrays["count"][i]).sum())
        ranges = channel_ranges(arrays, i)
        outliers = outlier_channels(ranges, outlier_fraction)  # empty when no channel has data
        median = float(np.nanmedian(ranges)) if outliers.size else float("nan")
        outlier_mean = float(ranges[outliers].mean()) if outliers.size else float("nan")
        steps = per_step_range[i]
        rows.append(LayerSummary(
            layer=names[i], min=lo, max=hi, mean=mean, std=std,
            negative_fraction=int(np.asarray(arrays["negative"][i]).sum()) / total if total else float("nan"),
            asymmetry=_ratio(hi, abs(lo)), outlier_ratio=_ratio(outlier_mean, median),
            temporal_ratio=_ratio(float(nan_max(steps)), float(nan_min(steps))),
        ))
    return rows


# --------------------------------------------------------------------------- rendering


COLUMNS = [f.name for f in fields(LayerSummary)]
HEADERS = ["layer", "min", "max", "mean", "std", "neg. frac.", "asymmetry", "outlier ratio",
           "temporal ratio"]


def format_value(value) -> str:
    if isinstance(value, str):
        return value
    if np.isnan(value):
        return "n/a"
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def _text_rows(rows: Sequence[LayerSummary]) -> list[list[str]]:
    return [[format_value(v) for v in astuple(row)] for row in rows]


def format_console(rows: Sequence[LayerSummary]) -> str:
    """Aligned plain-text table: layer names left-aligned, numbers right-aligned."""
    table = [HEADERS] + _text_rows(rows)
    widths = [max(len(r[k]) for r in table) for k in range(len(HEADERS))]
    lines = []
    for n, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def footnotes(outlier_fraction: float = DEFAULT_OUTLIER_FRACTION) -> list[tuple[str, str]]:
    """(header, definition) for each numeric column; 'n/a' marks layers without data."""
    pct = f"{outlier_fraction:.3g}".rstrip("0") if outlier_fraction >= 1 else f"{100 * outlier_fraction:.3g}%"
    return [(h, COLUMN_NOTES[c].format(pct=pct)) for h, c in zip(HEADERS[1:], COLUMNS[1:])]


def format_markdown(rows: Sequence[LayerSummary], outlier_fraction: float = DEFAULT_OUTLIER_FRACTION) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "| --- |" + " ---: |" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in _text_rows(rows)]
    lines += ["", "Per layer, over all timesteps and channels of the calibration set (finite values only; "
                  "n/a: no data):", ""]
    lines += [f"- **{header}**: {note}" for header, note in footnotes(outlier_fraction)]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[LayerSummary]) -> str:
    """Full-precision CSV with the field names as header (nan/inf as Python writes them)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([row.layer] + [repr(float(v)) for v in astuple(row)[1:]] for row in rows)
    return out.getvalue()


def write_summary(rows: Sequence[LayerSummary], output_dir: str | Path,
                  outlier_fraction: float = DEFAULT_OUTLIER_FRACTION) -> tuple[Path, Path]:
    """Write summary.md and summary.csv into output_dir (atomically); returns their paths."""
    output_dir = Path(output_dir)
    paths = output_dir / "summary.md", output_dir / "summary.csv"
    for path, text in zip(paths, (format_markdown(rows, outlier_fraction), format_csv(rows))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths
