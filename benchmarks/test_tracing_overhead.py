"""What tracing costs: one pocket-model forward at a profiling batch, untraced vs traced, and the statistics alone.

    python -m pytest benchmarks/test_tracing_overhead.py --benchmark-columns=median,min,rounds

The traced forward evaluates the output and every layer's reductions in one `mx.eval` (`tracer.flush`), then merges
them on the host; "accumulation alone" is that reduce + merge over activations captured beforehand.
"""

from functools import partial

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from taq.models.loading import load_model
from taq.pocket.prompts import CALIBRATION_PROMPTS
from taq.tracing import ActivationStats, FFNTracer, HistogramSpec, RecordingModule, mmdit_layer_paths, reduce_batch
from taq.tracing import trace_ffn_activations

ROWS = 64  # a profiling batch: 32 calibration points, doubled for CFG
TIMESTEP = 500.0
GROUP = pytest.mark.benchmark(group=f"pocket forward, {ROWS} rows")


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def inputs(model):
    """(x, t, tokens, pooled) of ROWS rows: digit-sized noise latents and a real prompt's embeddings."""
    H, W, C = model.latent_shape(model.default_resolution)
    x = mx.array(np.random.default_rng(0).standard_normal((ROWS, H, W, C), dtype=np.float32))
    tokens, pooled = model.encode([CALIBRATION_PROMPTS[0]])
    tokens, pooled = mx.repeat(tokens, ROWS, axis=0), mx.repeat(pooled, ROWS, axis=0)
    mx.eval(x, tokens, pooled)
    return x, mx.full((ROWS,), TIMESTEP), tokens, pooled


@GROUP
def test_untraced_forward(benchmark, model, inputs):
    benchmark(lambda: mx.eval(model.mmdit(*inputs)))


@GROUP
def test_traced_forward_and_flush(benchmark, model, inputs):
    stats = ActivationStats()
    with trace_ffn_activations(model.mmdit, mmdit_layer_paths(model.mmdit), stats) as tracer:
        tracer.timestep = TIMESTEP
        benchmark(lambda: tracer.flush(model.mmdit(*inputs)))
    assert len(stats) == 11


@GROUP
def test_stats_accumulation_alone(benchmark, model, inputs):
    """Reduce and merge the 11 layers' activations of one forward, without the forward."""
    captured = {}
    layer_paths = mmdit_layer_paths(model.mmdit)
    modules = dict(model.mmdit.named_modules())
    originals = {path: modules[path] for path in layer_paths.values()}
    swap = lambda mods: model.mmdit.update_modules(tree_unflatten(list(mods.items())))  # noqa: E731
    swap({path: RecordingModule(originals[path], partial(captured.__setitem__, layer))
          for layer, path in layer_paths.items()})
    try:
        mx.eval(model.mmdit(*inputs), list(captured.values()))
    finally:
        swap(originals)
    spec = HistogramSpec()
    tracer = FFNTracer(ActivationStats(spec), partial(reduce_batch, spec=spec))
    tracer.timestep = TIMESTEP

    def accumulate():
        for layer, activations in captured.items():
            tracer.recorder(layer)(activations)
        tracer.flush()

    benchmark(accumulate)
    assert len(tracer.stats) == 11
