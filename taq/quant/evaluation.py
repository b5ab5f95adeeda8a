"""Paired evaluation of a quantized model against full precision: same noise, same prompts, same sampler.

Sample i starts from `numpy.random.default_rng([seed, 2, i])` noise with prompt `prompts[i]` in every
configuration, so each quantized sample has a full-precision twin and every comparison is paired:

- final-latent MSE and PSNR per sample (pocket: the latent is the image, [-1, 1] mapped to [0, 1], PSNR =
  10 log10(1 / MSE); other models: latents, with the twin's peak-to-peak range as the data range), their mean
  with a bootstrap 95% interval over samples (`scipy.stats.bootstrap`), the 10th percentile and the worst sample;
- the error trajectory: the latent MSE against the twin at every sampler step;
- each quantized layer's own output error at each step (quantized output vs the full-precision Linear on the same
  input), as a signal-to-quantization-noise ratio in dB;
- for pocket, digit accuracy with the digit classifier and Frechet distances in its feature space (its 10 logits)
  to the full-precision samples and to real held-out digits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from taq.conditioning import UNCONDITIONAL_PROMPT
from taq.sampling import CFGDenoiser, euler_steps, flow_sigmas

NOISE_STREAM = 2  # default_rng([seed, NOISE_STREAM, i]): apart from calibration's noise (0) and shuffle (1)
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4999

Model = Callable[[mx.array, mx.array, mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class Setup:
    """What every configuration is sampled with."""

    prompts: tuple[str, ...]  # one per sample
    latent_shape: tuple[int, int, int]
    steps: int = 50
    cfg_scale: float = 1.5
    shift: float = 3.0
    seed: int = 0
    batch_size: int = 64  # trajectories per model call (2x rows with CFG)

    def noise(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, NOISE_STREAM, i]).standard_normal(
            self.latent_shape, dtype=np.float32) for i in indices])

    @property
    def sigmas(self) -> np.ndarray:
        return flow_sigmas(self.steps, self.shift)


@dataclass
class Run:
    """One configuration's samples: final latents (N, H, W, C), every step's latent (S, N, H, W, C) when kept,
    per-(site, step) output error sums, seconds of sampling."""

    final: np.ndarray
    trajectory: np.ndarray | None
    step_mse: np.ndarray | None = None  # (S, N) against the full-precision twin
    layer_error: dict[str, np.ndarray] = field(default_factory=dict)  # site -> (S, 2): sum sq error, sum sq ref
    seconds: float = 0.0


def sample(model: Model, encode, setup: Setup, keep_trajectory: bool = False, reference: Run | None = None,
           probe=None, progress: bool = True, desc: str = "sample") -> Run:
    """Sample every prompt of `setup` with `model` (batches of `setup.batch_size`); with `reference`, the MSE
    against its trajectory at every step; with `probe` (a QuantizedModel made with probe=True), its layers'
    output errors per step."""
    started = time.perf_counter()
    n, steps = len(setup.prompts), setup.steps
    final = np.empty((n,) + setup.latent_shape, np.float32)
    trajectory = np.empty((steps, n) + setup.latent_shape, np.float32) if keep_trajectory else None
    step_mse = np.empty((steps, n)) if reference is not None else None
    layer_error: dict[str, np.ndarray] = {}
    uncond = encode([UNCONDITIONAL_PROMPT])
    with tqdm(total=n, unit="sample", desc=desc, disable=not progress) as bar:
        for start in range(0, n, setup.batch_size):
            rows = range(start, min(start + setup.batch_size, n))
            denoiser = CFGDenoiser(model, encode([setup.prompts[i] for i in rows]), uncond, setup.cfg_scale)
            steps_iter = euler_steps(denoiser, mx.array(setup.noise(rows)), setup.sigmas)
            while True:
                try:
                    step = next(steps_iter)
                except StopIteration as done:
                    final[rows.start:rows.stop] = np.array(done.value.astype(mx.float32))
                    break
                x = np.array(step.x_t.astype(mx.float32))
                if trajectory is not None:
                    trajectory[step.index, rows.start:rows.stop] = x
                if step_mse is not None:
                    twin = reference.trajectory[step.index, rows.start:rows.stop]
                    step_mse[step.index, rows.start:rows.stop] = np.square(x - twin).reshape(len(rows), -1).mean(1)
                if probe is not None and step.index > 0:
                    _add_layer_errors(layer_error, probe.layer_errors(), step.index - 1, steps)
            if probe is not None:
                _add_layer_errors(layer_error, probe.layer_errors(), steps - 1, steps)
            bar.update(len(rows))
    if step_mse is not None:  # the last step's error is the final latent's
        step_mse = np.concatenate([step_mse[1:], np.square(final - reference.final).reshape(n, -1).mean(1)[None]])
    return Run(final, trajectory, step_mse, layer_error, time.perf_counter() - started)


def _add_layer_errors(totals: dict[str, np.ndarray], errors: dict[str, list], step: int, steps: int) -> None:
    """Add one model call's (squared error, squared reference) sums of every layer to totals[site][step]."""
    sites = [site for site, calls in errors.items() if calls]
    if not sites:
        return
    sums = np.array(mx.stack([mx.stack(pair) for site in sites for pair in errors[site]]), np.float64)
    row = 0
    for site in sites:
        calls = len(errors[site])
        totals.setdefault(site, np.zeros((steps, 2)))[step] += sums[row:row + calls].sum(axis=0)
        row += calls


# --------------------------------------------------------------------------- metrics


def images01(latents: np.ndarray) -> np.ndarray:
    """Pocket latents ([-1, 1] with ink +1) as images in [0, 1]."""
    return np.clip((np.asarray(latents, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def psnr(reference: np.ndarray, test: np.ndarray, data_range: np.ndarray | float) -> np.ndarray:
    """(N,) 10 log10(range^2 / MSE) per sample; inf for identical samples."""
    mse = np.square(np.asarray(test, np.float64) - reference).reshape(len(reference), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(np.square(data_range) / mse)


def summary(values: np.ndarray, seed: int = 0) -> dict:
    """Mean with its bootstrap 95% interval over samples, 10th and 90th percentiles, min and max with their
    samples. Infinite values (a PSNR of identical samples) count as the largest finite one, and are counted."""
    from scipy.stats import bootstrap

    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    capped = np.where(np.isfinite(values), values, finite.max() if finite.size else 0.0)
    interval = (bootstrap((capped,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", random_state=seed).confidence_interval
                if capped.size > 1 and np.ptp(capped) > 0 else (capped.mean(), capped.mean()))
    return {"mean": float(capped.mean()), "ci": [float(interval[0]), float(interval[1])],
            "p10": float(np.percentile(capped, 10)), "p90": float(np.percentile(capped, 90)),
            "min": float(capped.min()), "min_sample": int(capped.argmin()), "max": float(capped.max()),
            "max_sample": int(capped.argmax()), "infinite": int(np.isinf(values).sum())}


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Mean of a - b over samples with its bootstrap 95% interval (a, b per sample, same samples)."""
    from scipy.stats import bootstrap

    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    diff = diff[np.isfinite(diff)]
    if diff.size < 2 or np.ptp(diff) == 0:
        return {"mean": float(diff.mean()) if diff.size else float("nan"), "ci": [float(diff.mean())] * 2
                if diff.size else [float("nan")] * 2, "samples": int(diff.size)}
    interval = bootstrap((diff,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                         method="percentile", random_state=seed).confidence_interval
    return {"mean": float(diff.mean()), "ci": [float(interval[0]), float(interval[1])], "samples": int(diff.size)}


def gap_recovered(table: np.ndarray, static: np.ndarray, dynamic: np.ndarray, seed: int = 0) -> dict:
    """(mean(table - static)) / (mean(dynamic - static)) over paired samples, with a bootstrap 95% interval:
    the share of the gap between static and per-call dynamic grids a time-aware table closes."""
    from scipy.stats import bootstrap

    keep = np.isfinite(table) & np.isfinite(static) & np.isfinite(dynamic)
    table, static, dynamic = (np.asarray(a, np.float64)[keep] for a in (table, static, dynamic))

    def share(t, s, d):
        gap = np.mean(d - s)
        return np.mean(t - s) / gap if gap != 0 else np.nan

    value = share(table, static, dynamic)
    if table.size < 2:
        return {"share": float(value), "ci": [float(value)] * 2}
    ci = bootstrap((table, static, dynamic), share, paired=True, vectorized=False, n_resamples=1999,
                   confidence_level=CONFIDENCE, method="percentile", random_state=seed).confidence_interval
    return {"share": float(value), "ci": [float(ci.low), float(ci.high)]}


def step_error_summary(step_mse: np.ndarray, seed: int = 0) -> dict:
    """Per step: mean latent MSE against the twin and a bootstrap 95% interval over samples."""
    from scipy.stats import bootstrap

    mean = step_mse.mean(axis=1)
    if step_mse.shape[1] > 1:
        ci = bootstrap((step_mse,), np.mean, axis=1, confidence_level=CONFIDENCE, n_resamples=999,
                       method="percentile", random_state=seed).confidence_interval
        low, high = np.asarray(ci.low), np.asarray(ci.high)
    else:
        low = high = mean
    return {"mean": mean.tolist(), "ci_low": np.nan_to_num(low, nan=0.0).tolist(),
            "ci_high": np.nan_to_num(high, nan=0.0).tolist()}


def layer_sqnr(layer_error: dict[str, np.ndarray]) -> dict:
    """{"sites": [...], "db": (sites, steps) 10 log10(sum ref^2 / sum err^2)} from the per-step sums."""
    sites = list(layer_error)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = [(10 * np.log10(layer_error[s][:, 1] / layer_error[s][:, 0])).tolist() for s in sites]
    return {"sites": sites, "db": db}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    from scipy.linalg import sqrtm

    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):  # numerical noise in an (almost) singular product
        root = root.real
    return float(np.square(mu_a - mu_b).sum() + np.trace(cov_a + cov_b - 2 * root))
