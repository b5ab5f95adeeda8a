"""Stats regression: per-(layer, timestep) statistics of the embedded default against a committed baseline.

Per cell the baseline keeps eight scalars over all channels' values -- min, max, mean, std, fractions of negative
values and of exact zeros, p0.1 and p99.9 (from the histogram, kept within [min, max]) -- and the histogram as a
normalized distribution over the occupied bins. `compare` checks new statistics against it with `TOLERANCES`:

- ranges and spread (min, max, std, p0.1, p99.9): 1% of the baseline value;
- mean: 1% of the cell's std (a post-GELU mean can sit near 0, where a relative tolerance means nothing);
- negative and zero fractions: 0.002 absolute;
- histogram: earth mover's distance (`taq.analysis.measures.wasserstein_distance`) at most 0.5% of the cell's std.

On one machine a rerun reproduces the statistics bit for bit; the tolerances leave room for other platforms'
float rounding and are well under what a 5% change of one FFN weight matrix does (see test_regression.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from taq.analysis.cells import cell_fraction, cell_max, cell_min, cell_moments, cell_quantile, layer_names
from taq.analysis.measures import wasserstein_distance
from taq.formats.container import load_npz, save_npz

KIND, VERSION = "taq-stats-baseline", 1
STATISTICS = ("min", "max", "mean", "std", "negative_fraction", "zero_fraction", "p0.1", "p99.9")
HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Tolerance:
    value: float
    kind: str  # "relative": of the baseline value; "of std": of the cell's baseline std; "absolute"

    def allowed(self, expected: np.ndarray, std: np.ndarray) -> np.ndarray:
        scale = {"relative": np.abs(expected), "of std": std, "absolute": 1.0}[self.kind]
        return self.value * scale

    def describe(self, allowed: float, sign: str = "+-") -> str:
        return f"{sign}{allowed:.3g}" + ("" if self.kind == "absolute" else f" ({self.value:g} {self.kind})")


TOLERANCES = {
    "min": Tolerance(0.01, "relative"), "max": Tolerance(0.01, "relative"), "std": Tolerance(0.01, "relative"),
    "p0.1": Tolerance(0.01, "relative"), "p99.9": Tolerance(0.01, "relative"),
    "mean": Tolerance(0.01, "of std"), "negative_fraction": Tolerance(0.002, "absolute"),
    "zero_fraction": Tolerance(0.002, "absolute"),
    HISTOGRAM: Tolerance(0.005, "of std"),
}


@dataclass(frozen=True)
class Baseline:
    layers: list[str]
    timesteps: np.ndarray  # (T,)
    values: dict[str, np.ndarray]  # statistic -> (L, T)
    hist: np.ndarray  # (L, T, bins) normalized, zero outside the stored window
    bin_edges: np.ndarray  # (bins + 1,)
    meta: dict


@dataclass(frozen=True)
class Mismatch:
    layer: str
    timestep: float
    statistic: str
    expected: float
    got: float
    tolerance: str

    def __str__(self) -> str:
        what = "histogram (earth mover's distance to the baseline's)" if self.statistic == HISTOGRAM else self.statistic
        return (f"{self.layer} t={self.timestep:.4g} {what}: expected {self.expected:.6g}, got {self.got:.6g}, "
                f"tolerance {self.tolerance}")


def cell_statistics(arrays: dict) -> dict[str, np.ndarray]:
    """statistic -> (L, T) over all channels' values of each cell."""
    mean, std = cell_moments(arrays)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"min": cell_min(arrays), "max": cell_max(arrays), "mean": mean, "std": std,
                "negative_fraction": cell_fraction(arrays, "negative"), "zero_fraction": cell_fraction(arrays, "zero"),
                "p0.1": cell_quantile(arrays, 0.001), "p99.9": cell_quantile(arrays, 0.999)}


def normalized_histograms(arrays: dict) -> np.ndarray:
    hist = np.asarray(arrays["hist"], dtype=np.float64)
    total = hist.sum(axis=-1, keepdims=True)
    return np.divide(hist, total, out=np.zeros_like(hist), where=total > 0)


def make_baseline(arrays: dict, meta: dict) -> Baseline:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Baseline(layer_names(arrays), np.asarray(arrays["timesteps"], np.float64), cell_statistics(arrays),
                    normalized_histograms(arrays), np.asarray(arrays["bin_edges"]), {**meta, "created": created})


def save_baseline(path: Path, baseline: Baseline) -> None:
    """Only the bins occupied somewhere are stored (float32): the file stays small."""
    occupied = np.flatnonzero(baseline.hist.reshape(-1, baseline.hist.shape[-1]).sum(axis=0) > 0)
    start, stop = (int(occupied[0]), int(occupied[-1]) + 1) if occupied.size else (0, 0)
    arrays = {"layers": np.array(baseline.layers), "timesteps": baseline.timesteps,
              "statistics": np.array(STATISTICS), "values": np.stack([baseline.values[s] for s in STATISTICS]),
              "hist": baseline.hist[..., start:stop].astype(np.float32), "hist_window": np.array([start, stop]),
              "bin_edges": baseline.bin_edges}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(path, arrays, baseline.meta, kind=KIND, version=VERSION)


def load_baseline(path: Path) -> Baseline:
    arrays, meta = load_npz(path, kind=KIND, version=VERSION, required={
        "layers": 1, "timesteps": 1, "statistics": 1, "values": 3, "hist": 3, "hist_window": 1, "bin_edges": 1})
    names = [str(s) for s in arrays["statistics"]]
    if names != list(STATISTICS):
        raise ValueError(f"{path}: holds statistics {names}, this suite compares {list(STATISTICS)}; regenerate it "
                         "with --taq-update-baselines")
    start, stop = (int(v) for v in arrays["hist_window"])
    L, T, _ = arrays["hist"].shape
    hist = np.zeros((L, T, arrays["bin_edges"].size - 1))
    hist[..., start:stop] = arrays["hist"]
    return Baseline([str(n) for n in arrays["layers"]], arrays["timesteps"],
                    dict(zip(STATISTICS, arrays["values"])), hist, arrays["bin_edges"], meta)


def compare(arrays: dict, baseline: Baseline) -> list[Mismatch]:
    """Every (layer, timestep, statistic) of `arrays` outside its tolerance around the baseline; a layer or
    timestep of the baseline missing from `arrays` is a mismatch too."""
    if not np.array_equal(np.asarray(arrays["bin_edges"]), baseline.bin_edges):
        raise ValueError("the statistics' histogram bins differ from the baseline's; profile with the same "
                         "HistogramSpec or regenerate the baseline with --taq-update-baselines")
    names, timesteps = layer_names(arrays), np.asarray(arrays["timesteps"], np.float64)
    got, got_hist = cell_statistics(arrays), normalized_histograms(arrays)
    mismatches = []
    for i, layer in enumerate(baseline.layers):
        if layer not in names:
            mismatches.append(Mismatch(layer, float("nan"), "layer present", 1, 0, "exact"))
            continue
        k = names.index(layer)
        for j, t in enumerate(baseline.timesteps):
            match = np.flatnonzero(np.isclose(timesteps, t, rtol=0, atol=1e-3))
            if match.size == 0:
                mismatches.append(Mismatch(layer, float(t), "timestep present", 1, 0, "exact"))
                continue
            m = int(match[0])
            std = baseline.values["std"][i, j]
            for statistic in STATISTICS:
                expected, value = baseline.values[statistic][i, j], got[statistic][k, m]
                allowed = TOLERANCES[statistic].allowed(expected, std)
                if np.isnan(expected) != np.isnan(value) or abs(value - expected) > allowed:
                    mismatches.append(Mismatch(layer, float(t), statistic, float(expected), float(value),
                                               TOLERANCES[statistic].describe(float(allowed))))
            empty = (got_hist[k, m].sum() == 0, baseline.hist[i, j].sum() == 0)
            distance = 0.0 if all(empty) else float("inf") if any(empty) else float(
                wasserstein_distance(got_hist[k, m], baseline.hist[i, j], baseline.bin_edges))
            allowed = TOLERANCES[HISTOGRAM].allowed(0.0, std)
            if not distance <= allowed:
                mismatches.append(Mismatch(layer, float(t), HISTOGRAM, 0.0, distance,
                                           TOLERANCES[HISTOGRAM].describe(float(allowed), "<= ")))
    return mismatches
