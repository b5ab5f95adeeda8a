"""Bootstrap 95% intervals for the statistics claims, over groups of calibration trajectories.

A stats file profiled in groups (`taq profile --groups G`; points grouped by trajectory, since the points of one
trajectory are not independent) holds each group's mergeable statistics. A bootstrap resample draws G groups with
replacement, i.e. a multiplicity w_g per group; its statistics are the groups' merged with those weights (counts,
histograms and counters summed, min and max over the drawn groups, mean and M2 by the pooled-moments formula for
w_g copies of each group), and every claim is measured on them. The time-aware claims, whose histogram MSE search
dominates the cost, use the error's linearity in the histogram instead (`group_time_aware_totals`). scipy's
percentile bootstrap gives the interval. With G groups the bootstrap sees only G independent units, so the
interval is as coarse as G is small; and for numbers made of extremes (max / |min|, the top 2% of channels) the
percentile interval is biased (a resample cannot exceed the observed maximum; top-fraction statistics grow with
noise), so it can sit to one side of the point value.
"""

from __future__ import annotations

import numpy as np

from taq.analysis.cells import layer_names
from taq.analysis.claims import CLAIMS, Claim
from taq.analysis.measures import layer_extremes
from taq.analysis.quant_error import group_time_aware_totals, time_aware_ratio
from taq.formats.stats import SHARED_KEYS, StatsFile
from taq.tracing.stats import CELL_COUNTERS

RESAMPLES = 299  # percentile ends from 299 resamples: about 30 s on pocket on 2 CPU cores
TIME_AWARE_BITS = {"time_aware_mse_8bit": 8, "time_aware_mse_4bit": 4}


class GroupedStats:
    """The groups' arrays stacked on a leading axis, and the statistics of any weighting of them."""

    def __init__(self, groups: list[dict[str, np.ndarray]]):
        if len(groups) < 2:
            raise ValueError(f"a bootstrap over groups needs at least 2 groups, got {len(groups)}")
        self.shared = {key: groups[0][key] for key in SHARED_KEYS}
        self.stacked = {key: np.stack([group[key] for group in groups])
                        for key in ("count", "mean", "m2", "min", "max", "hist", *CELL_COUNTERS)}
        self.size = len(groups)

    def weighted(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of a sample holding group g `weights[g]` times (the keys the claims read)."""
        w = np.asarray(weights, dtype=np.float64)
        s = self.stacked
        count = np.tensordot(w, s["count"], axes=1)
        n = s["count"] * w.reshape(-1, 1, 1, 1)  # (G, L, T, C) values each group contributes
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, np.nansum(n * np.nan_to_num(s["mean"]), axis=0) / count, np.nan)
            between = n * np.square(np.nan_to_num(s["mean"]) - np.nan_to_num(mean))
            m2 = np.where(count > 0, np.sum(w.reshape(-1, 1, 1, 1) * np.nan_to_num(s["m2"]) + between, axis=0),
                          np.nan)
            std = np.where(count > 0, np.sqrt(m2 / count), np.nan)
        drawn = w > 0
        result = dict(self.shared)
        result.update(count=count.astype(np.int64), mean=mean, m2=m2, std=std,
                      # fmin / fmax ignore NaN (an empty channel of a group) unless every group's is NaN
                      min=np.fmin.reduce(s["min"][drawn], axis=0), max=np.fmax.reduce(s["max"][drawn], axis=0),
                      hist=np.tensordot(w, s["hist"], axes=1), present=count.sum(axis=-1) > 0,
                      **{key: np.tensordot(w, s[key], axes=1) for key in CELL_COUNTERS})
        return result


def claim_intervals(stats: StatsFile, claims: dict[str, Claim] = CLAIMS, n_resamples: int = RESAMPLES,
                    seed: int = 0) -> dict[tuple[str, str], tuple[float, float]]:
    """(claim, layer) -> the percentile bootstrap 95% interval of the claim's number, resampling the file's
    groups; empty when the file holds no groups."""
    from scipy.stats import bootstrap

    if not stats.groups:
        return {}
    grouped = GroupedStats(stats.groups)
    names = layer_names(stats.arrays)
    keys = [(claim, layer, i) for claim in claims for i, layer in enumerate(names)]
    totals = {(claim, i): group_time_aware_totals(grouped.stacked["hist"][:, i], stats.arrays["bin_edges"], bits,
                                                  *layer_extremes(stats.arrays, i))
              for claim, bits in TIME_AWARE_BITS.items() if claim in claims
              for i in range(len(names)) if stats.arrays["hist"][i].sum() > 0}

    def statistic(drawn: np.ndarray) -> np.ndarray:
        weights = np.bincount(drawn.astype(np.int64), minlength=grouped.size)
        arrays = grouped.weighted(weights)
        values = []
        for claim, _, i in keys:
            if claim in TIME_AWARE_BITS:
                t = totals.get((claim, i))
                values.append(time_aware_ratio(np.tensordot(weights, t, axes=1)) if t is not None else np.nan)
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    values.append(claims[claim].compute(arrays, i)[0])
        return np.array(values, dtype=np.float64)

    ci = bootstrap((np.arange(grouped.size),), statistic, vectorized=False, n_resamples=n_resamples,
                   confidence_level=0.95, method="percentile", random_state=seed).confidence_interval
    return {(claim, layer): (float(low), float(high)) for (claim, layer, _), low, high in zip(keys, ci.low, ci.high)}
