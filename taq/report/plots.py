"""Phase 2 figures (TaQ-DiT style) from activation statistics, and `taq plot`.

Each `*_figure` function takes a stats file, an ActivationStats or its `to_arrays()` dict and returns a matplotlib
Figure (object-oriented API, no pyplot state: nothing to close); `write_figures` writes them all as PNGs.
Timestep axes run in denoising order, t = 1000 -> 0 (t = 1000 * sigma). Cells or layers without data render
as gaps or grey cells with a red note on the figure saying what is missing.

Per-layer figures (histograms, channel ranges) default to the first, middle and last image layer plus the middle
text layer (`default_layers`); `--layers` replaces that choice and also restricts the all-layer figures.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from taq.analysis.cells import (cell_fraction, cell_max, cell_min, cell_moments, cell_quantile,
                                channel_ranges, display_order, layer_block, layer_names, layer_stream, nan_max,
                                nan_min, select_layers, stats_arrays)
from taq.analysis.measures import OUTLIER_FRACTION, RANGE_QUANTILES, outlier_channels, outlier_ratio
from taq.analysis.summary import ZEROS_NOTE, summarize
from taq.analysis.time_groups import GAIN_SHARE, time_group_curves
from taq.formats import atomic_path, check_outputs_in_spare
from taq.formats.stats import load_stats
from taq.report.tables import format_console, write_summary

DPI = 120
OUTPUT_PATTERNS = ("summary.md", "summary.csv", "*.png")  # what `taq plot` writes into its directory
GELU_MINIMUM = -0.170  # both GELU forms bottom out here (exact -0.169971, tanh -0.170041)
LOW_Q, HIGH_Q = RANGE_QUANTILES
TIME_LABEL = "timestep t = 1000·σ   (denoising order: 1000 → 0)"
NOTE_COLOR = "firebrick"
STREAMS = {"img": ("image", "Blues"), "txt": ("text", "Oranges")}


# --------------------------------------------------------------------------- layers


def default_layers(names: Sequence[str]) -> list[str]:
    """First, middle and last image layer and the middle text layer; first/middle/last layer without those. CFG
    branches (`mm_03_img:cond`) are left to `--layers`: the picks are whole layers."""
    ordered = [names[i] for i in display_order(names)]
    ordered = [n for n in ordered if ":" not in n] or ordered
    by_stream = {s: [n for n in ordered if layer_stream(n) == s] for s in ("img", "txt")}
    picks = []
    if by_stream["img"]:
        img = by_stream["img"]
        picks += [img[0], img[len(img) // 2], img[-1]]
    if by_stream["txt"]:
        picks.append(by_stream["txt"][len(by_stream["txt"]) // 2])
    if not picks and ordered:
        picks = [ordered[0], ordered[len(ordered) // 2], ordered[-1]]
    return list(dict.fromkeys(picks))


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --------------------------------------------------------------------------- figure helpers


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _add_notes(fig: Figure, notes: Sequence[str]) -> None:
    """Red lines under the plots saying what is missing or clipped (the layout leaves them room)."""
    notes = [n for n in notes if n]
    if not notes:
        return
    height, line = fig.get_figheight(), 0.2  # inches
    reserved = (0.1 + line * len(notes)) / height
    fig.get_layout_engine().set(rect=(0, reserved, 1, 1 - reserved))
    for k, note in enumerate(notes):
        fig.text(0.01, (0.05 + line * (len(notes) - 1 - k)) / height, "Note: " + note, color=NOTE_COLOR,
                 fontsize=8, va="bottom", ha="left")


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color=NOTE_COLOR, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def _stream_colormap(stream: str) -> ListedColormap:
    """Light (shallow) to dark (deep) shades of the stream's hue."""
    base = STREAMS.get(stream, ("other", "Greys"))[1]
    return ListedColormap(colormaps[base](np.linspace(0.35, 1.0, 256)))


def _layer_colors(names: Sequence[str], rows: Sequence[int]) -> tuple[dict[int, tuple], dict[str, Normalize]]:
    """Color per layer row by depth within its stream, and each stream's block range (for colorbars)."""
    blocks = {i: layer_block(names[i], i) for i in rows}
    norms = {}
    for stream in {layer_stream(names[i]) for i in rows}:
        depth = [blocks[i] for i in rows if layer_stream(names[i]) == stream]
        norms[stream] = Normalize(min(depth), max(max(depth), min(depth) + 1))
    colors = {i: _stream_colormap(layer_stream(names[i]))(norms[layer_stream(names[i])](blocks[i])) for i in rows}
    return colors, norms


def _depth_colorbars(fig: Figure, axes, norms: dict[str, Normalize]) -> None:
    for stream, norm in sorted(norms.items()):
        label = STREAMS.get(stream, ("other",))[0]
        bar = fig.colorbar(ScalarMappable(norm, _stream_colormap(stream)), ax=axes, shrink=0.9, aspect=30, pad=0.01)
        bar.set_label(f"{label} layer: block" if stream != "other" else "layer index")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()


def _timestep_axis(ax, timesteps: np.ndarray) -> None:
    ax.set_xlabel(TIME_LABEL)
    if timesteps.size:
        pad = max(1.0, 0.02 * float(np.ptp(timesteps)))
        ax.set_xlim(float(timesteps.max()) + pad, float(timesteps.min()) - pad)  # 1000 on the left


def _missing_notes(arrays: dict, rows: Sequence[int]) -> list[str]:
    """Notes naming the layers without any data, and counting the other empty (layer, timestep) cells."""
    names = layer_names(arrays)
    filled = np.asarray(arrays["count"]).sum(axis=-1) > 0  # (L, T)
    empty_layers = [names[i] for i in rows if not filled[i].any()]
    gaps = sum(int((~filled[i]).sum()) for i in rows if filled[i].any())
    notes = []
    if empty_layers:
        notes.append(f"no finite data for {_name_list(empty_layers)}")
    if gaps:
        notes.append(f"{gaps} (layer, timestep) cell{'s' if gaps > 1 else ''} without finite data (gaps / grey)")
    bad = sum(int(np.asarray(arrays[k])[rows].sum()) for k in ("nan", "posinf", "neginf") if k in arrays)
    if bad:
        notes.append(f"{bad} non-finite activation values (NaN/±Inf) were excluded from all statistics")
    return notes


def _name_list(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- range vs timestep


def range_vs_timestep_figure(stats, layers: Sequence[str] | None = None, stream: str | None = None) -> Figure:
    """Per-timestep max and p99.9 (top) and min and p0.1 (bottom) of each layer, one line per layer colored by
    depth. `stream` ('img' or 'txt') keeps one stream; percentiles come from the histograms (interpolated)."""
    arrays = stats_arrays(stats)
    names = layer_names(arrays)
    rows = select_layers(arrays, layers)
    if stream is not None:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
        rows = [i for i in rows if layer_stream(names[i]) == stream]
    rows = [i for i in display_order(names) if i in rows]
    timesteps = np.asarray(arrays["timesteps"], dtype=np.float64)
    fig = _figure(11, 6.5)
    # The lower side is GELU's floor almost everywhere: a small panel, so the maxima get the room.
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[5, 1])
    which = {"img": "image-stream", "txt": "text-stream", None: "all"}[stream]
    fig.suptitle(f"Post-GELU activation range vs timestep ({which} FFN layers, {len(rows)} shown)")
    if not rows or timesteps.size == 0:
        for ax in (top, bottom):
            _no_data(ax, "no layers or timesteps to show")
        _add_notes(fig, _missing_notes(arrays, rows) if rows else [])
        return fig

    highest, lowest = cell_max(arrays), cell_min(arrays)
    p_high, p_low = cell_quantile(arrays, HIGH_Q), cell_quantile(arrays, LOW_Q)
    colors, norms = _layer_colors(names, rows)
    for i in rows:
        color = colors[i]
        top.plot(timesteps, highest[i], color=color, lw=1.3, marker="o", ms=2.5)
        bottom.plot(timesteps, lowest[i], color=color, lw=1.3, marker="o", ms=2.5)
        top.plot(timesteps, p_high[i], color=color, lw=0.9, ls="--")
        bottom.plot(timesteps, p_low[i], color=color, lw=0.9, ls="--")
    bottom.axhline(GELU_MINIMUM, color="black", lw=0.8, ls=":")
    low_values = np.concatenate([lowest[rows].ravel(), p_low[rows].ravel()])
    low_values = low_values[np.isfinite(low_values)]
    if low_values.size:  # keep the GELU floor in view with a readable span, not a 1e-5 sliver
        bottom.set_ylim(min(low_values.min(), GELU_MINIMUM - 0.02), max(low_values.max(), GELU_MINIMUM + 0.03))
    bottom.ticklabel_format(axis="y", useOffset=False)
    at_floor = low_values.size and np.all(np.abs(low_values - GELU_MINIMUM) < 0.005)
    bottom.annotate(f"GELU minimum {GELU_MINIMUM}" + (
        f"; every min and p0.1 lies within 0.005 of it ({low_values.min():.4g} .. {low_values.max():.4g})"
        if at_floor else ""), (0.995, GELU_MINIMUM), xycoords=("axes fraction", "data"), ha="right", va="bottom",
        fontsize=8)
    finite_high = highest[rows][np.isfinite(highest[rows])]
    if finite_high.size and finite_high.min() > 0 and finite_high.max() > 10 * finite_high.min():
        top.set_yscale("log")  # maxima spanning decades
    top.set_ylabel("activation value" + (", log scale" if top.get_yscale() == "log" else ""))
    bottom.set_ylabel("activation value")
    for ax, extreme, q in ((top, "max", "p99.9"), (bottom, "min", "p0.1")):
        ax.grid(alpha=0.3)
        ax.legend(handles=[Line2D([], [], color="black", lw=1.3, label=extreme),
                           Line2D([], [], color="black", lw=0.9, ls="--", label=f"{q} (from histogram)")],
                  loc="upper left", fontsize=8)
    _timestep_axis(bottom, timesteps)
    _depth_colorbars(fig, [top, bottom], norms)
    _add_notes(fig, _missing_notes(arrays, rows))
    return fig


# --------------------------------------------------------------------------- histograms


def histogram_figure(stats, layer: str) -> Figure:
    """Histogram of one layer's activations at every timestep: counts per bin on an asinh axis (the bins are
    uniform in asinh, so each gets the same width), and the density near 0 zoomed on GELU's minimum."""
    arrays = stats_arrays(stats)
    (i,) = select_layers(arrays, [layer])
    timesteps = np.asarray(arrays["timesteps"], dtype=np.float64)
    edges = np.asarray(arrays["bin_edges"], dtype=np.float64)
    hist = np.asarray(arrays["hist"][i])  # (T, bins)
    fig = _figure(12, 5)
    full, zoom = fig.subplots(1, 2, width_ratios=[2.2, 1])
    fig.suptitle(f"{layer}: post-GELU activation histogram per timestep")
    present = np.flatnonzero(hist.sum(axis=-1) > 0)
    if present.size == 0:
        for ax in (full, zoom):
            _no_data(ax, f"no histogram data for {layer}")
        _add_notes(fig, _missing_notes(arrays, [i]))
        return fig

    lowest, highest = float(nan_min(arrays["min"][i])), float(nan_max(arrays["max"][i]))
    drawn = np.clip(edges, lowest, highest)  # the end bins reach float32's max; the values stop at min and max
    scale = float(np.asarray(arrays["hist_scale"]))
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.88, 256)))  # no pale yellow end
    norm = Normalize(float(timesteps.min()), float(max(timesteps.max(), timesteps.min() + 1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        density = hist / np.diff(edges)  # (T, bins) per unit of activation
    occupied = np.flatnonzero(hist.sum(axis=0) > 0)
    bins = slice(occupied[0], occupied[-1] + 1)  # empty bins draw nothing; leave them out of the lines
    x = drawn[bins.start:bins.stop + 1]
    for j in present[np.argsort(-timesteps[present])]:  # denoising order in the legend
        color, label = cmap(norm(timesteps[j])), f"t = {timesteps[j]:.4g}"
        for ax, values in ((full, hist[j]), (zoom, density[j])):
            y = np.where(hist[j, bins] > 0, values[bins], np.nan)
            # A step line, as ax.stairs draws it; stairs' patch spends seconds on limits for 4096 bins.
            ax.plot(x, np.append(y, y[-1]), drawstyle="steps-post", color=color, lw=1.1,
                    label=label if ax is full else None)
    full.set_xscale("asinh", linear_width=scale)
    full.set_xlim(lowest, highest)
    zoom.set_xlim(-0.45, 0.45)
    for ax in (full, zoom):
        ax.set_yscale("log")
        ax.axvline(GELU_MINIMUM, color="black", ls=":", lw=1)
        ax.grid(alpha=0.3)
    full.set_xlabel(f"activation value (asinh scale, linear within +-{scale:g})")
    zoom.set_xlabel("activation value")
    zoom.set_title(f"zoom near 0 (dotted: GELU minimum {GELU_MINIMUM})", fontsize=10)
    full.set_ylabel(f"count per bin ({edges.size - 1} bins uniform in asinh), log scale")
    zoom.set_ylabel("count per unit of activation, log scale")
    if present.size <= 8:
        full.legend(title="timestep", fontsize=8, ncols=1 if present.size <= 4 else 2)
    else:
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=[full, zoom], pad=0.01, aspect=30)
        bar.set_label("timestep t = 1000·σ")
    notes = _missing_notes(arrays, [i])
    beyond = int(hist[:, [0, -1]].sum())
    if beyond:
        notes.append(f"{beyond} values beyond +-{edges[-2]:g} lie in the coarse end bins (drawn up to min/max)")
    _add_notes(fig, notes)
    return fig


# --------------------------------------------------------------------------- channel ranges


def channel_ranges_figure(stats, layer: str, outlier_fraction: float = OUTLIER_FRACTION) -> Figure:
    """Each channel's span over the calibration set (min over timesteps of its min to max over timesteps of its
    max), by channel index (top) and sorted (bottom, log scale); the widest `outlier_fraction` highlighted."""
    arrays = stats_arrays(stats)
    (i,) = select_layers(arrays, [layer])
    ranges = channel_ranges(arrays, i)  # (C,)
    low, high = nan_min(arrays["min"][i], axis=0), nan_max(arrays["max"][i], axis=0)
    fig = _figure(12, 7)
    top, bottom = fig.subplots(2, 1)
    pct = f"{100 * outlier_fraction:.3g}%"
    fig.suptitle(f"{layer}: per-channel activation range over all timesteps (top {pct} widest highlighted)")
    filled = np.isfinite(ranges)
    if not filled.any():
        for ax in (top, bottom):
            _no_data(ax, f"no channel has data in {layer}")
        _add_notes(fig, _missing_notes(arrays, [i]))
        return fig

    outliers = outlier_channels(ranges, outlier_fraction)
    is_outlier = np.zeros(ranges.shape, bool)
    is_outlier[outliers] = True
    channels = np.arange(ranges.size)
    normal = filled & ~is_outlier
    top.vlines(channels[normal], low[normal], high[normal], color="tab:blue", lw=0.8, alpha=0.7,
               label="channel range")
    top.vlines(channels[is_outlier], low[is_outlier], high[is_outlier], color="tab:red", lw=1.4,
               label=f"top {pct}: {outliers.size} channel{'s' if outliers.size > 1 else ''}")
    top.axhline(0, color="black", lw=0.6)
    top.set_xlim(-0.5, ranges.size - 0.5)
    top.set_xlabel("channel index")
    top.set_ylabel("activation value\n(min … max over timesteps)")
    top.legend(loc="upper right", fontsize=8)

    order = np.argsort(-np.where(filled, ranges, -np.inf), kind="stable")[: int(filled.sum())]
    rank = np.arange(order.size)
    median = float(np.median(ranges[filled]))
    bottom.plot(rank, ranges[order], color="tab:blue", lw=1.2, label="channel range (max − min)")
    bottom.plot(rank[: outliers.size], ranges[order][: outliers.size], ls="none", marker="o", ms=3,
                color="tab:red", label=f"top {pct}")
    bottom.axhline(median, color="black", ls="--", lw=0.9, label=f"median {median:.3g}")
    if ranges[filled].min() > 0:
        bottom.set_yscale("log")  # the same scale for every layer, so their panels compare
    bottom.set_xlabel("channels sorted by range (widest first)")
    bottom.set_ylabel("range" + (", log scale" if bottom.get_yscale() == "log" else ""))
    bottom.set_title(f"outlier ratio (smallest of the top {pct} / median) = "
                     f"{outlier_ratio(ranges, outlier_fraction):.3g}", fontsize=10)
    bottom.legend(loc="upper right", fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    notes = _missing_notes(arrays, [i])
    if not filled.all():
        notes.append(f"{int((~filled).sum())} of {ranges.size} channels never saw a finite value (not drawn)")
    _add_notes(fig, notes)
    return fig


MAP_CHANNELS = 48  # channels per channel x timestep map: the widest
MAP_LAYERS = 2  # layers that get one: the widest


def widest_layers(arrays: dict, layers: Sequence[str] | None = None, count: int = MAP_LAYERS) -> list[str]:
    """The `count` layers (among `layers`) with the widest single channel range, widest first."""
    names = layer_names(arrays)
    rows = select_layers(arrays, layers)
    ranges = {i: channel_ranges(arrays, i) for i in rows}
    widest = {i: np.nanmax(r) if np.isfinite(r).any() else -np.inf for i, r in ranges.items()}
    return [names[i] for i in sorted(rows, key=lambda i: -widest[i])[:count] if np.isfinite(widest[i])]


def channel_time_map_figure(stats, layer: str, channels: int = MAP_CHANNELS) -> Figure:
    """Which channels drift, and when: each of the layer's widest channels' range (max - min) per timestep,
    absolute (left, log colour) and relative to that channel's widest timestep (right)."""
    arrays = stats_arrays(stats)
    (i,) = select_layers(arrays, [layer])
    ranges = channel_ranges(arrays, i)
    timesteps = np.asarray(arrays["timesteps"], dtype=np.float64)
    columns = np.argsort(-timesteps, kind="stable")  # denoising order
    fig = _figure(13, 7.5)
    left, right = fig.subplots(1, 2, sharey=True)
    fig.suptitle(f"{layer}: per-timestep range of its {channels} widest channels (rows widest first)")
    filled = np.isfinite(ranges)
    if not filled.any() or columns.size == 0:
        for ax in (left, right):
            _no_data(ax, f"no channel has data in {layer}")
        return fig
    order = np.argsort(-np.where(filled, ranges, -np.inf), kind="stable")[:min(channels, int(filled.sum()))]
    per_t = (np.asarray(arrays["max"][i]) - np.asarray(arrays["min"][i]))[np.ix_(columns, order)].T  # (rows, T)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = per_t / np.nanmax(per_t, axis=1, keepdims=True)
    from matplotlib.colors import LogNorm

    positive = per_t[np.isfinite(per_t) & (per_t > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    for ax, values, cmap, label, scale in ((left, per_t, "magma", "range (max − min), log colour", norm),
                                           (right, relative, "viridis", "range / the channel's widest", None)):
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest",
                          cmap=colormaps[cmap].with_extremes(bad="lightgrey"), norm=scale,
                          **({} if scale else {"vmin": 0, "vmax": 1}))
        ax.set_xticks(range(columns.size), [f"{t:.0f}" for t in timesteps[columns]], rotation=90, fontsize=7)
        ax.set_xlabel(TIME_LABEL, fontsize=8)
        fig.colorbar(image, ax=ax, pad=0.01, aspect=40).set_label(label)
    left.set_yticks(range(order.size), [str(c) for c in order], fontsize=6)
    left.set_ylabel("channel (widest first)")
    _add_notes(fig, _missing_notes(arrays, [i]))
    return fig


# --------------------------------------------------------------------------- heatmaps


def _heatmap(arrays: dict, values: np.ndarray, layers, title: str, label: str, cmap: str, fmt: str) -> Figure:
    """Layer x timestep heatmap of values (L, T): rows image layers then text layers, columns t = 1000 -> 0."""
    names = layer_names(arrays)
    selected = select_layers(arrays, layers)
    rows = [i for i in display_order(names) if i in selected]
    timesteps = np.asarray(arrays["timesteps"], dtype=np.float64)
    columns = np.argsort(-timesteps, kind="stable")  # denoising order
    fig = _figure(max(7.0, 3.5 + 0.42 * columns.size), max(3.5, 1.6 + 0.24 * len(rows)))
    ax = fig.subplots()
    ax.set_title(title)
    if not rows or columns.size == 0:
        _no_data(ax, "no layers or timesteps to show")
        _add_notes(fig, _missing_notes(arrays, rows) if rows else [])
        return fig

    grid = np.asarray(values, dtype=np.float64)[np.ix_(rows, columns)]  # (rows, T)
    palette = colormaps[cmap].with_extremes(bad="lightgrey")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=palette, interpolation="nearest",
                      vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    ax.set_xticks(range(columns.size), [f"{t:.0f}" for t in timesteps[columns]], rotation=90 if columns.size > 12
                  else 0, fontsize=8)  # whole timesteps: t = 1000 sigma needs no more to tell columns apart
    ax.set_yticks(range(len(rows)), [names[i] for i in rows], fontsize=7 if len(rows) > 24 else 9)
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel("FFN layer")
    streams = [layer_stream(names[i]) for i in rows]
    for k in range(1, len(rows)):
        if streams[k] != streams[k - 1]:
            ax.axhline(k - 0.5, color="white", lw=2.5)
    if grid.size <= 150:  # values readable in the cells
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                shade = image.norm(v)
                ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=7,
                        color="white" if shade < 0.55 else "black")
    fig.colorbar(image, ax=ax, pad=0.01, aspect=30).set_label(label)
    _add_notes(fig, _missing_notes(arrays, rows))
    return fig


def heatmap_figure(stats, statistic: str, layers: Sequence[str] | None = None) -> Figure:
    """Layer x timestep drift heatmap of the mean or std of each cell's values (pooled over channels)."""
    arrays = stats_arrays(stats)
    mean, std = cell_moments(arrays)
    choices = {"mean": (mean, "viridis"), "std": (std, "magma")}
    if statistic not in choices:
        raise ValueError(f"statistic must be one of {sorted(choices)}, got {statistic!r}")
    values, cmap = choices[statistic]
    return _heatmap(arrays, values, layers, f"Post-GELU activation {statistic} per layer and timestep "
                    "(all channels pooled)", f"{statistic} of activation values", cmap, ".3g")


FRACTIONS = {"negative": ("< 0", "cividis"), "zero": ("exactly 0", "YlGn")}


def fraction_figure(stats, counter: str, layers: Sequence[str] | None = None) -> Figure:
    """Layer x timestep heatmap of the fraction of activation values below 0 (`counter` "negative") or exactly 0
    ("zero", see `ZEROS_NOTE`)."""
    if counter not in FRACTIONS:
        raise ValueError(f"counter must be one of {sorted(FRACTIONS)}, got {counter!r}")
    arrays = stats_arrays(stats)
    what, cmap = FRACTIONS[counter]
    return _heatmap(arrays, cell_fraction(arrays, counter), layers,
                    f"Fraction of post-GELU activations {what} per layer and timestep", f"fraction of values {what}",
                    cmap, ".2f")


def time_groups_figure(stats, layers: Sequence[str] | None = None, bits: Sequence[int] = (8, 4)) -> Figure:
    """Per layer, quantization MSE (relative to one range for all timesteps) against the number of contiguous
    timestep groups sharing a range, one panel per bit width; a dot where the layer reaches 90% of the gain of one
    range per timestep (`taq.analysis.time_groups`)."""
    arrays = stats_arrays(stats)
    names = layer_names(arrays)
    selected = {names[i] for i in select_layers(arrays, layers)}
    fig = _figure(11, 4.6)
    axes = fig.subplots(1, len(bits), sharey=False, squeeze=False)[0]
    fig.suptitle("How many time groups? Quantization MSE with one activation range per group of timesteps")
    shown: list[int] = []
    for ax, width in zip(axes, bits):
        curves = [c for c in time_group_curves(arrays, width) if c.layer in selected]
        rows = [names.index(c.layer) for c in curves]
        shown = rows or shown
        if not curves:
            _no_data(ax, "no layer has data")
            continue
        colors, norms = _layer_colors(names, rows)
        for curve, i in zip(curves, rows):
            ax.plot(curve.groups, curve.relative, color=colors[i], lw=1.3, marker="o", ms=2.5)
            k = curve.groups_for()
            ax.plot(k, curve.relative[list(curve.groups).index(k)], "o", color=colors[i], ms=7,
                    markeredgecolor="black")
        ax.set_xscale("log", base=2)
        ax.set_xticks(curves[0].groups, [str(g) for g in curves[0].groups])
        ax.set_xlabel("contiguous timestep groups (last: one per timestep)")
        ax.set_ylabel("MSE / MSE with one range")
        ax.set_title(f"{width}-bit activations; big dot: {GAIN_SHARE:.0%} of the per-timestep gain", fontsize=9)
        ax.grid(alpha=0.3)
    if shown:
        _depth_colorbars(fig, list(axes), _layer_colors(names, shown)[1])
    _add_notes(fig, _missing_notes(arrays, sorted(names.index(n) for n in selected)))
    return fig


# --------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class WrittenFigure:
    path: Path
    caption: str


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write fig as PNG atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def write_figures(stats, output_dir: str | Path, layers: Sequence[str] | None = None,
                  outlier_fraction: float = OUTLIER_FRACTION) -> list[WrittenFigure]:
    """Write every figure into output_dir (which must exist). `layers` restricts all figures and sets the
    per-layer ones (default: `default_layers`). Stream variants with no selected layer are skipped."""
    arrays = stats_arrays(stats)
    names = layer_names(arrays)
    selected = [names[i] for i in select_layers(arrays, layers)]  # unknown names fail before any writing
    per_layer = selected if layers is not None else default_layers(names)
    output_dir = Path(output_dir)
    jobs = [("range_vs_timestep_all.png", lambda: range_vs_timestep_figure(arrays, selected),
             "Activation range vs timestep, all layers: max and p99.9 (top), min and p0.1 (bottom).")]
    for stream, (word, _) in STREAMS.items():
        if any(layer_stream(n) == stream for n in selected):
            jobs.append((f"range_vs_timestep_{stream}.png",
                         lambda s=stream: range_vs_timestep_figure(arrays, selected, stream=s),
                         f"Activation range vs timestep, {word}-stream layers only."))
    for name in per_layer:
        jobs.append((f"histogram_{_file_safe(name)}.png", lambda n=name: histogram_figure(arrays, n),
                     f"{name}: histogram per timestep (log count); dotted line: GELU minimum {GELU_MINIMUM}."))
        jobs.append((f"channel_ranges_{_file_safe(name)}.png",
                     lambda n=name: channel_ranges_figure(arrays, n, outlier_fraction),
                     f"{name}: per-channel range over all timesteps, widest {100 * outlier_fraction:.3g}% in red."))
    for name in widest_layers(arrays, selected):
        jobs.append((f"channel_time_map_{_file_safe(name)}.png", lambda n=name: channel_time_map_figure(arrays, n),
                     f"{name} (one of the {MAP_LAYERS} layers with the widest channel): which channels drift and "
                     f"when, the range of its {MAP_CHANNELS} widest channels per timestep."))
    jobs += [
        ("heatmap_mean.png", lambda: heatmap_figure(arrays, "mean", selected), "Mean per layer and timestep."),
        ("heatmap_std.png", lambda: heatmap_figure(arrays, "std", selected), "Std per layer and timestep."),
        ("negative_fraction_heatmap.png", lambda: fraction_figure(arrays, "negative", selected),
         "Fraction of values < 0 per layer and timestep (exact zeros not included)."),
        ("zero_fraction_heatmap.png", lambda: fraction_figure(arrays, "zero", selected),
         f"Fraction of values exactly 0 per layer and timestep: {ZEROS_NOTE}."),
        ("time_groups.png", lambda: time_groups_figure(arrays, selected),
         "How many time groups a time-aware quantizer needs: quantization MSE (from the histograms, MSE-optimal "
         "range per group) against the number of contiguous timestep groups, relative to one range for all."),
    ]
    return [WrittenFigure(save_figure(make(), output_dir / filename), caption) for filename, make, caption in jobs]


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stats-file", required=True, help="activation stats file written by `taq profile`")
    parser.add_argument("--output-dir", default="activation_plots",
                        help="directory for the PNGs and summary.md/csv (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", metavar="LAYER",
                        help="layer names (e.g. mm_00_img mm_12_txt): restricts all figures and the table; "
                             "default: all layers, per-layer figures for the first/middle/last image layer and "
                             "the middle text layer")
    parser.add_argument("--outlier-fraction", type=float, default=OUTLIER_FRACTION,
                        help="fraction of widest channels highlighted as outliers (default: %(default)s)")


def prepare_output_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_cli(args: argparse.Namespace) -> None:
    if not 0 < args.outlier_fraction <= 1:
        raise ValueError(f"--outlier-fraction must lie in (0, 1], got {args.outlier_fraction}")
    check_outputs_in_spare(args.output_dir, OUTPUT_PATTERNS, {"--stats-file": args.stats_file})
    stats = load_stats(args.stats_file)
    select_layers(stats_arrays(stats), args.layers)  # before creating the directory
    output_dir = prepare_output_dir(args.output_dir)
    figures = write_figures(stats, output_dir, args.layers, args.outlier_fraction)
    rows = summarize(stats, args.layers, args.outlier_fraction)
    tables = write_summary(rows, output_dir, args.outlier_fraction)
    print(format_console(rows))
    print(f"\nwrote {len(figures)} figures and {', '.join(p.name for p in tables)} to {output_dir}")
