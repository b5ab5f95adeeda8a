"""The claim registry: TaQ-DiT's observations on post-GELU activations (arXiv:2411.14172) as measured numbers.

Each `Claim` is one number per layer, computed from the statistics arrays (`ActivationStats.to_arrays()`, a stats
file's `.arrays`) by a pure NumPy function of `taq.analysis.measures`, with the threshold it must reach, what the
number is and the observation it encodes. A claim *holds* for a layer when its number is >= the threshold. A
measurement with a 95% interval (the quantizer's claims, `taq.quant.claims`) is decided by the interval instead:
it holds when the whole interval lies above the threshold, does not hold when it lies below, and is *undecided*
when the interval touches or straddles it (the data cannot tell a finding from noise; a method identical to its
baseline, interval [0, 0], is undecided too).
`measure(arrays, layer, claim)` gives a `Measurement`; `measure_all(arrays)` does every claim for every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from taq.analysis.cells import channel_ranges, layer_names
from taq.analysis.measures import (MEAN_SHIFT_FRACTION, OUTLIER_FRACTION, WASTED_LEVELS_BITS, asymmetry_ratio,
                                   channel_mean_shifts, layer_clipped_extremes, layer_extremes, layer_timestep_ranges, outlier_fraction,
                                   outlier_ratio, temporal_range_factor, top_fraction_floor, wasted_levels_fraction)
from taq.analysis.quant_error import time_aware_mse
from taq.config import lookup

REFERENCE = "TaQ-DiT: Time-aware Quantization for Diffusion Transformers (arXiv:2411.14172)"
HOLDS, DOES_NOT_HOLD, UNDECIDED = "holds", "does not hold", "undecided"
OUTCOMES = (HOLDS, DOES_NOT_HOLD, UNDECIDED)

Compute = Callable[[dict, int], tuple[float, str]]  # (stats arrays, layer row) -> (value, supporting note)


@dataclass(frozen=True)
class Claim:
    name: str
    threshold: float
    measure: str  # what the number is
    observation: str  # what TaQ-DiT observed that this threshold encodes
    compute: Compute | None  # None for claims measured on the model itself (taq.quant.claims)


@dataclass(frozen=True)
class Measurement:
    claim: str
    layer: str
    value: float  # the point estimate
    threshold: float
    note: str
    interval: tuple[float, float] | None = None  # its 95% interval, where the measure has one

    @property
    def outcome(self) -> str:
        if self.interval is None:
            return HOLDS if self.value >= self.threshold else DOES_NOT_HOLD  # NaN never holds
        low, high = self.interval
        if low > self.threshold:
            return HOLDS
        return DOES_NOT_HOLD if high < self.threshold else UNDECIDED  # NaN: undecided

    @property
    def holds(self) -> bool:
        return self.outcome == HOLDS


# --------------------------------------------------------------------------- the measurements


def _asymmetry(arrays: dict, i: int) -> tuple[float, str]:
    lowest, highest = layer_extremes(arrays, i)
    return asymmetry_ratio(lowest, highest), f"min {lowest:.4g}, max {highest:.4g}"


def _wasted_levels(arrays: dict, i: int) -> tuple[float, str]:
    lowest, highest = layer_clipped_extremes(arrays, i)
    value = wasted_levels_fraction(lowest, highest)
    levels = 2**WASTED_LEVELS_BITS - 1
    shown = round(value * levels) if math.isfinite(value) else "n/a"
    return value, (f"{shown} of {levels} levels lie below p0.1 {lowest:.4g} (p99.9 {highest:.4g}; max "
                   f"{layer_extremes(arrays, i)[1]:.4g})")


def _range_drift(arrays: dict, i: int) -> tuple[float, str]:
    ranges = layer_timestep_ranges(arrays, i)
    if np.isnan(ranges).all():
        return float("nan"), "no timestep has data"
    timesteps = np.asarray(arrays["timesteps"], dtype=np.float64)
    narrow, wide = np.nanargmin(ranges), np.nanargmax(ranges)
    return temporal_range_factor(ranges), (f"p0.1..p99.9 range {ranges[narrow]:.4g} at t={timesteps[narrow]:.4g}"
                                           f" to {ranges[wide]:.4g} at t={timesteps[wide]:.4g}")


def _mean_shift(arrays: dict, i: int) -> tuple[float, str]:
    shifts = channel_mean_shifts(arrays["mean"][i], arrays["std"][i])
    if np.isnan(shifts).all():
        return float("nan"), "no channel has data"
    top = int(np.nanargmax(shifts))
    k = max(1, math.ceil(MEAN_SHIFT_FRACTION * shifts.size))
    return top_fraction_floor(shifts, MEAN_SHIFT_FRACTION), (
        f"top {k} of {shifts.size} channels; largest shift {shifts[top]:.3g} std (channel {top})")


OUTLIER_MULTIPLE = 2.0  # the channel_outliers threshold, also the multiple behind the reported outlier fraction


def _outliers(arrays: dict, i: int) -> tuple[float, str]:
    ranges = channel_ranges(arrays, i)
    if not np.isfinite(ranges).any():
        return float("nan"), "no channel has data"
    return outlier_ratio(ranges, OUTLIER_FRACTION), (
        f"outlier fraction (range > {OUTLIER_MULTIPLE:g}x median {np.nanmedian(ranges):.3g}): "
        f"{outlier_fraction(ranges, OUTLIER_MULTIPLE):.1%} of {ranges.size} channels")


def _time_aware(bits: int) -> Compute:
    def compute(arrays: dict, i: int) -> tuple[float, str]:
        hist = np.asarray(arrays["hist"][i])
        if hist.sum() == 0:
            return float("nan"), "empty histogram"
        result = time_aware_mse(hist, arrays["bin_edges"], bits, *layer_extremes(arrays, i))
        note = (f"MSE {result.shared_mse:.3g} shared (range {result.lo:.3g}..{result.shared_hi:.3g}) vs "
                f"{result.per_timestep_mse:.3g} per timestep (hi {np.nanmin(result.per_timestep_hi):.3g}.."
                f"{np.nanmax(result.per_timestep_hi):.3g})")
        beyond = int(hist[:, [0, -1]].sum())  # the end bins: beyond the fine bins' limit
        if beyond:
            note += f"; {beyond} values in the coarse end bins beyond +-{float(arrays['bin_edges'][-2]):g}"
        return result.ratio, note
    return compute


# --------------------------------------------------------------------------- the registry


CLAIMS: dict[str, Claim] = {claim.name: claim for claim in (
    Claim("asymmetry_ratio", 10.0, "max / |min| of the layer over all timesteps and channels",
          "Post-GELU activations are asymmetric: the negative side is bounded by GELU's minimum (about -0.17) "
          "while the positive tail is long, so max / |min| is at least 10.", _asymmetry),
    Claim("asymmetry_wasted_levels", 0.45,
          "fraction of a symmetric signed 8-bit grid over [-p99.9, p99.9] (255 levels) lying below the layer's "
          "p0.1 (percentiles over all timesteps and channels, from the histograms)",
          "The asymmetry is in the bulk, not only in the extremes: even with the range clipped to p0.1 .. p99.9, as "
          "a percentile observer would, at least 45% of a symmetric 8-bit grid lies below the values (a perfectly "
          "one-sided layer wastes 127/255 = 50%). Unlike max / |min|, a long positive tail alone cannot make it "
          "hold.", _wasted_levels),
    Claim("temporal_range_drift", 1.5, "largest / smallest per-timestep range p0.1 .. p99.9 (from the histograms)",
          "Post-GELU activation ranges vary across denoising timesteps: the widest timestep's range is at least "
          "1.5x the narrowest's, so one static range fits some timesteps badly.", _range_drift),
    Claim("temporal_mean_shift", 1.0,
          "mean shift over time (max_t - min_t of a channel's mean, in units of its RMS within-timestep std) "
          "reached by the top 2% of channels",
          "Activation distributions drift with the timestep, channel by channel (TaQ-DiT's momentum-based shifting "
          "tracks a per-channel centre over time): some channels' means move by at least one standard deviation.",
          _mean_shift),
    Claim("channel_outliers", OUTLIER_MULTIPLE,
          "smallest range among the top 2% of channels by range / median channel range (range: max over "
          "timesteps of the max minus min over timesteps of the min)",
          "A few channels have much wider ranges than the rest (TaQ-DiT's reconstruction-driven migration gives "
          "them their own scale): every one of the top 2% spans at least 2x the median channel's range.", _outliers),
    Claim("time_aware_mse_8bit", 1.1,
          "MSE of 8-bit fake quantization with one range shared by all timesteps / with one range per timestep",
          "Time-aware quantization pays off: a range per timestep cuts the 8-bit quantization MSE by at least 10% "
          "against one shared range, both ranges chosen to minimize MSE.", _time_aware(8)),
    Claim("time_aware_mse_4bit", 1.1,
          "MSE of 4-bit fake quantization with one range shared by all timesteps / with one range per timestep",
          "The same at 4 bits: a range per timestep cuts the MSE by at least 10%.", _time_aware(4)),
)}


def get_claim(name: str) -> Claim:
    return lookup(CLAIMS, name, "claim")


def measure(arrays: dict, layer: str, claim: str) -> Measurement:
    """One claim's measurement for one layer of the statistics arrays."""
    names = layer_names(arrays)
    if layer not in names:
        raise ValueError(f"unknown layer {layer!r}; these statistics hold {', '.join(names)}")
    definition = get_claim(claim)
    with np.errstate(invalid="ignore", divide="ignore"):
        value, note = definition.compute(arrays, names.index(layer))
    return Measurement(claim, layer, float(value), definition.threshold, note)


def measure_all(arrays: dict) -> list[Measurement]:
    """Every claim for every layer, claim-major."""
    return [measure(arrays, layer, claim) for claim in CLAIMS for layer in layer_names(arrays)]
