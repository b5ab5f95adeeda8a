"""SD3's MMDiT (Esser et al. 2024, arXiv:2403.03206) in MLX.

Module names follow SD3's checkpoint (`joint_blocks.N.x_block.attn.qkv`, `adaLN_modulation.1`, ...), so loading
the original weights only strips the key prefix and transposes the patch-embedding convolution. Every FFN's
activation is its own module (`joint_blocks.N.{x,context}_block.mlp.act`) so a tracer can swap it out.

adaLN modulation is recomputed from (timestep, pooled text) on every call: it never replaces weights, and it is
exact by construction. The forward has no host synchronization, so it can be wrapped in `mx.compile`. Its
memory-bound steps (LayerNorm + modulation, gated residuals, GELU) and the attention are `taq.models.fused` ops:
CUDA kernels on NVIDIA GPUs, vectorizable arithmetic forms of the tanh GELU and the softmax on the CPU, plain
MLX ops elsewhere.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from taq.config import MMDiTConfig
from taq.models.fused import GELU, attention, gated_add, norm_modulate

# --------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.proj(x)  # (B, h, w, D)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (cos half first, as SD3) followed by an MLP."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.frequency_dim = cfg.frequency_embedding_dim
        self.mlp = [nn.Linear(cfg.frequency_embedding_dim, cfg.hidden_size), nn.SiLU(),
                    nn.Linear(cfg.hidden_size, cfg.hidden_size)]

    def __call__(self, t: mx.array) -> mx.array:
        half = self.frequency_dim // 2
        freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
        args = t.astype(mx.float32)[:, None] * freqs[None]
        features = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
        features = features.astype(self.mlp[0].weight.dtype)
        for layer in self.mlp:
            features = layer(features)
        return features


class VectorEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = [nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)]

    def __call__(self, y: mx.array) -> mx.array:
        for layer in self.mlp:
            y = layer(y)
        return y


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """The per-stream projections of joint attention; the attention itself runs in JointBlock."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool):
        super().__init__()
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        if not pre_only:
            self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class FeedForward(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_hidden)
        self.act = GELU(cfg.gelu)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block. `pre_only`: the last text block stops after q, k, v."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.num_heads = cfg.num_heads
        self.eps = cfg.layer_norm_eps  # both LayerNorms are affine-free: no weights
        self.attn = Attention(cfg, pre_only)
        if not pre_only:
            self.mlp = FeedForward(cfg)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(cfg.hidden_size, (2 if pre_only else 6) * cfg.hidden_size)]

    def modulation(self, c: mx.array) -> list[mx.array]:
        """shift_msa, scale_msa[, gate_msa, shift_mlp, scale_mlp, gate_mlp], each (B, 1, D)."""
        mods = self.adaLN_modulation[1](self.adaLN_modulation[0](c))
        return mx.split(mods[:, None, :], 2 if self.pre_only else 6, axis=-1)

    def pre_attention(self, x: mx.array, mods: list[mx.array]) -> mx.array:
        """(B, N, D) -> q, k, v stacked as (3, B, heads, N, head_dim)."""
        B, N, D = x.shape
        qkv = self.attn.qkv(norm_modulate(x, mods[0], mods[1], self.eps))
        return qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).transpose(2, 0, 3, 1, 4)

    def post_attention(self, x: mx.array, attn_out: mx.array, mods: list[mx.array]) -> mx.array:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = gated_add(x, gate_msa, self.attn.proj(attn_out))
        return gated_add(x, gate_mlp, self.mlp(norm_modulate(x, shift_mlp, scale_mlp, self.eps)))


class JointAttention(nn.Module):
    """softmax(scale q k^T) v over the joint sequence (text tokens first). Its own module, without weights, so that
    a tracer can swap it for one that also records the probabilities, which fused attention never forms."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.scale = cfg.head_dim**-0.5

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, text_tokens: int) -> mx.array:
        return attention(q, k, v, self.scale)  # text_tokens: where the text queries end, for a recording wrapper


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, last: bool):
        super().__init__()
        self.attention = JointAttention(cfg)
        self.context_block = StreamBlock(cfg, pre_only=last)
        self.x_block = StreamBlock(cfg)

    def __call__(self, context: mx.array, x: mx.array, c: mx.array) -> tuple[mx.array | None, mx.array]:
        ctx_mods = self.context_block.modulation(c)
        x_mods = self.x_block.modulation(c)
        qkv = mx.concatenate([self.context_block.pre_attention(context, ctx_mods),
                              self.x_block.pre_attention(x, x_mods)], axis=3)  # text tokens first
        n_ctx = context.shape[1]
        out = self.attention(qkv[0], qkv[1], qkv[2], n_ctx)
        B, _, L, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        x = self.x_block.post_attention(x, out[:, n_ctx:], x_mods)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, out[:, :n_ctx], ctx_mods), x


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)]

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        shift, scale = mx.split(self.adaLN_modulation[1](self.adaLN_modulation[0](c))[:, None, :], 2, axis=-1)
        return self.linear(norm_modulate(x, shift, scale, self.eps))


# --------------------------------------------------------------------------- model


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        D, M = config.hidden_size, config.pos_embed_max_size
        self.x_embedder = PatchEmbed(config)
        self.pos_embed = mx.random.normal((1, M * M, D)) * 0.02
        self.t_embedder = TimestepEmbedder(config)
        self.y_embedder = VectorEmbedder(config.pooled_dim, D)
        self.context_embedder = nn.Linear(config.token_dim, D)
        self.joint_blocks = [JointBlock(config, last=i == config.depth - 1) for i in range(config.depth)]
        self.final_layer = FinalLayer(config)

    def cropped_pos_embed(self, h: int, w: int) -> mx.array:
        """The centre h x w window of the positional grid, as (1, h*w, D)."""
        M = self.config.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2
        grid = self.pos_embed.reshape(M, M, -1)[top : top + h, left : left + w]
        return grid.reshape(1, h * w, -1)

    def check_inputs(self, x: mx.array, t: mx.array, tokens: mx.array, pooled: mx.array) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be (B, H, W, {cfg.in_channels}), got {x.shape}")
        B, H, W, _ = x.shape
        p, M = cfg.patch_size, cfg.pos_embed_max_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {p}")
        if H // p > M or W // p > M:
            raise ValueError(f"latent size {H}x{W} exceeds the positional grid ({M * p}x{M * p})")
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {t.shape}")
        if tokens.ndim != 3 or tokens.shape[0] != B or tokens.shape[2] != cfg.token_dim:
            raise ValueError(f"tokens must be ({B}, L, {cfg.token_dim}), got {tokens.shape}")
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be ({B}, {cfg.pooled_dim}), got {pooled.shape}")

    def embed(self, x: mx.array, t: mx.array, tokens: mx.array, pooled: mx.array) -> tuple[mx.array, ...]:
        """The first joint block's inputs: text tokens (B, L, D), image tokens (B, h*w, D), conditioning (B, D)."""
        self.check_inputs(x, t, tokens, pooled)
        p = self.config.patch_size
        dtype = self.context_embedder.weight.dtype
        img = self.x_embedder(x.astype(dtype)) + self.cropped_pos_embed(x.shape[1] // p, x.shape[2] // p)
        c = self.t_embedder(t) + self.y_embedder(pooled.astype(dtype))
        return self.context_embedder(tokens.astype(dtype)), img, c

    def __call__(self, x: mx.array, t: mx.array, tokens: mx.array, pooled: mx.array) -> mx.array:
        """Velocity for latents x (B, H, W, C) at timesteps t (B,) = 1000 * sigma."""
        txt, img, c = self.embed(x, t, tokens, pooled)
        B, H, W, C = x.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        for block in self.joint_blocks:
            txt, img = block(txt, img, c)
        out = self.final_layer(img, c)  # (B, h*w, p*p*C)
        out = out.reshape(B, h, w, p, p, C).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(B, H, W, C)


def zero_init_modulation(model: MMDiT) -> None:
    """adaLN-Zero: zero every modulation and the final projection, so each block starts as the identity."""
    for block in model.joint_blocks:
        for stream in (block.context_block, block.x_block):
            linear = stream.adaLN_modulation[1]
            linear.weight = mx.zeros_like(linear.weight)
            linear.bias = mx.zeros_like(linear.bias)
    for linear in (model.final_layer.adaLN_modulation[1], model.final_layer.linear):
        linear.weight = mx.zeros_like(linear.weight)
        linear.bias = mx.zeros_like(linear.bias)
