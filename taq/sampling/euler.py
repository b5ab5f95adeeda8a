"""Classifier-free-guided denoiser and an Euler sampler that yields every step's model input.

The model is `model(x, t, tokens, pooled) -> v`, the flow velocity v = noise - x0, so the
denoised estimate is x - sigma * v. Neither the denoiser nor a sampler step reads anything back
to the host: the caller decides when to `mx.eval`. Both the denoiser `(x, sigma) -> denoised`
and `euler_update` take only arrays, so either can be wrapped with `mx.compile`.
"""

import math
from dataclasses import dataclass
from typing import Callable, Generator, Optional, Sequence, Tuple

import numpy as np

import mlx.core as mx  # importing taq.sampling runs taq/__init__ first, which loads OpenBLAS

from taq.sampling.schedule import sigma_to_timestep

Model = Callable[[mx.array, mx.array, mx.array, mx.array], mx.array]
TextConditioning = Tuple[mx.array, mx.array]  # tokens (B, L, token_dim), pooled (B, pooled_dim)
Denoiser = Callable[[mx.array, mx.array], mx.array]


def check_guidance_scale(scale: float) -> float:
    """A CFG scale is a finite number >= 0 (0: unconditional, 1: conditional only); a negative one would push
    every sample away from its prompt."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) or not (
            math.isfinite(scale) and scale >= 0):
        raise ValueError(f"the guidance scale (cfg_scale) must be a finite number >= 0, got {scale!r}")
    return float(scale)


class CFGDenoiser:
    """`denoiser(x, sigma) -> guided denoised latent` for B trajectories, one model call per step.

    x is (B, H, W, C); sigma is a scalar array shared by all rows. The model sees 2B rows, the
    conditional ones first ([0:B] cond, [B:2B] uncond), all at t = 1000 * sigma; the result is
    uncond + scale * (cond - uncond) on the denoised estimates. At scale 1.0 that is exactly the
    conditional estimate, so only the B conditional rows go through the model (uncond may be None).
    An unconditional pair with 1 row is broadcast to all B trajectories.
    """

    def __init__(
        self,
        model: Model,
        cond: TextConditioning,
        uncond: Optional[TextConditioning] = None,
        scale: float = 1.0,
    ):
        check_guidance_scale(scale)
        tokens, pooled = cond
        _check_conditioning("cond", tokens, pooled, tokens.shape[0])
        self.model = model
        self.scale = float(scale)
        self.num_trajectories = tokens.shape[0]
        self.guided = self.scale != 1.0
        if not self.guided:
            self.tokens, self.pooled = tokens, pooled
            return
        if uncond is None:
            raise ValueError(f"guidance scale {scale} needs unconditional embeddings, got uncond=None")
        uncond_tokens, uncond_pooled = _broadcast_rows(uncond, self.num_trajectories)
        if uncond_tokens.shape[1:] != tokens.shape[1:] or uncond_pooled.shape[1:] != pooled.shape[1:]:
            raise ValueError(
                f"uncond shapes {uncond_tokens.shape[1:]}, {uncond_pooled.shape[1:]} do not match "
                f"cond shapes {tokens.shape[1:]}, {pooled.shape[1:]} (per row)"
            )
        self.tokens = mx.concatenate([tokens, uncond_tokens])  # (2B, L, token_dim)
        self.pooled = mx.concatenate([pooled, uncond_pooled])  # (2B, pooled_dim)

    def __call__(self, x: mx.array, sigma: mx.array) -> mx.array:
        if x.shape[0] != self.num_trajectories:
            raise ValueError(f"x has {x.shape[0]} rows, the conditioning has {self.num_trajectories}")
        rows = mx.concatenate([x, x]) if self.guided else x
        t = mx.broadcast_to(sigma_to_timestep(sigma), (rows.shape[0],))
        denoised = rows - sigma * self.model(rows, t, self.tokens, self.pooled)
        if not self.guided:
            return denoised
        cond, uncond = mx.split(denoised, 2)
        return uncond + self.scale * (cond - uncond)


def _check_conditioning(name: str, tokens: mx.array, pooled: mx.array, rows: int) -> None:
    if tokens.ndim != 3 or pooled.ndim != 2:
        raise ValueError(
            f"{name}: tokens must be (B, L, D) and pooled (B, P), got {tokens.shape} and {pooled.shape}"
        )
    if tokens.shape[0] != rows or pooled.shape[0] != rows:
        raise ValueError(
            f"{name}: tokens have {tokens.shape[0]} rows, pooled {pooled.shape[0]}, expected {rows}"
        )


def _broadcast_rows(uncond: TextConditioning, rows: int) -> TextConditioning:
    tokens, pooled = uncond
    if tokens.shape[0] == 1 and rows != 1:
        _check_conditioning("uncond", tokens, pooled, 1)
        return (
            mx.broadcast_to(tokens, (rows,) + tokens.shape[1:]),
            mx.broadcast_to(pooled, (rows,) + pooled.shape[1:]),
        )
    _check_conditioning("uncond", tokens, pooled, rows)
    return tokens, pooled


@dataclass(frozen=True)
class Step:
    """One sampler step as the model sees it."""

    index: int  # 0 .. N-1
    x_t: mx.array  # (B, H, W, C) the model input at this step, before the step's update
    t: float  # timestep given to the model, 1000 * sigma
    sigma: float


def euler_update(x: mx.array, denoised: mx.array, sigma: mx.array, sigma_next: mx.array) -> mx.array:
    """x at sigma_next from one Euler step of dx/dsigma = (x - denoised) / sigma; keeps x's dtype."""
    return (x + (sigma_next - sigma) * (x - denoised) / sigma).astype(x.dtype)


def euler_steps(
    denoiser: Denoiser, x: mx.array, sigmas: Sequence[float]
) -> Generator[Step, None, mx.array]:
    """Yield a Step for each of the N = len(sigmas) - 1 steps, then return the final latent.

    x is the latent at sigmas[0] (pure noise when sigmas[0] == 1). The final latent is the
    generator's return value (`StopIteration.value`); `sample` hands it back directly. Nothing
    here is evaluated: evaluate `step.x_t` every step or few to keep the lazy graph short.
    """
    sigmas = _check_sigmas(sigmas)
    for index in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        yield Step(index=index, x_t=x, t=sigma_to_timestep(sigma), sigma=sigma)
        sigma_array = mx.array(sigma, dtype=mx.float32)
        denoised = denoiser(x, sigma_array)
        x = euler_update(x, denoised, sigma_array, mx.array(sigma_next, dtype=mx.float32))
    return x


def sample(
    denoiser: Denoiser,
    x: mx.array,
    sigmas: Sequence[float],
    on_step: Optional[Callable[[Step], None]] = None,
) -> mx.array:
    """Run all steps and return the final latent (lazy); on_step, if given, sees every Step.

    Each step's input is scheduled with `mx.async_eval`, which bounds the graph without waiting.
    """
    steps = euler_steps(denoiser, x, sigmas)
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            return finished.value
        mx.async_eval(step.x_t)
        if on_step is not None:
            on_step(step)


def _check_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or sigmas.size < 2:
        raise ValueError(
            f"sigmas must be 1-D with at least 2 values (N steps + terminal 0), got shape {sigmas.shape}"
        )
    if not np.all(np.diff(sigmas) < 0):
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    if sigmas[-2] <= 0:
        raise ValueError(
            f"every sigma but the last must be > 0 (the update divides by it), got {sigmas.tolist()}"
        )
    return sigmas
