"""Side by side on the CPU, in one process with interleaved runs: the pocket MMDiT's forward in taq (MLX, eager
and `mx.compile`) against diffusers' `SD3Transformer2DModel` of the same configuration under PyTorch eager.

The pocket configuration: 6 joint blocks, hidden 128 (2 heads of 64), 1 latent channel, patch 2, a 16x16 latent
(64 image tokens), 16 text tokens of width 64, a pooled vector of 32. taq runs its shipped weights, diffusers
random ones (the work per forward does not depend on the values); both get the same random float32 inputs at
t = 500. Every round times each runner once (`--repeats` back-to-back forwards, `taq.bench.per_step`); the
table gives the median, min and max over `--rounds` rounds. `--baseline` adds taq's CPU forward as it was before
the CPU work, in the same process. Needs `torch` (2 threads by default) and `diffusers`:

    python benchmarks/compare_cpu.py --baseline --out docs/benchmarks/cpu-compare-2026-12-01.json
    python benchmarks/compare_cpu.py --rows 2 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

POCKET_DIFFUSERS = dict(sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=6,
                        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                        caption_projection_dim=128, pooled_projection_dim=32, pos_embed_max_size=16)
TEXT_TOKENS = 16


def inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"latent": rng.standard_normal((rows, 16, 16, 1), dtype=np.float32),  # NHWC, MLX's layout
            "tokens": rng.standard_normal((rows, TEXT_TOKENS, 64), dtype=np.float32),
            "pooled": rng.standard_normal((rows, 32), dtype=np.float32),
            "timestep": np.full((rows,), 500.0, dtype=np.float32)}


@contextmanager
def previous_cpu_paths():
    """taq's CPU forward before the CPU work (commit a88a349), bit for bit: MLX's tanh GELU and fused SDPA, and
    MLX's default 32 MB CPU buffer cache."""
    import mlx.core as mx
    import mlx.nn as nn
    import taq.models.fused as fused
    import taq.models.mmdit as mmdit
    saved = fused.gelu_tanh_cpu, mmdit.attention
    fused.gelu_tanh_cpu = nn.gelu_approx
    mmdit.attention = lambda q, k, v, scale: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    limit = mx.set_cache_limit(32 << 20)
    mx.clear_cache()
    try:
        yield
    finally:
        fused.gelu_tanh_cpu, mmdit.attention = saved
        mx.set_cache_limit(limit)


def taq_runners(rows: int, baseline: bool) -> tuple[dict, dict]:
    """(step, finish) per taq runner, and the max abs difference of each runner's output to taq eager's."""
    import mlx.core as mx
    from taq.loading import load_model
    model = load_model("pocket", dtype=mx.float32).mmdit
    data = {k: mx.array(v) for k, v in inputs(rows).items()}
    args = (data["latent"], data["timestep"], data["tokens"], data["pooled"])
    forwards = {"taq eager": model, "taq mx.compile": mx.compile(model)}
    if baseline:
        compiled_before = mx.compile(lambda *a: model(*a))  # its own trace, made under the old paths
        forwards["taq eager, before"] = lambda *a: _before(model, *a)
        forwards["taq mx.compile, before"] = lambda *a: _before(compiled_before, *a)
    reference = model(*args)
    diffs = {name: mx.abs(f(*args) - reference).max().item() for name, f in forwards.items() if name != "taq eager"}
    return {name: (lambda f=f: mx.eval(f(*args)), mx.synchronize) for name, f in forwards.items()}, diffs


def _before(forward, *args):
    import mlx.core as mx
    with previous_cpu_paths():
        out = forward(*args)
        mx.eval(out)  # inside: the old paths and cache limit must be in force while it runs
    return out


def torch_runner(rows: int):
    import torch
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**POCKET_DIFFUSERS).eval()
    data = inputs(rows)
    kwargs = dict(hidden_states=torch.from_numpy(data["latent"]).permute(0, 3, 1, 2).contiguous(),
                  encoder_hidden_states=torch.from_numpy(data["tokens"]),
                  pooled_projections=torch.from_numpy(data["pooled"]), timestep=torch.from_numpy(data["timestep"]))

    def step():
        with torch.inference_mode():
            model(**kwargs, return_dict=False)
    return step, lambda: None


def summary(times_s: list[float]) -> dict:
    ms = [1e3 * t for t in times_s]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "rounds_ms": ms}


def measure(rows: int, rounds: int, repeats: int, pause: float, baseline: bool) -> dict:
    from taq.bench import per_step
    runners, diffs = taq_runners(rows, baseline)
    runners["PyTorch eager"] = torch_runner(rows)
    for step, finish in runners.values():  # warm up (and compile) each once before any timing
        per_step(step, finish, repeats=1, warmup=1, trials=1)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (step, finish) in runners.items():
            time.sleep(pause)  # let the other framework's spinning worker threads (OpenBLAS, OpenMP) go idle
            times[name] += per_step(step, finish, repeats, warmup=0, trials=1)
    result = {name: summary(ts) for name, ts in times.items()}
    torch_ms = result["PyTorch eager"]["median_ms"]
    ratios = {f"{name} / PyTorch": result[name]["median_ms"] / torch_ms for name in runners if name.startswith("taq")}
    return {"rows": rows, "repeats": repeats, "rounds": rounds, **result, **ratios,
            "max abs diff to taq eager": diffs}


def environment(threads: int) -> dict:
    import mlx.core as mx
    import torch
    import diffusers
    import taq
    return {"platform": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
            "mlx": mx.__version__, "blas": taq.BLAS, "torch": torch.__version__, "torch_threads": threads,
            "diffusers": diffusers.__version__, "dtype": "float32", "text_tokens": TEXT_TOKENS}


def table(results: list[dict]) -> str:
    """Markdown: median (min-max) ms per runner, then each taq runner's median over PyTorch's."""
    runners = [k for k, v in results[0].items() if isinstance(v, dict) and "median_ms" in v]
    ratios = [k for k in results[0] if k.endswith("/ PyTorch")]
    lines = ["| rows | " + " | ".join(runners + ratios) + " |", "| ---: |" + " ---: |" * (len(runners) + len(ratios))]
    for r in results:
        cells = [f"{r[k]['median_ms']:,.1f} ({r[k]['min_ms']:,.1f}-{r[k]['max_ms']:,.1f})" for k in runners]
        lines.append(f"| {r['rows']} | " + " | ".join(cells + [f"{r[k]:.2f}" for k in ratios]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 32, 128, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-rows-per-round", type=int, default=64,
                        help="each timed run repeats the forward until it has covered this many rows")
    parser.add_argument("--pause", type=float, default=0.5, help="idle seconds before each timed run")
    parser.add_argument("--baseline", action="store_true",
                        help="also time taq's CPU forward as it was before the CPU work (a88a349)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    import taq  # noqa: F401  (before mlx: on a Linux CPU it loads OpenBLAS)
    import torch
    torch.set_num_threads(args.threads)
    report = {"environment": environment(args.threads), "results": []}
    for rows in args.rows:
        repeats = max(1, args.min_rows_per_round // rows)
        report["results"].append(measure(rows, args.rounds, repeats, args.pause, args.baseline))
        print(json.dumps({k: v for k, v in report["results"][-1].items()}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
