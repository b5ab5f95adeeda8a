"""The pocket model: a tiny SD3-like MMDiT and text encoder trained on 8x8 handwritten digits.

SD3's real weights cannot be downloaded everywhere, so taq ships this trained stand-in as its embedded
default: same architecture family, same conditioning interface (tokens + pooled), same rectified-flow
objective, small enough (~3.7 M parameters, float16) to live inside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from taq.config import MMDiTConfig
from taq.models.checkpoint import (CheckpointError, config_from_metadata, load_into, read_taq_weights,
                                   save_taq_weights)
from taq.models.mmdit import MMDiT
from taq.pocket.text_encoder import TextEncoder, TextEncoderConfig

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "pocket.safetensors"


class PocketModel(nn.Module):
    """The MMDiT and its text encoder as one module: trained jointly, saved and loaded together."""

    def __init__(self, mmdit_config: MMDiTConfig, text_config: TextEncoderConfig):
        super().__init__()
        if (text_config.token_dim, text_config.pooled_dim) != (mmdit_config.token_dim, mmdit_config.pooled_dim):
            raise ValueError(f"text encoder gives token/pooled dims {text_config.token_dim}/{text_config.pooled_dim}, "
                             f"the MMDiT takes {mmdit_config.token_dim}/{mmdit_config.pooled_dim}")
        self.mmdit = MMDiT(mmdit_config)
        self.text_encoder = TextEncoder(text_config)

    def __call__(self, x: mx.array, t: mx.array, ids: mx.array) -> mx.array:
        """Velocity for latents x (B, H, W, C) at t (B,) = 1000 * sigma, prompts given as token ids (B, L)."""
        tokens, pooled = self.text_encoder(ids)
        return self.mmdit(x, t, tokens, pooled)


def save_pocket(path: str | os.PathLike, model: PocketModel, metadata: dict | None = None,
                dtype: mx.Dtype = mx.float16) -> None:
    """Write both modules and their configs to one taq weights file (atomically)."""
    record = {"mmdit_config": model.mmdit.config.to_dict(),
              "text_encoder_config": model.text_encoder.config.to_dict(), **(metadata or {})}
    save_taq_weights(path, {"mmdit": model.mmdit, "text_encoder": model.text_encoder}, record, dtype=dtype)


def load_pocket(path: str | os.PathLike = DEFAULT_WEIGHTS) -> tuple[PocketModel, dict]:
    """The pocket model (float32) and the metadata record saved with it."""
    modules, metadata = read_taq_weights(path)
    for name, config_key in (("mmdit", "mmdit_config"), ("text_encoder", "text_encoder_config")):
        if name not in modules or config_key not in metadata:
            raise CheckpointError(f"{path}: not a pocket model file (modules {sorted(modules)}, "
                                  f"metadata keys {sorted(metadata)})")
    model = PocketModel(config_from_metadata(MMDiTConfig, metadata["mmdit_config"], path),
                        config_from_metadata(TextEncoderConfig, metadata["text_encoder_config"], path))
    load_into(model.mmdit, modules["mmdit"], source=f"{path} (mmdit)")
    load_into(model.text_encoder, modules["text_encoder"], source=f"{path} (text_encoder)")
    return model, metadata
