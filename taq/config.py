"""MMDiT configurations and the named presets (configuration plus per-model input facts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

GELU_FORMS = ("tanh", "exact")


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 16
    pos_embed_max_size: int = 192  # side of the learned positional grid, in patches
    pooled_dim: int = 2048  # CLIP-L + CLIP-G pooled
    token_dim: int = 4096  # T5-XXL width (CLIP tokens zero-padded to it)
    frequency_embedding_dim: int = 256
    mlp_ratio: float = 4.0
    gelu: str = "tanh"  # SD3's reference FFN uses the tanh approximation; DiffusionKit uses "exact"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "pos_embed_max_size",
                     "pooled_dim", "token_dim", "frequency_embedding_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MMDiTConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.frequency_embedding_dim % 2:
            raise ValueError(f"frequency_embedding_dim must be even, got {self.frequency_embedding_dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {GELU_FORMS}, got {self.gelu!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MMDiTConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Preset:
    """A named model: its MMDiT configuration and the facts about its inputs that do not live in the weights."""

    name: str
    mmdit: MMDiTConfig
    latent_scale: int  # pixels per latent cell (SD3's VAE downsamples 8x; pocket's latent is the image)
    default_resolution: int  # pixels, square
    text_tokens: int  # tokens per prompt of the model's text encoder
    ships_weights: bool = False  # trained weights inside the package; no --checkpoint

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(H, W, C) of the latent for a square image of `resolution` pixels; the one resolution rule."""
        step = self.latent_scale * self.mmdit.patch_size
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % step:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {step} for {self.name} "
                             f"(latent scale {self.latent_scale} x patch {self.mmdit.patch_size})")
        if resolution // step > self.mmdit.pos_embed_max_size:
            raise ValueError(f"resolution {resolution} is larger than {self.name}'s positional grid allows "
                             f"({self.mmdit.pos_embed_max_size * step})")
        side = resolution // self.latent_scale
        return side, side, self.mmdit.in_channels


PRESETS: dict[str, Preset] = {
    # SD3 Medium (2B): hidden = 64 * depth, head dim 64; 77 CLIP + 77 T5 text tokens.
    "sd3-medium": Preset("sd3-medium", MMDiTConfig(depth=24, hidden_size=1536, num_heads=24), latent_scale=8,
                         default_resolution=512, text_tokens=154),
    # The embedded default: trained on 16x16x1 digit latents (taq/pocket).
    "pocket": Preset("pocket", MMDiTConfig(depth=6, hidden_size=128, num_heads=2, in_channels=1,
                                           pos_embed_max_size=16, pooled_dim=32, token_dim=64),
                     latent_scale=1, default_resolution=16, text_tokens=16, ships_weights=True),
    # Random-weight sizes for tests.
    "tiny": Preset("tiny", MMDiTConfig(depth=2, hidden_size=64, num_heads=2, in_channels=4, pos_embed_max_size=16,
                                       pooled_dim=32, token_dim=48), latent_scale=1, default_resolution=16,
                   text_tokens=16),
    "small": Preset("small", MMDiTConfig(depth=4, hidden_size=128, num_heads=2, in_channels=16,
                                         pos_embed_max_size=32, pooled_dim=64, token_dim=96), latent_scale=1,
                    default_resolution=32, text_tokens=16),
}
DEFAULT_MODEL = "pocket"


def lookup(table: dict, name: str, what: str, plural: str | None = None):
    """table[name], or a ValueError naming the known entries ("unknown <what> 'x'; known <plural>: ...")."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known {plural or what + 's'}: {', '.join(table)}") from None


def get_preset(name: str) -> Preset:
    return lookup(PRESETS, name, "model preset", "presets")
