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

With `shift`, `migrate` or `balance` (`taq.quant.transforms`), each layer's exact input transform is chosen from
the per-channel extremes of the same capture, and the observers see the inputs and weights as transformed (the
extremes exactly, through the per-channel ones; the subsample through each value's channel).
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
from taq.quant.transforms import InputTransform, balance_divisor, half_ranges, midrange_shift, migration_divisor
from taq.sampling.schedule import timestep_to_sigma
from taq.tracing.plan import batch_inputs, plan_batches
from taq.tracing.sites import linear_sites, site_role
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
    shift: bool = False  # TaQ-DiT's shifting of post-GELU inputs (per timestep unless act_mode is static/dynamic)
    migrate: float | None = None  # TaQ-DiT's outlier migration on post-GELU inputs, at this threshold
    balance: bool = False  # PTQ4DiT's salience balancing on every quantized layer
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
        if self.migrate is not None and self.balance:
            raise ValueError("migration and salience balancing both set the input divisors: choose one")
        if self.migrate is not None and not self.migrate > 1:
            raise ValueError(f"the migration threshold must be > 1 (times the median channel's range), "
                             f"got {self.migrate}")

    def weight_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, granularity=self.weight_granularity, group_size=self.group_size)

    @property
    def transforms_inputs(self) -> bool:
        return self.shift or self.migrate is not None or self.balance

    @property
    def shift_mode(self) -> str | None:
        """None (no shift), 'static' (one for every timestep) or 'per-timestep'."""
        if not self.shift:
            return None
        return "static" if self.act_mode in ("static", "dynamic") else "per-timestep"

    def act_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.act_bits)

    @property
    def label(self) -> str:
        """'W4A8 per-timestep', 'W8A16', ...: the configuration in one phrase."""
        weights = f"W{self.weight_bits or FULL_PRECISION}"
        acts = f"A{self.act_bits or FULL_PRECISION}"
        methods = [name for name, on in (("shift", self.shift), ("migrate", self.migrate is not None),
                                          ("balance", self.balance)) if on]
        return (f"{weights}{acts}" + (f" {self.act_mode}" if self.act_bits is not None else "")
                + "".join(f" +{name}" for name in methods))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def calibrate_quantization(model: Model, cal: CalibrationSet, config: QuantConfig, *,
                           calibration_path=None, progress: bool = True) -> Quantization:
    """The weight and activation grids of every quantized layer of `model` under `config`."""
    return calibrate_quantizations(model, cal, [config], calibration_path=calibration_path, progress=progress)[0]


def calibrate_quantizations(model: Model, cal: CalibrationSet, configs: list[QuantConfig], *,
                            calibration_path=None, progress: bool = True) -> list[Quantization]:
    """One Quantization per config. Configurations that capture activations alike (same layers and calibration
    sample) share one pass over the calibration set, and those that also transform and observe them alike share
    the observer's grids: their static, per-timestep and sigma-poly schedules differ only in how time is handled."""
    sites = linear_sites(model.mmdit)
    modules = dict(model.mmdit.named_modules())
    identity = _calibration_identity(cal, calibration_path)
    captured: dict[tuple, dict[str, _Captured]] = {}
    observed: dict[tuple, dict[str, _Observations]] = {}
    results = []
    for config in configs:
        chosen = select_layers(list(sites), config.layers, config.include_adaln)
        bits = weight_bits(chosen, config.weight_bits, config.overrides, config.first_last_bits) \
            if config.weight_bits is not None else {}
        transforms, schedules = {}, {}
        if config.act_bits is not None or config.transforms_inputs:
            key = (tuple(chosen), config.num_samples, config.seed, config.batch_size, config.max_values)
            if key not in captured:
                captured[key] = _capture_activations(model, cal, {site: sites[site] for site in chosen}, config,
                                                     progress)
            transforms = {site: t for site in chosen if (t := _transform(site, captured[key][site], config,
                                                                           modules[sites[site]].weight)) is not None}
            if config.act_bits is not None:
                observe_key = key + (config.act_bits, config.act_observer, config.percentiles, config.shift_mode,
                                     config.migrate, config.balance)
                if observe_key not in observed:
                    observed[observe_key] = {site: _observe_layer(captured[key][site], transforms.get(site), config,
                                                                  layer)
                                             for layer, site in enumerate(chosen)}
                schedules = _schedules(observed[observe_key], config)
        weights = {}
        for site in bits:
            weight = modules[sites[site]].weight
            if site in transforms:
                weight = transforms[site].weight(weight)
            weights[site] = _weight_grid(weight, config.weight_spec(bits[site]), config)
        layers = {site: LayerQuantization(site, sites[site], config.weight_spec(bits[site]) if site in bits else None,
                                          weights.get(site), schedules.get(site), transforms.get(site))
                  for site in chosen}
        meta = {"label": config.label, "config": config.to_dict(), "model": model.name,
                "weights_id": model.weights_id, "dtype": str(model.dtype),
                "mmdit_config": model.mmdit.config.to_dict(),
                "calibration": identity, "taq_version": taq.__version__, "mlx_version": mx.__version__}
        if config.migrate is not None:
            meta["outlier_fraction"] = {site: float(np.mean(t.divisor > 1)) for site, t in transforms.items()
                                        if site_role(site) == "fc2" and t.divisor is not None}
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
    """One layer's inputs at the current timestep, reduced as they arrive: extremes overall and per channel, and
    a bounded subsample of values with the channel each came from."""

    max_values: int
    seed: tuple
    pieces: list[tuple[mx.array, ...]] = field(default_factory=list)  # (min, max, channel min, channel max, values)
    channels: list[np.ndarray] = field(default_factory=list)

    def record(self, x: mx.array) -> None:
        C = x.shape[-1]
        rows = x.reshape(-1, C)
        flat = rows.reshape(-1)
        if flat.size > self.max_values:
            rng = np.random.default_rng(self.seed + (len(self.pieces),))
            index = np.sort(rng.choice(flat.size, self.max_values, replace=False))
            flat = flat[mx.array(index)]
        else:
            index = np.arange(flat.size)
        self.pieces.append((mx.min(x), mx.max(x), mx.min(rows, axis=0).astype(mx.float32),
                            mx.max(rows, axis=0).astype(mx.float32), flat.astype(mx.float32)))
        self.channels.append((index % C).astype(np.int32))


@dataclass
class _Captured:
    """One layer's calibration inputs, per calibrated timestep (T of them)."""

    sigmas: np.ndarray  # (T,) decreasing
    lows: np.ndarray  # (T,)
    highs: np.ndarray  # (T,)
    channel_min: np.ndarray  # (T, C)
    channel_max: np.ndarray  # (T, C)
    samples: list[tuple[np.ndarray, np.ndarray]]  # per timestep: (values, their channels), a seeded subsample


@dataclass
class _Observations:
    """What the observer made of one layer's (transformed) inputs, per calibrated timestep."""

    sigmas: np.ndarray
    lows: list[float] = field(default_factory=list)
    highs: list[float] = field(default_factory=list)
    grids: list[tuple[float, float]] = field(default_factory=list)  # (scale, zero point)
    samples: list[np.ndarray] = field(default_factory=list)


def _capture_activations(model: Model, cal: CalibrationSet, paths: dict[str, str], config: QuantConfig,
                         progress: bool) -> dict[str, _Captured]:
    batches = plan_batches(cal, config.num_samples, config.seed, config.batch_size)
    timesteps = sorted({batch.timestep for batch in batches}, reverse=True)
    per_step: dict[str, list] = {site: [] for site in paths}
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
                    per_step[site].append(_reduce_capture(capture, config, (config.seed, TIMESTEP_STREAM, layer, index)))
    finally:
        model.mmdit.update_modules(tree_unflatten(list(originals.items())))
    sigmas = timestep_to_sigma(np.asarray(timesteps, dtype=np.float64))
    return {site: _Captured(sigmas, np.array([s[0] for s in steps]), np.array([s[1] for s in steps]),
                            np.stack([s[2] for s in steps]), np.stack([s[3] for s in steps]), [s[4] for s in steps])
            for site, steps in per_step.items()}


def _reduce_capture(capture: _Capture, config: QuantConfig, seed: tuple) -> tuple:
    """(low, high, channel min, channel max, (values, channels)) of one (layer, timestep)."""
    low = min(piece[0].item() for piece in capture.pieces)
    high = max(piece[1].item() for piece in capture.pieces)
    channel_min = np.min([np.array(piece[2]) for piece in capture.pieces], axis=0).astype(np.float64)
    channel_max = np.max([np.array(piece[3]) for piece in capture.pieces], axis=0).astype(np.float64)
    values = np.concatenate([np.array(piece[4]) for piece in capture.pieces])
    channels = np.concatenate(capture.channels)
    if values.size > config.max_values:
        keep = np.sort(np.random.default_rng(seed).choice(values.size, config.max_values, replace=False))
        values, channels = values[keep], channels[keep]
    return low, high, channel_min, channel_max, (values, channels)


def _transform(site: str, captured: _Captured, config: QuantConfig, weight: mx.array) -> InputTransform | None:
    """The layer's input transform under `config` (shift and migration on post-GELU inputs, balancing on every
    quantized layer), or None."""
    post_gelu = site_role(site) == "fc2"
    shift = divisor = None
    if config.shift and post_gelu:
        shift = midrange_shift(captured.channel_min, captured.channel_max, config.shift_mode == "per-timestep")
    if config.migrate is not None and post_gelu:
        divisor = migration_divisor(half_ranges(captured.channel_min, captured.channel_max, shift), config.migrate)
    elif config.balance:
        divisor = balance_divisor(half_ranges(captured.channel_min, captured.channel_max, shift),
                                  np.array(weight.astype(mx.float32)))
    if shift is None and divisor is None:
        return None
    return InputTransform(captured.sigmas, shift, divisor)


def _observe_layer(captured: _Captured, transform: InputTransform | None, config: QuantConfig,
                   layer: int) -> _Observations:
    """The observer's grid at each calibrated timestep, on the inputs as the quantizer sees them: exact extremes
    (from the per-channel extremes, transformed) and the transformed subsample."""
    spec = config.act_spec()
    obs = _Observations(captured.sigmas)
    for index, (values, channels) in enumerate(captured.samples):
        low, high = captured.lows[index], captured.highs[index]
        if transform is not None:
            shift = 0.0 if transform.shift is None else transform.shift[min(index, transform.shift.shape[0] - 1)]
            divisor = 1.0 if transform.divisor is None else transform.divisor
            ends = np.stack([(captured.channel_min[index] - shift) / divisor,
                             (captured.channel_max[index] - shift) / divisor])
            low, high = float(ends.min()), float(ends.max())
            shift = shift if np.isscalar(shift) else shift[channels]
            values = ((values - shift) / (divisor if np.isscalar(divisor) else divisor[channels])).astype(np.float32)
        if config.act_observer == "minmax":
            params = grid_from_range(low, high, spec)
        else:
            params = observe(mx.array(values), spec, config.act_observer, lower=config.percentiles[0],
                             upper=config.percentiles[1])
        obs.lows.append(low)
        obs.highs.append(high)
        obs.grids.append((params.scale.item(), params.zero_point.item()))
        obs.samples.append(values)
    return obs


def _schedules(observations: dict[str, _Observations], config: QuantConfig) -> dict:
    return {site: _schedule(obs, config.act_spec(), config, (config.seed, STATIC_STREAM, layer))
            for layer, (site, obs) in enumerate(observations.items())}


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
