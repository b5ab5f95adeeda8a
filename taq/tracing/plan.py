"""Which calibration points go through the model, in which forward batches (profiling and quantizer calibration).

`num_samples` points are drawn uniformly without replacement by
`numpy.random.default_rng(seed).choice(P, num_samples, replace=False)` (asking for more points than the set holds
is an error, not a silent clamp), sorted by (timestep, prompt, point index) and cut into forward batches of at most
`batch_size` points that share one timestep. A batch of B points runs as 2B rows, as the sampler's CFG doubling:
rows [0:B] carry the points' prompt embeddings, rows [B:2B] the unconditional ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from taq.formats import TaqFormatError
from taq.formats.calibration import CalibrationSet
from taq.loading import Model


@dataclass(frozen=True)
class ForwardBatch:
    timestep: float  # shared by every point of the batch
    points: np.ndarray  # (B,) indices into the calibration set


def sample_points(num_points: int, num_samples: int, seed: int) -> np.ndarray:
    """`num_samples` distinct point indices drawn uniformly from range(num_points), seeded."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if num_samples > num_points:
        raise ValueError(f"num_samples {num_samples} exceeds the {num_points} points of the calibration set; "
                         f"ask for at most {num_points}")
    return np.random.default_rng(seed).choice(num_points, size=num_samples, replace=False)


def plan_batches(cal: CalibrationSet, num_samples: int, seed: int, batch_size: int) -> list[ForwardBatch]:
    """The sampled points in forward batches of at most `batch_size` points that share one timestep."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return point_batches(cal, sample_points(len(cal), num_samples, seed), batch_size)


def point_batches(cal: CalibrationSet, points: np.ndarray, batch_size: int) -> list[ForwardBatch]:
    """`points` in forward batches of at most `batch_size` points that share one timestep, by t, then prompt."""
    points = points[np.lexsort((points, cal.prompt_indices[points], cal.ts[points]))]
    batches = []
    for t in np.unique(cal.ts[points]):
        same_t = points[cal.ts[points] == t]
        batches += [ForwardBatch(float(t), same_t[i : i + batch_size]) for i in range(0, len(same_t), batch_size)]
    return batches


def batch_inputs(cal: CalibrationSet, batch: ForwardBatch) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """(x, t, tokens, pooled) of 2B rows for B points: conditional rows first, then unconditional."""
    x = cal.xs[batch.points]  # (B, H, W, C)
    prompts = cal.prompt_indices[batch.points]
    tokens = _cond_then_uncond(cal.cs[prompts], cal.cs_uncond)  # (2B, L, token_dim)
    pooled = _cond_then_uncond(cal.cs_pooled[prompts], cal.cs_pooled_uncond)  # (2B, pooled_dim)
    t = np.full((2 * len(batch.points),), cal.ts[batch.points[0]], dtype=np.float32)
    return mx.array(np.concatenate([x, x])), mx.array(t), mx.array(tokens), mx.array(pooled)


def _cond_then_uncond(cond: np.ndarray, uncond: np.ndarray) -> np.ndarray:
    return np.concatenate([cond, np.broadcast_to(uncond, cond.shape)])


def check_calibration_fits(cal: CalibrationSet, model: Model, source: str) -> None:
    """The calibration set must feed this model: latent channels and grid, embedding widths, finite embeddings."""
    cfg = model.mmdit.config
    made_with = cal.meta.get("model", "an unknown model")
    H, W, C = cal.xs.shape[1:]
    problems = []
    if C != cfg.in_channels:
        problems.append(f"latents have {C} channels, the model takes {cfg.in_channels}")
    p, grid = cfg.patch_size, cfg.pos_embed_max_size
    if H % p or W % p or H // p > grid or W // p > grid:
        problems.append(f"latents are {H}x{W}, the model takes multiples of {p} up to {grid * p}")
    if cal.cs.shape[-1] != cfg.token_dim:
        problems.append(f"token embeddings are {cal.cs.shape[-1]} wide, the model takes {cfg.token_dim}")
    if cal.cs_pooled.shape[-1] != cfg.pooled_dim:
        problems.append(f"pooled embeddings are {cal.cs_pooled.shape[-1]} wide, the model takes {cfg.pooled_dim}")
    if problems:
        raise ValueError(f"{source} was made with {made_with!r} and does not fit model {model.name!r}: "
                         + "; ".join(problems))
    for key in ("cs", "cs_pooled", "cs_uncond", "cs_pooled_uncond"):
        if not np.isfinite(getattr(cal, key)).all():
            raise TaqFormatError(f"{source}: {key!r} holds NaN or inf values")
    if len(cal) == 0:
        raise TaqFormatError(f"{source}: holds no points")
    if made_with != model.name:
        warnings.warn(f"{source} was made with {made_with!r}, not {model.name!r}", stacklevel=3)
    elif cal.meta.get("weights_id") != model.weights_id:
        warnings.warn(f"{source} was made with other weights of {model.name!r} "
                      f"({cal.meta.get('weights_id')} vs {model.weights_id})", stacklevel=3)
