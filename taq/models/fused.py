"""The MMDiT's memory-bound steps, each one pass over the activations: custom CUDA kernels on MLX's CUDA backend,
plain MLX ops everywhere else.

MLX's own op sequences for LayerNorm + modulation, the gated residuals and the tanh GELU read and write each
activation several times; the kernels below read each input once, compute in float32 and round once (timings:
docs/benchmarks/README.md). The fallbacks are the exact op sequences the CPU baselines were recorded with.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from taq.cuda import HEADER, cuda_available

VEC = 4  # elements per vector load; the kernels need the channel count to be a multiple of 32 * VEC
THREADS = 256

NORM_MODULATE = r"""
    // One warp per token: mean and variance in float32 from registers, then (x - mean) * rstd * (1 + scale) + shift.
    constexpr int PER_LANE = D / (32 * 4);
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int tokens = x_shape[1];
    if (row >= x_shape[0] * tokens) return;  // the whole warp leaves together
    const int b = row / tokens;
    const Vec<T, 4>* xv = reinterpret_cast<const Vec<T, 4>*>(x + static_cast<size_t>(row) * D);
    float v[PER_LANE][4];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const Vec<T, 4> a = xv[lane + 32 * k];
#pragma unroll
        for (int j = 0; j < 4; ++j) { v[k][j] = static_cast<float>(a.v[j]); s += v[k][j]; }
    }
    const float mean = warp_sum(s) / D;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k)
#pragma unroll
        for (int j = 0; j < 4; ++j) { const float d = v[k][j] - mean; q += d * d; }
    const float rstd = rsqrtf(warp_sum(q) / D + eps[0]);
    const Vec<T, 4>* shift_v = reinterpret_cast<const Vec<T, 4>*>(shift + static_cast<size_t>(b) * D);
    const Vec<T, 4>* scale_v = reinterpret_cast<const Vec<T, 4>*>(scale + static_cast<size_t>(b) * D);
    Vec<T, 4>* out_v = reinterpret_cast<Vec<T, 4>*>(out + static_cast<size_t>(row) * D);
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const Vec<T, 4> sh = shift_v[lane + 32 * k], sc = scale_v[lane + 32 * k];
        Vec<T, 4> o;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            o.v[j] = static_cast<T>((v[k][j] - mean) * rstd * (1.f + static_cast<float>(sc.v[j]))
                                    + static_cast<float>(sh.v[j]));
        out_v[lane + 32 * k] = o;
    }
"""

GATED_ADD = r"""
    // x + gate[b] * y, four elements per thread.
    const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const size_t per_batch = static_cast<size_t>(x_shape[1]) * D;
    if (i * 4 >= static_cast<size_t>(x_shape[0]) * per_batch) return;
    const size_t e = i * 4;
    const Vec<T, 4> a = reinterpret_cast<const Vec<T, 4>*>(x)[i];
    const Vec<T, 4> c = reinterpret_cast<const Vec<T, 4>*>(y)[i];
    const Vec<T, 4> g = *reinterpret_cast<const Vec<T, 4>*>(gate + (e / per_batch) * D + e % D);
    Vec<T, 4> o;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        o.v[j] = static_cast<T>(static_cast<float>(a.v[j]) + static_cast<float>(g.v[j]) * static_cast<float>(c.v[j]));
    reinterpret_cast<Vec<T, 4>*>(out)[i] = o;
"""

GELU_SOURCE = r"""
    // GELU, tanh form or exact (erf), four elements per thread.
    const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i * 4 >= static_cast<size_t>(x_shape[0]) * x_shape[1] * x_shape[2]) return;
    const Vec<T, 4> a = reinterpret_cast<const Vec<T, 4>*>(x)[i];
    Vec<T, 4> o;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float v = static_cast<float>(a.v[j]);
        const float inner = TANH ? tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))
                                 : erff(v * 0.7071067811865476f);
        o.v[j] = static_cast<T>(0.5f * v * (1.f + inner));
    }
    reinterpret_cast<Vec<T, 4>*>(out)[i] = o;
"""


@lru_cache(maxsize=None)
def _kernel(name: str, source: str, inputs: tuple[str, ...]):
    return mx.fast.cuda_kernel(name=name, input_names=list(inputs), output_names=["out"], source=source,
                               header=HEADER)


def _use_kernel(x: mx.array) -> bool:
    return cuda_available() and x.ndim == 3 and x.shape[-1] % (32 * VEC) == 0 and x.dtype != mx.float64


def _per_batch(v: mx.array, x: mx.array) -> mx.array:
    """(B, 1, D) modulation -> (B, D), as the kernels index it."""
    return v.reshape(x.shape[0], x.shape[-1]).astype(x.dtype)


def norm_modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine, then adaLN modulation: norm(x) * (1 + scale) + shift; shift, scale (B, 1, D)."""
    if not _use_kernel(x):
        return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift
    B, N, D = x.shape
    return _kernel("taq_norm_modulate", NORM_MODULATE, ("x", "shift", "scale", "eps"))(
        inputs=[x, _per_batch(shift, x), _per_batch(scale, x), mx.array([eps], dtype=mx.float32)],
        template=[("T", x.dtype), ("D", D)], grid=(B * N * 32, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """The gated residual x + gate * y; gate (B, 1, D)."""
    if not (_use_kernel(x) and y.shape == x.shape):
        return x + gate * y
    B, N, D = x.shape
    return _kernel("taq_gated_add", GATED_ADD, ("x", "gate", "y"))(
        inputs=[x, _per_batch(gate, x), y.astype(x.dtype)], template=[("T", x.dtype), ("D", D)],
        grid=(B * N * D // VEC, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


class GELU(nn.Module):
    """GELU in SD3's tanh form ("tanh") or exact ("exact"); its own module so that a tracer can wrap it."""

    def __init__(self, form: str = "tanh"):
        super().__init__()
        if form not in ("tanh", "exact"):
            raise ValueError(f"GELU form must be 'tanh' or 'exact', got {form!r}")
        self.form = form

    def __call__(self, x: mx.array) -> mx.array:
        if not _use_kernel(x):
            return nn.gelu_approx(x) if self.form == "tanh" else nn.gelu(x)
        return _kernel("taq_gelu", GELU_SOURCE, ("x",))(
            inputs=[x], template=[("T", x.dtype), ("TANH", self.form == "tanh")],
            grid=(x.size // VEC, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[x.shape], output_dtypes=[x.dtype])[0]

