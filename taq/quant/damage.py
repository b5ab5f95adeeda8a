"""Whether Phase 2's diagnostics predict where quantization hurts: `diagnostics_predict_damage`.

A layer's *damage* is the quantized model's output error (MSE against full precision on held-out calibration
points) when only that layer's post-GELU input (its fc2 input) is quantized, with one static minmax grid for all
timesteps (a naive quantizer, so drift and asymmetry can show) and weights in full precision. Each diagnostic --
the asymmetry ratio, the temporal range drift and the channel outlier ratio of `taq.analysis.claims` -- is
compared with the damage by Spearman's rank correlation across the layers, with a bootstrap 95% interval over
layers (pairs resampled together). The claim holds for a diagnostic when the interval lies above 0: layers it
ranks higher lose more.
"""

from __future__ import annotations


import numpy as np

from taq.analysis.claims import Claim, Measurement, measure
from taq.formats.calibration import CalibrationSet
from taq.formats.quantization import Quantization
from taq.loading import Model
from taq.quant.calibration import QuantConfig, calibrate_quantizations
from taq.quant.claims import held_out_points, output_errors, point_outputs
from taq.quant.modules import quantize_model
from taq.tracing import mmdit_layer_paths

DIAGNOSTICS = ("asymmetry_ratio", "temporal_range_drift", "channel_outliers")
DAMAGE_BITS = (4, 6)
DAMAGE = Claim(
    "diagnostics_predict_damage", 0.0, "Spearman's rank correlation across layers between the diagnostic and the "
    "output MSE with only that layer's fc2 input quantized (static minmax grid, weights full precision), with its "
    "95% interval (bootstrap over layers); row: diagnostic and activation bits",
    "The diagnostics predict the damage: the layers a Phase 2 diagnostic marks (asymmetric, drifting, with "
    "outlier channels) are the ones whose quantized post-GELU input hurts the model most.", compute=None)
DAMAGE_ROWS = [f"{name}:A{bits}" for name in DIAGNOSTICS for bits in DAMAGE_BITS]


def layer_damage(model: Model, cal: CalibrationSet, layers: list[str], bits: tuple[int, ...], *, num_samples: int,
                 eval_points: int, seed: int) -> dict[int, np.ndarray]:
    """bits -> (layers,) the mean held-out output MSE with only each layer's fc2 input quantized at those bits
    (one observation pass and one full-precision reference for all widths)."""
    sites = [f"{layer}.fc2" for layer in layers]  # fc2's input is the layer's post-GELU activation
    configs = [QuantConfig(weight_bits=None, act_bits=b, act_mode="static", act_observer="minmax",
                           layers=tuple(sites), num_samples=num_samples, seed=seed, batch_size=16) for b in bits]
    quantizations = calibrate_quantizations(model, cal, configs, progress=False)
    points = held_out_points(cal, (num_samples,), eval_points, seed)
    reference = point_outputs(cal, points, model.mmdit)
    damage = {}
    for b, every in zip(bits, quantizations):
        errors = []
        for site in sites:
            alone = Quantization({site: every.layers[site]}, every.meta)
            with quantize_model(model.mmdit, alone) as quantized:
                errors.append(output_errors(point_outputs(cal, points, quantized), reference).mean())
        damage[b] = np.array(errors)
    return damage


def rank_correlation(diagnostic: np.ndarray, damage: np.ndarray, seed: int) -> tuple[float, float, float]:
    """Spearman's rho and its percentile bootstrap 95% interval, resampling (diagnostic, damage) pairs."""
    from scipy.stats import bootstrap, spearmanr

    def rho(x, y):
        return spearmanr(x, y).statistic

    ci = bootstrap((diagnostic, damage), rho, paired=True, vectorized=False, n_resamples=1999,
                   confidence_level=0.95, method="percentile", random_state=seed).confidence_interval
    return float(rho(diagnostic, damage)), float(ci.low), float(ci.high)


def measure_damage_claim(model: Model, cal: CalibrationSet, arrays: dict, *, num_samples: int = 256,
                         eval_points: int = 48, seed: int = 0) -> list[Measurement]:
    """One Measurement per row of DAMAGE_ROWS: each diagnostic (from the statistics `arrays`) against each
    layer's damage at each of DAMAGE_BITS."""
    layers = list(mmdit_layer_paths(model.mmdit))
    values = {name: np.array([measure(arrays, layer, name).value for layer in layers]) for name in DIAGNOSTICS}
    results = []
    damages = layer_damage(model, cal, layers, DAMAGE_BITS, num_samples=num_samples, eval_points=eval_points, seed=seed)
    for bits, damage in damages.items():
        worst = layers[int(np.argmax(damage))]
        for name in DIAGNOSTICS:
            rho, low, high = rank_correlation(values[name], damage, seed)
            top = layers[int(np.argmax(values[name]))]
            results.append(Measurement(DAMAGE.name, f"{name}:A{bits}", rho, DAMAGE.threshold,
                                       f"rho {rho:+.2f} [{low:+.2f}, {high:+.2f}] over {len(layers)} layers; most "
                                       f"damaged {worst} (MSE {damage.max():.3g}), highest {name} {top}",
                                       interval=(low, high)))
    return sorted(results, key=lambda m: DAMAGE_ROWS.index(m.layer))
