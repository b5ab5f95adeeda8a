"""Sampler and tracing timings with pytest-benchmark: the embedded default, and a random-weight sd3-medium.

Nothing here asserts a time (shared machines are noisy: compare within one run). The results go into
<report dir>/benchmarks.json and the HTML report; `traced_over_untraced` in a traced benchmark's extra_info is
its median over the untraced one's from the same run.

sd3-medium (512x512: a 64x64x16 latent, 154 text tokens, CFG batch 2) needs about 8 GB in float32 and tens of
seconds per step on a CPU: it is skipped on the CPU device unless --taq-bench-sd3 is given; on GPU/Metal devices
it runs by default, in bfloat16.
"""

from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from taq.bench import forward_flops
from taq.calibration import default_prompts
from taq.conditioning import UNCONDITIONAL_PROMPT
from taq.loading import Model, load_model
from taq.sampling import CFGDenoiser, euler_update, flow_sigmas, sample
from taq.tracing import ActivationStats, FFNTracer, HistogramSpec, mmdit_layer_paths, reduce_batch
from taq.tracing import trace_ffn_activations

CFG_SCALE = 1.5
POCKET_TRAJECTORIES = 16  # 32 rows per model call with CFG
TRAJECTORY_STEPS = 100
SD3_RESOLUTION = 512
TIMESTEP = 500.0


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


@dataclass
class Sampler:
    model: Model
    denoiser: CFGDenoiser
    x: mx.array  # (B, H, W, C) starting noise
    sigmas: np.ndarray

    def step(self) -> mx.array:
        """One CFG Euler step from the first sigma."""
        sigma, sigma_next = (mx.array(float(s), dtype=mx.float32) for s in self.sigmas[:2])
        return euler_update(self.x, self.denoiser(self.x, sigma), sigma, sigma_next)

    def forward_inputs(self) -> tuple[mx.array, ...]:
        """(x, t, tokens, pooled) of one CFG model call: 2B rows."""
        rows = mx.concatenate([self.x, self.x])
        return rows, mx.full((rows.shape[0],), TIMESTEP), self.denoiser.tokens, self.denoiser.pooled

    def info(self) -> dict:
        H, W, C = self.x.shape[1:]
        cfg = self.model.mmdit.config
        rows, tokens = 2 * self.x.shape[0], self.denoiser.tokens.shape[1]
        return {"model": self.model.name, "latent": [H, W, C], "rows_per_call": rows, "text_tokens": tokens,
                "dtype": str(self.x.dtype), "device": str(mx.default_device()),
                "flops_per_call": forward_flops(cfg, rows, (H // cfg.patch_size) * (W // cfg.patch_size), tokens)}


def make_sampler(model: Model, cond, uncond, trajectories: int, resolution: int, dtype=mx.float32) -> Sampler:
    H, W, C = model.latent_shape(resolution)
    x = mx.array(np.random.default_rng(0).standard_normal((trajectories, H, W, C), dtype=np.float32)).astype(dtype)
    denoiser = CFGDenoiser(model.mmdit, cond, uncond, CFG_SCALE)
    mx.eval(x, denoiser.tokens, denoiser.pooled)
    return Sampler(model, denoiser, x, flow_sigmas(TRAJECTORY_STEPS))


def time_traced(benchmark, sampler: Sampler, **pedantic) -> None:
    inputs = sampler.forward_inputs()
    with trace_ffn_activations(sampler.model.mmdit, mmdit_layer_paths(sampler.model.mmdit), ActivationStats()) as tr:
        tr.timestep = TIMESTEP
        run = lambda: tr.flush(sampler.model.mmdit(*inputs))  # noqa: E731
        if pedantic:
            benchmark.pedantic(run, **pedantic)
        else:
            benchmark(run)


# --------------------------------------------------------------------------- the embedded default


@pytest.fixture(scope="module")
def pocket() -> Sampler:
    model = load_model()
    prompts = default_prompts(model.name)
    prompts = [prompts[i % len(prompts)] for i in range(POCKET_TRAJECTORIES)]
    return make_sampler(model, model.encode(prompts), model.encode([UNCONDITIONAL_PROMPT]), POCKET_TRAJECTORIES,
                        model.default_resolution)


@pytest.mark.benchmark(group="pocket sampler")
def test_pocket_cfg_euler_step(benchmark, pocket):
    benchmark.extra_info.update(pocket.info())
    benchmark(lambda: mx.eval(pocket.step()))


@pytest.mark.benchmark(group="pocket sampler")
def test_pocket_trajectory(benchmark, pocket):
    """A whole 100-step trajectory of 16 samples; one round (it takes tens of seconds on a CPU)."""
    benchmark.extra_info.update(pocket.info(), steps=TRAJECTORY_STEPS)
    benchmark.pedantic(lambda: mx.eval(sample(pocket.denoiser, pocket.x, pocket.sigmas)), rounds=1, iterations=1)


@pytest.mark.benchmark(group="pocket forward")
def test_pocket_forward_untraced(benchmark, pocket):
    benchmark.extra_info.update(pocket.info())
    inputs = pocket.forward_inputs()
    benchmark(lambda: mx.eval(pocket.model.mmdit(*inputs)))


@pytest.mark.benchmark(group="pocket forward")
def test_pocket_forward_traced(benchmark, pocket):
    """Every FFN activation reduced to statistics on the device and merged on the host, per forward."""
    benchmark.extra_info.update(pocket.info())
    time_traced(benchmark, pocket)


@pytest.mark.benchmark(group="pocket forward")
def test_pocket_stats_accumulation(benchmark, pocket):
    """Reduce and merge one forward's worth of FFN activations (11 layers, 32 rows), without the forward."""
    cfg, rows = pocket.model.mmdit.config, 2 * POCKET_TRAJECTORIES
    image_tokens = (pocket.x.shape[1] // cfg.patch_size) * (pocket.x.shape[2] // cfg.patch_size)
    shapes = {layer: (rows, image_tokens if layer.endswith("img") else pocket.denoiser.tokens.shape[1],
                      cfg.mlp_hidden) for layer in mmdit_layer_paths(pocket.model.mmdit)}
    activations = {layer: mx.random.normal(shape, key=mx.random.key(i)) for i, (layer, shape) in enumerate(
        shapes.items())}
    mx.eval(list(activations.values()))
    spec = HistogramSpec()
    tracer = FFNTracer(ActivationStats(spec), partial(reduce_batch, spec=spec))
    tracer.timestep = TIMESTEP

    def accumulate():
        for layer, x in activations.items():
            tracer.recorder(layer)(x)
        tracer.flush()

    benchmark.extra_info.update(layers=len(shapes), values=int(sum(np.prod(s) for s in shapes.values())))
    benchmark(accumulate)


# --------------------------------------------------------------------------- random-weight sd3-medium


@pytest.fixture(scope="module")
def sd3(pytestconfig) -> Sampler:
    if not on_gpu() and not pytestconfig.getoption("--taq-bench-sd3"):
        pytest.skip("sd3-medium at 512x512 is skipped on the CPU device (about 8 GB in float32 and tens of seconds "
                    "per step); --taq-bench-sd3 runs it anyway, GPU/Metal devices run it by default")
    dtype = mx.bfloat16 if on_gpu() else mx.float32  # bf16 matmuls are emulated, slowly, on the CPU backend
    model = load_model("sd3-medium", dtype=dtype, random_weights=True)  # a benchmark: the weights do not matter
    cfg = model.mmdit.config
    rng = np.random.default_rng(0)
    embeddings = [(mx.array(rng.standard_normal((1, model.preset.text_tokens, cfg.token_dim), dtype=np.float32)).astype(dtype),
                   mx.array(rng.standard_normal((1, cfg.pooled_dim), dtype=np.float32)).astype(dtype))
                  for _ in range(2)]
    return make_sampler(model, embeddings[0], embeddings[1], 1, SD3_RESOLUTION, dtype)


def sd3_rounds() -> dict:
    return {"rounds": 10, "warmup_rounds": 2} if on_gpu() else {"rounds": 2, "warmup_rounds": 1}


@pytest.mark.benchmark(group="sd3-medium 512x512")
def test_sd3_medium_cfg_euler_step(benchmark, sd3):
    benchmark.extra_info.update(sd3.info())
    benchmark.pedantic(lambda: mx.eval(sd3.step()), **sd3_rounds())


@pytest.mark.benchmark(group="sd3-medium 512x512")
def test_sd3_medium_forward_untraced(benchmark, sd3):
    benchmark.extra_info.update(sd3.info())
    inputs = sd3.forward_inputs()
    benchmark.pedantic(lambda: mx.eval(sd3.model.mmdit(*inputs)), **sd3_rounds())


@pytest.mark.benchmark(group="sd3-medium 512x512")
def test_sd3_medium_forward_traced(benchmark, sd3):
    benchmark.extra_info.update(sd3.info())
    time_traced(benchmark, sd3, **sd3_rounds())
