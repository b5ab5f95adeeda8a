"""taq's CUDA kernels against the portable MLX ops they replace. They run where MLX's CUDA backend is the default
device (an NVIDIA GPU with `mlx[cuda13]`); elsewhere the kernels are never used and these tests skip."""

from dataclasses import replace
from functools import partial

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import taq.models.fused as fused
from taq.config import get_preset
from taq.cuda import cuda_available
from taq.models.mmdit import MMDiT
from taq.tracing import (ActivationStats, CellStats, HistogramSpec, cuda_reduce_batch, mmdit_layer_paths, reduce_batch,
                         trace_ffn_activations)

pytestmark = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend as the default device")

SPEC = HistogramSpec()
EXACT = ("count", "hist", "min", "max", "negative", "zero", "nan", "posinf", "neginf")


def hard_values(shape=(3, 100, 300), seed=0) -> np.ndarray:
    """Zeros, NaN, +-Inf, values in the end bins up to float32's max, bin edges and their float32 neighbours (as
    many as fit, in random places) and an all-NaN channel."""
    rng = np.random.default_rng(seed)
    edges = SPEC.bin_edges[1:-1]  # the outermost edges' neighbours are infinite
    big = np.finfo(np.float32).max
    pool = np.concatenate([[big, -big, 0.0, -0.0, 1e-45, -1e-45], [np.nan] * 10, [np.inf] * 5, [-np.inf] * 7,
                           [1e6] * 50, [-1e6] * 50, edges, np.nextafter(edges, np.float32(-np.inf)),
                           np.nextafter(edges, np.float32(np.inf))]).astype(np.float32)
    flat = rng.standard_normal(int(np.prod(shape))).astype(np.float32) * 6
    k = min(flat.size, pool.size)
    flat[:k] = pool[:k]
    v = rng.permutation(flat).reshape(shape)
    v[..., 7] = np.nan
    return v


CASES = {
    "edges and non-finite, float32": lambda: mx.array(hard_values()),
    "one row": lambda: mx.array(hard_values((1, 1, 1600))),
    "channels not a multiple of the block": lambda: mx.array(hard_values((2, 70, 37), seed=1)),
    "mean far from zero": lambda: mx.array(np.random.default_rng(2).standard_normal((4000, 3), np.float32) + 1000),
    "SD3 text FFN, bf16": lambda: nn.gelu_approx(4 * mx.random.normal((2, 154, 6144), key=mx.random.key(3))
                                                 ).astype(mx.bfloat16),
    "SD3 image FFN, bf16": lambda: nn.gelu_approx(4 * mx.random.normal((2, 4096, 6144), key=mx.random.key(4))
                                                  ).astype(mx.bfloat16),
    "float16": lambda: mx.random.normal((3, 50, 256), key=mx.random.key(5)).astype(mx.float16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_one_pass_kernel_reduces_as_the_portable_ops(case):
    x = CASES[case]()
    portable = CellStats.from_activations(x, SPEC)
    reduction = cuda_reduce_batch(x, SPEC)
    mx.eval(reduction.arrays())
    kernel = CellStats.from_reduction(reduction, SPEC)
    for name in EXACT:
        np.testing.assert_array_equal(getattr(kernel, name), getattr(portable, name), err_msg=name)
    filled = portable.count > 0
    scale = np.maximum(portable.std[filled], 1e-30)
    assert np.all(np.abs(kernel.mean[filled] - portable.mean[filled]) <= 1e-5 * np.maximum(scale, np.abs(
        portable.mean[filled])))
    np.testing.assert_allclose(kernel.std[filled], portable.std[filled], rtol=1e-5)


def _portable(fn):
    """Run fn with the fused ops' kernels switched off."""
    real = fused.cuda_available
    fused.cuda_available = lambda: False
    try:
        return fn()
    finally:
        fused.cuda_available = real


FUSED = {
    "norm_modulate": lambda x, m: fused.norm_modulate(x, m[0], m[1], 1e-6),
    "gated_add": lambda x, m: fused.gated_add(x, m[2], x[:, ::-1]),
    "gelu tanh": lambda x, m: fused.GELU("tanh")(x),
    "gelu exact": lambda x, m: fused.GELU("exact")(x),
}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("op", list(FUSED))
def test_fused_kernels_match_the_portable_ops_to_rounding(op, dtype):
    keys = mx.random.split(mx.random.key(6), 2)
    x = (3 * mx.random.normal((2, 77, 256), key=keys[0]) + 0.5).astype(dtype)
    mods = [m.astype(dtype) for m in mx.split(mx.random.normal((2, 1, 3 * 256), key=keys[1]), 3, axis=-1)]
    kernel = FUSED[op](x, mods).astype(mx.float32)
    portable = _portable(lambda: FUSED[op](x, mods)).astype(mx.float32)
    # The kernels round once from float32; MLX's bf16 op chains round after every op.
    tol = 1e-5 if dtype == mx.float32 else 2.0**-6
    assert float(mx.abs(kernel - portable).max()) <= tol * max(1.0, float(mx.abs(portable).max()))


@pytest.mark.parametrize("op", list(FUSED))
def test_gradients_through_the_fused_kernels_are_the_portable_ops(op):
    """Block reconstruction differentiates through the MMDiT: the kernels carry the MLX ops' VJPs."""
    keys = mx.random.split(mx.random.key(7), 3)
    x = 3 * mx.random.normal((2, 77, 256), key=keys[0]) + 0.5
    mods = mx.split(mx.random.normal((2, 1, 3 * 256), key=keys[1]), 3, axis=-1)
    weights = mx.random.normal((2, 77, 256), key=keys[2])

    def loss(x, *mods):
        return mx.sum(FUSED[op](x, mods) * weights)
    grads = mx.grad(loss, argnums=(0, 1, 2, 3))(x, *mods)
    portable = _portable(lambda: mx.grad(loss, argnums=(0, 1, 2, 3))(x, *mods))
    for kernel_grad, portable_grad in zip(grads, portable):
        np.testing.assert_allclose(np.array(kernel_grad), np.array(portable_grad), rtol=1e-4, atol=1e-4)


def test_a_compiled_traced_sd3_width_forward_records_what_the_portable_reduction_does():
    mx.random.seed(0)
    model = MMDiT(replace(get_preset("sd3-medium").mmdit, depth=2))
    model.set_dtype(mx.bfloat16)
    cfg = model.config
    keys = mx.random.split(mx.random.key(1), 3)
    args = (mx.random.normal((2, 32, 32, 16), key=keys[0]).astype(mx.bfloat16), mx.array([500.0, 500.0]),
            mx.random.normal((2, 20, cfg.token_dim), key=keys[1]), mx.random.normal((2, cfg.pooled_dim), key=keys[2]))
    untraced = mx.compile(model)(*args)
    paths = mmdit_layer_paths(model)
    fast, portable = ActivationStats(), ActivationStats()
    with trace_ffn_activations(model, paths, fast) as tracer:
        tracer.timestep = 500.0
        traced = tracer.compile(model)(*args)
        tracer.flush(traced)
    with trace_ffn_activations(model, paths, portable, partial(reduce_batch, spec=SPEC)) as tracer:
        tracer.timestep = 500.0  # the same compiled graph but for the reductions: the same activations
        tracer.flush(tracer.compile(model)(*args))
    np.testing.assert_array_equal(np.array(traced.astype(mx.float32)), np.array(untraced.astype(mx.float32)))
    assert len(fast) == len(portable) == len(paths)
    for key, cell in portable.items():
        for name in ("count", "hist", "min", "max", "negative"):
            np.testing.assert_array_equal(getattr(fast[key], name), getattr(cell, name), err_msg=f"{key} {name}")
        np.testing.assert_allclose(fast[key].std, cell.std, rtol=1e-4)
