"""`load_model`: a preset name (and optional checkpoint) -> the MMDiT plus the prompt encoder that feeds it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from taq.conditioning import Encoder, PrecomputedEncoder, RandomEncoder, DiffusionKitEncoder
from taq.config import get_preset
from taq.io import file_sha256
from taq.models.checkpoint import CheckpointError, load_sd3_checkpoint
from taq.models.mmdit import MMDiT

DEFAULT_MODEL = "pocket"
# Pixels per latent cell (SD3's VAE downsamples 8x; the pocket model's latent is the image) and default size.
LATENT_SCALE = {"sd3-medium": 8, "pocket": 1, "tiny": 1, "small": 1}
DEFAULT_RESOLUTION = {"sd3-medium": 512, "pocket": 16, "tiny": 16, "small": 32}


@dataclass
class Model:
    name: str
    mmdit: MMDiT
    encode: Encoder  # prompts -> (tokens (B, L, token_dim), pooled (B, pooled_dim))
    weights_id: str  # sha256 of the weights file, or "random-seed-N"
    latent_scale: int
    default_resolution: int

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(H, W, C) of the latent for a square image of `resolution` pixels."""
        step = self.latent_scale * self.mmdit.config.patch_size
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {step} for {self.name} "
                             f"(latent scale {self.latent_scale} x patch {self.mmdit.config.patch_size})")
        side = resolution // self.latent_scale
        if side // self.mmdit.config.patch_size > self.mmdit.config.pos_embed_max_size:
            raise ValueError(f"resolution {resolution} is larger than {self.name}'s positional grid allows")
        return side, side, self.mmdit.config.in_channels


def load_model(name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
               embeddings: str | os.PathLike | None = None, dtype: mx.Dtype | None = None, seed: int = 0) -> Model:
    """The pocket model from its shipped weights; `sd3-medium` etc. from an SD3-layout checkpoint, or with
    seeded random weights when no checkpoint is given. `embeddings` overrides the prompt encoder."""
    config = get_preset(name)
    if name == "pocket":
        if checkpoint is not None:
            raise ValueError("the pocket model ships its own weights; --checkpoint is for SD3-layout models")
        from taq.pocket import DEFAULT_WEIGHTS, load_pocket

        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"the pocket model's weights are missing ({DEFAULT_WEIGHTS}); train them with "
                                  f"`python -m taq.pocket.train --out {DEFAULT_WEIGHTS}`")
        pocket, _ = load_pocket(DEFAULT_WEIGHTS)
        mmdit, default_encoder = pocket.mmdit, pocket.text_encoder.encode
        weights_id = file_sha256(DEFAULT_WEIGHTS)
    elif checkpoint is not None:
        mmdit = load_sd3_checkpoint(checkpoint, gelu=config.gelu, num_heads=config.num_heads)
        default_encoder = DiffusionKitEncoder()
        weights_id = file_sha256(checkpoint) if Path(checkpoint).is_file() else str(checkpoint)
    else:
        mx.random.seed(seed)
        mmdit = MMDiT(config)
        mx.eval(mmdit.parameters())
        default_encoder = RandomEncoder(config.token_dim, config.pooled_dim)
        weights_id = f"random-seed-{seed}"
    encoder = PrecomputedEncoder(embeddings) if embeddings is not None else default_encoder
    if dtype is not None:
        mmdit.set_dtype(dtype)
    return Model(name, mmdit, encoder, weights_id, LATENT_SCALE[name], DEFAULT_RESOLUTION[name])
