"""The statistics file (phase 2's output): `ActivationStats.to_arrays()` plus the run's metadata record.

Derived keys (std, negative_fraction, zero_fraction, bin_edges) are stored for readers outside taq but recomputed on
load and required to agree with the rest, so a file whose arrays contradict each other is refused.

A file profiled in groups (`taq profile --groups G`) also holds each group's arrays, stacked on a leading axis
under `group.<key>` and laid out over the merged timesteps; on load they must add up to the merged statistics
(counts, histograms and counters exactly, min and max as their extremes).
"""

from __future__ import annotations

import os
import warnings
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


SHARED_KEYS = ("layers", "timesteps", "hist_scale", "hist_limit", "bin_edges")  # the same for every group
GROUP_KEYS = ("present", "count", "mean", "m2", "min", "max", "hist", *CELL_COUNTERS)  # the rest is derived
GROUP_PREFIX = "group."


@dataclass
class StatsFile:
    stats: ActivationStats
    arrays: dict[str, np.ndarray]  # exactly stats.to_arrays()
    meta: dict
    groups: list[dict[str, np.ndarray]] | None = None  # each group's arrays (shared keys included), if profiled so


def save_stats(path: str | os.PathLike, stats: ActivationStats, meta: dict,
               groups: list[ActivationStats] | None = None) -> None:
    """Write `stats.to_arrays()` and `meta` (and each group's arrays, stacked) to `path` atomically."""
    arrays = stats.to_arrays()
    if groups:
        laid_out = [group.to_arrays(stats.timesteps) for group in groups]
        arrays |= {GROUP_PREFIX + key: np.stack([group[key] for group in laid_out]) for key in GROUP_KEYS}
    save_npz(path, arrays, meta, kind=KIND, version=VERSION, compress=bool(groups))


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
    return StatsFile(stats=stats, arrays=rebuilt, meta=meta, groups=_load_groups(path, arrays, rebuilt))


def _load_groups(path, arrays: dict[str, np.ndarray], merged: dict[str, np.ndarray]) -> list[dict] | None:
    stacked = {key[len(GROUP_PREFIX):]: value for key, value in arrays.items() if key.startswith(GROUP_PREFIX)}
    if not stacked:
        return None
    missing = sorted(set(GROUP_KEYS) - set(stacked))
    if missing:
        raise TaqFormatError(f"{path}: the group statistics lack {[GROUP_PREFIX + k for k in missing]}")
    sizes = {value.shape[0] if value.ndim else 0 for value in stacked.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise TaqFormatError(f"{path}: the group arrays disagree on the number of groups")
    groups = []
    for g in range(sizes.pop()):
        group = {key: merged[key] for key in SHARED_KEYS} | {key: value[g] for key, value in stacked.items()}
        try:
            rebuilt = ActivationStats.from_arrays(group).to_arrays(tuple(merged["timesteps"]))
        except ValueError as exc:
            raise TaqFormatError(f"{path}: group {g}: {exc}") from None
        groups.append(rebuilt)
    for key, combine in (("count", np.sum), ("hist", np.sum), *((k, np.sum) for k in CELL_COUNTERS),
                         ("min", np.nanmin), ("max", np.nanmax)):
        values = np.stack([group[key] for group in groups])
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels stay NaN
            combined = combine(values, axis=0)
        if not np.array_equal(combined, merged[key], equal_nan=True):
            raise TaqFormatError(f"{path}: the groups' {key!r} do not add up to the merged statistics")
    return groups
