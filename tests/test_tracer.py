import math
import threading
from functools import partial

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from taq.config import get_preset
from taq.models.fused import GELU
from taq.models.mmdit import MMDiT
from taq.tracing.site_choice import SITES, traced_sites
from taq.tracing import (ActivationStats, CellStats, HistogramSpec, RecordingModule, compiled_reducer,
                         mmdit_layer_paths, reduce_batch, trace_ffn_activations)

GELU_FORMS = {"exact": "none", "tanh": "precise"}  # MLX's names


def gelu_minimum(form: str) -> float:
    """GELU's global minimum (at x ~ -0.75), by ternary search on the float64 formula."""
    if form == "exact":
        f = lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    else:
        f = lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    lo, hi = -2.0, 0.0
    for _ in range(200):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return f(lo)


GELU_FLOOR = {form: gelu_minimum(form) - 1e-6 for form in GELU_FORMS}  # 1e-6: float32 rounding of the activation


# --------------------------------------------------------------------------- a toy model with SD3's module paths


class ToyFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approx=GELU_FORMS[gelu])
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ToyStream(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str, with_mlp: bool = True):
        super().__init__()
        if with_mlp:
            self.mlp = ToyFFN(dim, hidden, gelu)


class ToyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str, last: bool):
        super().__init__()
        self.x_block = ToyStream(dim, hidden, gelu)
        self.context_block = ToyStream(dim, hidden, gelu, with_mlp=not last)


class ToyMMDiT(nn.Module):
    def __init__(self, depth=3, dim=8, hidden=16, gelu="tanh"):
        super().__init__()
        self.joint_blocks = [ToyBlock(dim, hidden, gelu, last=i == depth - 1) for i in range(depth)]

    def __call__(self, x, ctx):
        for block in self.joint_blocks:
            x = x + block.x_block.mlp(x)
            if "mlp" in block.context_block:
                ctx = ctx + block.context_block.mlp(ctx)
        return x, ctx

    def activations(self, x, ctx) -> dict[str, mx.array]:
        """Every FFN's post-GELU output by layer name, computed by hand for the reference statistics."""
        out = {}
        for i, block in enumerate(self.joint_blocks):
            out[f"mm_{i:02d}_img"] = block.x_block.mlp.act(block.x_block.mlp.fc1(x))
            x = x + block.x_block.mlp(x)
            if "mlp" in block.context_block:
                out[f"mm_{i:02d}_txt"] = block.context_block.mlp.act(block.context_block.mlp.fc1(ctx))
                ctx = ctx + block.context_block.mlp(ctx)
        return out


def toy_inputs(seed: int, batch: int = 2, text_tokens: int = 4):
    kx, kc = mx.random.split(mx.random.key(seed))
    return 3 * mx.random.normal((batch, 6, 8), key=kx), 3 * mx.random.normal((batch, text_tokens, 8), key=kc)


@pytest.fixture(params=list(GELU_FORMS))
def toy(request):
    mx.random.seed(0)
    return ToyMMDiT(gelu=request.param)


def parameter_keys(model) -> list[str]:
    return [k for k, _ in tree_flatten(model.parameters())]


def traced(model, paths, inputs_by_timestep, stats=None, reduce=None):
    stats = stats or ActivationStats()
    with trace_ffn_activations(model, paths, stats, reduce) as tracer:
        outs = []
        for t, inputs in inputs_by_timestep:
            tracer.timestep = t
            outs.append(model(*inputs))
            tracer.flush(outs[-1])
    return stats, outs


# --------------------------------------------------------------------------- layer discovery


def test_layer_paths_follow_the_sd3_layout_and_skip_the_last_text_block(toy):
    assert mmdit_layer_paths(toy) == {
        "mm_00_img": "joint_blocks.0.x_block.mlp.act", "mm_00_txt": "joint_blocks.0.context_block.mlp.act",
        "mm_01_img": "joint_blocks.1.x_block.mlp.act", "mm_01_txt": "joint_blocks.1.context_block.mlp.act",
        "mm_02_img": "joint_blocks.2.x_block.mlp.act"}


def test_a_layer_filter_keeps_the_named_layers(toy):
    assert list(mmdit_layer_paths(toy, ["mm_02_img", "mm_00_txt"])) == ["mm_00_txt", "mm_02_img"]


def test_an_unknown_layer_is_an_error_listing_the_known_ones(toy):
    with pytest.raises(ValueError, match=r"unknown layers \['mm_02_txt'\].*mm_00_img, mm_00_txt"):
        mmdit_layer_paths(toy, ["mm_00_img", "mm_02_txt"])


def test_a_model_without_ffn_activations_is_an_error():
    with pytest.raises(ValueError, match="no FFN activation modules"):
        mmdit_layer_paths(nn.Sequential(nn.Linear(2, 2), nn.GELU()))


def test_a_path_that_names_no_module_is_an_error(toy):
    with pytest.raises(ValueError, match="joint_blocks.2.context_block.mlp.act"):
        with trace_ffn_activations(toy, {"mm_02_txt": "joint_blocks.2.context_block.mlp.act"}, ActivationStats()):
            pass


# --------------------------------------------------------------------------- wrapping and restoring


def test_tracing_leaves_the_output_bit_identical(toy):
    inputs = toy_inputs(1)
    plain = [np.array(a) for a in toy(*inputs)]
    _, (outs,) = traced(toy, mmdit_layer_paths(toy), [(500.0, inputs)])
    for got, expected in zip(outs, plain):
        np.testing.assert_array_equal(np.array(got), expected)


def test_originals_are_restored_after_the_block(toy):
    paths = mmdit_layer_paths(toy)
    modules, keys = dict(toy.named_modules()), parameter_keys(toy)
    with trace_ffn_activations(toy, paths, ActivationStats()):
        inside = dict(toy.named_modules())
        assert all(isinstance(inside[path], RecordingModule) for path in paths.values())
    after = dict(toy.named_modules())
    assert all(after[path] is modules[path] for path in paths.values())
    assert parameter_keys(toy) == keys and after.keys() == modules.keys()


def test_originals_are_restored_when_the_block_raises(toy):
    paths = mmdit_layer_paths(toy)
    modules, keys = dict(toy.named_modules()), parameter_keys(toy)
    stats = ActivationStats()
    with pytest.raises(KeyError, match="boom"):
        with trace_ffn_activations(toy, paths, stats) as tracer:
            tracer.timestep = 1.0
            toy(*toy_inputs(0))
            raise KeyError("boom")
    assert all(dict(toy.named_modules())[path] is modules[path] for path in paths.values())
    assert parameter_keys(toy) == keys
    assert len(stats) == 0  # the failed forward's pending reductions are dropped


def test_a_forward_before_the_timestep_is_set_is_an_error(toy):
    paths = mmdit_layer_paths(toy)
    with pytest.raises(RuntimeError, match="timestep"):
        with trace_ffn_activations(toy, paths, ActivationStats()):
            toy(*toy_inputs(0))
    assert all(dict(toy.named_modules())[path].__class__ is nn.GELU for path in paths.values())


@pytest.mark.parametrize("t", [float("nan"), "t", None])
def test_a_bad_timestep_is_rejected(toy, t):
    with trace_ffn_activations(toy, mmdit_layer_paths(toy), ActivationStats()) as tracer:
        with pytest.raises(ValueError, match="timestep"):
            tracer.timestep = t


# --------------------------------------------------------------------------- what gets recorded


def test_recorded_statistics_equal_a_numpy_reference(toy):
    timesteps = [(1000.0, toy_inputs(2)), (1000.0, toy_inputs(3)), (250.0, toy_inputs(4))]
    stats, _ = traced(toy, mmdit_layer_paths(toy), timesteps)
    assert stats.layers == tuple(mmdit_layer_paths(toy)) and stats.timesteps == (250.0, 1000.0)
    for layer in stats.layers:
        for t in (250.0, 1000.0):
            acts = [np.array(toy.activations(*inputs)[layer]) for tt, inputs in timesteps if tt == t]
            flat = np.concatenate([a.reshape(-1, a.shape[-1]) for a in acts]).astype(np.float64)  # (rows, C)
            cell = stats[layer, t]
            np.testing.assert_array_equal(cell.count, len(flat))
            mean, std = flat.mean(axis=0), flat.std(axis=0)
            assert np.all(np.abs(cell.mean - mean) <= 1e-5 * np.maximum(np.abs(mean), std))
            np.testing.assert_allclose(cell.std, std, rtol=1e-5)
            np.testing.assert_array_equal(cell.min, flat.min(axis=0))
            np.testing.assert_array_equal(cell.max, flat.max(axis=0))
            np.testing.assert_array_equal(cell.hist, np.histogram(flat.astype(np.float32), stats.spec.bin_edges)[0])
            assert (cell.negative, cell.zero) == (np.count_nonzero(flat < 0), np.count_nonzero(flat == 0))


def test_a_flush_takes_every_layer_and_merges_it_by_the_next_flush_or_sync(toy):
    paths = mmdit_layer_paths(toy)
    stats = ActivationStats()
    with trace_ffn_activations(toy, paths, stats) as tracer:
        tracer.timestep = 3
        out = toy(*toy_inputs(0))
        assert tracer.pending == len(paths) and len(stats) == 0
        tracer.flush(out)
        assert tracer.pending == 0
        tracer.timestep = 4
        tracer.flush(toy(*toy_inputs(1)))
        tracer.sync()
        assert len(stats) == 2 * len(paths) and stats.timesteps == (3.0, 4.0)


def test_a_failing_merge_surfaces_at_sync_and_nothing_is_left_running(toy):
    stats = ActivationStats()
    stats.update("mm_00_img", 3.0, CellStats.empty(99, stats.spec))  # 99 channels: the toy's 16 cannot merge
    with pytest.raises(ValueError, match="channels"):
        with trace_ffn_activations(toy, mmdit_layer_paths(toy), stats) as tracer:
            tracer.timestep = 3
            tracer.flush(toy(*toy_inputs(0)))
    assert not [t for t in threading.enumerate() if t.name.startswith("taq-merge")]  # the merging thread stopped
    assert "mm_00_img" in stats.layers


def test_reductions_left_pending_are_flushed_on_exit(toy):
    stats = ActivationStats()
    with trace_ffn_activations(toy, mmdit_layer_paths(toy), stats) as tracer:
        tracer.timestep = 3
        toy(*toy_inputs(0))
    assert len(stats) == 5 and stats.timesteps == (3.0,)


@pytest.mark.parametrize("gelu", list(GELU_FORMS))
def test_no_recorded_post_gelu_value_is_below_the_gelu_minimum(gelu):
    mx.random.seed(5)
    toy = ToyMMDiT(gelu=gelu, hidden=64)
    inputs = [(t, toy_inputs(10 + i, batch=8)) for i, t in enumerate((1000.0, 500.0))]
    stats, _ = traced(toy, mmdit_layer_paths(toy), inputs)
    mins = np.array([cell.min.min() for _, cell in stats.items()])
    assert len(mins) == 10 and np.all(mins >= GELU_FLOOR[gelu])
    assert np.all(mins < GELU_FLOOR[gelu] + 1e-3)  # random inputs reach the floor: the check is not vacuous
    # The same check catches a tracer attached one module too early, to the GELU's input.
    pre_gelu = {name: path.replace(".act", ".fc1") for name, path in mmdit_layer_paths(toy).items()}
    stats, _ = traced(toy, pre_gelu, inputs)
    assert all(cell.min.min() < GELU_FLOOR[gelu] for _, cell in stats.items())


def assert_cells_agree(actual: ActivationStats, expected: ActivationStats, rtol: float, atol: float) -> None:
    """Counts, histograms and extremes equal; mean and std to float32 reduction-order rounding."""
    for key, cell in expected.items():
        for name in ("count", "hist", "min", "max"):
            np.testing.assert_array_equal(getattr(actual[key], name), getattr(cell, name))
        np.testing.assert_allclose(actual[key].mean, cell.mean, rtol=rtol, atol=atol)
        np.testing.assert_allclose(actual[key].std, cell.std, rtol=rtol)


def test_compiled_reductions_record_what_eager_ones_do():
    mx.random.seed(6)
    toy = ToyMMDiT()
    inputs = [(10.0, toy_inputs(20, text_tokens=6))]  # one activation shape: one compilation
    spec = HistogramSpec()
    (eager, (out_eager,)), (fused, (out_fused,)) = (traced(toy, mmdit_layer_paths(toy), inputs, reduce=r)
                                                    for r in (partial(reduce_batch, spec=spec), compiled_reducer(spec)))
    for a, b in zip(out_eager, out_fused):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert_cells_agree(fused, eager, rtol=1e-6, atol=1e-7)


def test_a_compiled_traced_forward_records_every_call_as_the_eager_one():
    mx.random.seed(7)
    toy = ToyMMDiT()
    # Two timesteps of one shape (the second call reuses the graph), then a new shape (mx.compile retraces).
    inputs = [(10.0, toy_inputs(30)), (20.0, toy_inputs(31)), (10.0, toy_inputs(32, batch=3, text_tokens=5))]
    paths = mmdit_layer_paths(toy)
    eager, eager_outs = traced(toy, paths, inputs)
    compiled = ActivationStats()
    with trace_ffn_activations(toy, paths, compiled) as tracer:
        forward = tracer.compile(toy)
        for (t, args), eager_out in zip(inputs, eager_outs):
            tracer.timestep = t
            out = forward(*args)
            assert tracer.pending == len(paths)  # real reductions filed, not the trace's placeholders
            tracer.flush(out)
            np.testing.assert_allclose(np.array(out[0]), np.array(eager_out[0]), rtol=1e-5, atol=1e-6)
    assert sorted(dict(compiled.items())) == sorted(dict(eager.items())) and len(compiled) == 2 * len(paths)
    assert_cells_agree(compiled, eager, rtol=1e-5, atol=1e-6)


def test_a_compiled_traced_forward_needs_a_timestep():
    toy = ToyMMDiT()
    with trace_ffn_activations(toy, mmdit_layer_paths(toy), ActivationStats()) as tracer:
        with pytest.raises(RuntimeError, match="timestep must be set"):
            tracer.compile(toy)(*toy_inputs(0))


# --------------------------------------------------------------------------- taq's MMDiT


def test_taq_mmdit_is_traced_without_changing_its_output():
    mx.random.seed(0)
    model = MMDiT(get_preset("tiny").mmdit)
    cfg = model.config
    keys = mx.random.split(mx.random.key(1), 3)
    args = (mx.random.normal((2, 8, 8, cfg.in_channels), key=keys[0]), mx.array([700.0, 700.0]),
            mx.random.normal((2, 5, cfg.token_dim), key=keys[1]), mx.random.normal((2, cfg.pooled_dim), key=keys[2]))
    plain, param_keys = np.array(model(*args)), parameter_keys(model)
    paths = mmdit_layer_paths(model)
    assert list(paths) == ["mm_00_img", "mm_00_txt", "mm_01_img"]  # depth 2: the last block has no text FFN
    stats, (out,) = traced(model, paths, [(700.0, args)])
    np.testing.assert_array_equal(np.array(out), plain)
    assert parameter_keys(model) == param_keys
    assert all(type(module) is GELU for path, module in model.named_modules() if path in paths.values())
    for layer in paths:
        cell = stats[layer, 700]
        assert cell.count.tolist() == [2 * (16 if layer.endswith("img") else 5)] * cfg.mlp_hidden
        assert cell.min.min() >= GELU_FLOOR[cfg.gelu] and isinstance(cell, CellStats)


@pytest.mark.parametrize("sites", SITES)
def test_every_site_is_traced_without_changing_the_output(sites):
    mx.random.seed(0)
    model = MMDiT(get_preset("tiny").mmdit)
    cfg = model.config
    keys = mx.random.split(mx.random.key(1), 3)
    args = (mx.random.normal((2, 8, 8, cfg.in_channels), key=keys[0]), mx.array([700.0, 700.0]),
            mx.random.normal((2, 5, cfg.token_dim), key=keys[1]), mx.random.normal((2, cfg.pooled_dim), key=keys[2]))
    plain = np.array(model(*args))
    chosen = traced_sites(model, sites)
    stats = ActivationStats()
    with trace_ffn_activations(model, chosen.paths, stats, record=chosen.record) as tracer:
        tracer.timestep = 700.0
        out = model(*args)
        tracer.flush(out)
    np.testing.assert_array_equal(np.array(out), plain)
    assert sorted(stats.layers) == sorted(chosen.paths) and all(stats[n, 700].count.sum() > 0 for n in chosen.paths)


@pytest.mark.diffusionkit
def test_diffusionkit_mmdit_layers_get_the_same_names():
    dk_config = pytest.importorskip("diffusionkit.mlx.config", exc_type=ImportError)
    dk_mmdit = pytest.importorskip("diffusionkit.mlx.mmdit", exc_type=ImportError)
    config = dk_config.MMDiTConfig(depth_multimodal=3, hidden_size_override=64, num_heads=2, mlp_ratio=2,
                                   pooled_text_embed_dim=32, token_level_text_embed_dim=48, low_memory_mode=False,
                                   max_latent_resolution=16)
    paths = mmdit_layer_paths(dk_mmdit.MMDiT(config))
    assert list(paths) == ["mm_00_img", "mm_00_txt", "mm_01_img", "mm_01_txt", "mm_02_img"]
    assert paths["mm_01_txt"] == "multimodal_transformer_blocks.1.text_transformer_block.mlp.act_fn"
