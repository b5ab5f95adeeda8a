"""The MMDiT's memory-bound steps, each one pass over the activations: custom CUDA kernels on MLX's CUDA backend,
plain MLX ops everywhere else.

MLX's own op sequences for LayerNorm + modulation, the gated residuals and the tanh GELU read and write each
activation several times; the kernels below read each input once, compute in float32 and round once (timings:
docs/benchmarks/README.md). Elsewhere they fall back to MLX ops, except on the CPU, where MLX evaluates tanh and
exp with scalar libm calls: there the tanh GELU and the attention's softmax use an arithmetic exp (a polynomial
and a bit shift) that mx.compile turns into vectorized loops (`gelu_tanh_cpu`, `softmax_cpu`), within 1.5e-6 of
float64.
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


def _layer_norm(x: mx.array, eps: mx.array) -> mx.array:
    """LayerNorm without affine in MLX ops, eps an array (for the kernels' VJPs, which see it as a primal)."""
    x32 = x.astype(mx.float32)
    mean = mx.mean(x32, axis=-1, keepdims=True)
    var = mx.mean(mx.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * mx.rsqrt(var + eps)).astype(x.dtype)


def norm_modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine, then adaLN modulation: norm(x) * (1 + scale) + shift; shift, scale (B, 1, D)."""
    if not _use_kernel(x):
        return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift
    return _norm_modulate_kernel(x, shift, scale, mx.array([eps], dtype=mx.float32))


@mx.custom_function
def _norm_modulate_kernel(x: mx.array, shift: mx.array, scale: mx.array, eps: mx.array) -> mx.array:
    B, N, D = x.shape
    return _kernel("taq_norm_modulate", NORM_MODULATE, ("x", "shift", "scale", "eps"))(
        inputs=[x, _per_batch(shift, x), _per_batch(scale, x), eps],
        template=[("T", x.dtype), ("D", D)], grid=(B * N * 32, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


@_norm_modulate_kernel.vjp
def _norm_modulate_vjp(primals, cotangent, output):
    """The kernels have no derivative of their own: the MLX ops' (block reconstruction trains through them)."""
    x, shift, scale, eps = primals
    grads = mx.vjp(lambda a, b, c: _layer_norm(a, eps) * (1 + c) + b, [x, shift, scale], [cotangent])[1]
    return (*grads, mx.zeros_like(eps))


def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """The gated residual x + gate * y; gate (B, 1, D)."""
    if not (_use_kernel(x) and y.shape == x.shape):
        return x + gate * y
    return _gated_add_kernel(x, gate, y)


@mx.custom_function
def _gated_add_kernel(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    B, N, D = x.shape
    return _kernel("taq_gated_add", GATED_ADD, ("x", "gate", "y"))(
        inputs=[x, _per_batch(gate, x), y.astype(x.dtype)], template=[("T", x.dtype), ("D", D)],
        grid=(B * N * D // VEC, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


@_gated_add_kernel.vjp
def _gated_add_vjp(primals, cotangent, output):
    return tuple(mx.vjp(lambda a, g, b: a + g * b, list(primals), [cotangent])[1])


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


GELU_CLAMP = 5.5  # |x| beyond which the float32 tanh GELU equals relu(x)
SQRT_2_OVER_PI = 0.7978845608028654
# 2**f on [-0.5, 0.5], ascending, from scripts/fit_cpu_approximations.py (relative error 2e-9 in float64).
EXP2 = (1.0, 0.69314720284480491, 0.24022647914110828, 0.055503324947235054, 0.0096184373874401152,
        0.0013398864757894636, 0.00015353328783769774)
LOG2_E = 1.4426950408889634
ROUND_TO_INT = 12582912.0  # 1.5 * 2**23: (y + R) - R rounds y to the nearest integer for |y| < 2**22


def _relu(d: mx.array) -> mx.array:
    """max(d, 0) from arithmetic only (exact), so that g++ vectorizes the fused loop; maximum's NaN branch does not."""
    return 0.5 * d + 0.5 * mx.abs(d)


def _poly(c: tuple[float, ...], s: mx.array) -> mx.array:
    """sum c[i] s^i for 7 coefficients by Estrin's scheme: shallow, so MLX fuses it into one kernel."""
    s2 = s * s
    s4 = s2 * s2
    return (c[0] + c[1] * s) + s2 * (c[2] + c[3] * s) + s4 * ((c[4] + c[5] * s) + s2 * c[6])


def _exp2_parts(y: mx.array) -> tuple[mx.array, mx.array]:
    """2**y for y <= 0 as (2**f, the float32 bit pattern of 2**k), y = k + f; y below -126 (the smallest normal
    float's exponent) counts as -126, so that the exponent field stays valid."""
    y = y + _relu(-126.0 - y)
    k = (y + ROUND_TO_INT) - ROUND_TO_INT
    return _poly(EXP2, y - k), mx.left_shift(k.astype(mx.int32) + 127, 23)


@mx.compile
def _clamped_abs(x: mx.array) -> mx.array:
    """min(|x|, GELU_CLAMP), or 0 past 2**24 * GELU_CLAMP where the subtraction rounds away; both give relu(x)."""
    a = mx.abs(x)
    return a - _relu(a - GELU_CLAMP)


@mx.compile
def _gelu_exp2_parts(ac: mx.array) -> tuple[mx.array, mx.array]:
    """exp(-2 u(a)) for u(a) = sqrt(2/pi) (a + 0.044715 a^3), a >= 0."""
    return _exp2_parts(-2.0 * LOG2_E * SQRT_2_OVER_PI * (ac + 0.044715 * ac * ac * ac))


@mx.compile
def _gelu_from_exp(x: mx.array, ac: mx.array, p: mx.array, two_k: mx.array) -> mx.array:
    e = p * two_k
    deficit = 2.0 * e / (1.0 + e)  # 1 - tanh(u(a)), to full relative precision
    deficit = (deficit + 0.5) - 0.5  # onto float32's grid of 1 + tanh(u(-a)): 0 wherever that tanh rounds to -1
    return _relu(x) - (0.5 * ac) * deficit


@mx.custom_function
def gelu_tanh_cpu(x: mx.array) -> mx.array:
    """SD3's tanh GELU for the CPU as relu(x) - |x| (1 - tanh(u(|x|))) / 2, with 1 - tanh from an arithmetic exp.

    MLX's CPU backend computes tanh with a scalar libm call per element; this form uses +, *, /, abs and a bit
    shift, which the g++ behind mx.compile vectorizes. The deficit 1 - tanh is rounded onto the grid that float32
    gives 1 + tanh(u) in the reference form 0.5 x (1 + tanh(u(x))), so the negative tail turns into exact zeros
    where MLX's and PyTorch's float32 GELU do (x below about -5.16): the exact-zero counter measures the same
    thing on every backend. Max abs error 1.5e-6 against float64; +-inf give NaN. Gradients are MLX's own form's.
    """
    dtype = x.dtype
    x = x.astype(mx.float32)
    ac = mx.contiguous(_clamped_abs(x))
    p, bits = _gelu_exp2_parts(ac)
    return _gelu_from_exp(x, ac, p, mx.view(bits, mx.float32)).astype(dtype)


@gelu_tanh_cpu.vjp
def _gelu_tanh_cpu_vjp(x, cotangent, output):
    return mx.vjp(nn.gelu_approx, [x], [cotangent])[1][0]


@mx.compile
def _softmax_exp2_parts(scores: mx.array, row_max: mx.array, scale: mx.array) -> tuple[mx.array, mx.array]:
    return _exp2_parts((scores - row_max) * scale)


@mx.compile
def _times(a: mx.array, b: mx.array) -> mx.array:
    return a * b


@mx.custom_function
def _softmax_cpu(scores: mx.array, scale: mx.array) -> mx.array:
    row_max = mx.max(scores, axis=-1, keepdims=True)
    p, bits = _softmax_exp2_parts(scores, row_max, scale)
    e = _times(p, mx.view(bits, mx.float32))
    return e / mx.sum(e, axis=-1, keepdims=True)


@_softmax_cpu.vjp
def _softmax_cpu_vjp(primals, cotangent, output):
    """d softmax(c s) = c y (g - sum(g y)); the bit-built exp has no derivative of its own."""
    _, scale = primals
    return (scale / LOG2_E) * output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True)), \
        mx.zeros_like(scale)


def softmax_cpu(scores: mx.array, scale: float) -> mx.array:
    """softmax(scale * scores) over the last axis, with exp built from vectorizable arithmetic and a bit shift.

    MLX's CPU softmax spends most of its time in scalar exp calls. Within 1e-6 of float64, as mx.softmax.
    """
    return _softmax_cpu(scores, mx.array(scale * LOG2_E, dtype=scores.dtype))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(scale q k^T) v over (B, heads, L, head_dim): MLX's fused SDPA, or on the CPU (float32) two
    matmuls around `softmax_cpu` (MLX's CPU SDPA runs the same matmuls around its scalar-exp softmax)."""
    if not (_on_cpu() and q.dtype == mx.float32):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return softmax_cpu(q @ k.swapaxes(-1, -2), scale) @ v


class GELU(nn.Module):
    """GELU in SD3's tanh form ("tanh") or exact ("exact"); its own module so that a tracer can wrap it."""

    def __init__(self, form: str = "tanh"):
        super().__init__()
        if form not in ("tanh", "exact"):
            raise ValueError(f"GELU form must be 'tanh' or 'exact', got {form!r}")
        self.form = form

    def __call__(self, x: mx.array) -> mx.array:
        if _use_kernel(x):
            return (_gelu_tanh_kernel if self.form == "tanh" else _gelu_exact_kernel)(x)
        if self.form == "exact":
            return nn.gelu(x)
        if _on_cpu() and x.dtype != mx.float64:
            return gelu_tanh_cpu(x)
        return nn.gelu_approx(x)


def _gelu_kernel_function(tanh: bool, reference):
    """The GELU kernel as a custom function whose VJP is the MLX form's (`reference`)."""
    @mx.custom_function
    def gelu(x: mx.array) -> mx.array:
        return _kernel("taq_gelu", GELU_SOURCE, ("x",))(
            inputs=[x], template=[("T", x.dtype), ("TANH", tanh)], grid=(x.size // VEC, 1, 1),
            threadgroup=(THREADS, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype])[0]

    @gelu.vjp
    def gelu_vjp(x, cotangent, output):
        return mx.vjp(reference, [x], [cotangent])[1][0]
    return gelu


_gelu_tanh_kernel = _gelu_kernel_function(True, nn.gelu_approx)
_gelu_exact_kernel = _gelu_kernel_function(False, nn.gelu)
