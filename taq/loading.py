"""`load_model`: a preset name (and optional checkpoint) -> the MMDiT plus the prompt encoder that feeds it.

Where the weights come from is one rule (`check_model_options`), so every command inherits it: the package
(pocket), an SD3-layout checkpoint, or seeded random weights -- the last only when asked for, since numbers
measured on random weights describe no trained model. It sits above `taq.models` (the architecture and weight
files) and `taq.pocket` (the embedded default), so neither imports the other through it.
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

__all__ = ["DEFAULT_MODEL", "DTYPES", "Model", "check_model_options", "dtype_from_args", "load_model", "resolve_dtype"]

DTYPES = ("auto", "float32", "float16", "bfloat16")


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def resolve_dtype(preset: Preset, choice: str = "auto") -> mx.Dtype:
    """The compute dtype of a model. "auto": float32 on the CPU (its backend emulates half precision slowly) and
    for models that ship their weights (pocket is small, and its baselines are float32); bfloat16 for SD3-size
    models on GPUs (the benchmarks' dtype: SD3 Medium's published weights are float16, but post-GELU values of
    several hundred and attention logits sit safer in bfloat16's float32-sized range)."""
    if choice not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {choice!r}")
    if choice != "auto":
        return getattr(mx, choice)
    return mx.bfloat16 if on_gpu() and not preset.ships_weights else mx.float32


@dataclass
class Model:
    preset: Preset
    mmdit: MMDiT
    encode: Encoder  # prompts -> (tokens (B, L, token_dim), pooled (B, pooled_dim))
    weights_id: str  # sha256 of the weights file, or "random-seed-N"
    random_weights: bool = False  # seeded random weights (asked for explicitly)

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def default_resolution(self) -> int:
        return self.preset.default_resolution

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(H, W, C) of the latent for a square image of `resolution` pixels."""
        return self.preset.latent_shape(resolution)

    @property
    def dtype(self) -> mx.Dtype:
        return self.mmdit.context_embedder.weight.dtype

    def forward(self):
        """The MMDiT as the real jobs call it: `mx.compile`d on GPUs (one fused graph per input shape, as
        `taq bench` times it), eager on the CPU backend, whose compilation of each new shape costs more than it
        saves. Call it again after swapping modules in: a compiled graph keeps the modules it was traced with."""
        return mx.compile(self.mmdit) if on_gpu() else self.mmdit


def check_model_options(name: str, checkpoint=None, random_weights: bool = False) -> Preset:
    """The preset, after checking where its weights come from: shipped in the package, else a checkpoint or
    (asked for explicitly) seeded random weights, never both."""
    preset = get_preset(name)
    if preset.ships_weights:
        if checkpoint is not None:
            raise ValueError(f"the {name} model ships its own weights; --checkpoint is for SD3-layout models")
        if random_weights:
            raise ValueError(f"the {name} model ships its own weights; --random-weights is for models without them")
    elif checkpoint is not None and random_weights:
        raise ValueError("give either --checkpoint or --random-weights, not both")
    elif checkpoint is None and not random_weights:
        raise ValueError(f"{name} needs its weights: give --checkpoint PATH (SD3-layout weights), or --random-weights "
                         "for seeded random weights (their numbers describe no trained model)")
    return preset


def load_model(name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
               embeddings: str | os.PathLike | None = None, dtype: mx.Dtype | None = None, seed: int = 0,
               random_weights: bool = False) -> Model:
    """The pocket model from its shipped weights; `sd3-medium` etc. from an SD3-layout checkpoint (attention heads
    of the preset's head dim, SD3's 64) or, with `random_weights`, from `seed`. `embeddings` overrides the prompt
    encoder."""
    preset = check_model_options(name, checkpoint, random_weights)
    if preset.ships_weights:
        from taq.pocket import DEFAULT_WEIGHTS, load_pocket

        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"the pocket model's weights are missing ({DEFAULT_WEIGHTS}); train them with "
                                  f"`python -m taq.pocket.train --out {DEFAULT_WEIGHTS}`")
        pocket, _ = load_pocket(DEFAULT_WEIGHTS)
        mmdit, default_encoder = pocket.mmdit, pocket.text_encoder.encode
        weights_id = file_sha256(DEFAULT_WEIGHTS)
    elif checkpoint is not None:
        mmdit = load_sd3_checkpoint(checkpoint, head_dim=preset.mmdit.head_dim, gelu=preset.mmdit.gelu)
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
    return Model(preset, mmdit, encoder, weights_id, random_weights)


def dtype_from_args(args) -> mx.Dtype:
    """The compute dtype the shared options (`taq.options.add_model_options`) ask for."""
    return resolve_dtype(check_model_options(args.model, args.checkpoint, args.random_weights), args.dtype)
