"""What taq's custom CUDA kernels share: when to use them, and device helpers for their sources.

The kernels (`taq.models.fused`, `taq.tracing.cuda_reduce`) run only on MLX's CUDA backend; everywhere else the
same functions fall back to plain MLX ops. MLX JIT-compiles each kernel once per process, per template arguments.
"""

from __future__ import annotations

import mlx.core as mx

# Device helpers prepended to every kernel: aligned vectors for wide loads and warp reductions.
HEADER = r"""
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec { T v[N]; };

__device__ __forceinline__ float warp_sum(float s) {
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    return s;
}
"""


def cuda_available() -> bool:
    """True when arrays are computed on an NVIDIA GPU through MLX's CUDA backend."""
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()
