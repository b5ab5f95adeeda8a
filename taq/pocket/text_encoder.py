"""The pocket model's text encoder: prompt -> SD3's two conditioning inputs.

A word-level tokenizer over a fixed vocabulary and a 2-layer transformer encoder (padding masked)
produce token embeddings (B, L, token_dim) for the MMDiT's text stream and a pooled embedding
(B, pooled_dim), a projection of the masked mean of the tokens, for its adaLN conditioning.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3


def split_words(text: str) -> list[str]:
    """Lowercase words: runs of letters and digits; everything else separates."""
    return re.findall(r"[a-z0-9]+", text.lower())


def build_vocab(prompts: list[str]) -> tuple[str, ...]:
    """The special tokens, then every word of `prompts` in sorted order."""
    return SPECIAL_TOKENS + tuple(sorted({w for p in prompts for w in split_words(p)}))


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab: tuple[str, ...] = field(repr=False)
    max_length: int = 16  # tokens per prompt, bos and eos included
    dim: int = 64  # width of the encoder = token_dim of its output
    num_heads: int = 2
    num_layers: int = 2
    mlp_ratio: float = 4.0
    pooled_dim: int = 32

    def __post_init__(self):
        object.__setattr__(self, "vocab", tuple(self.vocab))
        if self.vocab[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with {SPECIAL_TOKENS}, got {self.vocab[:len(SPECIAL_TOKENS)]}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab has duplicate entries")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (bos + eos), got {self.max_length}")
        for name in ("dim", "num_heads", "num_layers", "pooled_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TextEncoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def token_dim(self) -> int:
        return self.dim

    def to_dict(self) -> dict:
        return {**asdict(self), "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, data: dict) -> "TextEncoderConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TextEncoderConfig fields: {sorted(unknown)}")
        return cls(**data)


class Tokenizer:
    """Prompts -> (B, max_length) int32 ids: bos, words (unknown -> unk), eos, then pads."""

    def __init__(self, vocab: tuple[str, ...], max_length: int):
        self.ids = {word: i for i, word in enumerate(vocab)}
        self.max_length = max_length
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.ids[t] for t in SPECIAL_TOKENS)

    def encode_one(self, prompt: str) -> list[int]:
        """Ids without padding; words past max_length - 2 are dropped so eos always ends the prompt."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        words = split_words(prompt)[: self.max_length - 2]
        return [self.bos_id] + [self.ids.get(w, self.unk_id) for w in words] + [self.eos_id]

    def knows_no_word(self, prompt: str) -> bool:
        """A non-blank prompt none of whose words is in the vocabulary: it conditions on nothing (without any
        word at all, e.g. CJK or emoji, its ids are exactly those of the unconditional "")."""
        return bool(prompt.strip()) and not any(w in self.ids for w in split_words(prompt))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        if isinstance(prompts, str):
            raise ValueError(f"expected a list of prompts, got the string {prompts!r}")
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        for row, prompt in enumerate(prompts):
            encoded = self.encode_one(prompt)
            ids[row, : len(encoded)] = encoded
        return ids


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(config.vocab, config.max_length)
        self.token_embedding = nn.Embedding(len(config.vocab), config.dim)
        self.position_embedding = mx.random.normal((config.max_length, config.dim)) * 0.02
        self.layers = [nn.TransformerEncoderLayer(config.dim, config.num_heads, int(config.dim * config.mlp_ratio),
                                                  activation=nn.gelu, norm_first=True)
                       for _ in range(config.num_layers)]
        self.norm = nn.LayerNorm(config.dim)
        self.pooled_projection = nn.Linear(config.dim, config.pooled_dim)

    def __call__(self, ids: mx.array) -> tuple[mx.array, mx.array]:
        """ids (B, L <= max_length) -> tokens (B, L, dim), pooled (B, pooled_dim). Pads change nothing else."""
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.config.max_length:
            raise ValueError(f"ids must be (B, L) with L <= {self.config.max_length}, got {ids.shape}")
        keep = ids != self.tokenizer.pad_id  # (B, L)
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        attention_mask = keep[:, None, None, :]  # (B, 1, 1, L): no query attends to a pad
        for layer in self.layers:
            x = layer(x, attention_mask)
        tokens = self.norm(x)
        weights = keep.astype(tokens.dtype)[..., None]  # (B, L, 1)
        mean = (tokens * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1)
        return tokens, self.pooled_projection(mean)

    def encode(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """Prompts -> (tokens (B, max_length, dim), pooled (B, pooled_dim)); warns, naming them, about prompts
        with no known word."""
        ids = self.tokenizer(prompts)
        unknown = list(dict.fromkeys(p for p in prompts if self.tokenizer.knows_no_word(p)))
        if unknown:
            shown = ", ".join(repr(p) for p in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5
                                                               else "")
            warnings.warn(f"the pocket text encoder knows no word of {len(unknown)} prompt(s), which therefore "
                          f"condition on no digit (without any word they get exactly the unconditional embedding): "
                          f"{shown}", stacklevel=2)
        return self(mx.array(ids))


def pocket_text_encoder_config(**overrides) -> TextEncoderConfig:
    """The pocket model's encoder: its vocabulary is every word of the training prompts."""
    from taq.pocket.prompts import all_training_prompts

    return TextEncoderConfig(vocab=build_vocab(all_training_prompts()), **overrides)
