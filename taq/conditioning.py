"""Prompt -> SD3's two conditioning inputs: token embeddings (B, L, token_dim) and a pooled vector (B, pooled_dim).

Three sources: the pocket model's own trained encoder (taq/pocket/text_encoder.py), embeddings precomputed
elsewhere and stored in a file (e.g. SD3's CLIP-L/G + T5 run once on a machine that has them), and, for
random-weight presets, a seeded random embedding per prompt.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import mlx.core as mx
import numpy as np

from taq.formats import embeddings

Encoder = Callable[[list[str]], tuple[mx.array, mx.array]]
UNCONDITIONAL_PROMPT = ""  # what classifier-free guidance contrasts the prompt with


class RandomEncoder:
    """A fixed random embedding per prompt (seeded by the prompt's text): for random-weight models."""

    def __init__(self, token_dim: int, pooled_dim: int, length: int = 16):
        self.token_dim, self.pooled_dim, self.length = token_dim, pooled_dim, length

    def __call__(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        tokens, pooled = [], []
        for prompt in prompts:
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little"))
            tokens.append(rng.standard_normal((self.length, self.token_dim), dtype=np.float32))
            pooled.append(rng.standard_normal(self.pooled_dim, dtype=np.float32))
        return mx.array(np.stack(tokens)), mx.array(np.stack(pooled))


class PrecomputedEncoder:
    """Looks prompts up in an embeddings file written by `save_embeddings`."""

    def __init__(self, path: str | os.PathLike):
        prompts, self.tokens, self.pooled = embeddings.load_embeddings(path)
        self.path = path
        self.index = {p: i for i, p in enumerate(prompts)}

    def __call__(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise ValueError(f"{self.path}: no embeddings for prompt(s) {missing[:3]}")
        rows = [self.index[p] for p in prompts]
        return mx.array(self.tokens[rows]), mx.array(self.pooled[rows])


def save_embeddings(path: str | os.PathLike, prompts: list[str], encoder: Encoder) -> None:
    """Encode prompts (include UNCONDITIONAL_PROMPT for the CFG branch) once and store them for
    PrecomputedEncoder."""
    tokens, pooled = encoder(prompts)
    embeddings.save_embeddings(path, prompts, np.array(tokens.astype(mx.float32)), np.array(pooled.astype(mx.float32)))


class DiffusionKitEncoder:
    """SD3's CLIP-L/G + T5-XXL encoders through DiffusionKit, built on first use (downloads their weights, so it
    never runs in CI)."""

    def __init__(self):
        self.pipeline = None

    def __call__(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        if self.pipeline is None:
            try:
                from diffusionkit.mlx import DiffusionPipeline
            except ImportError:
                raise ValueError("encoding prompts for SD3 needs DiffusionKit (scripts/install_diffusionkit.sh) "
                                 "or a precomputed embeddings file (--embeddings)") from None
            self.pipeline = DiffusionPipeline(model_version="argmaxinc/mlx-stable-diffusion-3-medium", shift=3.0,
                                              low_memory_mode=False, w16=True, a16=True)
        pairs = [self.pipeline.encode_text(p, cfg_weight=1.0, negative_text=UNCONDITIONAL_PROMPT) for p in prompts]
        return mx.concatenate([t[:1] for t, _ in pairs]), mx.concatenate([p[:1] for _, p in pairs])
