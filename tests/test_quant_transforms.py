"""TaQ-DiT's shifting and outlier migration and PTQ4DiT's salience balancing: exact in full precision, and what
they do to the ranges the quantizers see."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.formats.calibration import load_calibration
from taq.formats.quantization import load_quantization, save_quantization
from taq.quant.calibration import QuantConfig, calibrate_quantization
from taq.quant.modules import quantize_model
from taq.quant.real import supports_real_weights
from taq.quant.transforms import (InputTransform, balance_divisor, half_ranges, midrange_shift,
                                  migration_divisor)
from taq.tracing.plan import ForwardBatch, batch_inputs
from taq.tracing.sites import site_role

SIGMAS = np.array([0.9, 0.5, 0.1])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), per_timestep=st.booleans(), integer=st.booleans())
def test_a_transformed_layer_equals_the_original_in_full_precision(seed, per_timestep, integer):
    rng = np.random.default_rng(seed)
    B, N, C, O = 3, 5, 16, 8
    x = rng.standard_normal((B, N, C)).astype(np.float32) * rng.uniform(0.1, 30, C).astype(np.float32)
    w = rng.standard_normal((O, C)).astype(np.float32)
    shift = rng.standard_normal((3 if per_timestep else 1, C)).astype(np.float32) * 5
    divisor = (rng.integers(1, 9, C) if integer else rng.uniform(0.05, 20, C)).astype(np.float32)
    transform = InputTransform(SIGMAS, shift, divisor)
    sigma = mx.array(rng.choice(SIGMAS, B).astype(np.float32))
    u, offset = transform.forward(mx.array(x), sigma)
    y = (u + offset) @ transform.weight(mx.array(w)).T
    np.testing.assert_allclose(np.array(y), x @ w.T, rtol=1e-4, atol=1e-4 * np.abs(x @ w.T).max())


def test_each_row_is_shifted_by_its_nearest_calibrated_timestep():
    shift = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    rows = np.array(InputTransform(SIGMAS, shift).shift_at(mx.array([0.88, 0.3, 0.12, 1.0, 0.0])))
    np.testing.assert_array_equal(rows[:, 0], shift[[0, 1, 2, 0, 2]])  # 0.3 is equidistant: the larger sigma wins
    assert InputTransform(SIGMAS, shift[:1]).shift_at(mx.array([0.1, 0.9])).shape == (1, 1, 4)


def test_the_midrange_shift_centres_every_channel():
    rng = np.random.default_rng(0)
    low = -rng.uniform(0, 0.17, (3, 6))
    high = rng.uniform(0.5, 40, (3, 6))
    for per_timestep in (True, False):
        shift = midrange_shift(low, high, per_timestep)
        lo, hi = (low.min(0), high.max(0)) if not per_timestep else (low, high)
        np.testing.assert_allclose(lo - shift, -(hi - shift), rtol=1e-6)
        assert np.all(half_ranges(low, high, shift) < half_ranges(low, high, None))


def test_migration_brings_outlier_channels_onto_the_common_range():
    ranges = np.array([1.0, 1.2, 0.8, 0.9, 9.7, 31.0, 1.1])
    divisor = migration_divisor(ranges, threshold=4.0)
    np.testing.assert_array_equal(divisor, [1, 1, 1, 1, 8, 26, 1])  # round(r / 1.2)
    assert np.all(divisor == np.round(divisor)) and np.all(divisor >= 1)
    assert (ranges / divisor).max() <= 1.5 * 1.2
    np.testing.assert_array_equal(migration_divisor(np.ones(5)), np.ones(5))  # no outliers, nothing moves
    with pytest.raises(ValueError, match="threshold"):
        migration_divisor(ranges, threshold=1.0)


def test_balancing_equalises_activation_and_weight_maxima():
    rng = np.random.default_rng(1)
    act_max = rng.uniform(0.1, 50, 8)
    weight = rng.standard_normal((4, 8))
    b = balance_divisor(act_max, weight)
    np.testing.assert_allclose(act_max / b, np.abs(weight).max(0) * b, rtol=1e-5)
    assert balance_divisor(np.array([0.0, 1.0]), np.array([[1.0, 0.0]])).tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- on the pocket model


@pytest.fixture(scope="module")
def pocket_set(pocket_calibration):
    return load_calibration(pocket_calibration)


@pytest.fixture(scope="module")
def quantizations(pocket_model, pocket_set):
    base = dict(weight_bits=8, act_bits=6, num_samples=16, act_observer="minmax", weight_observer="minmax")
    configs = {"plain": QuantConfig(**base), "shift": QuantConfig(**base, shift=True),
               "migrate": QuantConfig(**base, shift=True, migrate=1.5),
               "balance": QuantConfig(**base, shift=True, balance=True)}
    return {name: calibrate_quantization(pocket_model, pocket_set, config, progress=False)
            for name, config in configs.items()}


def test_shifting_centres_every_post_gelu_grid_without_widening_it(quantizations):
    """The per-tensor range is set by the widest channel, so the step barely moves; the zero point goes from the
    bottom of the grid (post-GELU floor about -0.17) to its middle."""
    plain, shifted = quantizations["plain"].layers, quantizations["shift"].layers
    post_gelu = [site for site in plain if site_role(site) == "fc2"]
    assert post_gelu and all(shifted[site].transform.shift.shape[0] == len(shifted[site].act.sigmas)
                             for site in post_gelu)
    for site in post_gelu:
        qmax = shifted[site].act.qmax
        assert np.all(shifted[site].act.scale <= plain[site].act.scale * (1 + 1e-6)), site
        assert np.all(plain[site].act.zero_point < qmax / 8), site
        assert np.all(np.abs(shifted[site].act.zero_point - qmax / 2) < qmax / 4), site
    assert all(shifted[site].transform is None for site in plain if site_role(site) != "fc2")


def test_migration_reports_its_outlier_channels_and_multiplies_fc2_columns(quantizations):
    q = quantizations["migrate"]
    fractions = q.meta["outlier_fraction"]
    assert set(fractions) == {site for site in q.layers if site_role(site) == "fc2"}
    assert any(f > 0 for f in fractions.values()) and all(0 <= f < 0.5 for f in fractions.values())
    for site, fraction in fractions.items():
        divisor = q.layers[site].transform.divisor
        assert np.all(divisor == np.round(divisor)) and np.mean(divisor > 1) == fraction


def test_transformed_quantizations_stay_close_to_full_precision_and_survive_the_file(pocket_model, pocket_set,
                                                                                   quantizations, tmp_path):
    t = np.unique(pocket_set.ts)[0]
    args = batch_inputs(pocket_set, ForwardBatch(float(t), np.flatnonzero(pocket_set.ts == t)[:4]))
    reference = np.array(pocket_model.mmdit(*args), np.float64)
    for name, q in quantizations.items():
        path = tmp_path / f"{name}.safetensors"
        save_quantization(path, q)
        loaded = load_quantization(path)
        with quantize_model(pocket_model.mmdit, q) as model:
            out = np.array(model(*args), np.float64)
        with quantize_model(pocket_model.mmdit, loaded) as model:
            np.testing.assert_array_equal(np.array(model(*args), np.float64), out)
        sqnr = 10 * np.log10(np.square(reference).mean() / np.square(out - reference).mean())
        assert sqnr > 15.0, (name, sqnr)


def test_real_low_bit_weights_refuse_input_transforms(pocket_model, pocket_set):
    q = calibrate_quantization(pocket_model, pocket_set, QuantConfig(weight_bits=8, act_bits=None, balance=True,
                                                                     num_samples=8), progress=False)
    assert all(layer.transform is not None for layer in q.layers.values())
    assert not supports_real_weights(q)


def test_migration_and_balancing_are_exclusive():
    with pytest.raises(ValueError, match="choose one"):
        QuantConfig(migrate=4.0, balance=True)
    with pytest.raises(ValueError, match="threshold"):
        QuantConfig(migrate=0.5)
