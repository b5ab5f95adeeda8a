"""`taq bench`: time one CFG step of the MMDiT, untraced and traced, for a preset at a resolution.

Prints JSON: per-step time (median and min over 3 runs of back-to-back steps), the traced/untraced ratio, ms per
row, peak memory, the analytic FLOP count of the forward and the achieved TFLOP/s. Timings are for `rows` =
2 x batch rows (CFG doubles the batch). Both modes are mx.compile'd unless --no-compile; the traced one through
`FFNTracer.compile`, so its reductions are part of the same graph.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import mlx.core as mx
import numpy as np

import taq
from taq.config import MMDiTConfig, get_preset
from taq.cuda import cuda_available
from taq.loading import load_model
from taq.tracing import ActivationStats, mmdit_layer_paths, trace_ffn_activations

def forward_flops(cfg: MMDiTConfig, rows: int, image_tokens: int, text_tokens: int) -> float:
    """Multiply-adds x 2 of the matmuls and attention of one MMDiT forward (embedders and norms omitted)."""
    D, L = cfg.hidden_size, image_tokens + text_tokens
    per_stream = lambda n, full: 2 * n * D * (3 * D + (D + 2 * cfg.mlp_hidden if full else 0))  # noqa: E731
    modulation = 2 * D * D * (6 + 6)  # both streams' adaLN, per row
    total = 0.0
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        total += per_stream(image_tokens, True) + per_stream(text_tokens, not last) + modulation
        total += 2 * 2 * L * L * D  # QK^T and attention x V over the joint sequence
    total += 2 * image_tokens * D * cfg.patch_size**2 * cfg.in_channels
    return rows * total


def per_step(step: Callable[[], None], finish: Callable[[], None], repeats: int, warmup: int,
              trials: int = 3) -> list[float]:
    """Seconds per step of `repeats` back-to-back steps (as a sampler runs them: the host may run ahead of the
    device), for each of `trials` runs after `warmup` steps; `finish` waits for the device."""
    for _ in range(warmup):
        step()
    finish()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        finish()
        times.append((time.perf_counter() - start) / repeats)
    return times


def bench(model_name: str = "sd3-medium", resolution: int | None = None, batch: int = 1, dtype: str = "bfloat16",
          repeats: int = 10, warmup: int = 2, compile: bool = True) -> dict:
    """Time the untraced and the traced CFG step (2 x batch rows); `compile` wraps both in mx.compile."""
    preset = get_preset(model_name)  # a benchmark: presets without shipped weights run on random ones
    model = load_model(model_name, dtype=getattr(mx, dtype), random_weights=not preset.ships_weights)
    text_tokens = model.preset.text_tokens
    cfg = model.mmdit.config
    resolution = resolution or model.default_resolution
    H, W, C = model.latent_shape(resolution)
    rows = 2 * batch
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((rows, H, W, C), dtype=np.float32)).astype(getattr(mx, dtype))
    t = mx.full((rows,), 500.0)
    tokens = mx.array(rng.standard_normal((rows, text_tokens, cfg.token_dim), dtype=np.float32))
    pooled = mx.array(rng.standard_normal((rows, cfg.pooled_dim), dtype=np.float32))
    args = (x, t, tokens, pooled)
    forward = mx.compile(model.mmdit) if compile else model.mmdit
    outputs = []  # the last step's output, kept alive until the device is done with it
    untraced = per_step(lambda: (outputs.clear(), outputs.append(forward(*args)), mx.async_eval(outputs)),
                        mx.synchronize, repeats, warmup)
    stats = ActivationStats()
    with trace_ffn_activations(model.mmdit, mmdit_layer_paths(model.mmdit), stats) as tracer:
        tracer.timestep = 500.0
        traced_forward = tracer.compile(model.mmdit) if compile else model.mmdit
        traced = per_step(lambda: tracer.flush(traced_forward(*args)), lambda: (mx.synchronize(), tracer.sync()),
                          repeats, warmup)
    n_img = (H // cfg.patch_size) * (W // cfg.patch_size)
    flops = forward_flops(cfg, rows, n_img, text_tokens)
    ms = {name: {"median": 1e3 * statistics.median(ts), "min": 1e3 * min(ts)}
          for name, ts in (("untraced_ms", untraced), ("traced_ms", traced))}
    return {
        "model": model_name, "resolution": resolution, "latent": [H, W, C], "rows": rows, "dtype": dtype,
        "text_tokens": text_tokens, "compiled": compile, "repeats": repeats,
        "device": str(mx.default_device()), "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__, "blas": taq.BLAS, "cuda_kernels": cuda_available(),
        **ms, "ms_per_row": ms["untraced_ms"]["median"] / rows,
        "traced_over_untraced": ms["traced_ms"]["median"] / ms["untraced_ms"]["median"],
        "flops": flops, "tflops_per_s": flops / (ms["untraced_ms"]["median"] / 1e3) / 1e12,
        "peak_memory_gb": mx.get_peak_memory() / 2**30,
        "traced_cells": len(stats),
    }


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="pocket", help="preset; those without shipped weights (sd3-medium) run "
                                                          "on seeded random weights")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--batch", type=int, default=1, help="trajectories; the step runs 2x rows for CFG")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="time the eager forwards")


def run_cli(args: argparse.Namespace) -> None:
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--batch and --repeats must be >= 1, --warmup >= 0")
    print(json.dumps(bench(args.model, args.resolution, args.batch, args.dtype, args.repeats, args.warmup,
                           compile=not args.no_compile), indent=1))
