"""The histogram layout of the activation statistics: one fixed set of bin edges that holds every finite float32.

Bins are uniform in u = asinh(x / scale): about `scale * du` wide near 0 (a linear core) and a constant fraction
`du` of |x| in the tail (logarithmic), symmetric around 0 with an edge at 0. They span [-limit, limit]; two end
bins, [-float32 max, -limit) and [limit, float32 max], hold anything beyond, so no finite value is ever left out.
The default (4,096 bins, scale 1/64, limit 65,536) puts about 400 bins on GELU's negative side [-0.17, 0] and
keeps tail bins 0.78% of their value wide.

The edges depend on the spec alone, so statistics of any batch, process or machine merge bin for bin. Binning a
value is numpy.histogram's rule over the float32 edges: each bin holds [left, right), the last also its right
edge. On the device the bin is guessed from asinh (float32, accurate to far less than a bin) and moved by one
against the float32 edges, which makes the result exact whatever rounding the device's asinh has.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx
import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_BINS = 2**16  # float32 keeps the asinh guess well within one bin up to here
MIN_MAGNITUDE, MAX_MAGNITUDE = 1e-30, 1e30  # scale and limit: 1 / scale and the edges stay normal float32


class HistogramSpecError(ValueError):
    """A bad HistogramSpec field; `field` names it, so a command line can name its own option instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"HistogramSpec.{field} {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class HistogramSpec:
    """`bins` bins uniform in asinh(x / scale) over [-limit, limit], the two outermost reaching float32's max."""

    bins: int = 4096
    scale: float = 1 / 64
    limit: float = 65536.0

    def __post_init__(self):
        bins = self.bins
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 4 <= bins <= MAX_BINS or bins % 2:
            raise HistogramSpecError("bins", f"must be an even integer from 4 to {MAX_BINS}, got {bins!r}")
        for name in ("scale", "limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
                    MIN_MAGNITUDE <= value <= MAX_MAGNITUDE):
                raise HistogramSpecError(name, f"must be a number from {MIN_MAGNITUDE:g} to {MAX_MAGNITUDE:g}, "
                                               f"got {value!r}")
        object.__setattr__(self, "bins", int(bins))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "limit", float(self.limit))
        if np.any(np.diff(self.bin_edges) <= 0) or self.bin_edges[self.bins // 2 + 1] < np.finfo(np.float32).tiny:
            raise HistogramSpecError("bins", f"{self.bins} bins with scale {self.scale:g} up to {self.limit:g} are "
                                             "too narrow for distinct float32 edges")

    @property
    def bins_per_unit(self) -> float:
        """1 / du: fine bins per unit of asinh(x / scale)."""
        return (self.bins // 2 - 1) / float(np.arcsinh(self.limit / self.scale))

    @cached_property
    def bin_edges(self) -> np.ndarray:
        """(bins + 1,) float32, increasing: -float32 max, scale * sinh(k du) for k = 1 - bins/2 .. bins/2 - 1
        (-limit .. limit, 0 in the middle), float32 max."""
        half = self.bins // 2
        inner = self.scale * np.sinh(np.arange(1 - half, half) / self.bins_per_unit)
        inner[half - 1] = 0.0  # sinh(0) exactly; the grid is symmetric by construction
        return np.concatenate([[-FLOAT32_MAX], inner, [FLOAT32_MAX]]).astype(np.float32)

    def describe(self) -> str:
        return f"{self.bins} bins uniform in asinh(x / {self.scale:g}) over +-{self.limit:g}, end bins to +-float32 max"


def histogram_slots(x: mx.array, spec: HistogramSpec, edges: mx.array | None = None) -> mx.array:
    """Bin index per element of float32 x: 0 .. bins-1, or bins for a non-finite value (`edges`: the spec's
    bin_edges already on the device)."""
    bins, half = spec.bins, spec.bins // 2
    edges = mx.array(spec.bin_edges) if edges is None else edges
    finite = mx.isfinite(x)
    xf = mx.where(finite, x, 0.0)
    # The clip happens in float32: x / scale may overflow to inf, which no integer conversion survives.
    steps = mx.clip(mx.floor(mx.arcsinh(xf * (1 / spec.scale)) * spec.bins_per_unit), -half, half - 1)
    guess = steps.astype(mx.int32) + half
    below, above = xf < edges[guess], (xf >= edges[guess + 1]) & (guess != bins - 1)  # the last bin holds its edge
    index = mx.where(below, guess - 1, mx.where(above, guess + 1, guess))
    return mx.where(finite, index, bins)
