"""The CPU paths of taq.models.fused (tanh GELU and softmax with an arithmetic exp, attention) against the
reference formulations, in float64 where it matters."""

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import taq.models.fused as fused

TANH_GELU_MIN = -0.17004075  # float64, at x = -0.7525

cpu_only = pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="the CPU fallbacks")


def gelu_tanh_float64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_cpu_gelu_is_within_1_5e_6_of_float64_and_keeps_the_floor_and_the_sign():
    x = np.linspace(-20, 20, 2_000_001, dtype=np.float32)
    ours = np.array(fused.gelu_tanh_cpu(mx.array(x))).astype(np.float64)
    ref = gelu_tanh_float64(x)
    assert np.abs(ours - ref).max() <= 1.5e-6
    assert ours.min() >= TANH_GELU_MIN - 1e-6
    assert not np.any((ref < 0) & (ours > 0))


def test_cpu_gelu_is_relu_past_the_clamp_and_for_huge_values():
    x = np.array([5.5, 6.0, 9.0, 1e3, 1e8, 3e8, 1e30, 3.4e38], dtype=np.float32)
    np.testing.assert_array_equal(np.array(fused.gelu_tanh_cpu(mx.array(x))), x)
    np.testing.assert_array_equal(np.array(fused.gelu_tanh_cpu(mx.array(-x))), np.zeros_like(x))


def test_cpu_gelu_has_exact_zeros_where_mlx_float32_form_has_them_and_its_gradient():
    x = mx.array(np.linspace(-8, 0, 800_001, dtype=np.float32))
    ours, ref = np.array(fused.gelu_tanh_cpu(x)), np.array(nn.gelu_approx(x))
    np.testing.assert_array_equal(ours == 0, ref == 0)
    assert (ref == 0).any() and (ref != 0).any()
    grad = mx.grad(lambda v: fused.gelu_tanh_cpu(v).sum())(x)
    np.testing.assert_array_equal(np.array(grad), np.array(mx.grad(lambda v: nn.gelu_approx(v).sum())(x)))


def test_cpu_softmax_gradient_matches_mlx():
    scores, weights = (mx.random.normal((2, 3, 40), key=mx.random.key(i)) for i in (3, 4))
    ours = mx.grad(lambda s: (fused.softmax_cpu(s, 0.3) * weights).sum())(scores)
    ref = mx.grad(lambda s: (mx.softmax(0.3 * s, axis=-1) * weights).sum())(scores)
    np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-7)


def test_cpu_gelu_propagates_nan_and_keeps_16_bit_dtypes():
    assert np.isnan(np.array(fused.gelu_tanh_cpu(mx.array([np.nan])))).all()
    x = mx.random.normal((4, 7, 33), key=mx.random.key(0)) * 3
    for dtype in (mx.float16, mx.bfloat16):
        out = fused.gelu_tanh_cpu(x.astype(dtype))
        assert out.dtype == dtype
        np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(nn.gelu_approx(x.astype(dtype))
                                                                              .astype(mx.float32)), atol=2e-2)


def test_cpu_gelu_compiled_equals_eager():
    x = mx.random.normal((3, 64, 512), key=mx.random.key(1)) * 4
    np.testing.assert_array_equal(np.array(mx.compile(fused.gelu_tanh_cpu)(x)), np.array(fused.gelu_tanh_cpu(x)))


@cpu_only
def test_the_gelu_module_uses_the_cpu_form_for_tanh_and_mlx_for_exact():
    x = mx.linspace(-6, 6, 1001)
    np.testing.assert_array_equal(np.array(fused.GELU("tanh")(x)), np.array(fused.gelu_tanh_cpu(x)))
    np.testing.assert_array_equal(np.array(fused.GELU("exact")(x)), np.array(nn.gelu(x)))
    x64 = mx.array(np.linspace(-6, 6, 101)).astype(mx.float64)  # no float64 shortcut: MLX's own form
    with mx.stream(mx.cpu):
        np.testing.assert_array_equal(np.array(fused.GELU("tanh")(x64)), np.array(nn.gelu_approx(x64)))


@pytest.mark.parametrize("spread", [1.0, 30.0, 3000.0], ids=["narrow", "wide", "underflowing"])
def test_cpu_softmax_matches_float64(spread):
    scores = mx.random.normal((5, 2, 80, 80), key=mx.random.key(2)) * spread
    ours = np.array(fused.softmax_cpu(scores, 0.125)).astype(np.float64)
    s = np.array(scores).astype(np.float64) * 0.125
    ref = np.exp(s - s.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert np.abs(ours - ref).max() <= 1e-6
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-6)
    assert np.all(ours >= 0)


def test_cpu_softmax_propagates_nan_to_its_row_only():
    scores = mx.zeros((3, 4)).at[1, 2].add(mx.array(np.nan))
    out = np.array(fused.softmax_cpu(scores, 1.0))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("shape", [(1, 1, 5, 8), (2, 2, 80, 64), (3, 4, 17, 32)])
def test_attention_matches_mlx_sdpa(shape):
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i)) for i in range(3))
    ours = fused.attention(q, k, v, shape[-1] ** -0.5)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=shape[-1] ** -0.5)
    np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.array(mx.compile(fused.attention)(q, k, v, shape[-1] ** -0.5)),
                                  np.array(ours))
