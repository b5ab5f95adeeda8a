"""Exact input transforms of a quantized Linear, chosen from calibration statistics (TaQ-DiT, PTQ4DiT).

A layer y = x W^T + b may quantize u = (x - s) / m instead of x, per input channel c, and use the weight W m
(column c times m_c) and the input x_hat = Q(u) + s / m:

    x_hat (W m)^T = (Q(u) + s / m) (W m)^T  =  x W^T   when Q is the identity,

so the transformed layer equals the original in full precision (up to float rounding) and only what the
quantizers see changes:

- **shift** s (post-GELU inputs, TaQ-DiT's momentum-based shifting): the per-channel midrange (min + max) / 2
  over tokens and batch, which centres each channel's asymmetric post-GELU range (about [-0.17, max]) on 0.
  Time-aware: one shift per calibrated timestep (a step between them takes the nearest calibrated sigma's, the
  activation schedules' rule), or one for all timesteps under static grids. It is added back after the quantizer
  rather than folded into the bias, because a per-timestep shift would make the bias per-timestep.
- **divisor** m: TaQ-DiT's outlier migration, integer m_c = round(r_c / r) >= 1 for channels whose half-range
  r_c (after the shift) exceeds `threshold` times the median channel's, r the largest half-range among the other
  channels, so every channel fits the tensor's grid; or PTQ4DiT's salience balancing, real
  m_c = sqrt(max|x_c| / max|W_:,c|), which moves range from the activation channel into the weight column.

The weight grid is observed on W m, so migration's and balancing's weight cost is measured, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from taq.quant.schedules import nearest_index

DEFAULT_MIGRATION_THRESHOLD = 4.0  # half-range over the median channel's that marks an outlier channel


@dataclass(frozen=True)
class InputTransform:
    """One layer's shift (R, C) -- R = 1 (every timestep) or R = len(sigmas) (one row per calibrated sigma) --
    and divisor (C,); either may be None."""

    sigmas: np.ndarray  # (T,) calibrated sigmas, decreasing
    shift: np.ndarray | None = None
    divisor: np.ndarray | None = None

    def __post_init__(self):
        if self.shift is not None:
            if self.shift.ndim != 2 or self.shift.shape[0] not in (1, len(self.sigmas)):
                raise ValueError(f"shift must be (1 or {len(self.sigmas)}, C), got {self.shift.shape}")
            if not np.all(np.isfinite(self.shift)):
                raise ValueError("shift holds NaN or inf")
        if self.divisor is not None:
            if self.divisor.ndim != 1 or not (np.all(np.isfinite(self.divisor)) and np.all(self.divisor > 0)):
                raise ValueError("divisor must be a (C,) array of finite values > 0")
            if self.shift is not None and self.shift.shape[1] != self.divisor.shape[0]:
                raise ValueError(f"shift has {self.shift.shape[1]} channels, divisor {self.divisor.shape[0]}")

    @property
    def channels(self) -> int:
        return (self.shift.shape[1] if self.shift is not None else self.divisor.shape[0])

    def shift_at(self, sigma: mx.array) -> mx.array:
        """(B, 1, C) shift for each row's sigma (B,), or (1, 1, C) when there is one for every timestep."""
        shift = mx.array(self.shift.astype(np.float32))
        if shift.shape[0] == 1:
            return shift[None]
        return shift[nearest_index(self.sigmas, sigma)][:, None, :]

    def weight(self, w: mx.array) -> mx.array:
        """W m: each input column times its divisor."""
        return w if self.divisor is None else w * mx.array(self.divisor.astype(np.float32)).astype(w.dtype)

    def forward(self, x: mx.array, sigma: mx.array | None) -> tuple[mx.array, mx.array | None]:
        """(u, offset): the input the quantizer sees, and what to add after it (s / m; None without a shift).
        x is (B, N, C)."""
        divisor = None if self.divisor is None else mx.array(self.divisor.astype(np.float32)).astype(x.dtype)
        offset = None
        if self.shift is not None:
            offset = self.shift_at(sigma).astype(x.dtype)
            x = x - offset
        if divisor is not None:
            x = x / divisor
            offset = None if offset is None else offset / divisor
        return x, offset


def midrange_shift(channel_min: np.ndarray, channel_max: np.ndarray, per_timestep: bool) -> np.ndarray:
    """(T, C) or (1, C) shifts from per-timestep channel extremes (T, C): each timestep's midrange, or the
    midrange over all timesteps."""
    if per_timestep:
        return ((channel_min + channel_max) / 2).astype(np.float32)
    return ((channel_min.min(axis=0) + channel_max.max(axis=0)) / 2)[None].astype(np.float32)


def half_ranges(channel_min: np.ndarray, channel_max: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """(C,) largest |x_c - s_c| over timesteps: what each channel asks of the tensor's grid."""
    shift = np.zeros((1, channel_min.shape[1])) if shift is None else shift
    return np.maximum(np.abs(channel_min - shift), np.abs(channel_max - shift)).max(axis=0)


def migration_divisor(ranges: np.ndarray, threshold: float = DEFAULT_MIGRATION_THRESHOLD) -> np.ndarray:
    """(C,) integer multipliers m_c = max(1, round(r_c / r)) for the outlier channels (r_c > threshold x the
    median r), 1 elsewhere; r = the largest half-range among the non-outliers."""
    if threshold <= 1:
        raise ValueError(f"the migration threshold must be > 1 (times the median channel's range), got {threshold}")
    outlier = ranges > threshold * np.median(ranges)
    divisor = np.ones(ranges.shape, np.float32)
    if outlier.any() and not outlier.all():
        base = ranges[~outlier].max()
        if base > 0:
            divisor[outlier] = np.maximum(1.0, np.round(ranges[outlier] / base))
    return divisor


def balance_divisor(act_max: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(C,) PTQ4DiT's salience balancing factors sqrt(max|x_c| / max|W_:,c|); 1 where either side is 0."""
    w_max = np.abs(weight).max(axis=0).astype(np.float64)
    ok = (act_max > 0) & (w_max > 0)
    factors = np.ones(act_max.shape, np.float64)
    factors[ok] = np.sqrt(act_max[ok] / w_max[ok])
    return factors.astype(np.float32)
