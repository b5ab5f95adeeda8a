import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from taq.calibration import (
    calibrate,
    default_prompts,
    partial_path,
    read_prompts,
    sample_selected_steps,
    shuffled_points,
    trajectory_noise,
)
from taq.formats import TaqFormatError
from taq.formats.calibration import KIND, VERSION, load_calibration
from taq.formats.container import save_npz
from taq.loading import load_model
from taq.recipes import CalibrationRecipe
from taq.sampling import CFGDenoiser, flow_sigmas, model_timesteps, select_steps

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
# Small but not trivial: uneven last batch (5 = 2 + 2 + 1), more trajectories than prompts.
RECIPE = dict(num_trajectories=5, num_steps=6, num_selected=3, cfg_scale=1.5, resolution=8, seed=3, batch_size=2)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", random_weights=True)


def run(model, path, progress=False, **overrides):
    summary = calibrate(model, PROMPTS, **{**RECIPE, **overrides}, output=path, progress=progress)
    return summary, load_calibration(path)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One uninterrupted run of RECIPE; tests compare against it."""
    path = tmp_path_factory.mktemp("reference") / "cal.npz"
    return run(tiny, path)


# --- format -------------------------------------------------------------------------------------


def test_round_trip_has_every_key_with_the_documented_shapes(tiny, reference):
    summary, cal = reference
    k, t = RECIPE["num_selected"], RECIPE["num_trajectories"]
    assert summary.num_points == len(cal) == t * k
    assert cal.xs.shape == (t * k, 8, 8, 4) and cal.xs.dtype == np.float32
    assert cal.ts.shape == cal.prompt_indices.shape == cal.step_indices.shape == (t * k,)
    assert cal.prompts == PROMPTS and cal.cfg_scale == 1.5
    tokens, pooled = tiny.encode(PROMPTS)
    np.testing.assert_array_equal(cal.cs, np.array(tokens))
    np.testing.assert_array_equal(cal.cs_pooled, np.array(pooled))
    uncond_tokens, uncond_pooled = tiny.encode([""])
    np.testing.assert_array_equal(cal.cs_uncond, np.array(uncond_tokens)[0])
    np.testing.assert_array_equal(cal.cs_pooled_uncond, np.array(uncond_pooled)[0])
    meta = cal.meta
    assert (meta["model"], meta["weights_id"], meta["seed"], meta["resolution"]) == ("tiny", "random-seed-0", 3, 8)
    assert meta["latent_shape"] == [8, 8, 4] and meta["num_trajectories"] == 5 and meta["num_steps"] == 6
    assert meta["sigmas"] == flow_sigmas(6, 3.0).tolist() and meta["step_selection"] == "stride"
    assert meta["taq_version"] == taq.__version__ and "created" in meta


def test_points_are_every_trajectory_at_every_selected_step_with_its_prompt(reference):
    _, cal = reference
    selected = select_steps(RECIPE["num_steps"], RECIPE["num_selected"], "stride")
    assert cal.meta["selected_steps"] == selected
    pairs = sorted(zip(cal.trajectory_indices.tolist(), cal.step_indices.tolist()))
    assert pairs == [(i, s) for i in range(RECIPE["num_trajectories"]) for s in selected]
    np.testing.assert_array_equal(cal.prompt_indices, cal.trajectory_indices % len(PROMPTS))
    # the stored t is exactly the model's timestep of the point's step
    sigmas32 = flow_sigmas(RECIPE["num_steps"], 3.0).astype(np.float32)
    np.testing.assert_array_equal(cal.ts, sigmas32[cal.step_indices] * np.float32(1000))
    # the points are shuffled, not trajectory-major
    assert not np.array_equal(cal.trajectory_indices, np.sort(cal.trajectory_indices))


def test_step_zero_is_the_trajectorys_own_seeded_noise(reference):
    _, cal = reference
    at_zero = np.flatnonzero(cal.step_indices == 0)
    assert at_zero.size == RECIPE["num_trajectories"]
    for p in at_zero:
        expected = trajectory_noise(RECIPE["seed"], int(cal.trajectory_indices[p]), (8, 8, 4))
        np.testing.assert_array_equal(cal.xs[p], expected)


def test_linspace_rule_keeps_the_last_step(tiny, tmp_path):
    _, cal = run(tiny, tmp_path / "cal.npz", step_selection="linspace", num_trajectories=2)
    assert cal.meta["selected_steps"] == [0, 2, 5] and cal.meta["step_selection"] == "linspace"
    assert sorted(set(cal.step_indices.tolist())) == [0, 2, 5]


def _rewrite(source, target, change):
    with np.load(source) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    change(arrays, meta)
    for key in ("kind", "format_version"):
        meta.pop(key)
    save_npz(target, arrays, meta, kind=KIND, version=VERSION)


def _set(key, value):
    def change(arrays, meta):
        arrays[key] = value(arrays[key])
    return change


def _unused_prompt(arrays, meta):
    arrays["prompts"] = np.append(arrays["prompts"], "a prompt no point uses")
    for key in ("cs", "cs_pooled"):
        arrays[key] = np.concatenate([arrays[key], arrays[key][:1]])


def _nan_in_xs(arrays, meta):
    arrays["xs"] = arrays["xs"].copy()
    arrays["xs"][1, 0, 0, 0] = np.nan


@pytest.mark.parametrize("change, message", [
    (lambda a, m: a.pop("cs_pooled"), "missing key 'cs_pooled'"),
    (_set("xs", lambda x: x[..., 0]), "'xs' has shape"),
    (_set("xs", lambda x: x.astype(np.float64)), "'xs' has dtype float64"),
    (_set("prompt_indices", lambda x: x.astype(np.float32)), "'prompt_indices' has dtype float32"),
    (_nan_in_xs, "'xs' holds 1 NaN"),
    (_set("ts", lambda x: x[:-1]), "'ts' has 14 entries"),
    (_set("cs", lambda x: x[:-1]), "'cs' has 2 rows for 3 prompts"),
    (_set("cs_uncond", lambda x: x[:-1]), "'cs_uncond' has shape"),
    (_set("prompt_indices", lambda x: x + 1), "'prompt_indices' range [1, 3]"),
    (_set("ts", lambda x: x + 1), "'ts' does not match"),
    (_set("step_indices", lambda x: x + 1), "not among the selected steps"),
    (lambda a, m: m.pop("sigmas"), "metadata has no 'sigmas'"),
    (_unused_prompt, "1 of its 4 prompts are used by no point"),
])
def test_load_rejects_an_inconsistent_file(reference, tmp_path, change, message):
    summary, _ = reference
    bad = tmp_path / "bad.npz"
    _rewrite(summary.path, bad, change)
    with pytest.raises(TaqFormatError) as error:
        load_calibration(bad)
    assert message in str(error.value)


def test_load_rejects_another_kind_of_file(tmp_path):
    save_npz(tmp_path / "x.npz", {"a": np.zeros(2)}, {}, kind="taq-stats", version=1)
    with pytest.raises(TaqFormatError, match="'taq-stats' file, expected 'taq-calibration'"):
        load_calibration(tmp_path / "x.npz")


# --- batching and determinism -------------------------------------------------------------------


def test_batched_equals_one_trajectory_at_a_time(tiny, reference, tmp_path):
    _, batched = reference
    _, single = run(tiny, tmp_path / "single.npz", batch_size=1)
    for key in ("ts", "prompt_indices", "trajectory_indices", "step_indices"):
        np.testing.assert_array_equal(getattr(single, key), getattr(batched, key))
    np.testing.assert_allclose(single.xs, batched.xs, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(single.xs[single.step_indices > 0], np.zeros(1))  # the steps did move


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tiny, reference, tmp_path):
    _, first = reference
    _, again = run(tiny, tmp_path / "again.npz")
    assert again.xs.tobytes() == first.xs.tobytes() and again.ts.tobytes() == first.ts.tobytes()
    _, other = run(tiny, tmp_path / "other.npz", seed=4)
    assert not np.array_equal(other.xs, first.xs)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32))
def test_shuffle_is_a_seeded_bijection_onto_trajectory_step_pairs(num_trajectories, num_selected, seed):
    trajectories, positions = shuffled_points(num_trajectories, num_selected, seed)
    flat = trajectories * num_selected + positions
    assert sorted(flat.tolist()) == list(range(num_trajectories * num_selected))
    again = shuffled_points(num_trajectories, num_selected, seed)
    assert np.array_equal(again[0], trajectories) and np.array_equal(again[1], positions)


def test_noise_depends_on_seed_and_index_only():
    a = trajectory_noise(1, 7, (2, 2, 3))
    assert a.dtype == np.float32 and a.shape == (2, 2, 3)
    np.testing.assert_array_equal(a, trajectory_noise(1, 7, (2, 2, 3)))
    assert not np.array_equal(a, trajectory_noise(1, 8, (2, 2, 3)))
    assert not np.array_equal(a, trajectory_noise(2, 7, (2, 2, 3)))


# --- resume -------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def interrupt_after(trajectories):
    def on_batch(finished):
        if finished >= trajectories:
            raise Interrupt
    return on_batch


def test_interrupted_run_resumes_to_the_same_file(tiny, reference, tmp_path):
    _, uninterrupted = reference
    path = tmp_path / "cal.npz"
    with pytest.raises(Interrupt):
        calibrate(tiny, PROMPTS, **RECIPE, output=path, progress=False, on_batch=interrupt_after(4))
    assert not path.exists()
    with np.load(partial_path(path)) as partial:
        assert partial["xs"].shape == (4, RECIPE["num_selected"], 8, 8, 4)  # two finished batches, nothing more
    finished = []
    summary = calibrate(tiny, PROMPTS, **RECIPE, output=path, progress=False, on_batch=finished.append)
    assert summary.resumed_trajectories == 4 and finished == [5]
    assert not partial_path(path).exists()
    resumed = load_calibration(path)
    for key in ("xs", "ts", "prompt_indices", "trajectory_indices", "step_indices", "cs", "cs_pooled"):
        assert getattr(resumed, key).tobytes() == getattr(uninterrupted, key).tobytes(), key


def test_partial_from_another_recipe_is_refused_and_kept(tiny, tmp_path):
    path = tmp_path / "cal.npz"
    with pytest.raises(Interrupt):
        calibrate(tiny, PROMPTS, **RECIPE, output=path, progress=False, on_batch=interrupt_after(2))
    before = partial_path(path).read_bytes()
    with pytest.raises(ValueError, match=r"different recipe \(differs in: cfg_scale\).*--no-resume"):
        calibrate(tiny, PROMPTS, **{**RECIPE, "cfg_scale": 2.0}, output=path, progress=False)
    assert partial_path(path).read_bytes() == before and not path.exists()
    summary = calibrate(tiny, PROMPTS, **{**RECIPE, "cfg_scale": 2.0}, output=path, progress=False, resume=False)
    assert summary.resumed_trajectories == 0 and path.exists() and not partial_path(path).exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(num_selected=7), "cannot select 7 steps out of 6"),
    (dict(resolution=9), "resolution 9 must be a positive multiple of 2"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(step_selection="random"), "unknown step selection rule 'random'"),
    (dict(seed=-1), "seed must be >= 0"),
])
def test_bad_arguments_fail_before_writing_anything(tiny, tmp_path, overrides, message):
    path = tmp_path / "cal.npz"
    with pytest.raises(ValueError, match=message):
        calibrate(tiny, PROMPTS, **{**RECIPE, **overrides}, output=path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_empty_prompts_fail(tiny, tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        calibrate(tiny, [], **RECIPE, output=tmp_path / "cal.npz", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- memory: only the selected steps are kept ---------------------------------------------------


class CountingModel:
    """Delegates to an MMDiT, counting calls and keeping each call's timesteps."""

    def __init__(self, mmdit):
        self.mmdit, self.timesteps = mmdit, []

    def __getattr__(self, name):
        return getattr(self.mmdit, name)

    def __call__(self, x, t, tokens, pooled):
        self.timesteps.append(np.array(t))
        return self.mmdit(x, t, tokens, pooled)


def test_sampler_keeps_the_selected_steps_and_stops_after_the_last(tiny):
    counting = CountingModel(tiny.mmdit)
    tokens, pooled = tiny.encode(PROMPTS[:2])
    denoiser = CFGDenoiser(counting, (tokens, pooled), tiny.encode([""]), scale=1.5)
    x = mx.array(np.stack([trajectory_noise(0, i, (8, 8, 4)) for i in range(2)]))
    sigmas = flow_sigmas(10)
    out = sample_selected_steps(denoiser, x, sigmas, [0, 3, 6])
    assert out.shape == (2, 3, 8, 8, 4) and out.dtype == np.float32
    assert len(counting.timesteps) == 6  # steps 0..5 feed x_6; steps 6..9 are never run
    assert all(t.shape == (4,) for t in counting.timesteps)  # 2 trajectories, 4 rows with CFG
    np.testing.assert_array_equal(out[:, 0], np.array(x))
    np.testing.assert_array_equal(np.stack([t[0] for t in counting.timesteps]), model_timesteps(sigmas[:6]))


def test_run_stores_exactly_the_timesteps_the_model_saw(tiny, tmp_path):
    counting = CountingModel(tiny.mmdit)
    model = dataclasses.replace(tiny, mmdit=counting)
    _, cal = run(model, tmp_path / "cal.npz")
    seen = {float(t[0]) for t in counting.timesteps}
    last = max(cal.meta["selected_steps"])  # the last selected step's x_t is kept, its model call never runs
    assert {float(t) for t in cal.ts[cal.step_indices < last]} == seen & {float(t) for t in cal.ts}
    assert len(seen) == last
    # 3 batches, each stops at the last selected step (4 of 6): 4 model calls per batch
    assert len(counting.timesteps) == 3 * last


def test_partial_file_holds_only_finished_trajectories_selected_steps(tiny, tmp_path):
    path = tmp_path / "cal.npz"
    sizes = []

    def record(finished):
        with np.load(partial_path(path)) as partial:
            sizes.append(partial["xs"].shape)

    calibrate(tiny, PROMPTS, **RECIPE, output=path, progress=False, on_batch=record)
    assert sizes == [(n, RECIPE["num_selected"], 8, 8, 4) for n in (2, 4, 5)]


# --- prompts ------------------------------------------------------------------------------------


def test_shipped_prompt_lists():
    from taq.pocket.prompts import CALIBRATION_PROMPTS

    assert default_prompts("pocket") == list(CALIBRATION_PROMPTS)
    sd3 = default_prompts("sd3-medium")
    assert len(sd3) == len(set(sd3)) == 20 and all(p.strip() == p and p for p in sd3)
    assert default_prompts("tiny") == sd3


def test_prompts_file_drops_blank_lines_and_whitespace(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a cat \n\n\ta dog\n   \n")
    assert read_prompts(path) == ["a cat", "a dog"]


def test_recipe_defaults_are_the_papers():
    recipe = CalibrationRecipe()
    assert (recipe.num_trajectories, recipe.num_steps, recipe.num_selected, recipe.cfg_scale) == (256, 100, 25, 1.5)
    assert recipe.selected_steps == list(range(0, 100, 4))
