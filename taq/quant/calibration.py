"""Calibrating a quantization: weight grids from the weights, activation grids from the calibration set over time.

`QuantConfig` says what is quantized and how (bits, granularity, observers, the activation mode over time, which
layers); `calibrate_quantization` turns it, a model and a calibration set into a `Quantization`.

Activations: `num_samples` calibration points run through the full-precision model in forward batches that share
a timestep (`taq.tracing.plan`, each point as its conditional and unconditional CFG rows), and every quantized
Linear's input is captured. Per (layer, timestep) the observer sees that timestep's captured inputs: all of them
for min and max, and a seeded uniform subsample of at most `max_values` values for the percentile and L_p
observers (their cost grows with the data). The static grid is observed on as many values drawn from the union of
the per-timestep subsamples (min-max: on the exact extremes of all timesteps). Weights: the observer per output
channel or group.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from tqdm import tqdm

import taq
from taq.formats import file_sha256
from taq.formats.calibration import CalibrationSet
from taq.formats.quantization import LayerQuantization, Quantization
from taq.loading import Model
from taq.quant.grid import QParams, QuantSpec, grid_from_range
from taq.quant.layers import select_layers, weight_bits
from taq.quant.observers import observe
from taq.quant.schedules import DEFAULT_DEGREE, MODES, fit_schedule
from taq.sampling.schedule import timestep_to_sigma
from taq.tracing.plan import batch_inputs, plan_batches
from taq.tracing.sites import linear_sites
from taq.tracing.tracer import RecordingModule

OBSERVERS = ("minmax", "percentile", "mse")
CAPTURE_STREAM, TIMESTEP_STREAM, STATIC_STREAM = 0, 1, 2  # keep the subsampling seeds of the three draws apart
FULL_PRECISION = 16  # bits that mean "not quantized" on the command line (W16 / A16)


@dataclass(frozen=True)
class QuantConfig:
    """What is quantized and how. `weight_bits` / `act_bits` None: that side stays in full precision."""

    weight_bits: int | None = 8
    act_bits: int | None = 8
    act_mode: str = "per-timestep"
    weight_granularity: str = "channel"  # or "group" (with group_size)
    group_size: int | None = None
    weight_observer: str = "mse"
    act_observer: str = "mse"
    percentiles: tuple[float, float] = (0.01, 99.99)  # lower, upper, for the percentile observer
    poly_degree: int = DEFAULT_DEGREE
    layers: tuple[str, ...] | None = None  # site patterns; None: every joint-block qkv, proj, fc1, fc2
    include_adaln: bool = False
    overrides: tuple[tuple[str, int], ...] = ()  # (pattern, weight bits)
    first_last_bits: int | None = None
    num_samples: int = 256  # calibration points for the activation grids (TaQ-DiT: 256)
    seed: int = 0
    batch_size: int = 32
    max_values: int = 2**18

    def __post_init__(self):
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        object.__setattr__(self, "overrides", tuple((str(p), int(b)) for p, b in self.overrides))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.weight_bits is None and self.act_bits is None:
            raise ValueError("nothing to quantize: both the weights and the activations are full precision")
        for name in ("weight_bits", "act_bits", "first_last_bits"):
            bits = getattr(self, name)
            if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
                raise ValueError(f"{name} must be an integer in 2..8 (or full precision), got {bits!r}")
        for _, bits in self.overrides:
            if not 2 <= bits <= 8:
                raise ValueError(f"override bits must be in 2..8, got {bits}")
        if self.act_mode not in MODES:
            raise ValueError(f"act_mode must be one of {MODES}, got {self.act_mode!r}")
        for name in ("weight_observer", "act_observer"):
            if getattr(self, name) not in OBSERVERS:
                raise ValueError(f"{name} must be one of {OBSERVERS}, got {getattr(self, name)!r}")
        lower, upper = self.percentiles
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles}")
        for name in ("num_samples", "batch_size", "max_values"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.weight_bits is not None:
            self.weight_spec(self.weight_bits)  # checks granularity and group size

    def weight_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, granularity=self.weight_granularity, group_size=self.group_size)

    def act_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.act_bits)

    @property
    def label(self) -> str:
        """'W4A8 per-timestep', 'W8A16', ...: the configuration in one phrase."""
        weights = f"W{self.weight_bits or FULL_PRECISION}"
        acts = f"A{self.act_bits or FULL_PRECISION}"
        return f"{weights}{acts}" + (f" {self.act_mode}" if self.act_bits is not None else "")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def calibrate_quantization(model: Model, cal: CalibrationSet, config: QuantConfig, *,
                           calibration_path=None, progress: bool = True) -> Quantization:
    """The weight and activation grids of every quantized layer of `model` under `config`."""
    return calibrate_quantizations(model, cal, [config], calibration_path=calibration_path, progress=progress)[0]


def calibrate_quantizations(model: Model, cal: CalibrationSet, configs: list[QuantConfig], *,
                            calibration_path=None, progress: bool = True) -> list[Quantization]:
    """One Quantization per config. Configurations that observe activations alike (same bits, observer, layers
    and calibration sample) share one pass over the calibration set: their static, per-timestep and sigma-poly
    grids all come from the same observations, so they differ only in how time is handled."""
    sites = linear_sites(model.mmdit)
    modules = dict(model.mmdit.named_modules())
    identity = _calibration_identity(cal, calibration_path)
    observed: dict[tuple, dict[str, _Observations]] = {}
    results = []
    for config in configs:
        chosen = select_layers(list(sites), config.layers, config.include_adaln)
        bits = weight_bits(chosen, config.weight_bits, config.overrides, config.first_last_bits) \
            if config.weight_bits is not None else {}
        weights = {site: _weight_grid(modules[sites[site]].weight, config.weight_spec(bits[site]), config)
                   for site in bits}
        schedules = {}
        if config.act_bits is not None:
            key = (config.act_bits, config.act_observer, config.percentiles, tuple(chosen), config.num_samples,
                   config.seed, config.batch_size, config.max_values)
            if key not in observed:
                observed[key] = _observe_activations(model, cal, {site: sites[site] for site in chosen}, config,
                                                     progress)
            schedules = _schedules(observed[key], config)
        layers = {site: LayerQuantization(site, sites[site], config.weight_spec(bits[site]) if site in bits else None,
                                          weights.get(site), schedules.get(site)) for site in chosen}
        meta = {"label": config.label, "config": config.to_dict(), "model": model.name,
                "weights_id": model.weights_id, "dtype": str(model.dtype),
                "mmdit_config": model.mmdit.config.to_dict(),
                "calibration": identity, "taq_version": taq.__version__, "mlx_version": mx.__version__}
        results.append(Quantization(layers, meta))
    return results


def _calibration_identity(cal: CalibrationSet, path) -> dict:
    identity = {"points": len(cal), "meta_sha256": hashlib.sha256(json.dumps(cal.meta, sort_keys=True).encode())
                .hexdigest(), "recipe": {k: cal.meta.get(k) for k in ("num_trajectories", "num_steps", "num_selected",
                                                                      "step_selection", "cfg_scale", "seed")}}
    if path is not None:
        identity["sha256"] = file_sha256(path)
    return identity


def _weight_grid(weight: mx.array, spec: QuantSpec, config: QuantConfig) -> QParams:
    params = observe(weight.astype(mx.float32), spec, config.weight_observer, lower=config.percentiles[0],
                     upper=config.percentiles[1])
    return QParams(np.array(params.scale, dtype=np.float32), np.array(params.zero_point, dtype=np.float32))


# --------------------------------------------------------------------------- activations


@dataclass
class _Capture:
    """One layer's inputs at the current timestep, reduced as they arrive: extremes and a bounded subsample."""

    max_values: int
    seed: tuple
    pieces: list[tuple[mx.array, mx.array, mx.array]] = field(default_factory=list)  # (min, max, values)

    def record(self, x: mx.array) -> None:
        flat = x.reshape(-1)
        if flat.size > self.max_values:
            rng = np.random.default_rng(self.seed + (len(self.pieces),))
            flat = flat[mx.array(np.sort(rng.choice(flat.size, self.max_values, replace=False)))]
        self.pieces.append((mx.min(x), mx.max(x), flat.astype(mx.float32)))


@dataclass
class _Observations:
    """What one layer's captured inputs left behind, per calibrated timestep."""

    sigmas: np.ndarray | None = None  # (T,) the calibrated sigmas, decreasing
    lows: list[float] = field(default_factory=list)
    highs: list[float] = field(default_factory=list)
    grids: list[tuple[float, float]] = field(default_factory=list)  # (scale, zero point)
    samples: list[np.ndarray] = field(default_factory=list)


def _observe_activations(model: Model, cal: CalibrationSet, paths: dict[str, str], config: QuantConfig,
                         progress: bool) -> dict[str, _Observations]:
    batches = plan_batches(cal, config.num_samples, config.seed, config.batch_size)
    timesteps = sorted({batch.timestep for batch in batches}, reverse=True)
    spec = config.act_spec()
    observations = {site: _Observations() for site in paths}
    modules = dict(model.mmdit.named_modules())
    originals = {path: modules[path] for path in paths.values()}
    try:
        with tqdm(total=len(batches), unit="batch", desc="calibrate activations", disable=not progress) as bar:
            for index, t in enumerate(timesteps):
                captures = {site: _Capture(config.max_values, (config.seed, CAPTURE_STREAM, layer, index))
                            for layer, site in enumerate(paths)}
                model.mmdit.update_modules(tree_unflatten([
                    (path, RecordingModule(originals[path], captures[site].record, input=True))
                    for site, path in paths.items()]))
                for batch in (b for b in batches if b.timestep == t):
                    out = model.mmdit(*batch_inputs(cal, batch))
                    mx.eval(out, [piece for capture in captures.values() for piece in capture.pieces[-1]])
                    bar.update()
                for layer, (site, capture) in enumerate(captures.items()):
                    _observe(observations[site], capture, spec, config, seed=(config.seed, TIMESTEP_STREAM, layer, index))
    finally:
        model.mmdit.update_modules(tree_unflatten(list(originals.items())))
    for obs in observations.values():
        obs.sigmas = timestep_to_sigma(np.asarray(timesteps, dtype=np.float64))
    return observations


def _schedules(observations: dict[str, _Observations], config: QuantConfig) -> dict:
    return {site: _schedule(obs, config.act_spec(), config, (config.seed, STATIC_STREAM, layer))
            for layer, (site, obs) in enumerate(observations.items())}


def _observe(obs: _Observations, capture: _Capture, spec: QuantSpec, config: QuantConfig, seed: tuple) -> None:
    """One (layer, timestep): exact extremes, the observer's grid, and the subsample kept for the static grid."""
    low = min(piece[0].item() for piece in capture.pieces)
    high = max(piece[1].item() for piece in capture.pieces)
    values = np.concatenate([np.array(piece[2]) for piece in capture.pieces])
    if values.size > config.max_values:
        values = values[np.sort(np.random.default_rng(seed).choice(values.size, config.max_values, replace=False))]
    if config.act_observer == "minmax":
        params = grid_from_range(low, high, spec)
    else:
        params = observe(mx.array(values), spec, config.act_observer, lower=config.percentiles[0],
                         upper=config.percentiles[1])
    obs.lows.append(low)
    obs.highs.append(high)
    obs.grids.append((params.scale.item(), params.zero_point.item()))
    obs.samples.append(values)


def _schedule(obs: _Observations, spec: QuantSpec, config: QuantConfig, seed: tuple):
    if config.act_observer == "minmax":
        static = grid_from_range(min(obs.lows), max(obs.highs), spec)
    else:  # as many values as one timestep's observer sees, drawn from all of them
        union = np.concatenate(obs.samples)
        if union.size > config.max_values:
            union = union[np.random.default_rng(seed).choice(union.size, config.max_values, replace=False)]
        static = observe(mx.array(union), spec, config.act_observer, lower=config.percentiles[0],
                         upper=config.percentiles[1])
    scale, zero_point = (np.array(v) for v in zip(*obs.grids))
    return fit_schedule(config.act_mode, spec.bits, obs.sigmas, scale, zero_point, static.scale.item(),
                        static.zero_point.item(), config.poly_degree)
