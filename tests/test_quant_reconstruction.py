"""Block reconstruction: AdaRound's algebra, the schedules, LSQ and momentum shifts, and a short run on pocket that
must beat round-to-nearest on the blocks it trains, deterministically and resumably."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import taq.quant.reconstruction as rec
from taq.formats.calibration import load_calibration
from taq.formats.quantization import load_quantization, save_quantization
from taq.quant.calibration import QuantConfig, calibrate_quantization
from taq.quant.grid import QParams, quantize
from taq.quant.modules import quantize_model
from taq.quant.reconstruction import (ReconstructedLinear, ReconstructionConfig, initial_alpha, reconstruct,
                                      rectified_sigmoid)
from taq.tracing.plan import ForwardBatch, batch_inputs


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 0.999), min_size=1, max_size=50))
def test_alpha_starts_at_each_weights_fractional_part(fractions):
    f = mx.array(np.array(fractions, np.float32))
    np.testing.assert_allclose(np.array(rectified_sigmoid(initial_alpha(f))), fractions, atol=2e-6)


@settings(max_examples=50, deadline=None)
@given(iters=st.integers(1, 5000), warmup=st.floats(0.0, 0.9))
def test_beta_is_off_in_the_warmup_then_anneals_from_20_to_2(iters, warmup):
    config = ReconstructionConfig(iters=iters, warmup=warmup)
    betas = [config.beta_at(i) for i in range(iters)]
    start = sum(b is None for b in betas)
    assert start == int(np.ceil(warmup * iters)) and all(b is None for b in betas[:start])
    on = np.array(betas[start:])
    assert np.all(np.diff(on) <= 1e-12) and np.all((on >= 2.0) & (on <= 20.0))
    if on.size:  # the first step after the warm-up is within one step's decrement of 20
        assert on[0] >= 20.0 - 18.0 / max(iters - warmup * iters, 1) - 1e-9


@pytest.fixture(scope="module")
def pocket_set(pocket_calibration):
    return load_calibration(pocket_calibration)


@pytest.fixture(scope="module")
def rtn(pocket_model, pocket_set):
    """W4A8 per-timestep with shifting, the first two blocks only (short runs)."""
    return calibrate_quantization(pocket_model, pocket_set, QuantConfig(
        weight_bits=4, act_bits=8, shift=True, layers=("mm_00_*", "mm_01_*"), num_samples=8,
        act_observer="minmax", weight_observer="minmax"), progress=False)


def test_the_soft_weight_starts_at_the_float_weight_and_hard_rounding_at_nearest(pocket_model, rtn):
    layer = rtn.layers["mm_00_img.fc1"]
    linear = dict(pocket_model.mmdit.named_modules())[layer.path]
    module = ReconstructedLinear(linear, layer, drop_prob=0.5)
    w = np.array(linear.weight)
    scale, zero = layer.weight.scale, layer.weight.zero_point  # (O, 1): per output channel
    inside = (w >= -zero * scale) & (w <= (layer.weight_spec.qmax - zero) * scale)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(np.array(module.weight())[inside], w[inside], atol=1e-5 * np.abs(w).max())
    module.hard = True
    nearest = np.array(quantize(linear.weight, QParams(mx.array(layer.weight.scale), mx.array(layer.weight.zero_point)),
                                layer.weight_spec))
    assert np.mean(np.array(module.levels()) == nearest) > 0.999  # ties and the clip at the ends may differ


def test_momentum_moves_only_the_shifts_of_the_timesteps_in_the_batch(pocket_model, rtn):
    layer = rtn.layers["mm_00_img.fc2"]
    module = ReconstructedLinear(dict(pocket_model.mmdit.named_modules())[layer.path], layer, drop_prob=0.0)
    before = np.array(module.shift)
    sigmas = layer.act.sigmas
    module.set_rows(mx.array(np.float32([sigmas[1], sigmas[1]])))
    x = mx.random.normal((2, 5, before.shape[1]), key=mx.random.key(0)) * 3
    module.train(True)
    module(x)
    after = np.array(module.shift)
    mid = (np.array(x).min(axis=(0, 1)) + np.array(x).max(axis=(0, 1))) / 2
    np.testing.assert_allclose(after[1], 0.95 * before[1] + 0.05 * mid, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.delete(after, 1, axis=0), np.delete(before, 1, axis=0))


def output_sqnr(model, cal, quantization) -> float:
    """Output SQNR of the whole model over every calibration point (each at its own timestep)."""
    signal = noise = 0.0
    for t in np.unique(cal.ts):
        args = batch_inputs(cal, ForwardBatch(float(t), np.flatnonzero(cal.ts == t)))
        reference = np.array(model.mmdit(*args), np.float64)
        with quantize_model(model.mmdit, quantization) as quantized:
            noise += np.square(np.array(quantized(*args), np.float64) - reference).sum()
        signal += np.square(reference).sum()
    return 10 * np.log10(signal / noise)


@pytest.fixture(scope="module")
def reconstructed(pocket_model, pocket_set, rtn, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    config = ReconstructionConfig(iters=80, num_samples=16, batch_size=16)
    before = tree_flatten(pocket_model.mmdit.parameters())
    trainable = len(tree_flatten(pocket_model.mmdit.trainable_parameters()))
    result = reconstruct(pocket_model, pocket_set, rtn, config, resume_dir=folder, progress=False)
    after = tree_flatten(pocket_model.mmdit.parameters())
    assert [k for k, _ in before] == [k for k, _ in after]
    assert all(np.array_equal(np.array(a), np.array(b)) for (_, a), (_, b) in zip(before, after))
    assert len(tree_flatten(pocket_model.mmdit.trainable_parameters())) == trainable
    return config, folder, result


def test_joint_reconstruction_beats_round_to_nearest(pocket_model, pocket_set, rtn, reconstructed):
    _, _, result = reconstructed
    assert result.meta["reconstruction"]["mode"] == "joint" and "+joint reconstruction" in result.meta["label"]
    changed = [site for site, layer in result.layers.items() if layer.levels is not None]
    assert sorted(changed) == sorted(rtn.layers)
    steps_moved = [not np.array_equal(result.layers[s].act.scale, rtn.layers[s].act.scale) for s in changed]
    assert all(steps_moved)
    assert output_sqnr(pocket_model, pocket_set, result) > output_sqnr(pocket_model, pocket_set, rtn) + 0.3


def test_reconstruction_is_deterministic_resumable_and_survives_the_file(pocket_model, pocket_set, rtn,
                                                                         reconstructed, tmp_path, monkeypatch):
    config, folder, result = reconstructed
    assert sorted(p.name for p in folder.iterdir()) == ["block_00.safetensors", "block_01.safetensors"]
    again = reconstruct(pocket_model, pocket_set, rtn, config, progress=False)  # from scratch, no resume
    for site, layer in result.layers.items():
        np.testing.assert_array_equal(again.layers[site].levels, layer.levels)
        np.testing.assert_array_equal(again.layers[site].act.scale, layer.act.scale)
    (folder / "block_01.safetensors").unlink()  # interrupted after block 0: the rerun trains block 1 alone
    interrupted = reconstruct(pocket_model, pocket_set, rtn, config, resume_dir=folder, progress=False)
    assert all(np.array_equal(interrupted.layers[s].levels, layer.levels) for s, layer in result.layers.items())
    monkeypatch.setattr(rec, "_reconstruct_block", lambda *a, **k: pytest.fail("a finished block was retrained"))
    resumed = reconstruct(pocket_model, pocket_set, rtn, config, resume_dir=folder, progress=False)
    path = tmp_path / "q.safetensors"
    save_quantization(path, resumed)
    loaded = load_quantization(path)
    for site, layer in result.layers.items():
        np.testing.assert_array_equal(loaded.layers[site].levels, layer.levels)
        if layer.transform is not None:
            np.testing.assert_array_equal(loaded.layers[site].transform.shift, layer.transform.shift)
    assert output_sqnr(pocket_model, pocket_set, loaded) == output_sqnr(pocket_model, pocket_set, result)


def test_separate_reconstruction_trains_rounding_then_steps(pocket_model, pocket_set, rtn):
    config = ReconstructionConfig(mode="separate", iters=10, num_samples=8, batch_size=16)
    result = reconstruct(pocket_model, pocket_set, rtn, config, progress=False)
    assert all(layer.levels is not None for layer in result.layers.values())


def test_the_regulariser_drives_every_rounding_to_floor_or_ceiling(pocket_model, rtn):
    """AdaRound's end state: with the regulariser alone at the final beta, h leaves the open interval (0, 1)."""
    layer = rtn.layers["mm_00_txt.proj"]
    module = ReconstructedLinear(dict(pocket_model.mmdit.named_modules())[layer.path], layer, drop_prob=0.0)
    grad = mx.grad(lambda alpha: mx.sum(1 - mx.power(mx.abs(2 * rectified_sigmoid(alpha) - 1), 2.0)))
    optimizer = optim.Adam(learning_rate=0.1)
    params = {"alpha": module.alpha}
    for _ in range(300):
        params = optimizer.apply_gradients({"alpha": grad(params["alpha"])}, params)
        mx.eval(params)
    h = np.array(rectified_sigmoid(params["alpha"]))
    assert np.mean((h > 0) & (h < 1)) < 0.01


def test_reconstruction_refuses_bad_settings():
    for kwargs, message in (({"mode": "both"}, "mode"), ({"iters": 0}, "iters"), ({"drop_prob": 1.0}, "drop_prob")):
        with pytest.raises(ValueError, match=message):
            ReconstructionConfig(**kwargs)
