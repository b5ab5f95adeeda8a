"""Streaming activation statistics per (layer, timestep): reduced on the device, merged on the host.

A batch of activations (..., C) is reduced in MLX to a few small arrays (`reduce_batch`); only those leave the
device. They are merged into running totals in float64 with Chan et al.'s parallel update, so accuracy does not
degrade with the number of batches. Reductions of many layers can be evaluated with one `mx.eval`
(`BatchReduction.arrays()`), then turned into `CellStats` and merged.

Bins: `taq.tracing.histogram` (fixed edges that hold every finite float32, so cells always merge bin for bin).
Non-finite values (NaN, +Inf, -Inf) are counted in their own counters and excluded from everything else: the
per-channel count, mean, M2, min and max, the histogram and the negative and zero counts. A channel with no
finite value has count 0 and reports NaN for mean, std, min and max. Exact zeros (+0.0 and -0.0) have their own
counter: GELU rounds its far negative side to -0.0 (in float32 below about -5.2, in bfloat16 below about -3.1), so
"< 0" alone undercounts the values exact arithmetic would call negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import mlx.core as mx
import numpy as np

from taq.tracing.histogram import HistogramSpec, histogram_slots

MAX_BATCH_ELEMENTS = 2**31 - 1  # device-side counts are int32
CELL_COUNTERS = ("negative", "zero", "nan", "posinf", "neginf")


# --------------------------------------------------------------------------- device side


def power_of_two_floor(a: mx.array) -> mx.array:
    """2 ** floor(log2(a)) for positive normal float32 a, exactly (by masking the exponent bits); 0 for subnormals."""
    return mx.view(mx.view(a, mx.int32) & 0x7F800000, mx.float32)


@dataclass
class BatchReduction:
    """One batch reduced on the device. Per channel (C,): values are divided by `scale`, a power of two near
    max |finite x| (exact, and squares of huge activations cannot overflow float32); `residual_sum`, the second
    pass's sum of (x/scale - mean), corrects the first pass's mean (Chan, Golub & LeVeque's corrected two-pass)."""

    count: mx.array  # (C,) int32: finite values
    scale: mx.array  # (C,) float32, a power of two
    scaled_mean: mx.array  # (C,) float32: first-pass mean of x / scale
    residual_sum: mx.array  # (C,) float32
    residual_sq_sum: mx.array  # (C,) float32
    min: mx.array  # (C,) float32, +inf where count is 0
    max: mx.array  # (C,) float32, -inf where count is 0
    slots: mx.array  # (bins + 1,) int32: histogram, then non-finite values
    signs: mx.array  # (4,) int32: values < 0 (-inf included), +inf, -inf, values == 0

    def arrays(self) -> list[mx.array]:
        """Everything to pass to `mx.eval` (together with other reductions) before `CellStats.from_reduction`."""
        return [self.count, self.scale, self.scaled_mean, self.residual_sum, self.residual_sq_sum,
                self.min, self.max, self.slots, self.signs]


SIGNS = 4  # entries of BatchReduction.signs
FLOAT_FIELDS = ("scale", "scaled_mean", "residual_sum", "residual_sq_sum", "min", "max")
INT_FIELDS = ("count", "slots", "signs")


def pack_reductions(reductions: list[BatchReduction]) -> tuple[mx.array, mx.array]:
    """Many reductions as one float32 and one int32 array: two device-to-host copies instead of nine each."""
    def flat(fields, dtype):
        return mx.concatenate([getattr(r, f).reshape(-1).astype(dtype) for r in reductions for f in fields])
    return flat(FLOAT_FIELDS, mx.float32), flat(INT_FIELDS, mx.int32)


def unpack_reductions(floats: np.ndarray, ints: np.ndarray, sizes: list[tuple[int, int]]) -> list[BatchReduction]:
    """Inverse of pack_reductions on the host; `sizes` holds (channels, slots) per reduction."""
    out, f, i = [], 0, 0
    for channels, slots in sizes:
        values = {}
        for name in FLOAT_FIELDS:
            values[name], f = floats[f:f + channels], f + channels
        for name, size in zip(INT_FIELDS, (channels, slots, SIGNS)):
            values[name], i = ints[i:i + size], i + size
        out.append(BatchReduction(**values))
    return out


HISTOGRAM_COPIES = 64  # channels scatter into this many histogram copies: spreads the GPU's atomic contention


def reduce_batch(x: mx.array, spec: HistogramSpec) -> BatchReduction:
    """Reduce activations x (..., C) to a BatchReduction without evaluating it (lazy MLX graph)."""
    if x.ndim < 1:
        raise ValueError(f"activations need a channel axis, got a scalar of shape {x.shape}")
    if x.size > MAX_BATCH_ELEMENTS:
        raise ValueError(f"a batch of {x.size} values exceeds {MAX_BATCH_ELEMENTS}; reduce it in smaller batches")
    channels = x.shape[-1]
    if channels == 0:
        raise ValueError(f"activations of shape {x.shape} have no channels")
    x = x.astype(mx.float32).reshape(-1, channels)  # (M, C)
    if x.shape[0] == 0:
        return _empty_reduction(channels, spec)
    finite = mx.isfinite(x)
    count = finite.sum(axis=0)
    lowest, highest = mx.where(finite, x, mx.inf).min(axis=0), mx.where(finite, x, -mx.inf).max(axis=0)
    scale = power_of_two_floor(mx.maximum(mx.abs(lowest), mx.abs(highest)))
    scale = mx.where((count > 0) & (scale > 0), scale, 1.0)  # empty, all-zero or subnormal channels
    scaled = mx.where(finite, x / scale, 0.0)  # exact: |scaled| < 2
    scaled_mean = scaled.sum(axis=0) / mx.maximum(count, 1)
    residual = mx.where(finite, scaled - scaled_mean, 0.0)
    copies = min(HISTOGRAM_COPIES, channels)
    offsets = (mx.arange(channels, dtype=mx.int32) % copies) * (spec.bins + 1)  # (C,)
    slot_index = (histogram_slots(x, spec, _device_edges(spec)) + offsets).reshape(-1)
    slots = mx.zeros((copies * (spec.bins + 1),), dtype=mx.int32).at[slot_index].add(1)
    signs = mx.stack([(x < 0).sum(), (x == mx.inf).sum(), (x == -mx.inf).sum(), (x == 0).sum()])
    return BatchReduction(
        count=count, scale=scale, scaled_mean=scaled_mean,
        residual_sum=residual.sum(axis=0), residual_sq_sum=mx.square(residual).sum(axis=0),
        min=lowest, max=highest, slots=slots.reshape(copies, -1).sum(axis=0), signs=signs,
    )


@lru_cache(maxsize=None)
def compiled_reducer(spec: HistogramSpec) -> Callable[[mx.array], BatchReduction]:
    """reduce_batch fused by `mx.compile`, compiled once per input shape: faster on a GPU, but each new shape
    costs seconds of compilation on the CPU backend."""
    fused = mx.compile(lambda x: reduce_batch(x, spec).arrays())
    return lambda x: BatchReduction(*fused(x))


def _empty_reduction(channels: int, spec: HistogramSpec) -> BatchReduction:
    zeros = mx.zeros((channels,), dtype=mx.float32)
    return BatchReduction(
        count=mx.zeros((channels,), dtype=mx.int32), scale=mx.ones((channels,)), scaled_mean=zeros,
        residual_sum=zeros, residual_sq_sum=zeros, min=mx.full((channels,), mx.inf), max=mx.full((channels,), -mx.inf),
        slots=mx.zeros((spec.bins + 1,), dtype=mx.int32), signs=mx.zeros((SIGNS,), dtype=mx.int32),
    )


@lru_cache(maxsize=None)
def _device_edges(spec: HistogramSpec) -> mx.array:
    """The bin edges on the device, once per spec rather than once per layer and forward."""
    return mx.array(spec.bin_edges)


# --------------------------------------------------------------------------- host side: the float64 arithmetic
# One implementation, elementwise, for one cell's (C,) arrays and for many cells' stacked (K, C) arrays alike, so
# both merge paths give the same bits. In-place (`out=`) where it can: large stacked arrays are not reallocated.

MOMENT_FIELDS = ("scale", "scaled_mean", "residual_sum", "residual_sq_sum")


def batch_moments(count: np.ndarray, scale: np.ndarray, scaled_mean: np.ndarray, residual_sum: np.ndarray,
                  residual_sq_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and M2 of reductions (any shape; float32 fields), 0 where count is 0:
    mean = (scaled_mean + residual_sum / n) * scale, m2 = max(residual_sq_sum - residual_sum**2 / n, 0) * scale**2
    with n = max(count, 1)."""
    n = np.maximum(count, 1).astype(np.float64)
    scale = scale.astype(np.float64)
    residual_sum = residual_sum.astype(np.float64)
    mean = np.divide(residual_sum, n)
    np.add(scaled_mean, mean, out=mean)  # float32 + float64: the float32 operand is widened exactly
    np.multiply(mean, scale, out=mean)
    m2 = np.square(residual_sum, out=residual_sum)
    np.divide(m2, n, out=m2)
    np.subtract(residual_sq_sum, m2, out=m2)
    np.maximum(m2, 0.0, out=m2)
    np.multiply(m2, np.square(scale, out=scale), out=m2)
    empty = count <= 0
    if empty.any():
        np.copyto(mean, 0.0, where=empty)
        np.copyto(m2, 0.0, where=empty)
    return mean, m2


def chan_merge(na: np.ndarray, mean: np.ndarray, m2: np.ndarray, nb: np.ndarray, mean_b: np.ndarray,
               m2_b: np.ndarray) -> np.ndarray:
    """Chan et al.'s parallel update of (na, mean, m2) by (nb, mean_b, m2_b), in place in `mean` and `m2`;
    counts as float64. `mean_b` is overwritten; returns the merged count na + nb. Per element:
    mean += delta * (nb / n), m2 = m2 + m2_b + delta**2 * (na * nb / n), delta = mean_b - mean, n = max(na + nb, 1);
    0 where na + nb is 0."""
    n = np.add(na, nb)
    safe_n = np.maximum(n, 1.0)
    delta = np.subtract(mean_b, mean, out=mean_b)
    weight = np.multiply(na, nb)
    np.divide(weight, safe_n, out=weight)
    share = np.divide(nb, safe_n, out=safe_n)
    np.multiply(delta, share, out=share)
    np.add(mean, share, out=mean)
    np.square(delta, out=delta)
    np.multiply(delta, weight, out=delta)
    np.add(m2, m2_b, out=m2)
    np.add(m2, delta, out=m2)
    empty = n <= 0
    if empty.any():
        np.copyto(mean, 0.0, where=empty)
        np.copyto(m2, 0.0, where=empty)
    return n


# --------------------------------------------------------------------------- host side: one cell


def _np64(a: mx.array) -> np.ndarray:
    return np.array(a).astype(np.float64)


@dataclass(eq=False)
class CellStats:
    """Running statistics of one (layer, timestep) cell, float64/int64 on the host.

    Empty channels hold the merge identities (mean 0, m2 0, min +inf, max -inf); `std` and
    `ActivationStats.to_arrays` report them as NaN.
    """

    spec: HistogramSpec
    count: np.ndarray  # (C,) int64
    mean: np.ndarray  # (C,) float64
    m2: np.ndarray  # (C,) float64: sum of squared deviations from the mean
    min: np.ndarray  # (C,) float64
    max: np.ndarray  # (C,) float64
    hist: np.ndarray  # (bins,) int64
    negative: int = 0  # finite values < 0
    zero: int = 0  # finite values == 0 (-0.0 included)
    nan: int = 0
    posinf: int = 0
    neginf: int = 0

    @classmethod
    def empty(cls, channels: int, spec: HistogramSpec) -> "CellStats":
        return cls(spec=spec, count=np.zeros(channels, np.int64), mean=np.zeros(channels), m2=np.zeros(channels),
                   min=np.full(channels, np.inf), max=np.full(channels, -np.inf), hist=np.zeros(spec.bins, np.int64))

    @classmethod
    def from_reduction(cls, r: BatchReduction, spec: HistogramSpec) -> "CellStats":
        """Host statistics of one evaluated BatchReduction (evaluates it if it is not yet)."""
        count = np.array(r.count).astype(np.int64)
        mean, m2 = batch_moments(count, *(np.array(getattr(r, name)) for name in MOMENT_FIELDS))
        slots = np.array(r.slots).astype(np.int64)
        below_zero, posinf, neginf, zero = (int(v) for v in np.array(r.signs))
        nan = int(slots[spec.bins]) - posinf - neginf
        return cls(spec=spec, count=count, mean=mean, m2=m2,
                   min=_np64(r.min), max=_np64(r.max), hist=slots[: spec.bins], negative=below_zero - neginf,
                   zero=zero, nan=nan, posinf=posinf, neginf=neginf)

    @classmethod
    def from_activations(cls, x: mx.array, spec: HistogramSpec = HistogramSpec()) -> "CellStats":
        """One batch on its own: reduce on the device, evaluate, bring home."""
        reduction = reduce_batch(x, spec)
        mx.eval(reduction.arrays())
        return cls.from_reduction(reduction, spec)

    @property
    def channels(self) -> int:
        return self.count.shape[0]

    @property
    def finite_count(self) -> int:
        return int(self.count.sum())

    @property
    def std(self) -> np.ndarray:
        """(C,) population standard deviation (ddof 0); NaN for empty channels."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / self.count), np.nan)

    @property
    def negative_fraction(self) -> float:
        """Fraction of the finite values that are < 0; NaN when there are none."""
        total = self.finite_count
        return self.negative / total if total else float("nan")

    @property
    def zero_fraction(self) -> float:
        """Fraction of the finite values that are exactly 0; NaN when there are none."""
        total = self.finite_count
        return self.zero / total if total else float("nan")

    def merge(self, other: "CellStats") -> "CellStats":
        """Statistics of the union of two disjoint sample sets (Chan et al.'s parallel update, float64)."""
        if other.spec != self.spec:
            raise ValueError(f"cannot merge cells with different histograms: {self.spec} vs {other.spec}")
        if other.channels != self.channels:
            raise ValueError(f"cannot merge cells with {self.channels} and {other.channels} channels")
        mean, m2 = self.mean.copy(), self.m2.copy()
        chan_merge(self.count.astype(np.float64), mean, m2, other.count.astype(np.float64), other.mean.copy(),
                   other.m2)
        counters = {name: getattr(self, name) + getattr(other, name) for name in CELL_COUNTERS}
        return CellStats(spec=self.spec, count=self.count + other.count, mean=mean, m2=m2,
                         min=np.minimum(self.min, other.min), max=np.maximum(self.max, other.max),
                         hist=self.hist + other.hist, **counters)


# --------------------------------------------------------------------------- host side: many cells at once


CHUNK_ELEMENTS = 2**16  # CellBlock merges this many (cell, channel) elements per NumPy operation


@dataclass(eq=False)
class CellBlock:
    """The running statistics of K cells with one channel count and histogram, as stacked arrays.

    Merging a flush's K packed reductions (`merge_packed`) is one NumPy pass per quantity over (K, C) arrays
    instead of K passes of a dozen small ones; the arithmetic is `CellStats.from_reduction` and `CellStats.merge`'s,
    element for element, so the result is bit-identical to merging the cells one by one. Counts are kept as
    float64 (exact below 2^53, and what the merge computes with); `cell(i)` gives row i as a `CellStats`.
    """

    spec: HistogramSpec
    count: np.ndarray  # (K, C) float64, integer valued
    mean: np.ndarray  # (K, C) float64
    m2: np.ndarray  # (K, C) float64
    min: np.ndarray  # (K, C) float64
    max: np.ndarray  # (K, C) float64
    hist: np.ndarray  # (K, bins) int64
    counters: np.ndarray  # (K, len(CELL_COUNTERS)) int64
    fresh: np.ndarray  # (K,) bool: rows no batch has been merged into, which take the first one as it is

    @classmethod
    def from_cells(cls, cells: list[CellStats | None], channels: int, spec: HistogramSpec) -> "CellBlock":
        """Rows copied from `cells`; None is a cell not visited yet (`fresh`)."""
        K = len(cells)
        block = cls(spec=spec, count=np.zeros((K, channels)), mean=np.zeros((K, channels)),
                    m2=np.zeros((K, channels)), min=np.full((K, channels), np.inf),
                    max=np.full((K, channels), -np.inf), hist=np.zeros((K, spec.bins), np.int64),
                    counters=np.zeros((K, len(CELL_COUNTERS)), np.int64),
                    fresh=np.array([cell is None for cell in cells], dtype=bool))
        for i, cell in enumerate(cells):
            if cell is not None:
                for name in ("count", "mean", "m2", "min", "max", "hist"):
                    getattr(block, name)[i] = getattr(cell, name)
                block.counters[i] = [getattr(cell, name) for name in CELL_COUNTERS]
        return block

    def __len__(self) -> int:
        return self.count.shape[0]

    @property
    def channels(self) -> int:
        return self.count.shape[1]

    def extend(self, other: "CellBlock") -> "CellBlock":
        """A block of these rows followed by `other`'s."""
        return CellBlock(self.spec, **{name: np.concatenate([getattr(self, name), getattr(other, name)])
                                       for name in ("count", "mean", "m2", "min", "max", "hist", "counters",
                                                    "fresh")})

    def cell(self, i: int) -> CellStats:
        """Row i as a CellStats (its per-channel arrays are views of this block's)."""
        counters = {name: int(v) for name, v in zip(CELL_COUNTERS, self.counters[i])}
        return CellStats(spec=self.spec, count=self.count[i].astype(np.int64), mean=self.mean[i], m2=self.m2[i],
                         min=self.min[i], max=self.max[i], hist=self.hist[i], **counters)

    def merge_packed(self, floats: np.ndarray, ints: np.ndarray, rows: slice | np.ndarray = slice(None)) -> None:
        """Merge K packed reductions (`pack_reductions` on the host: K x (channels, bins + 1) of this block's
        shape) into `rows` (K of them, distinct), in place."""
        C, S = self.channels, self.spec.bins + 1
        K = ints.size // (C + S + SIGNS)
        if floats.size != K * len(FLOAT_FIELDS) * C or ints.size != K * (C + S + SIGNS):
            raise ValueError(f"packed reductions of {floats.size} floats and {ints.size} ints are not {K} of "
                             f"{C} channels and {S} histogram slots")
        floats = floats.reshape(K, len(FLOAT_FIELDS), C)
        ints = ints.reshape(K, C + S + SIGNS)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1 or stop - start != K:
                raise ValueError(f"rows {rows} must be a slice of {K} consecutive rows")
            chunk = max(1, CHUNK_ELEMENTS // C)  # stacked arrays of about CHUNK_ELEMENTS stay in the caches
            for first in range(0, K, chunk):
                last = min(K, first + chunk)
                self._merge_rows(slice(start + first, start + last), floats[first:last], ints[first:last])
            return
        rows = np.asarray(rows, dtype=np.intp)
        if rows.shape != (K,) or len(set(rows.tolist())) != K:
            raise ValueError(f"rows {rows} must be {K} distinct row indices")
        part = CellBlock(self.spec, **{name: getattr(self, name)[rows]
                                       for name in ("count", "mean", "m2", "min", "max", "hist", "counters",
                                                    "fresh")})
        part.merge_packed(floats, ints)
        for name in ("count", "mean", "m2", "min", "max", "hist", "counters", "fresh"):
            getattr(self, name)[rows] = getattr(part, name)

    def _merge_rows(self, rows: slice, floats: np.ndarray, ints: np.ndarray) -> None:
        C, bins = self.channels, self.spec.bins
        field = {name: floats[:, j] for j, name in enumerate(FLOAT_FIELDS)}
        count = ints[:, :C]
        slots, signs = ints[:, C:C + bins + 1], ints[:, C + bins + 1:]
        if self.count[rows].shape[0] != count.shape[0]:
            raise ValueError(f"{count.shape[0]} reductions for {self.count[rows].shape[0]} rows")
        mean_b, m2_b = batch_moments(count, *(field[name] for name in MOMENT_FIELDS))
        fresh = np.flatnonzero(self.fresh[rows])
        first = (mean_b[fresh].copy(), m2_b[fresh].copy()) if fresh.size else None
        na, mean, m2 = self.count[rows], self.mean[rows], self.m2[rows]  # views: rows is a slice
        na[...] = chan_merge(na, mean, m2, count.astype(np.float64), mean_b, m2_b)
        if first is not None:  # a first batch is taken as it is (merging it into nothing could flip a zero's sign)
            mean[fresh], m2[fresh] = first
        np.minimum(self.min[rows], field["min"], out=self.min[rows])
        np.maximum(self.max[rows], field["max"], out=self.max[rows])
        np.add(self.hist[rows], slots[:, :bins], out=self.hist[rows])
        below_zero, posinf, neginf, zero = signs.T.astype(np.int64)
        nan = slots[:, bins].astype(np.int64) - posinf - neginf
        self.counters[rows] += np.stack([below_zero - neginf, zero, nan, posinf, neginf], axis=1)
        self.fresh[rows] = False


# --------------------------------------------------------------------------- host side: all cells

PER_CHANNEL_STATS = ("mean", "m2", "min", "max")
DERIVED_KEYS = ("std", "negative_fraction", "zero_fraction", "bin_edges")  # written by to_arrays, recomputed on load


def timestep_key(timestep) -> float:
    """Cells are keyed by the timestep as a Python float (so 500, 500.0 and np.float32(500) are one cell)."""
    if isinstance(timestep, (bool, np.bool_)):
        raise ValueError(f"timestep must be a number, got {timestep!r}")
    try:
        value = float(timestep)
    except (TypeError, ValueError):
        raise ValueError(f"timestep must be a number, got {timestep!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"timestep must be finite, got {timestep!r}")
    return value


class ActivationStats:
    """CellStats keyed by (layer name, timestep); every cell has the same channel count and histogram spec.

    `to_arrays()` stacks them as (L, T, C) per-channel and (L, T, bins) histogram arrays (cells never visited:
    `present` False, count 0, NaN statistics); `from_arrays()` rebuilds the container exactly.
    """

    def __init__(self, spec: HistogramSpec = HistogramSpec(), layers=()):
        self.spec = spec
        self.channels: int | None = None
        self._layers: list[str] = []
        self._cells: dict[tuple[str, float], CellStats] = {}
        self.add_layers(layers)

    # ---- access

    def add_layers(self, names) -> None:
        """Fix the export order of layers (first mention wins); layers are also added when first updated."""
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"layer names must be non-empty strings, got {name!r}")
            if name not in self._layers:
                self._layers.append(name)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self._layers)

    @property
    def timesteps(self) -> tuple[float, ...]:
        return tuple(sorted({t for _, t in self._cells}))

    def __getitem__(self, key: tuple[str, float]) -> CellStats:
        layer, timestep = key
        try:
            return self._cells[layer, timestep_key(timestep)]
        except KeyError:
            raise KeyError(f"no statistics for layer {layer!r} at timestep {timestep!r}") from None

    def __contains__(self, key: tuple[str, float]) -> bool:
        layer, timestep = key
        return (layer, timestep_key(timestep)) in self._cells

    def __len__(self) -> int:
        return len(self._cells)

    def items(self):
        return self._cells.items()

    # ---- accumulation

    def update(self, layer: str, timestep, cell: CellStats) -> None:
        """Merge `cell` (one batch, or any disjoint sample set) into the (layer, timestep) cell."""
        if cell.spec != self.spec:
            raise ValueError(f"layer {layer!r}: cell histogram {cell.spec} differs from these stats' {self.spec}")
        if self.channels is None:
            self.channels = cell.channels
        elif cell.channels != self.channels:
            raise ValueError(f"layer {layer!r} has {cell.channels} channels, these stats hold {self.channels}; "
                             "all layers must have the same channel count")
        self.add_layers([layer])
        key = (layer, timestep_key(timestep))
        self._cells[key] = self._cells[key].merge(cell) if key in self._cells else cell

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        """A new container holding both; cells present in both are merged (disjoint sample sets assumed)."""
        if other.spec != self.spec:
            raise ValueError(f"cannot merge stats with different histograms: {self.spec} vs {other.spec}")
        merged = ActivationStats(self.spec, self.layers + other.layers)
        for source in (self, other):
            for (layer, timestep), cell in source.items():
                merged.update(layer, timestep, cell)
        return merged

    # ---- export

    def to_arrays(self, timesteps: tuple[float, ...] | None = None) -> dict[str, np.ndarray]:
        """Every cell as arrays over the layers and `timesteps` (default: its own; a superset lays out a group's
        statistics like the merged ones, timesteps it has no data for as empty cells)."""
        layers = self.layers
        if timesteps is None:
            timesteps = self.timesteps
        elif not set(self.timesteps) <= set(timesteps):
            raise ValueError(f"timesteps {sorted(set(self.timesteps) - set(timesteps))} hold data but are not laid out")
        L, T, C, B = len(layers), len(timesteps), self.channels or 0, self.spec.bins
        out = {
            "layers": np.array(layers, dtype=str),
            "timesteps": np.array(timesteps, dtype=np.float64),
            "hist_scale": np.array(self.spec.scale, dtype=np.float64),
            "hist_limit": np.array(self.spec.limit, dtype=np.float64),
            "bin_edges": self.spec.bin_edges,
            "present": np.zeros((L, T), dtype=bool),
            "count": np.zeros((L, T, C), dtype=np.int64),
            **{name: np.full((L, T, C), np.nan) for name in PER_CHANNEL_STATS + ("std",)},
            "hist": np.zeros((L, T, B), dtype=np.int64),
            **{name: np.zeros((L, T), dtype=np.int64) for name in CELL_COUNTERS},
            "negative_fraction": np.full((L, T), np.nan),
            "zero_fraction": np.full((L, T), np.nan),
        }
        layer_index = {name: i for i, name in enumerate(layers)}
        time_index = {t: j for j, t in enumerate(timesteps)}
        for (layer, timestep), cell in self._cells.items():
            i, j = layer_index[layer], time_index[timestep]
            filled = cell.count > 0
            out["present"][i, j] = True
            out["count"][i, j] = cell.count
            for name in PER_CHANNEL_STATS:
                out[name][i, j] = np.where(filled, getattr(cell, name), np.nan)
            out["std"][i, j] = cell.std
            out["hist"][i, j] = cell.hist
            for name in CELL_COUNTERS:
                out[name][i, j] = getattr(cell, name)
            out["negative_fraction"][i, j] = cell.negative_fraction
            out["zero_fraction"][i, j] = cell.zero_fraction
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ActivationStats":
        """Inverse of to_arrays. The derived keys (std, the fractions, bin_edges) are recomputed, not read;
        bin_edges, if given, must be the histogram spec's."""
        required = (("layers", "timesteps", "hist_scale", "hist_limit", "present", "count", "hist")
                    + PER_CHANNEL_STATS + CELL_COUNTERS)
        missing = [k for k in required if k not in arrays]
        if missing:
            raise ValueError(f"activation stats arrays lack {missing}")
        layers = [str(name) for name in np.asarray(arrays["layers"]).reshape(-1)]
        timesteps = np.asarray(arrays["timesteps"], dtype=np.float64)
        hist = np.asarray(arrays["hist"])
        L, T = len(layers), timesteps.shape[0]
        if np.shape(arrays["hist_scale"]) != () or np.shape(arrays["hist_limit"]) != ():
            raise ValueError("hist_scale and hist_limit must be scalars")
        spec = HistogramSpec(bins=int(hist.shape[-1]), scale=float(arrays["hist_scale"]),
                             limit=float(arrays["hist_limit"]))
        if "bin_edges" in arrays and not np.array_equal(arrays["bin_edges"], spec.bin_edges):
            raise ValueError(f"bin_edges do not match {spec}")
        count = np.asarray(arrays["count"])
        C = count.shape[-1] if count.ndim == 3 else -1
        expected = {"present": (L, T), "count": (L, T, C), "hist": (L, T, spec.bins),
                    **{k: (L, T, C) for k in PER_CHANNEL_STATS}, **{k: (L, T) for k in CELL_COUNTERS}}
        for key, shape in expected.items():
            if np.shape(arrays[key]) != shape:
                raise ValueError(f"{key!r} has shape {np.shape(arrays[key])}, expected {shape} "
                                 f"for {L} layers, {T} timesteps, {C} channels, {spec.bins} bins")
        if len(set(layers)) != L:
            raise ValueError(f"layer names are not unique: {layers}")
        if not (np.all(np.isfinite(timesteps)) and np.all(np.diff(timesteps) > 0)):
            raise ValueError(f"timesteps must be finite and strictly increasing, got {timesteps}")
        present = np.asarray(arrays["present"], dtype=bool)
        stats = cls(spec, layers)
        for i, j in zip(*np.nonzero(~present)):
            if count[i, j].any() or hist[i, j].any() or any(arrays[k][i, j] for k in CELL_COUNTERS):
                raise ValueError(f"cell ({layers[i]!r}, {timesteps[j]}) is marked absent but holds counts")
        for i, j in zip(*np.nonzero(present)):
            where = f"({layers[i]!r}, {timesteps[j]})"
            stats.update(layers[i], timesteps[j], _cell_from_arrays(arrays, i, j, spec, where))
        return stats


class PackedMerger:
    """Merges packed reductions (`pack_reductions`, brought to the host) into an ActivationStats, many cells per
    NumPy operation: the cells of each timestep are held as one CellBlock, seeded from the cells the stats already
    hold, and stored back into the stats by `write_back()`. Until then the stats do not show what was merged, and
    must not be updated otherwise. The result equals `stats.update(layer, timestep, CellStats.from_reduction(r))`
    for every reduction in order, bit for bit.
    """

    def __init__(self, stats: "ActivationStats"):
        self.stats = stats
        self.channels: int | None = stats.channels
        self._blocks: dict[float, CellBlock] = {}
        self._rows: dict[float, dict[str, int]] = {}
        self._order: list[tuple[str, float]] = []  # cells in the order they were first merged

    def __len__(self) -> int:
        return len(self._order)

    def merge(self, layers: list[str], timestep: float, floats: np.ndarray, ints: np.ndarray, channels: int,
              slots: int) -> None:
        """Merge the packed reductions of `layers` (distinct; one reduction of `channels` channels and `slots`
        histogram slots each, in this order) at `timestep`."""
        spec, timestep = self.stats.spec, timestep_key(timestep)
        if len(set(layers)) != len(layers):
            raise ValueError(f"one merge takes each layer once, got {layers}")
        if slots != spec.bins + 1:
            raise ValueError(f"layer {layers[0]!r}: {slots - 1} histogram bins, these stats' have {spec.bins}")
        held = self.stats.channels if self.stats.channels is not None else self.channels
        if held is not None and channels != held:
            raise ValueError(f"layer {layers[0]!r} has {channels} channels, these stats hold {held}; "
                             "all layers must have the same channel count")
        self.channels = channels
        index = self._rows.setdefault(timestep, {})
        new = [layer for layer in layers if layer not in index]
        if new:
            self.stats.add_layers(new)
            seeds = [self.stats._cells.get((layer, timestep)) for layer in new]
            added = CellBlock.from_cells(seeds, channels, spec)
            block = self._blocks.get(timestep)
            self._blocks[timestep] = added if block is None else block.extend(added)
            for layer in new:
                index[layer] = len(index)
                self._order.append((layer, timestep))
        rows = [index[layer] for layer in layers]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self._blocks[timestep].merge_packed(floats, ints, slice(rows[0], rows[0] + len(rows)) if contiguous
                                            else np.array(rows))

    def write_back(self) -> None:
        """Store every merged cell into the stats and start afresh."""
        if self._order and self.stats.channels is None:
            self.stats.channels = self.channels
        for layer, timestep in self._order:
            self.stats._cells[layer, timestep] = self._blocks[timestep].cell(self._rows[timestep][layer])
        self._blocks.clear()
        self._rows.clear()
        self._order.clear()


def _cell_from_arrays(arrays: dict[str, np.ndarray], i: int, j: int, spec: HistogramSpec, where: str) -> CellStats:
    count = np.asarray(arrays["count"][i, j], dtype=np.int64)
    filled = count > 0
    values = {k: np.asarray(arrays[k][i, j], dtype=np.float64) for k in PER_CHANNEL_STATS}
    if np.any(count < 0):
        raise ValueError(f"cell {where} has negative counts")
    bad = [k for k, v in values.items() if not np.all(np.isfinite(v[filled]))]
    if bad or np.any(values["m2"][filled] < 0) or np.any(values["min"][filled] > values["max"][filled]):
        raise ValueError(f"cell {where} has invalid statistics (non-finite {bad}, negative m2 or min > max)")
    identity = {"mean": 0.0, "m2": 0.0, "min": np.inf, "max": -np.inf}  # merge identities of empty channels
    per_channel = {k: np.where(filled, v, identity[k]) for k, v in values.items()}
    counters = {k: int(arrays[k][i, j]) for k in CELL_COUNTERS}
    hist = np.asarray(arrays["hist"][i, j], dtype=np.int64)
    finite = int(count.sum())
    # Every finite value lands in exactly one bin, and a value is negative, zero or neither.
    if np.any(hist < 0) or int(hist.sum()) != finite or min(counters.values()) < 0 or \
            counters["negative"] + counters["zero"] > finite:
        raise ValueError(f"cell {where} has inconsistent counts (histogram total {int(hist.sum())}, {finite} finite "
                         f"values, {counters['negative']} negative, {counters['zero']} zero)")
    return CellStats(spec=spec, count=count, hist=hist, **per_channel, **counters)
