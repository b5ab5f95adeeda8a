"""Uniform quantization grids and fake quantization with straight-through rounding, in MLX (float32 inside).

A grid is a scale s > 0 and an integer-valued zero point z; its levels are the integers q in [qmin, qmax] and
level q stands for the value (q - z) * s:

    asymmetric (affine), b bits:  q in 0 .. 2^b - 1
    symmetric, b bits:            q in -(2^(b-1) - 1) .. 2^(b-1) - 1, z = 0 (the -2^(b-1) level is not used, so
                                  the grid is symmetric about 0 and +-amax are both levels)

    quantize:    q = clip(round(x / s) + z, qmin, qmax)     round half to even (mx.round)
    dequantize:  x_hat = (q - z) * s

0 is always on the lattice s * Z (q = z gives exactly 0.0) and, when qmin <= z <= qmax, one of the levels. The
end levels (qmin - z) * s and (qmax - z) * s are fixed points of fake quantization. This is the PyTorch /
TaQ-DiT / LSQ convention; MLX's packed layout (w = scale * q + bias, q in 0 .. 2^b - 1) is the same grid with
bias = (qmin - z) * s and its q = q - qmin (see taq.quant.export).

Granularity (`QuantSpec.granularity`) says which elements share a grid, and fixes the shape of the parameters:

    "tensor"   any shape            scale, zero_point: ()                  activations
    "channel"  weight (out, in)     scale, zero_point: (out, 1)            one grid per output channel
    "group"    weight (out, in)     scale, zero_point: (out, in // group)  one grid per `group` input columns

A per-channel grid is a per-group grid with one group of `in` columns: both go through `group_view`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import mlx.core as mx
import numpy as np

MIN_BITS, MAX_BITS = 2, 8
GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize supports, so every spec can be exported to MLX
GRANULARITIES = ("tensor", "channel", "group")
ANCHORS = ("zero", "min", "mlx")
EPS = 1e-8  # smallest scale a range maps to (TaQ-DiT's observer floor); an all-zero range still quantizes to 0
MLX_EPS = 1e-7  # mx.quantize's floor, used by anchor="mlx"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, grid kind, granularity, and how a range becomes a grid.

    `anchor` (asymmetric grids only) is the rule `grid_from_range` uses to turn a range [lo, hi] into (s, z):
      "zero": TaQ-DiT's / PyTorch's rule. The range is widened to contain 0, s = (hi - lo) / (2^b - 1),
              z = round(-lo / s). 0 is a level; the end levels are within s / 2 of lo and hi.
      "min":  0 and lo are levels (lo to float rounding): z = floor(-lo / s0), s = -lo / z with
              s0 = (hi - lo) / (2^b - 1), so the step grows by less than a factor (z + 1) / z and hi stays covered.
              Meant for post-GELU activations, whose floor (about -0.17) holds much of the mass. When the
              negative side is shorter than one step (-lo < s0) no such grid exists and the rule is "zero"'s.
      "mlx":  mx.quantize's rule: the end with the larger magnitude and 0 (on the lattice) are kept, the other
              end is within about one step; the range is *not* widened to contain 0 (an all-positive weight
              group gets a window that excludes 0, z outside [qmin, qmax]). min-max ranges under this rule
              give mx.quantize's grids.
    Symmetric grids have one rule (s = max(|lo|, |hi|) / qmax, z = 0) and must leave `anchor` at "zero".
    """

    bits: int = 8
    symmetric: bool = False
    granularity: str = "tensor"
    group_size: int | None = None  # required for, and only for, granularity="group"
    anchor: str = "zero"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"QuantSpec.bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be True or False, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if type(self.group_size) is not int or self.group_size not in GROUP_SIZES:
                raise ValueError(f"QuantSpec.group_size must be one of {GROUP_SIZES} for granularity='group', "
                                 f"got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"QuantSpec.group_size is only for granularity='group' "
                             f"(got group_size={self.group_size!r} with granularity={self.granularity!r})")
        if self.anchor not in ANCHORS:
            raise ValueError(f"QuantSpec.anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.symmetric and self.anchor != "zero":
            raise ValueError(f"QuantSpec.anchor={self.anchor!r} applies to asymmetric grids only; "
                             "symmetric grids are always anchored at zero")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def steps(self) -> int:
        """qmax - qmin: the number of steps between the end levels."""
        return self.qmax - self.qmin

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        """Inverse of to_dict. Unknown keys are an error; missing keys take their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"QuantSpec.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"QuantSpec.from_dict: unknown keys {unknown}")
        return cls(**d)

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale and zero point for a tensor of `shape` (validates the shape)."""
        shape = tuple(shape)
        if self.granularity == "tensor":
            return ()
        if len(shape) != 2:
            raise ValueError(f"granularity={self.granularity!r} is for weights of shape (out, in), got shape {shape}")
        out_dim, in_dim = shape
        if self.granularity == "channel":
            return (out_dim, 1)
        if in_dim % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the input dimension {in_dim} "
                             f"of a weight of shape {shape}")
        return (out_dim, in_dim // self.group_size)


class QParams(NamedTuple):
    """A grid's parameters, float32 arrays of `QuantSpec.param_shape`; zero_point holds integers."""

    scale: mx.array
    zero_point: mx.array


# --------------------------------------------------------------------------- elementwise primitives


def as_float32(a) -> mx.array:
    """a (an mx.array, NumPy array or Python number) as a float32 mx.array."""
    return a.astype(mx.float32) if isinstance(a, mx.array) else mx.array(np.asarray(a, dtype=np.float32))


def round_ste(x: mx.array) -> mx.array:
    """round(x) forward (bit for bit), identity backward: the straight-through estimator."""
    return x + mx.stop_gradient(mx.round(x) - x)


def fake_quant_affine(x: mx.array, scale, zero_point, qmin: int, qmax: int) -> mx.array:
    """(clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale, broadcasting, float32 inside.

    Gradients (what autodiff through this expression gives; all three inputs are ordinary differentiable inputs):
      d/dx:           1 where qmin <= round(x/s) + z <= qmax (the end levels included), 0 where clipped.
      d/dscale:       round(x/s) - x/s inside, (qmin - z) or (qmax - z) where clipped: LSQ's gradient
                      (Esser et al. 2020); scale it with `grad_scale` for LSQ's 1/sqrt(N * qmax) factor.
      d/dzero_point:  0 inside, -s where clipped (LSQ+). Round a learned zero point with `round_ste` first;
                      this function uses the value it is given.
    The clip is a `where` on the rounded level rather than mx.clip, whose gradient is 0 at the bounds
    themselves. The result has x's dtype.
    """
    q = round_ste(x.astype(mx.float32) / scale) + zero_point
    q = mx.where(q < qmin, qmin, mx.where(q > qmax, qmax, q))
    return ((q - zero_point) * scale).astype(x.dtype)


def quantize_affine(x: mx.array, scale, zero_point, qmin: int, qmax: int) -> mx.array:
    """The integer levels clip(round(x / scale) + zero_point, qmin, qmax) as int32 (no gradient)."""
    q = mx.round(x.astype(mx.float32) / scale) + zero_point
    return mx.clip(q, qmin, qmax).astype(mx.int32)


def dequantize_affine(q: mx.array, scale, zero_point) -> mx.array:
    """(q - zero_point) * scale in float32: the values of levels q. Equals fake_quant_affine bit for bit."""
    return (q.astype(mx.float32) - zero_point) * scale


def grad_scale(x: mx.array, factor: float) -> mx.array:
    """x unchanged forward (bit for bit), gradient multiplied by `factor` backward (LSQ's step-size scaling)."""
    y = x * factor
    return mx.stop_gradient(x) + (y - mx.stop_gradient(y))


def lsq_grad_factor(num_elements: int, qmax: int) -> float:
    """LSQ's gradient scale for a step size shared by `num_elements` values: 1 / sqrt(num_elements * qmax)."""
    if num_elements < 1 or qmax < 1:
        raise ValueError(f"lsq_grad_factor needs num_elements >= 1 and qmax >= 1, got {num_elements}, {qmax}")
    return 1.0 / (num_elements * qmax) ** 0.5


# --------------------------------------------------------------------------- ranges <-> grids


def grid_from_range(lo, hi, spec: QuantSpec) -> QParams:
    """The grid (scale, zero point) for ranges [lo, hi] (arrays of one shape, or scalars) under spec's rule.

    Symmetric: s = max(|lo|, |hi|) / qmax, z = 0. Asymmetric: see `QuantSpec.anchor`. Scales are at least EPS
    (MLX_EPS for anchor="mlx"), so a zero range gives a grid that still holds 0 exactly.
    """
    lo, hi = as_float32(lo), as_float32(hi)
    if not mx.all(mx.isfinite(lo) & mx.isfinite(hi)).item():
        raise ValueError("grid_from_range: ranges must be finite (got NaN or Inf)")
    if mx.any(lo > hi).item():
        raise ValueError("grid_from_range: every range needs lo <= hi")
    n = float(spec.steps)
    if spec.symmetric:
        scale = mx.maximum(mx.maximum(mx.abs(lo), mx.abs(hi)) / spec.qmax, EPS)
        return QParams(scale, mx.zeros_like(scale))
    if spec.anchor == "mlx":
        return _mlx_grid(lo, hi, n)
    scale, zero_point = zero_anchored_grid(lo, hi, n)
    if spec.anchor == "min":
        z = mx.floor(-lo / scale)
        keep_min = z >= 1  # otherwise the negative side is shorter than a step: "zero"'s grid
        scale = mx.where(keep_min, -lo / mx.maximum(z, 1.0), scale)
        zero_point = mx.where(keep_min, z, zero_point)
    return QParams(scale, zero_point)


def zero_anchored_grid(lo: mx.array, hi: mx.array, n: float) -> QParams:
    """The asymmetric anchor="zero" grid of [lo, hi] with n steps, unchecked and with no host synchronisation (for
    grids computed inside a forward): the range widened to contain 0, s = (hi - lo) / n, z = round(-lo / s)."""
    lo, hi = mx.minimum(lo, 0.0), mx.maximum(hi, 0.0)
    scale = mx.maximum((hi - lo) / n, EPS)
    return QParams(scale, mx.clip(mx.round(-lo / scale), 0.0, n))


def _mlx_grid(lo: mx.array, hi: mx.array, n: float) -> QParams:
    """mx.quantize's affine grid for [lo, hi] in this module's terms (positive scale, integer zero point).

    MLX keeps the end with the larger magnitude, `edge`, as its bias and nudges the step so edge / step is an
    integer q0: scale = edge / q0 with the sign that makes levels q = 0..n run from edge inwards. A negative
    MLX scale (edge = hi) is the same grid read from the top: our level n - q is MLX's q.
    """
    step = mx.maximum((hi - lo) / n, MLX_EPS)
    lo_is_edge = mx.abs(lo) > mx.abs(hi)
    signed = mx.where(lo_is_edge, step, -step)
    edge = mx.where(lo_is_edge, lo, hi)
    q0 = mx.round(edge / signed)
    signed = mx.where(q0 != 0, edge / q0, signed)
    scale = mx.abs(signed)
    zero_point = mx.where(signed > 0, -q0, n + q0)
    return QParams(scale, zero_point)


def grid_range(params: QParams, spec: QuantSpec) -> tuple[mx.array, mx.array]:
    """The values of the end levels: ((qmin - z) * s, (qmax - z) * s)."""
    scale, zero_point = params
    return (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale


# --------------------------------------------------------------------------- whole tensors under a spec


def group_view(w: mx.array, spec: QuantSpec) -> mx.array:
    """A weight (out, in) as (out, G, g): G grids per row of g columns each (channel: G = 1, g = in)."""
    shape = spec.param_shape(w.shape)
    if spec.granularity == "tensor":
        raise ValueError("group_view is for granularity 'channel' or 'group'")
    out_dim, groups = shape
    return w.reshape(out_dim, groups, -1)


def rows_view(x: mx.array, spec: QuantSpec) -> mx.array:
    """x as (R, N): one row per grid (tensor: 1 row of all elements; channel: out rows; group: out * G rows)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    view = group_view(x, spec)
    return view.reshape(-1, view.shape[-1])


def _check_params(x: mx.array, params: QParams, spec: QuantSpec) -> tuple[int, ...]:
    shape = spec.param_shape(x.shape)
    for name, a in zip(("scale", "zero_point"), params):
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)}; granularity={spec.granularity!r} on a tensor "
                             f"of shape {tuple(x.shape)} needs {shape}")
    return shape


def fake_quant(x: mx.array, params: QParams, spec: QuantSpec) -> mx.array:
    """Fake-quantize x on spec's grids (straight-through rounding; gradients as in `fake_quant_affine`)."""
    _check_params(x, params, spec)
    scale, zero_point = params
    if spec.granularity == "tensor":
        return fake_quant_affine(x, scale, zero_point, spec.qmin, spec.qmax)
    out = fake_quant_affine(group_view(x, spec), scale[..., None], zero_point[..., None], spec.qmin, spec.qmax)
    return out.reshape(x.shape)


def quantize(x: mx.array, params: QParams, spec: QuantSpec) -> mx.array:
    """The integer levels of x (int32, x's shape) on spec's grids."""
    _check_params(x, params, spec)
    scale, zero_point = params
    if spec.granularity == "tensor":
        return quantize_affine(x, scale, zero_point, spec.qmin, spec.qmax)
    q = quantize_affine(group_view(x, spec), scale[..., None], zero_point[..., None], spec.qmin, spec.qmax)
    return q.reshape(x.shape)


def dequantize(q: mx.array, params: QParams, spec: QuantSpec) -> mx.array:
    """The float32 values of levels q (x's shape) on spec's grids; dequantize(quantize(x)) == fake_quant(x)."""
    _check_params(q, params, spec)
    scale, zero_point = params
    if spec.granularity == "tensor":
        return dequantize_affine(q, scale, zero_point)
    return dequantize_affine(group_view(q, spec), scale[..., None], zero_point[..., None]).reshape(q.shape)
