"""The statistics file (phase 2's output): `ActivationStats.to_arrays()` plus the run's metadata record.

Derived keys (std, negative_fraction, zero_fraction, bin_edges) are stored for readers outside taq but recomputed on
load and required to agree with the rest, so a file whose arrays contradict each other is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from taq.formats.container import TaqFormatError, load_npz, read_meta as _read_meta, save_npz
from taq.tracing.stats import CELL_COUNTERS, ActivationStats

KIND, VERSION = "taq-stats", 2  # 2: asinh bins holding every finite value, zero counter

# key -> ndim of every array in a stats file (L layers, T timesteps, C channels, bins)
STATS_KEYS = {
    "layers": 1, "timesteps": 1, "hist_scale": 0, "hist_limit": 0, "bin_edges": 1, "present": 2,
    "count": 3, "mean": 3, "std": 3, "m2": 3, "min": 3, "max": 3, "hist": 3,
    "negative_fraction": 2, "zero_fraction": 2, **{name: 2 for name in CELL_COUNTERS},
}


@dataclass
class StatsFile:
    stats: ActivationStats
    arrays: dict[str, np.ndarray]  # exactly stats.to_arrays()
    meta: dict


def save_stats(path: str | os.PathLike, stats: ActivationStats, meta: dict) -> None:
    """Write `stats.to_arrays()` and `meta` to `path` atomically."""
    save_npz(path, stats.to_arrays(), meta, kind=KIND, version=VERSION)


def read_meta(path: str | os.PathLike) -> dict:
    """A stats file's metadata record, without reading its arrays."""
    return _read_meta(path, kind=KIND, version=VERSION)


def load_stats(path: str | os.PathLike) -> StatsFile:
    """Read and validate a stats file; any problem is a TaqFormatError naming the file and the key."""
    arrays, meta = load_npz(path, kind=KIND, version=VERSION, required=STATS_KEYS)
    try:
        stats = ActivationStats.from_arrays(arrays)
    except ValueError as exc:
        raise TaqFormatError(f"{path}: {exc}") from None
    rebuilt = stats.to_arrays()
    for key, expected in rebuilt.items():  # derived keys (std, the fractions) must agree with the rest
        if arrays[key].shape != expected.shape or not np.array_equal(arrays[key], expected, equal_nan=key != "layers"):
            raise TaqFormatError(f"{path}: {key!r} is inconsistent with the other arrays (count, m2, hist, ...)")
    return StatsFile(stats=stats, arrays=rebuilt, meta=meta)
