"""The quantizer's own claims, measured on the model rather than on histograms: a method lowers the quantized
model's output error at the same bits.

- `time_aware_activation_error`: per-timestep activation grids against one static grid, per activation width and
  layer group (all quantized layers, or only the qkv / proj / fc1 / fc2 inputs);
- `shifting_post_gelu_error`: TaQ-DiT's shifting of the post-GELU (fc2) inputs against none;
- `migration_fc2_error`: TaQ-DiT's outlier migration on the shifted fc2 inputs against none;
- `joint_reconstruction_w4a8`: TaQ-DiT's joint block reconstruction (AdaRound rounding and LSQ steps together)
  against the separate one (rounding first, then steps), from the same W4A8 quantization.

In the first three only the named layers' inputs are quantized (weights stay in full precision, so the activation
side is all that differs), once without and once with the method, from the same observations. Both models predict the velocity at
the same held-out calibration points; per point, the output MSE against full precision. The number is the
relative error reduction 1 - sum(e_method) / sum(e_baseline) with a paired bootstrap 95% interval over points:
the claim holds when the interval lies above 0, does not hold when it lies below, and is undecided when it
contains 0.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from taq.analysis.claims import Claim, Measurement
from taq.formats.calibration import CalibrationSet
from taq.loading import Model
from taq.quant.calibration import QuantConfig, calibrate_quantizations
from taq.quant.modules import quantize_model
from taq.quant.reconstruction import ReconstructionConfig, reconstruct
from taq.tracing.plan import ForwardBatch, batch_inputs, sample_points

THRESHOLD = 0.0
MIGRATION_THRESHOLD = 2.0  # pocket's post-GELU channels are even: at 4x the median almost none qualify


def _claim(name: str, measure: str, observation: str) -> Claim:
    # Measured on the model (paired_gain), not from statistics arrays: no `compute`.
    return Claim(name, THRESHOLD, measure, observation, compute=None)


TIME_AWARE = _claim(
    "time_aware_activation_error", "1 - output MSE with per-timestep activation grids / with a static grid, with its "
    "95% interval (paired over held-out calibration points; weights full precision)",
    "Time-aware quantization pays off in the model itself: with a grid per timestep instead of one for all "
    "timesteps, the quantized model's output error at the same activation bits is lower (the 95% interval of the "
    "relative reduction lies above 0).")
SHIFTING = _claim(
    "shifting_post_gelu_error", "1 - output MSE with shifted / unshifted post-GELU inputs, with its 95% interval "
    "(fc2 inputs alone quantized, per-timestep grids, weights full precision)",
    "TaQ-DiT's shifting: centring each post-GELU channel on its midrange before the per-tensor quantizer lowers "
    "the quantized model's output error at the same bits.")
MIGRATION = _claim(
    "migration_fc2_error", "1 - output MSE with / without outlier migration, with its 95% interval "
    f"(fc2 inputs, shifted, per-timestep grids, channels over {MIGRATION_THRESHOLD:g}x the median range)",
    "TaQ-DiT's outlier migration: moving the range of outlier post-GELU channels into fc2's weight columns lowers "
    "the output error of fc2's quantized inputs.")
RECONSTRUCTION = _claim(
    "joint_reconstruction_w4a8", "1 - output MSE after joint / after separate block reconstruction, with its 95% "
    "interval (W4A8, per-timestep minmax grids with shifting; row: iterations per block)",
    "TaQ-DiT's joint reconstruction: training the weight rounding and the activation steps together reconstructs "
    "the W4A8 blocks better than training them one after the other (which TaQ-DiT reports fails to converge).")
RECONSTRUCTION_ITERS = 60  # per block and mode: about a minute each on pocket on a 2-core CPU (TaQ-DiT: 20,000)
RECONSTRUCTION_POINTS = 64  # calibration points whose block inputs train the reconstruction, 16 rows per step
BITS = (8, 6, 4)
GROUPS = {"all": None, "qkv": ("*.qkv",), "proj": ("*.proj",), "fc1": ("*.fc1",), "fc2": ("*.fc2",)}
QUANT_CLAIMS = {claim.name: claim for claim in (TIME_AWARE, SHIFTING, MIGRATION, RECONSTRUCTION)}
CLAIM_ROWS = {TIME_AWARE.name: [f"A{bits}:{group}" for bits in BITS for group in GROUPS],
              SHIFTING.name: [f"A{bits}:fc2" for bits in BITS], MIGRATION.name: [f"A{bits}:fc2" for bits in BITS],
              RECONSTRUCTION.name: [f"W4A8:{RECONSTRUCTION_ITERS}it"]}


def claim_pairs(claim: str, bits: int, num_samples: int, seed: int,
                observer: str) -> dict[str, tuple[QuantConfig, QuantConfig]]:
    """Row -> (baseline, method) configurations of one claim at `bits`-bit activations (weights full precision)."""
    base = QuantConfig(weight_bits=None, act_bits=bits, act_observer=observer, num_samples=num_samples, seed=seed,
                       batch_size=16)
    if claim == TIME_AWARE.name:
        return {f"A{bits}:{group}": (replace(base, layers=layers, act_mode="static"), replace(base, layers=layers))
                for group, layers in GROUPS.items()}
    post_gelu = replace(base, layers=GROUPS["fc2"])
    if claim == SHIFTING.name:
        return {f"A{bits}:fc2": (post_gelu, replace(post_gelu, shift=True))}
    if claim == MIGRATION.name:
        shifted = replace(post_gelu, shift=True)
        return {f"A{bits}:fc2": (shifted, replace(shifted, migrate=MIGRATION_THRESHOLD))}
    raise ValueError(f"unknown quantizer claim {claim!r}; known: {', '.join(QUANT_CLAIMS)}")


def held_out_points(cal: CalibrationSet, calibrated: tuple[int, ...], count: int, seed: int) -> np.ndarray:
    """`count` points outside every calibration sample of the given sizes (drawn with `seed`, as the observers
    and the reconstruction draw theirs)."""
    order = np.random.default_rng(seed).permutation(len(cal))
    used = set().union(*(sample_points(len(cal), n, seed).tolist() for n in calibrated))
    return np.array([i for i in order if i not in used][:count])


def point_outputs(cal: CalibrationSet, points: np.ndarray, forward) -> list[mx.array]:
    """`forward`'s velocity at each point, one call per point (its own timestep, its two CFG rows)."""
    outputs = []
    for point in points:
        outputs.append(forward(*batch_inputs(cal, ForwardBatch(float(cal.ts[point]), np.array([point])))))
        mx.eval(outputs[-1])
    return outputs


def output_errors(outputs: list[mx.array], reference: list[mx.array]) -> np.ndarray:
    """(P,) per point: the MSE of the outputs against the reference (full-precision) ones."""
    return np.array([float(mx.mean(mx.square(a - b))) for a, b in zip(outputs, reference)])


def paired_reduction(claim: str, row: str, baseline: np.ndarray, method: np.ndarray, seed: int) -> Measurement:
    """The relative error reduction 1 - sum(method) / sum(baseline) of per-point errors, with a paired bootstrap
    95% interval over the points."""
    from scipy.stats import bootstrap

    statistic = lambda b, m: 1 - np.sum(m) / np.sum(b)  # noqa: E731
    ci = bootstrap((baseline, method), statistic, paired=True, vectorized=False, n_resamples=1999,
                   confidence_level=0.95, method="percentile", random_state=seed).confidence_interval
    mean = statistic(baseline, method)
    return Measurement(claim, row, float(mean), THRESHOLD,
                       f"error reduction {mean:+.1%} [{ci.low:+.1%}, {ci.high:+.1%}] over {len(baseline)} held-out "
                       f"points (output MSE baseline {baseline.mean():.3g}, method {method.mean():.3g})",
                       interval=(float(ci.low), float(ci.high)))


def measure_claim(model: Model, cal: CalibrationSet, claim: str, bits: int, *, num_samples: int = 64,
                  eval_points: int = 48, seed: int = 0, observer: str = "minmax") -> list[Measurement]:
    """One Measurement per row of `claim` at `bits`-bit activations: the method's relative output-error reduction
    over its baseline on held-out points (`paired_reduction`)."""
    pairs = claim_pairs(claim, bits, num_samples, seed, observer)
    configs = [config for pair in pairs.values() for config in pair]
    quantizations = calibrate_quantizations(model, cal, configs, progress=False)
    points = held_out_points(cal, (num_samples,), eval_points, seed)
    reference = point_outputs(cal, points, model.mmdit)
    results = []
    for k, row in enumerate(pairs):
        errors = []
        for quantization in quantizations[2 * k: 2 * k + 2]:
            with quantize_model(model.mmdit, quantization) as quantized:
                errors.append(output_errors(point_outputs(cal, points, quantized), reference))
        results.append(paired_reduction(claim, row, *errors, seed))
    return results


def measure_reconstruction_claim(model: Model, cal: CalibrationSet, *, num_samples: int = 256,
                                 eval_points: int = 48, seed: int = 0) -> Measurement:
    """Joint against separate reconstruction of one W4A8 quantization (per-timestep minmax activation grids on
    `num_samples` points, shifted post-GELU inputs), `RECONSTRUCTION_ITERS` iterations per block each, compared
    on held-out points; the note also gives the round-to-nearest error both started from."""
    config = QuantConfig(weight_bits=4, act_bits=8, act_observer="minmax", shift=True, num_samples=num_samples,
                         seed=seed, batch_size=16)
    (start,) = calibrate_quantizations(model, cal, [config], progress=False)
    settings = ReconstructionConfig(iters=RECONSTRUCTION_ITERS, batch_size=16, num_samples=RECONSTRUCTION_POINTS,
                                    seed=seed)
    points = held_out_points(cal, (num_samples, RECONSTRUCTION_POINTS), eval_points, seed)
    reference = point_outputs(cal, points, model.mmdit)
    errors = {}
    for mode in ("rtn", "separate", "joint"):
        quantization = start if mode == "rtn" else reconstruct(model, cal, start, replace(settings, mode=mode),
                                                               progress=False)
        with quantize_model(model.mmdit, quantization) as quantized:
            errors[mode] = output_errors(point_outputs(cal, points, quantized), reference)
    result = paired_reduction(RECONSTRUCTION.name, f"W4A8:{RECONSTRUCTION_ITERS}it", errors["separate"],
                              errors["joint"], seed)
    return replace(result, note=f"{result.note}; round-to-nearest {errors['rtn'].mean():.3g}")
