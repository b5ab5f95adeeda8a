import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from taq.sampling.euler import CFGDenoiser, euler_steps, euler_update, sample
from taq.sampling.schedule import flow_sigmas

H, W, C = 3, 2, 4
TOKENS, TOKEN_DIM, POOLED_DIM = 5, 6, 7


def make_toy_model(seed=0):
    """Small nonlinear velocity model that depends on x, t, tokens and pooled, row by row."""
    k = mx.random.split(mx.random.key(seed), 3)
    w_x = mx.random.normal((C, C), key=k[0]) / C**0.5
    w_tokens = mx.random.normal((TOKEN_DIM, C), key=k[1])
    w_pooled = mx.random.normal((POOLED_DIM, C), key=k[2])

    def model(x, t, tokens, pooled):
        text = mx.tanh(tokens.mean(axis=1) @ w_tokens + pooled @ w_pooled)  # (B, C)
        time = mx.sin(t / 300.0)[:, None, None, None]  # (B, 1, 1, 1)
        h = x @ w_x + text[:, None, None, :] + time
        return mx.tanh(h) * (1.0 + time) + 0.1 * x * x.mean(axis=(1, 2, 3), keepdims=True)

    return model


def conditioning(rows, seed):
    k = mx.random.split(mx.random.key(seed), 2)
    tokens = mx.random.normal((rows, TOKENS, TOKEN_DIM), key=k[0])
    return tokens, mx.random.normal((rows, POOLED_DIM), key=k[1])


def noise(rows, seed=1):
    return mx.random.normal((rows, H, W, C), key=mx.random.key(seed))


class RecordingModel:
    """Wraps a model and keeps every call's inputs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, tokens, pooled):
        self.calls.append((x, t, tokens, pooled))
        return self.model(x, t, tokens, pooled)


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=atol)


# --- batching -----------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 4),
    scale=st.floats(0.0, 8.0),
    uncond_rows_one=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batched_trajectories_match_each_trajectory_alone(rows, scale, uncond_rows_one, seed):
    model, sigmas = make_toy_model(seed), flow_sigmas(6)
    cond, x = conditioning(rows, seed + 1), noise(rows, seed + 2)
    uncond = conditioning(1 if uncond_rows_one else rows, seed + 3)
    batched = sample(CFGDenoiser(model, cond, uncond, scale), x, sigmas)
    for i in range(rows):
        row = slice(i, i + 1)
        uncond_i = uncond if uncond_rows_one else (uncond[0][row], uncond[1][row])
        alone = sample(CFGDenoiser(model, (cond[0][row], cond[1][row]), uncond_i, scale), x[row], sigmas)
        assert_close(batched[row], alone)


# --- classifier-free guidance -------------------------------------------------------------------


def plain_conditional_euler(model, cond, x, sigmas):
    """Reference written out independently: (x - denoised) / sigma is the velocity itself."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = mx.full((x.shape[0],), 1000.0 * sigma)
        x = x + (sigma_next - sigma) * model(x, t, *cond)
    return x


def test_guidance_scale_one_runs_only_conditional_rows_and_equals_conditional_sampling():
    recording, sigmas = RecordingModel(make_toy_model()), flow_sigmas(10)
    cond, x = conditioning(3, 5), noise(3)
    final = sample(CFGDenoiser(recording, cond, uncond=None, scale=1.0), x, sigmas)
    assert [call[0].shape[0] for call in recording.calls] == [3] * 10
    assert_close(final, plain_conditional_euler(make_toy_model(), cond, x, sigmas))


def test_guidance_other_than_one_without_uncond_is_rejected():
    with pytest.raises(ValueError, match="scale 4.5"):
        CFGDenoiser(make_toy_model(), conditioning(2, 0), uncond=None, scale=4.5)


def test_conditional_rows_come_first():
    # v = first pooled feature per row, so each branch's denoised value is x - sigma * pooled[:, 0].
    def branch_model(x, t, tokens, pooled):
        return mx.broadcast_to(pooled[:, :1, None, None], x.shape)

    cond = (mx.zeros((2, TOKENS, TOKEN_DIM)), mx.full((2, POOLED_DIM), 1.0))
    uncond = (mx.zeros((1, TOKENS, TOKEN_DIM)), mx.full((1, POOLED_DIM), 5.0))
    x, sigma, scale = noise(2), 0.5, 3.0
    guided = CFGDenoiser(branch_model, cond, uncond, scale)(x, mx.array(sigma))
    # uncond + scale * (cond - uncond) on v: 5 + 3 * (1 - 5) = -7 (swapped rows would give 13).
    assert_close(guided, x - sigma * -7.0)


def test_model_sees_two_b_rows_at_t_1000_sigma_with_uncond_broadcast():
    recording = RecordingModel(make_toy_model())
    cond, uncond = conditioning(3, 0), conditioning(1, 1)
    CFGDenoiser(recording, cond, uncond, 2.0)(noise(3), mx.array(0.25))
    (x, t, tokens, pooled), = recording.calls
    assert x.shape[0] == t.shape[0] == tokens.shape[0] == pooled.shape[0] == 6
    assert_close(t, np.full(6, 250.0))
    assert_close(pooled[:3], cond[1])
    assert_close(pooled[3:], np.repeat(np.array(uncond[1]), 3, axis=0))


@pytest.mark.parametrize(
    "cond_rows, uncond_rows, tokens_len, match",
    [(3, 2, TOKENS, "expected 3"), (2, 2, TOKENS + 1, "do not match")],
)
def test_mismatched_unconditional_embeddings_are_rejected(cond_rows, uncond_rows, tokens_len, match):
    uncond = (mx.zeros((uncond_rows, tokens_len, TOKEN_DIM)), mx.zeros((uncond_rows, POOLED_DIM)))
    with pytest.raises(ValueError, match=match):
        CFGDenoiser(make_toy_model(), conditioning(cond_rows, 0), uncond, 2.0)


def test_latent_rows_must_match_conditioning_rows():
    denoiser = CFGDenoiser(make_toy_model(), conditioning(2, 0), conditioning(1, 1), 2.0)
    with pytest.raises(ValueError, match="x has 3 rows"):
        denoiser(noise(3), mx.array(0.5))


# --- the sampler's steps ------------------------------------------------------------------------


def test_yields_n_steps_with_the_model_input_before_each_update():
    recording, sigmas = RecordingModel(make_toy_model()), flow_sigmas(7)
    x = noise(2)
    denoiser = CFGDenoiser(recording, conditioning(2, 0), conditioning(1, 1), 1.5)
    steps = list(euler_steps(denoiser, x, sigmas))
    assert [step.index for step in steps] == list(range(7))
    assert [step.sigma for step in steps] == pytest.approx(sigmas[:-1].tolist(), abs=0)
    assert [step.t for step in steps] == pytest.approx((1000.0 * sigmas[:-1]).tolist())
    assert steps[0].x_t is x
    for step, (model_x, model_t, _, _) in zip(steps, recording.calls):
        assert_close(model_x[:2], step.x_t, atol=0)
        assert_close(model_t, np.full(4, step.t))


def test_generator_returns_the_final_latent_that_sample_returns():
    denoiser = CFGDenoiser(make_toy_model(), conditioning(2, 0), conditioning(1, 1), 1.5)
    sigmas, x = flow_sigmas(5), noise(2)
    steps = euler_steps(denoiser, x, sigmas)
    with pytest.raises(StopIteration) as finished:
        while True:
            last = next(steps)
    seen = []
    final = sample(denoiser, x, sigmas, on_step=seen.append)
    assert last.index == 4 and len(seen) == 5
    assert_close(finished.value.value, final, atol=0)
    sigma = mx.array(last.sigma)
    assert_close(final, euler_update(last.x_t, denoiser(last.x_t, sigma), sigma, mx.array(0.0)))


def test_compiled_denoiser_gives_the_same_trajectory():
    denoiser = CFGDenoiser(make_toy_model(), conditioning(2, 0), conditioning(1, 1), 4.0)
    sigmas, x = flow_sigmas(8), noise(2)
    assert_close(sample(mx.compile(denoiser), x, sigmas), sample(denoiser, x, sigmas))


def test_bf16_latents_stay_bf16():
    denoiser = CFGDenoiser(make_toy_model(), conditioning(1, 0), conditioning(1, 1), 2.0)
    assert sample(denoiser, noise(1).astype(mx.bfloat16), flow_sigmas(3)).dtype == mx.bfloat16


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 0.5, 0.7, 0.0], [1.0, 0.0, 0.0]])
def test_bad_sigmas_are_rejected(sigmas):
    denoiser = CFGDenoiser(make_toy_model(), conditioning(1, 0))
    with pytest.raises(ValueError, match="sigmas|sigma"):
        sample(denoiser, noise(1), sigmas)


# --- analytic flows -----------------------------------------------------------------------------


def test_single_point_data_is_reached_exactly_for_any_step_count():
    # With all data at x0 the flow lines are straight, v = (x - x0) / sigma, so Euler is exact.
    x0 = mx.random.normal((2, H, W, C), key=mx.random.key(7))

    def point_model(x, t, tokens, pooled):
        return (x - x0) / (t / 1000.0)[:, None, None, None]

    for num_steps in (1, 3, 20):
        final = sample(CFGDenoiser(point_model, conditioning(2, 0)), noise(2), flow_sigmas(num_steps))
        assert_close(final, x0)


def gaussian_velocity(mean, std):
    """Exact v = E[noise - x0 | x_sigma] for data x0 ~ N(mean, std^2) per element."""

    def model(x, t, tokens, pooled):
        sigma = (t / 1000.0)[:, None, None, None]
        variance = (1 - sigma) ** 2 * std**2 + sigma**2
        residual = (x - (1 - sigma) * mean) / variance
        return sigma * residual - (mean + (1 - sigma) * std**2 * residual)

    return model


def test_gaussian_data_endpoint_error_shrinks_with_step_count():
    # The exact flow keeps the standardized value fixed: noise z ends at mean + std * z.
    mean, std, z = 0.7, 0.3, noise(2, seed=11)
    denoiser = CFGDenoiser(gaussian_velocity(mean, std), conditioning(2, 0))
    step_counts = (4, 16, 64, 256)
    finals = [sample(denoiser, z, flow_sigmas(n)) for n in step_counts]
    errors = [float(mx.abs(final - (mean + std * z)).max()) for final in finals]
    # Euler is first order: measured error * N stays near 2-3 (0.52, 0.17, 0.044, 0.011).
    assert all(error < 4.0 / n for error, n in zip(errors, step_counts))
    assert all(finer < 0.35 * coarser for coarser, finer in zip(errors, errors[1:]))
