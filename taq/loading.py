"""`load_model`: a preset name (and optional checkpoint) -> the MMDiT plus the prompt encoder that feeds it.

It sits above `taq.models` (the architecture and weight files) and `taq.pocket` (the embedded default), so
neither imports the other through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from taq.conditioning import DiffusionKitEncoder, Encoder, PrecomputedEncoder, RandomEncoder
from taq.config import DEFAULT_MODEL, Preset, get_preset
from taq.formats import file_sha256
from taq.models.checkpoint import CheckpointError, load_sd3_checkpoint
from taq.models.mmdit import MMDiT

__all__ = ["DEFAULT_MODEL", "Model", "check_checkpoint_option", "load_model"]


@dataclass
class Model:
    preset: Preset
    mmdit: MMDiT
    encode: Encoder  # prompts -> (tokens (B, L, token_dim), pooled (B, pooled_dim))
    weights_id: str  # sha256 of the weights file, or "random-seed-N"

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def default_resolution(self) -> int:
        return self.preset.default_resolution

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(H, W, C) of the latent for a square image of `resolution` pixels."""
        return self.preset.latent_shape(resolution)


def check_checkpoint_option(name: str, checkpoint) -> Preset:
    """The preset, after checking that a checkpoint is given only to models that do not ship their weights."""
    preset = get_preset(name)
    if preset.ships_weights and checkpoint is not None:
        raise ValueError(f"the {name} model ships its own weights; --checkpoint is for SD3-layout models")
    return preset


def load_model(name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
               embeddings: str | os.PathLike | None = None, dtype: mx.Dtype | None = None, seed: int = 0) -> Model:
    """The pocket model from its shipped weights; `sd3-medium` etc. from an SD3-layout checkpoint, or with
    seeded random weights when no checkpoint is given. `embeddings` overrides the prompt encoder."""
    preset = check_checkpoint_option(name, checkpoint)
    if preset.ships_weights:
        from taq.pocket import DEFAULT_WEIGHTS, load_pocket

        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"the pocket model's weights are missing ({DEFAULT_WEIGHTS}); train them with "
                                  f"`python -m taq.pocket.train --out {DEFAULT_WEIGHTS}`")
        pocket, _ = load_pocket(DEFAULT_WEIGHTS)
        mmdit, default_encoder = pocket.mmdit, pocket.text_encoder.encode
        weights_id = file_sha256(DEFAULT_WEIGHTS)
    elif checkpoint is not None:
        mmdit = load_sd3_checkpoint(checkpoint, gelu=preset.mmdit.gelu, num_heads=preset.mmdit.num_heads)
        default_encoder = DiffusionKitEncoder()
        weights_id = file_sha256(checkpoint) if Path(checkpoint).is_file() else str(checkpoint)
    else:
        mx.random.seed(seed)
        mmdit = MMDiT(preset.mmdit)
        mx.eval(mmdit.parameters())
        default_encoder = RandomEncoder(preset.mmdit.token_dim, preset.mmdit.pooled_dim, preset.text_tokens)
        weights_id = f"random-seed-{seed}"
    encoder = PrecomputedEncoder(embeddings) if embeddings is not None else default_encoder
    if dtype is not None:
        mmdit.set_dtype(dtype)
    return Model(preset, mmdit, encoder, weights_id)
