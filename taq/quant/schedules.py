"""Activation grids over denoising time: one layer's per-tensor (scale, zero point) as a function of sigma.

Three modes, all calibrated from the same per-timestep observations (`calibrate` in `taq.quant.calibration`):

- `static`: one grid for all timesteps, observed on the union of every calibrated timestep's activations;
- `per-timestep`: the grid observed at each calibrated sigma. A sampler step between calibrated sigmas takes the
  grid of the **nearest calibrated sigma** (ties go to the larger, noisier one); steps outside the calibrated
  span take the nearest end. Nearest rather than interpolated: at a calibrated step the grid is exactly the one
  observed there, and an interpolated zero point would not be an integer;
- `sigma-poly`: the ends of the per-timestep grids, lo(sigma) and hi(sigma), fitted by least-squares polynomials
  of `degree` in sigma; any sigma (clamped to the calibrated span, so the polynomials never extrapolate) gets the
  grid of [lo(sigma), hi(sigma)] by the asymmetric zero-anchored rule. Any sampler step count works;
- `dynamic`: the reference no table can beat: every call takes the min-max grid of its own input (`dynamic_grid`),
  known only at run time. The file keeps the per-timestep grids beside it for comparison.

`grid_at(sigma)` evaluates on the device with no host synchronisation, for a (B,) array of per-row sigmas, so
CFG rows and batches mixing timesteps are all handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from taq.quant.grid import zero_anchored_grid

MODES = ("static", "per-timestep", "sigma-poly", "dynamic")
DEFAULT_DEGREE = 3  # activation maxima of SD3 are smooth in sigma: degree 2-3 polynomials fit them (R^2 ~ 0.94)


@dataclass(frozen=True)
class ActivationSchedule:
    """One layer's activation grids over time for a `bits`-bit asymmetric per-tensor quantizer.

    scale, zero_point: (T,) the grid applied at each calibrated sigma (static: the same value T times);
    lo, hi: (T,) the per-timestep observed grid ends the polynomial is fitted to; poly_lo, poly_hi: (degree + 1,)
    coefficients, lowest power first (sigma-poly only, else empty).
    """

    mode: str
    bits: int
    sigmas: np.ndarray  # (T,) calibrated sigmas, strictly decreasing
    scale: np.ndarray  # (T,)
    zero_point: np.ndarray  # (T,)
    lo: np.ndarray  # (T,)
    hi: np.ndarray  # (T,)
    poly_lo: np.ndarray  # (degree + 1,) or (0,)
    poly_hi: np.ndarray

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"activation mode must be one of {MODES}, got {self.mode!r}")
        T = self.sigmas.shape[0]
        for name in ("scale", "zero_point", "lo", "hi"):
            if getattr(self, name).shape != (T,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({T},)")
        if T == 0 or not np.all(np.diff(self.sigmas) < 0):
            raise ValueError("calibrated sigmas must be non-empty and strictly decreasing")
        if not (np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise ValueError("activation scales must be finite and > 0")
        levels = 2**self.bits - 1
        zp = self.zero_point
        if not (np.all(zp == np.round(zp)) and np.all((zp >= 0) & (zp <= levels))):
            raise ValueError(f"activation zero points must be integers in 0..{levels}")
        polynomial = self.mode == "sigma-poly"
        if polynomial != (self.poly_lo.size > 0) or self.poly_lo.shape != self.poly_hi.shape:
            raise ValueError("sigma-poly schedules need polynomial coefficients (and only they have them)")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def grid_at(self, sigma: mx.array) -> tuple[mx.array, mx.array]:
        """(scale, zero point) for each sigma of a (B,) array, on the device."""
        sigma = sigma.astype(mx.float32)
        if self.mode == "static":
            return (mx.full(sigma.shape, float(self.scale[0])), mx.full(sigma.shape, float(self.zero_point[0])))
        if self.mode == "dynamic":
            raise ValueError("a dynamic schedule's grid comes from each call's input: use dynamic_grid(x)")
        if self.mode == "per-timestep":
            index = nearest_index(self.sigmas, sigma)
            return mx.array(self.scale.astype(np.float32))[index], mx.array(self.zero_point.astype(np.float32))[index]
        s = mx.clip(sigma, float(self.sigmas[-1]), float(self.sigmas[0]))
        return zero_anchored_grid(_polyval(self.poly_lo, s), _polyval(self.poly_hi, s), self.qmax)


def nearest_index(calibrated: np.ndarray, sigma: mx.array) -> mx.array:
    """(B,) index of the calibrated sigma (decreasing) nearest each sigma; a tie goes to the larger sigma
    (argmin takes the first minimum)."""
    grid = mx.array(np.asarray(calibrated, np.float32))
    return mx.argmin(mx.abs(sigma.astype(mx.float32)[:, None] - grid[None, :]), axis=1)


def dynamic_grid(x: mx.array, bits: int) -> tuple[mx.array, mx.array]:
    """The min-max grid of one call's whole input x (the per-call dynamic reference), as (1,) arrays."""
    scale, zero_point = zero_anchored_grid(mx.min(x).astype(mx.float32), mx.max(x).astype(mx.float32), 2**bits - 1)
    return scale.reshape(1), zero_point.reshape(1)


def _polyval(coefficients: np.ndarray, x: mx.array) -> mx.array:
    """sum_k c_k x^k by Horner's rule (coefficients lowest power first)."""
    result = mx.zeros_like(x)
    for c in coefficients[::-1]:
        result = result * x + float(c)
    return result


def fit_schedule(mode: str, bits: int, sigmas: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                 static_scale: float, static_zero_point: float, degree: int = DEFAULT_DEGREE) -> ActivationSchedule:
    """A schedule from per-timestep grids (T,) observed at `sigmas` and the grid observed on all timesteps."""
    sigmas, scale, zero_point = (np.asarray(a, dtype=np.float64) for a in (sigmas, scale, zero_point))
    order = np.argsort(-sigmas)
    sigmas, scale, zero_point = sigmas[order], scale[order], zero_point[order]
    lo, hi = -zero_point * scale, (2**bits - 1 - zero_point) * scale
    empty = np.zeros(0)
    if mode == "static":
        T = sigmas.size
        return ActivationSchedule(mode, bits, sigmas, np.full(T, float(static_scale)),
                                  np.full(T, float(static_zero_point)), lo, hi, empty, empty)
    if mode in ("per-timestep", "dynamic"):
        return ActivationSchedule(mode, bits, sigmas, scale, zero_point, lo, hi, empty, empty)
    if mode != "sigma-poly":
        raise ValueError(f"activation mode must be one of {MODES}, got {mode!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"polynomial degree must be an integer >= 0, got {degree!r}")
    degree = min(degree, sigmas.size - 1)
    poly_lo = np.polynomial.polynomial.polyfit(sigmas, lo, degree)
    poly_hi = np.polynomial.polynomial.polyfit(sigmas, hi, degree)
    # The applied grids at the calibrated sigmas, computed as grid_at computes them (float32, on the device).
    fitted = ActivationSchedule(mode, bits, sigmas, scale, zero_point, lo, hi, poly_lo, poly_hi)
    fitted_scale, fitted_zp = (np.array(v, np.float64) for v in fitted.grid_at(mx.array(sigmas.astype(np.float32))))
    return ActivationSchedule(mode, bits, sigmas, fitted_scale, fitted_zp, lo, hi, poly_lo, poly_hi)
