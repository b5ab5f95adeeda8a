import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from taq.quant.grid import (ANCHORS, GROUP_SIZES, QParams, QuantSpec, dequantize, fake_quant, fake_quant_affine,
                            grad_scale, grid_from_range, grid_range, lsq_grad_factor, quantize, round_ste)
from taq.quant.observers import minmax_range

GELU_TANH_FLOOR = -0.170041  # the tanh GELU's minimum, the floor of SD3's post-GELU activations

specs = st.builds(
    lambda bits, symmetric, gran, group, anchor: QuantSpec(
        bits=bits, symmetric=symmetric, granularity=gran, group_size=group if gran == "group" else None,
        anchor="zero" if symmetric else anchor),
    st.integers(2, 8), st.booleans(), st.sampled_from(["tensor", "channel", "group"]), st.sampled_from(GROUP_SIZES),
    st.sampled_from(ANCHORS))
finite = st.floats(-100, 100, allow_nan=False, width=32)


def grid_values(scale, zero_point, spec):
    """All levels' values of one grid, as this module computes them."""
    q = mx.arange(spec.qmin, spec.qmax + 1, dtype=mx.float32)
    return (q - zero_point) * scale


# --------------------------------------------------------------------------- the spec


@settings(max_examples=60, deadline=None)
@given(specs)
def test_spec_round_trips_through_json(spec):
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_levels():
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (0, 15)
    assert (QuantSpec(bits=4, symmetric=True).qmin, QuantSpec(bits=4, symmetric=True).qmax) == (-7, 7)
    assert (QuantSpec(bits=8, symmetric=True).qmin, QuantSpec(bits=8, symmetric=True).qmax) == (-127, 127)
    assert QuantSpec(bits=2, symmetric=True).steps == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=1), "bits must be an integer in 2..8"),
    (dict(bits=9), "bits must be an integer in 2..8"),
    (dict(bits=4.0), "bits must be an integer"),
    (dict(bits=True), "bits must be an integer"),
    (dict(symmetric=1), "symmetric must be True or False"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(granularity="group"), "group_size must be one of"),
    (dict(granularity="group", group_size=48), "group_size must be one of"),
    (dict(granularity="group", group_size=64.0), "group_size must be one of"),
    (dict(granularity="channel", group_size=64), "only for granularity='group'"),
    (dict(anchor="max"), "anchor must be one of"),
    (dict(symmetric=True, anchor="min"), "asymmetric grids only"),
])
def test_bad_spec_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_from_dict_rejects_unknown_keys_and_non_dicts():
    with pytest.raises(ValueError, match="unknown keys \\['bitz'\\]"):
        QuantSpec.from_dict({"bits": 4, "bitz": 4})
    with pytest.raises(ValueError, match="needs a dict"):
        QuantSpec.from_dict([("bits", 4)])


def test_group_must_divide_the_input_dimension():
    spec = QuantSpec(bits=4, granularity="group", group_size=64)
    assert spec.param_shape((3, 192)) == (3, 3)
    with pytest.raises(ValueError, match="group_size=64 does not divide the input dimension 96"):
        spec.param_shape((3, 96))
    with pytest.raises(ValueError, match="weights of shape \\(out, in\\)"):
        QuantSpec(granularity="channel").param_shape((2, 3, 4))


def test_params_of_the_wrong_shape_are_rejected():
    spec = QuantSpec(bits=4, granularity="channel")
    w = mx.zeros((4, 8))
    with pytest.raises(ValueError, match="scale has shape \\(4,\\).*needs \\(4, 1\\)"):
        fake_quant(w, QParams(mx.ones((4,)), mx.zeros((4,))), spec)


# --------------------------------------------------------------------------- the algebra


@st.composite
def grid_and_values(draw, symmetric=None):
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans()) if symmetric is None else symmetric
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    scale = draw(st.floats(2.0**-10, 10.0, width=32))
    zero_point = 0 if symmetric else draw(st.integers(spec.qmin - 3, spec.qmax + 3))  # windows without 0 too
    x = draw(arrays(np.float32, st.integers(1, 64), elements=st.floats(-3000, 3000, width=32)))
    return spec, np.float32(scale), np.float32(zero_point), x


@settings(max_examples=200, deadline=None)
@given(grid_and_values())
def test_error_is_at_most_half_a_step_inside_the_range(case):
    spec, s, z, x = case
    lo, hi = (spec.qmin - z) * s, (spec.qmax - z) * s
    x = np.clip(x, lo, hi)
    xq = np.array(fake_quant_affine(mx.array(x), s, z, spec.qmin, spec.qmax))
    slack = 4 * np.spacing(np.maximum(np.abs(x), np.abs(xq)))  # float32 rounding of x / s and (q - z) * s
    assert np.all(np.abs(xq - x) <= s / 2 + slack)


@settings(max_examples=200, deadline=None)
@given(grid_and_values())
def test_values_outside_the_range_clip_to_the_end_levels(case):
    spec, s, z, x = case
    lo, hi = grid_range(QParams(mx.array(s), mx.array(z)), spec)
    lo, hi = float(lo), float(hi)
    xq = np.array(fake_quant_affine(mx.array(x), s, z, spec.qmin, spec.qmax))
    assert np.all(xq[x < lo - s] == np.float32(lo))
    assert np.all(xq[x > hi + s] == np.float32(hi))
    assert np.all((xq >= np.float32(lo)) & (xq <= np.float32(hi)))


@settings(max_examples=200, deadline=None)
@given(grid_and_values())
def test_levels_end_points_and_zero_are_fixed_points(case):
    spec, s, z, _ = case
    levels = grid_values(s, z, spec)
    assert np.array_equal(np.array(fake_quant_affine(levels, s, z, spec.qmin, spec.qmax)), np.array(levels))
    if spec.qmin <= z <= spec.qmax:  # 0 is then a level, and it comes back as exactly 0.0
        assert float(fake_quant_affine(mx.array([0.0]), s, z, spec.qmin, spec.qmax)[0]) == 0.0


@settings(max_examples=200, deadline=None)
@given(grid_and_values())
def test_fake_quantization_is_idempotent(case):
    spec, s, z, x = case
    once = fake_quant_affine(mx.array(x), s, z, spec.qmin, spec.qmax)
    twice = fake_quant_affine(once, s, z, spec.qmin, spec.qmax)
    assert np.array_equal(np.array(once), np.array(twice))


@settings(max_examples=100, deadline=None)
@given(grid_and_values())
def test_quantize_then_dequantize_is_fake_quantization_bit_for_bit(case):
    spec, s, z, x = case
    q = np.array(quantize(mx.array(x), QParams(mx.array(s), mx.array(z)), spec))
    assert q.dtype == np.int32 and q.min() >= spec.qmin and q.max() <= spec.qmax
    back = dequantize(mx.array(q), QParams(mx.array(s), mx.array(z)), spec)
    fq = fake_quant(mx.array(x), QParams(mx.array(s), mx.array(z)), spec)
    assert np.array_equal(np.array(back), np.array(fq))


def test_round_ste_rounds_half_to_even_bit_for_bit():
    x = mx.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, 1.7, -3.2, 8388609.0])
    assert np.array_equal(np.array(round_ste(x)), np.array(mx.round(x)))
    assert np.array_equal(np.array(mx.round(x))[:6], [-2, -2, -0, 0, 2, 2])


# --------------------------------------------------------------------------- gradients


def test_ste_gradient_is_identity_inside_and_zero_where_clipped():
    s, z, qmin, qmax = 0.5, 3.0, 0, 15  # levels -1.5 .. 6.0
    x = mx.array([-3.0, -1.76, -1.74, -1.5, 0.1, 2.6, 6.0, 6.24, 6.26, 9.0])
    g = mx.grad(lambda v: fake_quant_affine(v, s, z, qmin, qmax).sum())(x)
    # inside: rounds to a level in 0..15 (the end levels included, down to half a step beyond them)
    assert np.array_equal(np.array(g), [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])


def test_scale_and_zero_point_gradients_are_lsqs():
    qmin, qmax = 0, 15
    x = mx.array([-3.0, -1.2, 0.3, 2.6, 4.4, 9.0])
    s = mx.full(x.shape, 0.5)  # one scale per element, so each element's gradient is visible
    z = mx.full(x.shape, 3.0)
    gs, gz = mx.grad(lambda s_, z_: fake_quant_affine(x, s_, z_, qmin, qmax).sum(), argnums=(0, 1))(s, z)
    v = np.array(x) / 0.5
    level = np.round(v) + 3
    inside = (level >= qmin) & (level <= qmax)
    expected_s = np.where(inside, np.round(v) - v, np.where(level < qmin, qmin - 3.0, qmax - 3.0))
    np.testing.assert_allclose(np.array(gs), expected_s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(gz), np.where(inside, 0.0, -0.5), atol=1e-7)
    assert inside.any() and not inside.all()


def test_grad_scale_keeps_the_value_and_scales_the_gradient():
    x = mx.array([0.1234567, -3.3, 7.0])
    assert np.array_equal(np.array(grad_scale(x, 0.37)), np.array(x))
    g = mx.grad(lambda v: (grad_scale(v, 0.37) * mx.array([1.0, 2.0, 3.0])).sum())(x)
    np.testing.assert_allclose(np.array(g), [0.37, 0.74, 1.11], rtol=1e-6)
    assert lsq_grad_factor(100, 255) == pytest.approx(1 / np.sqrt(25500))
    with pytest.raises(ValueError, match="num_elements >= 1"):
        lsq_grad_factor(0, 255)


def test_fake_quant_keeps_the_input_dtype():
    x = mx.array([0.3, -1.2], dtype=mx.bfloat16)
    assert fake_quant_affine(x, 0.1, 0.0, -127, 127).dtype == mx.bfloat16


# --------------------------------------------------------------------------- ranges -> grids


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 8), finite, finite)
def test_zero_anchor_is_taq_dits_rule(bits, a, b):
    lo, hi = min(a, b), max(a, b)
    spec = QuantSpec(bits=bits)
    s, z = grid_from_range(lo, hi, spec)
    lo0, hi0 = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    s_ref = np.maximum((hi0 - lo0) / np.float32(spec.steps), np.float32(1e-8))
    assert float(s) == pytest.approx(float(s_ref), rel=1e-6)
    assert float(z) == np.clip(np.round(-lo0 / np.float32(s)), 0, spec.steps)
    bottom, top = (float(v) for v in grid_range(QParams(s, z), spec))
    if hi0 - lo0 > spec.steps * 1e-8:  # not a range the EPS floor widened
        tol = float(s) / 2 * (1 + 1e-5)
        assert abs(bottom - lo0) <= tol and abs(top - hi0) <= tol


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 8), finite, finite)
def test_symmetric_grid_holds_plus_and_minus_amax(bits, a, b):
    lo, hi = min(a, b), max(a, b)
    spec = QuantSpec(bits=bits, symmetric=True)
    params = grid_from_range(lo, hi, spec)
    amax = max(abs(np.float32(lo)), abs(np.float32(hi)))
    assert float(params.zero_point) == 0.0
    bottom, top = (float(v) for v in grid_range(params, spec))
    assert bottom == -top
    assert top == pytest.approx(max(amax, 1e-8 * spec.qmax), rel=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 8), st.floats(0.0, 60.0, width=32))
def test_min_anchor_puts_gelus_floor_on_the_grid(bits, hi):
    spec = QuantSpec(bits=bits, anchor="min")
    params = grid_from_range(GELU_TANH_FLOOR, hi, spec)
    n = spec.steps
    floor = np.float32(GELU_TANH_FLOOR)
    if -floor < (np.float32(hi) - floor) / n:  # the negative side is shorter than a step: "zero"'s grid
        zero = grid_from_range(GELU_TANH_FLOOR, hi, QuantSpec(bits=bits))
        assert float(params.scale) == float(zero.scale) and float(params.zero_point) == float(zero.zero_point)
        return
    xq = float(fake_quant_affine(mx.array(np.array([floor])), params.scale, params.zero_point, spec.qmin, spec.qmax)[0])
    assert abs(xq - floor) <= abs(np.spacing(floor))  # the floor is a level, to float32 rounding
    assert float(fake_quant_affine(mx.array([0.0]), params.scale, params.zero_point, spec.qmin, spec.qmax)[0]) == 0.0
    top = float(grid_range(params, spec)[1])
    assert top >= np.float32(hi) - 1e-6 * (np.float32(hi) - floor)  # hi is still covered (to float rounding)
    step0 = (np.float32(hi) - floor) / n
    assert float(params.scale) < step0 * (float(params.zero_point) + 1) / float(params.zero_point) * (1 + 1e-6)


def test_gelu_floor_is_exact_at_8_bits_for_sd3_like_ranges():
    spec = QuantSpec(bits=8, anchor="min")
    for hi in (0.5, 2.0, 4.0, 10.0, 40.0):
        params = grid_from_range(GELU_TANH_FLOOR, hi, spec)
        bottom = float(grid_range(params, spec)[0])
        assert abs(bottom - np.float32(GELU_TANH_FLOOR)) <= abs(np.spacing(np.float32(GELU_TANH_FLOOR)))


@pytest.mark.parametrize("lo, hi, message", [(1.0, -1.0, "lo <= hi"), (np.nan, 1.0, "finite"),
                                             (0.0, np.inf, "finite")])
def test_bad_ranges_raise(lo, hi, message):
    with pytest.raises(ValueError, match=message):
        grid_from_range(lo, hi, QuantSpec())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_mlx_anchor_gives_mx_quantizes_grids(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(6, 128)).astype(np.float32)
    w[1] += 4.0  # groups that are all positive ...
    w[2] -= 4.0  # ... or all negative: MLX's windows then leave 0 out
    w[3, :64] = 0.0  # a constant group
    spec = QuantSpec(bits=bits, granularity="group", group_size=32, anchor="mlx")
    params = grid_from_range(*minmax_range(mx.array(w), spec), spec)
    _, scales, biases = mx.quantize(mx.array(w), 32, bits)
    n = 2**bits - 1
    mlx_ends = np.stack([np.array(biases), np.array(biases + n * scales)])  # MLX's q = 0 and q = n
    ours = np.stack([np.array(v) for v in grid_range(params, spec)])
    np.testing.assert_allclose(np.sort(mlx_ends, axis=0), ours, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(params.scale), np.abs(np.array(scales)), rtol=1e-7)


# --------------------------------------------------------------------------- granularities


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(GROUP_SIZES), st.integers(1, 5), st.integers(2, 8), st.sampled_from(ANCHORS),
       st.integers(0, 2**31 - 1))
def test_one_group_spanning_the_row_is_per_channel(group, rows, bits, anchor, seed):
    w = mx.array(np.random.default_rng(seed).normal(size=(rows, group)).astype(np.float32))
    by_group = QuantSpec(bits=bits, granularity="group", group_size=group, anchor=anchor)
    by_channel = QuantSpec(bits=bits, granularity="channel", anchor=anchor)
    pg = grid_from_range(*minmax_range(w, by_group), by_group)
    pc = grid_from_range(*minmax_range(w, by_channel), by_channel)
    assert np.array_equal(np.array(pg.scale), np.array(pc.scale))
    assert np.array_equal(np.array(fake_quant(w, pg, by_group)), np.array(fake_quant(w, pc, by_channel)))


def test_group_grids_apply_to_their_own_columns():
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    w = mx.concatenate([mx.full((2, 32), 1.0), mx.full((2, 32), 100.0)], axis=1)
    params = QParams(mx.array([[1.0, 10.0], [1.0, 10.0]]), mx.zeros((2, 2)))
    out = np.array(fake_quant(w, params, spec))
    assert np.all(out[:, :32] == 1.0) and np.all(out[:, 32:] == 100.0)
    assert np.array_equal(np.array(quantize(w, params, spec))[0, [0, 40]], [1, 10])
