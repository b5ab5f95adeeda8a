"""Which calibration points go through the model, in which forward batches (profiling and quantizer calibration).

`num_samples` points are drawn uniformly without replacement by
`numpy.random.default_rng(seed).choice(P, num_samples, replace=False)` (asking for more points than the set holds
is an error, not a silent clamp), sorted by (timestep, prompt, point index) and cut into forward batches of at most
`batch_size` points that share one timestep. A batch of B points runs as 2B rows, as the sampler's CFG doubling:
rows [0:B] carry the points' prompt embeddings, rows [B:2B] the unconditional ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from taq.formats.calibration import CalibrationSet


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
    points = sample_points(len(cal), num_samples, seed)
    points = points[np.lexsort((points, cal.prompt_indices[points], cal.ts[points]))]  # by t, then prompt
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
