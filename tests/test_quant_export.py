import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taq.quant.export import pack_levels, quantized_linear, to_mlx, unpack_levels
from taq.quant.grid import QuantSpec, fake_quant, grid_from_range
from taq.quant.observers import minmax_range, observe

OUT, IN = 24, 256


def weight(seed: int = 0) -> mx.array:
    w = np.random.default_rng(seed).standard_t(4, size=(OUT, IN)).astype(np.float32) * 0.05
    w[3] = np.abs(w[3])  # an all-positive row
    return mx.array(w)


def dequantized(layer: nn.QuantizedLinear) -> mx.array:
    return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)


def close_to(a: mx.array, b: mx.array, w: mx.array) -> bool:
    """Equal to float32 rounding: a few ulps of the weights' magnitude."""
    return bool(np.max(np.abs(np.array(a) - np.array(b))) <= 4 * np.spacing(np.float32(np.abs(np.array(w)).max())))


# --------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 4), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_unpack_inverts_pack(bits, rows, words, seed):
    q = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, words * 32 // bits)).astype(np.uint32)
    packed = pack_levels(mx.array(q), bits)
    assert packed.dtype == mx.uint32 and packed.shape == (rows, words)
    assert np.array_equal(np.array(unpack_levels(packed, bits)), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_mlxs_layout(bits):
    packed, scales, biases = mx.quantize(weight(), 64, bits)
    levels = unpack_levels(packed, bits)  # MLX's own q, read with our layout ...
    assert np.array_equal(np.array(pack_levels(levels, bits)), np.array(packed))  # ... and written back
    deq = scales[..., None] * levels.reshape(OUT, -1, 64).astype(mx.float32) + biases[..., None]
    theirs = mx.dequantize(packed, scales, biases, 64, bits)
    np.testing.assert_allclose(np.array(deq).reshape(OUT, IN), np.array(theirs), atol=1e-6)


# --------------------------------------------------------------------------- export equals fake quantization


EXPORTS = [(bits, gs, method) for bits in (4, 8) for gs in (32, 64, 128) for method in ("minmax", "mse")]


@pytest.mark.parametrize("bits, group, method", EXPORTS)
def test_exported_per_group_weights_are_the_fake_quantized_ones(bits, group, method):
    w = weight(bits + group)
    spec = QuantSpec(bits=bits, granularity="group", group_size=group)
    params = observe(w, spec, method)
    fq = fake_quant(w, params, spec)
    layer = quantized_linear(w, params, spec)
    assert (layer.bits, layer.group_size) == (bits, group)
    assert close_to(dequantized(layer), fq, w)


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_quantized_linear_computes_the_fake_quantized_linear(bits, group):
    w = weight(7)
    bias = mx.array(np.linspace(-1, 1, OUT).astype(np.float32))
    spec = QuantSpec(bits=bits, granularity="group", group_size=group)
    params = observe(w, spec, "mse")
    reference = nn.Linear(IN, OUT)
    reference.weight, reference.bias = fake_quant(w, params, spec), bias
    x = mx.array(np.random.default_rng(1).normal(size=(2, 5, IN)).astype(np.float32))
    got, want = np.array(quantized_linear(w, params, spec, bias=bias)(x)), np.array(reference(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=8),
                                  QuantSpec(bits=4, granularity="channel", symmetric=True),
                                  QuantSpec(bits=8, granularity="group", group_size=64, symmetric=True),
                                  QuantSpec(bits=2, granularity="group", group_size=32)])
@pytest.mark.parametrize("group", [32, 128])
def test_per_channel_per_tensor_and_symmetric_grids_export_too(spec, group):
    w = weight(3)
    params = observe(w, spec, "mse")
    if spec.granularity == "group" and group != spec.group_size:
        with pytest.raises(ValueError, match="its own group size"):
            to_mlx(w, params, spec, group_size=group)
        return
    layer = quantized_linear(w, params, spec, group_size=None if spec.granularity == "group" else group)
    assert close_to(dequantized(layer), fake_quant(w, params, spec), w)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_minmax_under_the_mlx_anchor_is_mx_quantize(bits, group):
    # Same grids as mx.quantize; the levels agree except where x sits on a rounding tie that float rounding
    # resolves differently in MLX's (x - bias) / scale and this module's x / s + z.
    w = weight(bits * group)
    spec = QuantSpec(bits=bits, granularity="group", group_size=group, anchor="mlx")
    params = grid_from_range(*minmax_range(w, spec), spec)
    ours = np.array(dequantized(quantized_linear(w, params, spec)))
    packed, scales, biases = mx.quantize(w, group, bits)
    theirs = np.array(mx.dequantize(packed, scales, biases, group, bits))
    s, b = (np.repeat(np.array(a), group, axis=1) for a in (scales, biases))
    v = (np.array(w) - b) / s  # MLX's value before rounding
    tie = np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-4
    differ = np.abs(ours - theirs) > 4 * np.spacing(np.float32(np.abs(np.array(w)).max()))
    assert not np.any(differ & ~tie)
    assert tie.mean() < 1e-3


# --------------------------------------------------------------------------- bad input


def test_export_rejects_what_mlx_cannot_hold():
    w = weight()
    spec3 = QuantSpec(bits=3, granularity="group", group_size=64)
    with pytest.raises(ValueError, match="exports \\(2, 4, 8\\)-bit grids"):
        to_mlx(w, observe(w, spec3), spec3)
    spec = QuantSpec(bits=4, granularity="channel")
    params = observe(w, spec)
    with pytest.raises(ValueError, match="group size must be one of"):
        to_mlx(w, params, spec, group_size=48)
    with pytest.raises(ValueError, match="group_size=128 does not divide the input dimension 192"):
        w2 = w[:, :192]
        to_mlx(w2, observe(w2, spec), spec, group_size=128)
    with pytest.raises(ValueError, match="bias needs shape \\(24,\\)"):
        quantized_linear(w, params, spec, bias=mx.zeros((3,)))
    with pytest.raises(ValueError, match="packs \\(2, 4, 8\\)-bit levels"):
        pack_levels(mx.zeros((1, 32), dtype=mx.uint32), 3)


def test_scales_take_the_requested_dtype():
    w = weight()
    spec = QuantSpec(bits=4, granularity="group", group_size=64)
    params = observe(w, spec)
    _, scales, biases = to_mlx(w, params, spec, dtype=mx.float16)
    assert scales.dtype == biases.dtype == mx.float16
    _, scales, _ = to_mlx(w.astype(mx.bfloat16), params, spec)
    assert scales.dtype == mx.bfloat16
