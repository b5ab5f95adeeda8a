import json
import math

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from mlx.utils import tree_flatten

import taq.profiling
from taq.formats.calibration import CalibrationSet, load_calibration
from taq.formats.container import META_KEY, TaqFormatError, file_sha256, save_npz
from taq.formats.stats import load_stats, save_stats
from taq.loading import load_model
from taq.profiling import profile
from taq.tracing.plan import ForwardBatch, batch_inputs, plan_batches, sample_points
from taq.tracing import ActivationStats, CellStats, HistogramSpec, mmdit_layer_paths, trace_ffn_activations

TANH_GELU_MIN = -0.17004075  # at x = -0.7525; float32 rounding of the activation may reach 1e-6 lower
FLOAT32_SLACK = 1e-6


# --------------------------------------------------------------------------- helpers


def module_identities(model: nn.Module) -> dict[str, int]:
    return {path: id(module) for path, module in model.named_modules()}


def read_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------- end to end


def test_profile_writes_stats_of_every_layer_at_the_sampled_timesteps(tiny_model, tiny_calibration, tmp_path):
    output = tmp_path / "stats.npz"
    summary = profile(tiny_model, tiny_calibration, num_samples=12, seed=1, batch_size=3, output=output,
                      progress=False)
    cal, loaded = load_calibration(tiny_calibration), load_stats(output)
    sampled = np.array(loaded.meta["sampled_points"])
    assert len(set(sampled.tolist())) == 12 and summary.num_samples == 12
    timesteps, points_per_t = np.unique(cal.ts[sampled], return_counts=True)
    assert loaded.stats.layers == summary.layers == ("mm_00_img", "mm_00_txt", "mm_01_img")
    assert loaded.stats.timesteps == summary.timesteps == tuple(float(t) for t in timesteps)
    assert summary.num_forwards == sum(math.ceil(n / 3) for n in points_per_t) == loaded.meta["num_forwards"]
    tokens = {"img": (16 // 2) ** 2, "txt": cal.cs.shape[1]}
    for i, layer in enumerate(loaded.stats.layers):  # both CFG rows of every point, every token, every channel
        expected = 2 * points_per_t[:, None] * tokens[layer[-3:]]
        np.testing.assert_array_equal(loaded.arrays["count"][i], np.broadcast_to(expected, (len(timesteps), 256)))
    assert loaded.arrays["present"].all()
    meta = loaded.meta
    assert meta["calibration_sha256"] == file_sha256(tiny_calibration)
    assert (meta["model"], meta["weights_id"], meta["seed"], meta["gelu"]) == ("tiny", "random-seed-0", 1, "tanh")
    assert meta["hist_spec"] == {"bins": 4096, "scale": 1 / 64, "limit": 65536.0}
    assert "both rows are counted" in meta["rows"]
    assert summary.line().startswith(f"wrote statistics of 3 layers x {len(timesteps)} timesteps from 12 points")


def test_stats_equal_numpy_over_the_same_captured_activations(tiny_model, tiny_calibration, tmp_path):
    spec = HistogramSpec(bins=40, scale=0.01, limit=0.3)  # narrow: both end bins get counts
    layer = "mm_01_img"
    cal = load_calibration(tiny_calibration)
    ffn = tiny_model.mmdit.joint_blocks[1].x_block.mlp
    captured = {}

    class Capture(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def __call__(self, x):
            out = self.act(x)
            captured.setdefault(timestep, []).append(np.array(out).reshape(-1, out.shape[-1]))
            return out

    original = ffn.act
    ffn.act = Capture(original)
    try:
        for batch in plan_batches(cal, 16, seed=0, batch_size=3):
            timestep = batch.timestep
            mx.eval(tiny_model.mmdit(*batch_inputs(cal, batch)))
    finally:
        ffn.act = original

    profile(tiny_model, tiny_calibration, num_samples=16, seed=0, batch_size=3, layers=[layer], hist_spec=spec,
            output=tmp_path / "stats.npz", progress=False)
    stats = load_stats(tmp_path / "stats.npz").stats
    assert stats.timesteps == tuple(sorted(captured))
    for timestep, chunks in captured.items():
        values = np.concatenate(chunks)  # (rows * tokens, C) float32
        cell = stats[layer, timestep]
        np.testing.assert_array_equal(cell.count, np.full(values.shape[1], values.shape[0]))
        np.testing.assert_allclose(cell.mean, values.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(cell.std, values.astype(np.float64).std(axis=0), rtol=1e-5)
        np.testing.assert_array_equal(cell.min, values.min(axis=0))
        np.testing.assert_array_equal(cell.max, values.max(axis=0))
        np.testing.assert_array_equal(cell.hist, np.histogram(values, bins=spec.bin_edges)[0])
        assert cell.hist[-1] == (values >= spec.limit).sum() > 0 and cell.hist.sum() == values.size
        assert (cell.negative, cell.zero) == ((values < 0).sum(), (values == 0).sum())


# --------------------------------------------------------------------------- the plan


def fake_calibration(num_points: int, num_timesteps: int, num_prompts: int, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    return CalibrationSet(
        xs=np.zeros((num_points, 2, 2, 1), np.float32),
        ts=rng.choice(np.linspace(0, 1000, num_timesteps, dtype=np.float32), num_points),
        prompt_indices=rng.integers(0, num_prompts, num_points), trajectory_indices=np.arange(num_points),
        step_indices=np.zeros(num_points, int), cs=np.zeros((num_prompts, 3, 4), np.float32),
        cs_pooled=np.zeros((num_prompts, 5), np.float32), cs_uncond=np.zeros((3, 4), np.float32),
        cs_pooled_uncond=np.zeros(5, np.float32), prompts=["p"] * num_prompts, cfg_scale=1.5, meta={})


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60).flatmap(lambda p: st.tuples(st.just(p), st.integers(1, p))),
       st.integers(1, 5), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_plan_covers_the_sample_in_fewest_batches_of_one_timestep(sizes, num_timesteps, num_prompts, batch_size,
                                                                  seed):
    num_points, num_samples = sizes
    cal = fake_calibration(num_points, num_timesteps, num_prompts, seed)
    batches = plan_batches(cal, num_samples, seed, batch_size)
    points = np.concatenate([b.points for b in batches])
    assert sorted(points.tolist()) == sorted(sample_points(num_points, num_samples, seed).tolist())
    assert len(set(points.tolist())) == num_samples
    for b in batches:
        assert 1 <= len(b.points) <= batch_size and np.all(cal.ts[b.points] == np.float32(b.timestep))
    _, per_timestep = np.unique(cal.ts[points], return_counts=True)
    assert len(batches) == sum(math.ceil(n / batch_size) for n in per_timestep)


def test_sampling_picks_every_point_equally_often():
    picks = np.bincount(np.concatenate([sample_points(10, 3, seed) for seed in range(3000)]), minlength=10)
    assert np.all(np.abs(picks - 900) < 5 * math.sqrt(3000 * 0.3 * 0.7))  # 5 sigma of a binomial


@pytest.mark.parametrize("num_samples, batch_size, message", [
    (17, 4, "num_samples 17 exceeds the 16 points of the calibration set"),
    (0, 4, "num_samples must be a positive integer, got 0"),
    (4, 0, "batch_size must be a positive integer, got 0"),
])
def test_impossible_plans_are_refused(tiny_calibration, num_samples, batch_size, message):
    with pytest.raises(ValueError, match=message):
        plan_batches(load_calibration(tiny_calibration), num_samples, 0, batch_size)


def test_batch_rows_are_conditional_then_unconditional(tiny_calibration):
    cal = load_calibration(tiny_calibration)
    points = np.flatnonzero(cal.ts == cal.ts[0])[:3]
    x, t, tokens, pooled = (np.array(a) for a in batch_inputs(cal, ForwardBatch(float(cal.ts[0]), points)))
    prompts = cal.prompt_indices[points]
    np.testing.assert_array_equal(x, np.concatenate([cal.xs[points], cal.xs[points]]))
    np.testing.assert_array_equal(t, np.full(6, cal.ts[0]))
    np.testing.assert_array_equal(tokens[:3], cal.cs[prompts])
    np.testing.assert_array_equal(pooled[:3], cal.cs_pooled[prompts])
    np.testing.assert_array_equal(tokens[3:], np.broadcast_to(cal.cs_uncond, (3,) + cal.cs_uncond.shape))
    np.testing.assert_array_equal(pooled[3:], np.broadcast_to(cal.cs_pooled_uncond, (3, cal.cs_pooled.shape[1])))


# --------------------------------------------------------------------------- the pocket model


def test_no_traced_value_lies_below_the_gelu_floor_on_any_pocket_layer(pocket_model, pocket_calibration, tmp_path):
    assert pocket_model.mmdit.config.gelu == "tanh"
    profile(pocket_model, pocket_calibration, num_samples=16, output=tmp_path / "stats.npz", progress=False)
    loaded = load_stats(tmp_path / "stats.npz")
    assert len(loaded.stats.layers) == 11  # 6 image FFNs, 5 text FFNs (the last block's text stream has none)
    lowest = np.nanmin(loaded.arrays["min"], axis=(1, 2))  # (L,)
    assert np.all(lowest >= TANH_GELU_MIN - FLOAT32_SLACK), dict(zip(loaded.stats.layers, lowest))
    assert np.all(lowest < -0.1)  # the negative lobe is reached, so the bound is tested, not vacuous


def test_the_floor_catches_a_tracer_hooked_before_the_gelu(pocket_model, pocket_calibration):
    cal = load_calibration(pocket_calibration)
    stats = ActivationStats()
    with trace_ffn_activations(pocket_model.mmdit, {"mm_00_img": "joint_blocks.0.x_block.mlp.fc1"}, stats) as tracer:
        tracer.timestep = float(cal.ts[0])
        tracer.flush(pocket_model.mmdit(*batch_inputs(cal, ForwardBatch(float(cal.ts[0]), np.array([0, 1])))))
    (_, cell), = stats.items()
    assert cell.min.min() < TANH_GELU_MIN - FLOAT32_SLACK


def test_tracing_leaves_the_pocket_models_output_bit_identical(pocket_model, pocket_calibration):
    cal = load_calibration(pocket_calibration)
    batch = plan_batches(cal, 16, seed=0, batch_size=8)[0]
    inputs = batch_inputs(cal, batch)
    untraced = np.array(pocket_model.mmdit(*inputs))
    with trace_ffn_activations(pocket_model.mmdit, mmdit_layer_paths(pocket_model.mmdit), ActivationStats()) as tr:
        tr.timestep = batch.timestep
        traced = pocket_model.mmdit(*inputs)
        tr.flush(traced)
    np.testing.assert_array_equal(np.array(traced), untraced)
    np.testing.assert_array_equal(np.array(pocket_model.mmdit(*inputs)), untraced)


def test_profile_restores_the_models_modules(pocket_model, pocket_calibration, tmp_path):
    def parameter_paths():
        return [path for path, _ in tree_flatten(pocket_model.mmdit.parameters())]

    before, parameters = module_identities(pocket_model.mmdit), parameter_paths()
    profile(pocket_model, pocket_calibration, num_samples=4, output=tmp_path / "stats.npz", progress=False)
    assert module_identities(pocket_model.mmdit) == before
    assert parameter_paths() == parameters  # no wrapper left in the parameter paths


def test_a_failing_run_restores_the_modules_and_writes_nothing(tiny_model, tiny_calibration, tmp_path, monkeypatch):
    before = module_identities(tiny_model.mmdit)
    real, calls = batch_inputs, []

    def fail_on_second_batch(cal, batch):
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(cal, batch)

    monkeypatch.setattr(taq.profiling, "batch_inputs", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        profile(tiny_model, tiny_calibration, num_samples=8, batch_size=2, output=tmp_path / "stats.npz",
                progress=False)
    assert module_identities(tiny_model.mmdit) == before
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- determinism and layers


def test_the_same_seed_gives_identical_arrays_and_another_seed_other_points(tiny_model, tiny_calibration, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        profile(tiny_model, tiny_calibration, num_samples=8, seed=seed, batch_size=3, output=tmp_path / f"{name}.npz",
                progress=False)
        runs[name] = read_npz(tmp_path / f"{name}.npz")
    assert runs["a"].keys() == runs["b"].keys()
    for key in runs["a"]:
        assert runs["a"][key].dtype == runs["b"][key].dtype
        assert runs["a"][key].tobytes() == runs["b"][key].tobytes(), key
    sampled = {name: json.loads(str(arrays[META_KEY]))["sampled_points"] for name, arrays in runs.items()}
    assert sampled["a"] == sampled["b"] != sampled["c"]


def test_layers_filter_keeps_only_the_named_layers(tiny_model, tiny_calibration, tmp_path):
    summary = profile(tiny_model, tiny_calibration, num_samples=4, layers=["mm_01_img", "mm_00_txt"],
                      output=tmp_path / "stats.npz", progress=False)
    loaded = load_stats(tmp_path / "stats.npz")
    assert summary.layers == loaded.stats.layers == ("mm_00_txt", "mm_01_img")
    assert loaded.meta["layer_paths"] == {"mm_00_txt": "joint_blocks.0.context_block.mlp.act",
                                          "mm_01_img": "joint_blocks.1.x_block.mlp.act"}


@pytest.mark.parametrize("layers, message", [(["mm_09_img"], r"unknown layers \['mm_09_img'\]"),
                                             ([], "layers is empty")])
def test_bad_layer_selections_are_refused(tiny_model, tiny_calibration, tmp_path, layers, message):
    with pytest.raises(ValueError, match=message):
        profile(tiny_model, tiny_calibration, num_samples=4, layers=layers, output=tmp_path / "s.npz", progress=False)
    assert not (tmp_path / "s.npz").exists()


# --------------------------------------------------------------------------- bad calibration files


def rewrite(source, target, change):
    """Copy a calibration file to `target` after `change(arrays, meta)` edits it in place."""
    arrays = read_npz(source)
    meta = json.loads(str(arrays.pop(META_KEY)))
    change(arrays, meta)
    save_npz(target, arrays, meta, kind=meta["kind"], version=meta["format_version"])


def set_nan(key):
    def change(arrays, meta):
        arrays[key] = arrays[key].copy()
        arrays[key].flat[3] = np.nan
    return change


BAD_CALIBRATIONS = {
    "missing key": (lambda a, m: a.pop("cs_pooled"), TaqFormatError, "missing key 'cs_pooled'"),
    "short ts": (lambda a, m: a.update(ts=a["ts"][:-1]), TaqFormatError, "'ts' has 15 entries, 'xs' has 16 points"),
    "2-d latents": (lambda a, m: a.update(xs=a["xs"][..., 0]), TaqFormatError, "'xs' has shape"),
    "float64 xs": (lambda a, m: a.update(xs=a["xs"].astype(np.float64)), TaqFormatError, "expected float32"),
    "nan latent": (set_nan("xs"), TaqFormatError, "'xs' holds 1 NaN or inf"),
    "nan embedding": (set_nan("cs"), TaqFormatError, "'cs' holds NaN or inf"),
    "wrong kind": (lambda a, m: m.update(kind="taq-stats"), TaqFormatError, "expected 'taq-calibration'"),
    "wider tokens": (lambda a, m: a.update(cs=np.pad(a["cs"], ((0, 0), (0, 0), (0, 1))),
                                           cs_uncond=np.pad(a["cs_uncond"], ((0, 0), (0, 1)))),
                     ValueError, "token embeddings are 49 wide, the model takes 48"),
}


@pytest.mark.parametrize("case", BAD_CALIBRATIONS)
def test_bad_calibration_files_are_refused_before_anything_is_written(tiny_model, tiny_calibration, tmp_path,
                                                                      case):
    change, error, message = BAD_CALIBRATIONS[case]
    rewrite(tiny_calibration, tmp_path / "bad.npz", change)
    with pytest.raises(error, match=message):
        profile(tiny_model, tmp_path / "bad.npz", num_samples=4, output=tmp_path / "stats.npz", progress=False)
    assert not (tmp_path / "stats.npz").exists()


def test_files_that_are_not_taq_calibrations_are_refused(tiny_model, tmp_path):
    np.savez(tmp_path / "plain.npz", xs=np.zeros((2, 4, 4, 4), np.float32))
    (tmp_path / "text.npz").write_text("hello")
    for name, message in (("plain.npz", "no __meta__ record; not a taq taq-calibration file"),
                          ("text.npz", "not a taq .npz file"), ("absent.npz", "no such file")):
        with pytest.raises(TaqFormatError, match=message):
            profile(tiny_model, tmp_path / name, num_samples=1, output=tmp_path / "stats.npz", progress=False)
    assert not (tmp_path / "stats.npz").exists()


def test_a_calibration_of_another_model_is_refused_naming_both(pocket_model, tiny_calibration, tmp_path):
    with pytest.raises(ValueError, match=r"made with 'tiny' and does not fit model 'pocket': latents have 4 "
                                         r"channels, the model takes 1"):
        profile(pocket_model, tiny_calibration, num_samples=4, output=tmp_path / "stats.npz", progress=False)


def test_a_calibration_of_other_weights_warns(tiny_calibration, tmp_path):
    with pytest.warns(UserWarning, match="other weights of 'tiny'"):
        profile(load_model("tiny", seed=1, random_weights=True), tiny_calibration, num_samples=2,
                output=tmp_path / "s.npz", progress=False)


# --------------------------------------------------------------------------- the stats file


@pytest.fixture
def some_stats() -> ActivationStats:
    rng = np.random.default_rng(0)
    spec = HistogramSpec(bins=16, scale=0.5, limit=2.0)
    stats = ActivationStats(spec, ["mm_00_img", "mm_00_txt"])
    for layer, timestep in (("mm_00_img", 250.0), ("mm_00_img", 750.0), ("mm_00_txt", 750.0)):  # one cell absent
        stats.update(layer, timestep, CellStats.from_activations(mx.array(rng.normal(size=(7, 5)) * 2), spec))
    return stats


def test_save_and_load_stats_round_trip(some_stats, tmp_path):
    save_stats(tmp_path / "s.npz", some_stats, {"seed": 3, "note": "x"})
    loaded = load_stats(tmp_path / "s.npz")
    expected = some_stats.to_arrays()
    assert loaded.arrays.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded.arrays[key].dtype == value.dtype and np.array_equal(loaded.arrays[key], value,
                                                                          equal_nan=key != "layers"), key
    assert loaded.stats.layers == some_stats.layers and loaded.stats.timesteps == some_stats.timesteps
    assert (loaded.meta["seed"], loaded.meta["note"], loaded.meta["kind"]) == (3, "x", "taq-stats")
    assert not loaded.arrays["present"][1, 0]


BAD_STATS = {
    "missing key": (lambda a, m: a.pop("hist"), "missing key 'hist'"),
    "shape mismatch": (lambda a, m: a.update(mean=a["mean"][..., :4]), r"'mean' has shape \(2, 2, 4\)"),
    "derived key off": (lambda a, m: a.update(std=a["std"] * 2), "'std' is inconsistent"),
    "wrong kind": (lambda a, m: m.update(kind="taq-calibration"), "expected 'taq-stats'"),
    "newer version": (lambda a, m: m.update(format_version=3), "format version 3"),
    "histogram short of a finite value": (lambda a, m: a["hist"][0, 0].__setitem__(0, a["hist"][0, 0, 0] - 1),
                                          "inconsistent counts"),
}


@pytest.mark.parametrize("case", BAD_STATS)
def test_load_stats_refuses_bad_files_naming_the_problem(some_stats, tmp_path, case):
    change, message = BAD_STATS[case]
    save_stats(tmp_path / "good.npz", some_stats, {})
    rewrite(tmp_path / "good.npz", tmp_path / "bad.npz", change)
    with pytest.raises(TaqFormatError, match=message):
        load_stats(tmp_path / "bad.npz")


def test_cfg_branches_are_kept_apart_and_their_union_is_the_layer(tiny_model, tiny_calibration, tmp_path):
    summary = profile(tiny_model, tiny_calibration, num_samples=12, batch_size=4, output=tmp_path / "b.npz",
                      progress=False, branches=True)
    profile(tiny_model, tiny_calibration, num_samples=12, batch_size=4, output=tmp_path / "a.npz", progress=False)
    both, plain = load_stats(tmp_path / "b.npz"), load_stats(tmp_path / "a.npz")
    names = list(both.arrays["layers"])
    base = list(plain.arrays["layers"])
    assert names == [n for layer in base for n in (layer, f"{layer}:cond", f"{layer}:uncond")]
    assert "conditional and unconditional" in both.meta["branches"]
    assert summary.layers == tuple(names) and f"{len(names)} layers" in summary.line()
    from taq.report.plots import default_layers
    assert set(default_layers(names)) <= set(base)  # the default figures pick whole layers, not branches
    for layer in base:
        i, c, u, k = names.index(layer), names.index(f"{layer}:cond"), names.index(f"{layer}:uncond"), base.index(layer)
        for key in ("count", "hist", "min", "max", "mean", "m2"):  # the union is exactly the layer without branches
            np.testing.assert_array_equal(both.arrays[key][i], plain.arrays[key][k], err_msg=key)
        a = both.arrays
        np.testing.assert_array_equal(a["count"][c] + a["count"][u], a["count"][i])
        np.testing.assert_array_equal(a["hist"][c] + a["hist"][u], a["hist"][i])
        np.testing.assert_array_equal(np.fmin(a["min"][c], a["min"][u]), a["min"][i])
        assert not np.array_equal(a["mean"][c], a["mean"][u])  # the two prompts' rows differ


@pytest.mark.parametrize("sites, roles, width", [("linear-inputs", ("qkv", "proj", "fc1"), "hidden"),
                                                 ("adaln", ("adaln",), "6 hidden"),
                                                 ("attention", ("attn",), "heads")])
def test_other_sites_trace_the_linear_inputs_or_the_modulation(tiny_model, tiny_calibration, tmp_path, sites, roles,
                                                                width):
    from taq.tracing.sites import linear_sites, site_role

    profile(tiny_model, tiny_calibration, num_samples=8, output=tmp_path / "s.npz", progress=False, sites=sites)
    stats = load_stats(tmp_path / "s.npz")
    config = tiny_model.mmdit.config
    hidden = config.hidden_size
    expected = [n.replace(".fc2", ".attn") for n in linear_sites(tiny_model.mmdit) if site_role(n) in roles
                or (sites == "attention" and site_role(n) == "fc2")]
    if sites == "adaln":  # the last text block modulates only its qkv: another width, left out
        last_txt = f"mm_{tiny_model.mmdit.config.depth - 1:02d}_txt.adaln"
        expected.remove(last_txt)
        assert stats.meta["left_out"]["sites"] == [last_txt]
    assert sorted(stats.arrays["layers"]) == sorted(expected)
    heads = config.num_heads
    assert stats.arrays["count"].shape[-1] == {"hidden": hidden, "6 hidden": 6 * hidden, "heads": heads}[width]
    assert stats.meta["recorded"] == {"linear-inputs": "module inputs", "adaln": "module outputs",
                                      "attention": "attention probabilities, one channel per head"}[sites]
    counts = stats.arrays["count"].sum(axis=(1, 2))
    if sites == "attention":  # probabilities: each query stream's rows over all keys, and a row sums to 1
        layers = list(stats.arrays["layers"])
        assert stats.arrays["min"].min() >= 0 and stats.arrays["max"].max() <= 1
        a = stats.arrays
        img, txt = (layers.index(f"mm_00_{s}.attn") for s in ("img", "txt"))
        seen = a["count"][img].sum(-1) > 0
        keys = 1 / a["mean"][img][seen].mean()  # every probability row sums to 1 over its keys
        np.testing.assert_allclose(a["mean"][[img, txt]][:, seen], 1 / keys, rtol=1e-4)
        # both streams' queries together are all keys: rows x keys x keys probabilities per head
        np.testing.assert_array_equal(a["count"][img].sum(0) + a["count"][txt].sum(0), round(2 * 8 * keys**2))
    elif sites == "linear-inputs":  # every Linear of a stream sees each of its tokens once per row
        assert len(set(counts[[list(stats.arrays["layers"]).index(n) for n in expected
                               if n.startswith("mm_00_img")]])) == 1
    else:  # the modulation runs once per row, not per token
        assert set(counts) == {2 * 8 * 6 * hidden}
