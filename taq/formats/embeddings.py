"""Precomputed prompt embeddings (e.g. SD3's CLIP-L/G + T5 run once where they are installed), read by
`taq.conditioning.PrecomputedEncoder`."""

from __future__ import annotations

import os

import numpy as np

from taq.formats.container import TaqFormatError, load_npz, save_npz

KIND, VERSION = "taq-embeddings", 1


def save_embeddings(path: str | os.PathLike, prompts: list[str], tokens: np.ndarray, pooled: np.ndarray) -> None:
    """prompts (M,), tokens (M, L, token_dim), pooled (M, pooled_dim), as float32."""
    save_npz(path, {"prompts": np.array(prompts), "tokens": np.asarray(tokens, np.float32),
                    "pooled": np.asarray(pooled, np.float32)}, {}, kind=KIND, version=VERSION)


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts, tokens (M, L, token_dim), pooled (M, pooled_dim)) of an embeddings file."""
    arrays, _ = load_npz(path, kind=KIND, version=VERSION, required={"prompts": 1, "tokens": 3, "pooled": 2})
    prompts = [str(p) for p in arrays["prompts"]]
    if not (len(prompts) == arrays["tokens"].shape[0] == arrays["pooled"].shape[0]):
        raise TaqFormatError(f"{path}: {len(prompts)} prompts but {arrays['tokens'].shape[0]} token and "
                             f"{arrays['pooled'].shape[0]} pooled embeddings")
    return prompts, arrays["tokens"], arrays["pooled"]
