"""`reduce_batch` in one pass over the activations, as custom CUDA kernels (MLX's CUDA backend only).

The portable reduction (`stats.reduce_batch`) is a dozen MLX ops that read each activation several times, even
fused by `mx.compile`. Here a thread owns one channel of a chunk of rows and keeps that channel's count, min, max
and shifted sums in registers, while its warp bins values into a shared-memory histogram (one copy per warp); each
block writes its partial moments and histogram, and a second small kernel merges the chunks (Chan et al., in
double) and sums the histograms. Measured timings: docs/benchmarks/README.md.

It returns the same `BatchReduction` as `reduce_batch` (zero residual sums; scale 1 below 2^60) and the same histogram bit
for bit: bins are guessed from asinh, as `histogram.histogram_slots` does, and corrected against the float32
edges. The warps share COPIES shared-memory histograms, as many as fit in 48 KiB beside the edges. The shifted
sums are kept in double, so activations up to float32's max are reduced as the portable reduction does.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import mlx.core as mx

from taq.cuda import HEADER
from taq.tracing.histogram import HistogramSpec
from taq.tracing.stats import MAX_BATCH_ELEMENTS, SIGNS, BatchReduction, reduce_batch

THREADS = 256  # channels per block
TARGET_BLOCKS = 1024  # enough blocks to fill an H100's 132 SMs several times over
MIN_ROWS_PER_CHUNK = 64  # fewer rows per block would make writing its histogram dominate
UNROLL = 8  # rows loaded before they are processed: several loads in flight per thread
SHARED_BYTES = 48 * 1024  # static shared memory of a block

KERNEL = r"""
    constexpr int SLOTS = BINS + 1;  // histogram, non-finite
    constexpr int HALF = BINS / 2;
    __shared__ int hist[COPIES][SLOTS];  // warps share the copies round robin: fewer colliding shared atomics
    __shared__ float sedges[BINS + 1];
    __shared__ int sign_counts[4];
    const int M = x_shape[0];
    const int C = x_shape[1];
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    for (int i = tid; i < COPIES * SLOTS; i += THREADS) (&hist[0][0])[i] = 0;
    for (int i = tid; i <= BINS; i += THREADS) sedges[i] = edges[i];
    if (tid < 4) sign_counts[tid] = 0;
    __syncthreads();

    int* my_hist = hist[(tid >> 5) % COPIES];
    const float inv_scale = binning[0];
    const float per_unit = binning[1];  // bins per unit of asinh(v / scale): only guesses the bin
    const float inf = __int_as_float(0x7f800000);
    const int c = blockIdx.x * THREADS + tid;
    const int rows = (M + gridDim.y - 1) / gridDim.y;
    const int r0 = blockIdx.y * rows;
    const int r1 = min(M, r0 + rows);
    int n = 0, negative = 0, posinf = 0, neginf = 0, zero = 0;
    // Shifted sums in double: squared deviations of activations up to float32's max fit, at half the FP32 rate
    // on a memory-bound loop.
    double shift = 0.0, s1 = 0.0, s2 = 0.0;
    float vmin = inf, vmax = -inf;
    auto process = [&](float v) {
        int slot;
        if (isfinite(v)) {
            if (n == 0) shift = v;  // sums of deviations from a sample: little cancellation
            ++n;
            const double d = static_cast<double>(v) - shift;
            s1 += d;
            s2 += d * d;
            vmin = fminf(vmin, v);
            vmax = fmaxf(vmax, v);
            negative += v < 0.f;
            zero += v == 0.f;
            // Clipped as a float: v * inv_scale may overflow to inf, which no int conversion survives.
            const float steps = fminf(fmaxf(floorf(asinhf(v * inv_scale) * per_unit), -HALF), HALF - 1);
            const int g = static_cast<int>(steps) + HALF;
            slot = v < sedges[g] ? g - 1 : ((v >= sedges[g + 1] && g != BINS - 1) ? g + 1 : g);
        } else {
            slot = BINS;
            posinf += v > 0.f;  // NaN compares false both ways
            neginf += v < 0.f;
            negative += v < 0.f;
        }
        atomicAdd(&my_hist[slot], 1);  // warp-aggregating equal slots (match_any) measured slower
    };
    if (c < C) {
        int r = r0;
        for (; r + UNROLL <= r1; r += UNROLL) {
            float v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = static_cast<float>(x[static_cast<size_t>(r + u) * C + c]);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) process(v[u]);
        }
        for (; r < r1; ++r) process(static_cast<float>(x[static_cast<size_t>(r) * C + c]));
        const size_t out = static_cast<size_t>(blockIdx.y) * C + c;
        part_count[out] = n;
        part_mean[out] = n ? shift + s1 / n : 0.f;
        part_std[out] = n ? static_cast<float>(sqrt(fmax(s2 - s1 * s1 / n, 0.0) / n)) : 0.f;  // fits float32
        part_min[out] = vmin;
        part_max[out] = vmax;
    }
    negative = __reduce_add_sync(0xffffffff, negative);
    posinf = __reduce_add_sync(0xffffffff, posinf);
    neginf = __reduce_add_sync(0xffffffff, neginf);
    zero = __reduce_add_sync(0xffffffff, zero);
    if (lane == 0) {
        if (negative) atomicAdd(&sign_counts[0], negative);
        if (posinf) atomicAdd(&sign_counts[1], posinf);
        if (neginf) atomicAdd(&sign_counts[2], neginf);
        if (zero) atomicAdd(&sign_counts[3], zero);
    }
    __syncthreads();
    const size_t block = static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    for (int i = tid; i < SLOTS; i += THREADS) {
        int total = 0;
#pragma unroll
        for (int w = 0; w < COPIES; ++w) total += hist[w][i];
        block_slots[block * SLOTS + i] = total;
    }
    if (tid < 4) block_signs[block * 4 + tid] = sign_counts[tid];
"""

MERGE = r"""
    // Thread c < C merges channel c over the row chunks (Chan et al., in double); thread i < SLOTS sums slot i
    // over the blocks, thread i < 4 sign counter i.
    constexpr int SLOTS = BINS + 1;
    const int chunks = part_count_shape[0];
    const int C = part_count_shape[1];
    const int blocks = block_slots_shape[0];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < C) {
        long long n = 0;
        double mu = 0.0, q = 0.0;
        float lo = __int_as_float(0x7f800000), hi = -lo;
        for (int k = 0; k < chunks; ++k) {
            const size_t j = static_cast<size_t>(k) * C + i;
            const int nk = part_count[j];
            if (nk == 0) continue;
            const double total = static_cast<double>(n + nk);
            const double delta = static_cast<double>(part_mean[j]) - mu;
            mu += delta * nk / total;
            const double std_k = static_cast<double>(part_std[j]);
            q += std_k * std_k * nk + delta * delta * static_cast<double>(n) * nk / total;
            n += nk;
            lo = fminf(lo, part_min[j]);
            hi = fmaxf(hi, part_max[j]);
        }
        // A channel beyond 2^60 is written divided by the power of two at its max |x| (exact), so m2 fits float32.
        const float amax = fmaxf(fabsf(lo), fabsf(hi));
        const int e = (n && amax >= 1.152921504606847e18f) ? ilogbf(amax) : 0;
        count[i] = static_cast<int>(n);
        scale[i] = ldexpf(1.f, e);
        mean[i] = static_cast<float>(ldexp(mu, -e));
        m2[i] = static_cast<float>(ldexp(q, -2 * e));
        minimum[i] = lo;
        maximum[i] = hi;
    }
    if (i < SLOTS) {
        int total = 0;
        for (int b = 0; b < blocks; ++b) total += block_slots[static_cast<size_t>(b) * SLOTS + i];
        slots[i] = total;
    }
    if (i < 4) {
        int total = 0;
        for (int b = 0; b < blocks; ++b) total += block_signs[b * 4 + i];
        signs[i] = total;
    }
"""

PARTIALS = ("part_count", "part_mean", "part_std", "part_min", "part_max", "block_slots", "block_signs")
OUTPUTS = ("count", "scale", "mean", "m2", "minimum", "maximum", "slots", "signs")


@lru_cache(maxsize=None)
def _kernels():
    one_pass = mx.fast.cuda_kernel(name="taq_reduce_batch", input_names=["x", "edges", "binning"],
                                   output_names=list(PARTIALS), source=KERNEL, header=HEADER)
    merge = mx.fast.cuda_kernel(name="taq_merge_partials", input_names=list(PARTIALS), output_names=list(OUTPUTS),
                                source=MERGE)
    return one_pass, merge


@lru_cache(maxsize=None)
def _binning(spec: HistogramSpec) -> tuple[mx.array, mx.array]:
    """The bin edges and (1 / scale, bins per unit of asinh) on the device, once per spec."""
    return mx.array(spec.bin_edges), mx.array([1 / spec.scale, spec.bins_per_unit], dtype=mx.float32)


def histogram_copies(bins: int) -> int:
    """Shared-memory histograms per block: one per warp, fewer when they would not fit beside the edges; 0 when
    not even one fits (more than 6,142 bins: `tracer.device_reducer` then uses the portable reduction)."""
    fits = (SHARED_BYTES - 4 * (bins + 1) - 16) // (4 * (bins + 1))
    return max(0, min(THREADS // 32, fits))


def chunks_for(rows: int, channels: int) -> int:
    """Row chunks (grid rows): about TARGET_BLOCKS blocks, each at least MIN_ROWS_PER_CHUNK rows long."""
    tiles = -(-channels // THREADS)
    return max(1, min(-(-rows // MIN_ROWS_PER_CHUNK), TARGET_BLOCKS // tiles))


def cuda_reduce_batch(x: mx.array, spec: HistogramSpec) -> BatchReduction:
    """reduce_batch(x, spec) in one pass on a CUDA GPU (lazy, like reduce_batch)."""
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"activations need a non-empty channel axis, got shape {x.shape}")
    if histogram_copies(spec.bins) == 0:
        raise ValueError(f"{spec.bins} bins do not fit the kernel's shared memory; use reduce_batch")
    if x.size > MAX_BATCH_ELEMENTS:
        raise ValueError(f"a batch of {x.size} values exceeds {MAX_BATCH_ELEMENTS}; reduce it in smaller batches")
    channels = x.shape[-1]
    x = x.reshape(-1, channels)
    rows = x.shape[0]
    if rows == 0:
        return reduce_batch(x, spec)  # the empty reduction
    chunks = chunks_for(rows, channels)
    tiles = -(-channels // THREADS)
    slots = spec.bins + 1
    one_pass, merge = _kernels()
    partials = one_pass(
        inputs=[x, *_binning(spec)], template=[("BINS", spec.bins), ("THREADS", THREADS), ("UNROLL", UNROLL),
                                               ("COPIES", histogram_copies(spec.bins))],
        grid=(tiles * THREADS, chunks, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(chunks, channels)] * 5 + [(chunks * tiles, slots), (chunks * tiles, SIGNS)],
        output_dtypes=[mx.int32] + [mx.float32] * 4 + [mx.int32, mx.int32])
    count, scale, mean, m2, minimum, maximum, slot_counts, signs = merge(
        inputs=partials, template=[("BINS", spec.bins)], grid=(max(channels, slots), 1, 1),
        threadgroup=(THREADS, 1, 1), output_shapes=[(channels,)] * 6 + [(slots,), (SIGNS,)],
        output_dtypes=[mx.int32] + [mx.float32] * 5 + [mx.int32, mx.int32])
    zeros = mx.zeros((channels,), dtype=mx.float32)
    return BatchReduction(count=count, scale=scale, scaled_mean=mean,
                          residual_sum=zeros, residual_sq_sum=m2, min=minimum, max=maximum, slots=slot_counts,
                          signs=signs)


def cuda_reducer(spec: HistogramSpec) -> Callable[[mx.array], BatchReduction]:
    return lambda x: cuda_reduce_batch(x, spec)
