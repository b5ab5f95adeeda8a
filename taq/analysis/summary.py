"""The per-layer summary table's numbers (`summarize`): pure NumPy, the same definitions as the claims."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from taq.analysis.cells import channel_ranges, display_order, layer_names, pooled_moments, select_layers, stats_arrays
from taq.analysis.measures import (OUTLIER_FRACTION, asymmetry_ratio, layer_extremes, layer_timestep_ranges,
                                   outlier_ratio, temporal_range_factor)


@dataclass(frozen=True)
class LayerSummary:
    """One layer over all its timesteps and channels (finite values only; NaN where there are none).

    - min, max: smallest and largest activation.
    - mean, std: mean and population standard deviation of all values (pooled over channels and timesteps).
    - negative_fraction, zero_fraction: fraction of values < 0 and == 0 (`ZEROS_NOTE` says why both).
    - asymmetry, outlier_ratio, temporal_ratio: the claims' numbers (`taq.analysis.measures`), so the table and
      the claims agree: max / |min|; smallest range among the widest `fraction` of channels / median channel
      range; widest / narrowest per-timestep p0.1..p99.9 range.
    """

    layer: str
    min: float
    max: float
    mean: float
    std: float
    negative_fraction: float
    zero_fraction: float
    asymmetry: float
    outlier_ratio: float
    temporal_ratio: float


# Why exact zeros are counted apart (measured with MLX's GELU on the CPU).
ZEROS_NOTE = ("GELU rounds every input below about -5.2 (tanh form; -5.5 exact) to -0.0 in float32, and below "
              "about -3.1 in bfloat16, so values negative in exact arithmetic are counted as zeros; the fraction of "
              "values <= 0 is the negative and the zero fraction together")

COLUMN_NOTES = {
    "min": "smallest finite activation over all timesteps and channels",
    "max": "largest finite activation over all timesteps and channels",
    "mean": "mean of all values (pooled over channels and timesteps)",
    "std": "population standard deviation of all values (pooled)",
    "negative_fraction": "fraction of values < 0 (exact zeros not included)",
    "zero_fraction": f"fraction of values exactly 0: {ZEROS_NOTE}",
    "asymmetry": "max / |min|; post-GELU values stop near -0.17, so a large ratio means a range lopsided to the "
                 "positive side",
    "outlier_ratio": "smallest range among the top {pct} channels by range / median channel range; a channel's "
                     "range is its max over timesteps minus its min over timesteps",
    "temporal_ratio": "widest / narrowest per-timestep range p0.1 .. p99.9 (from the histograms)",
}


def summarize(stats, layers: Sequence[str] | None = None,
              outlier_fraction: float = OUTLIER_FRACTION) -> list[LayerSummary]:
    """One LayerSummary per layer: all layers when `layers` is None (image stream, then text, by block), else
    those named, in the order given."""
    arrays = stats_arrays(stats)
    names = layer_names(arrays)
    order = display_order(names) if layers is None else select_layers(arrays, layers)
    rows = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in order:
            lo, hi = layer_extremes(arrays, i)
            mean, std = (float(v) for v in pooled_moments(arrays["count"][i].reshape(-1),
                                                          arrays["mean"][i].reshape(-1),
                                                          arrays["m2"][i].reshape(-1), axis=0))
            total = int(np.asarray(arrays["count"][i]).sum())
            fraction = {k: int(np.asarray(arrays[k][i]).sum()) / total if total else float("nan")
                        for k in ("negative", "zero")}
            rows.append(LayerSummary(
                layer=names[i], min=lo, max=hi, mean=mean, std=std, negative_fraction=fraction["negative"],
                zero_fraction=fraction["zero"],
                asymmetry=asymmetry_ratio(lo, hi), outlier_ratio=outlier_ratio(channel_ranges(arrays, i),
                                                                              outlier_fraction),
                temporal_ratio=temporal_range_factor(layer_timestep_ranges(arrays, i)),
            ))
    return rows
