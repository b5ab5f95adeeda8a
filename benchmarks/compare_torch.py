"""Side by side, in one process on one GPU: taq's MLX MMDiT step (untraced and traced) against diffusers' SD3
transformer under PyTorch (eager and torch.compile), and DiffusionKit's MLX MMDiT when it is importable.

Every model gets SD3 Medium's configuration with random bf16 weights and the same inputs (one CFG step: `rows`
rows, 154 text tokens); each time is seconds per step over back-to-back steps, median of 3 runs. MLX runs first
and hands its memory back before PyTorch starts. Needs torch with CUDA, diffusers and MLX's CUDA build:

    python benchmarks/compare_torch.py --out compare.json          # 512 and 1024 at 2 rows, 1024 at 16 rows
    python benchmarks/compare_torch.py --configs 1024x2 --no-torch-compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TEXT_TOKENS = 154


def inputs(resolution: int, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    side = resolution // 8
    return {"latent": rng.standard_normal((rows, side, side, 16), dtype=np.float32),  # NHWC, MLX's layout
            "tokens": rng.standard_normal((rows, TEXT_TOKENS, 4096), dtype=np.float32),
            "pooled": rng.standard_normal((rows, 2048), dtype=np.float32),
            "timestep": np.full((rows,), 500.0, dtype=np.float32)}


def per_step_ms(step, finish, repeats: int) -> float:
    """taq.bench.per_step's median, in ms: the same loop times every framework."""
    from taq.bench import per_step
    return 1e3 * statistics.median(per_step(step, finish, repeats, warmup=2))


def time_taq(resolution: int, rows: int, repeats: int) -> dict:
    from taq.bench import bench
    result = bench("sd3-medium", resolution, rows // 2, "bfloat16", repeats)
    return {"taq untraced": result["untraced_ms"]["median"], "taq traced": result["traced_ms"]["median"]}


@lru_cache(maxsize=None)
def load_diffusionkit_mmdit():
    """DiffusionKit's MLX MMDiT module, loaded from its file: the package's __init__ pulls in its text encoders."""
    import importlib.util
    import types
    spec = importlib.util.find_spec("diffusionkit")
    if spec is None:
        raise ImportError("diffusionkit is not installed")
    root = Path(spec.origin).parent / "mlx"
    for name, path in (("diffusionkit", root.parent), ("diffusionkit.mlx", root)):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules.setdefault(name, package)
    modules = {}
    for name in ("config", "mmdit"):
        module_spec = importlib.util.spec_from_file_location(f"diffusionkit.mlx.{name}", root / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = modules[name]
        module_spec.loader.exec_module(modules[name])
    return modules["config"], modules["mmdit"]


def time_diffusionkit(resolution: int, rows: int, repeats: int) -> dict:
    import mlx.core as mx
    from dataclasses import replace
    dk_config, dk_mmdit = load_diffusionkit_mmdit()
    # low_memory_mode=True passes an argument MLX's attention no longer takes; random bf16 weights, as taq's.
    config = replace(dk_config.SD3_2b, low_memory_mode=False, dtype=mx.bfloat16, float16_dtype=mx.bfloat16)
    model = dk_mmdit.MMDiT(config)
    model.set_dtype(mx.bfloat16)
    arrays = {k: mx.array(v) for k, v in inputs(resolution, rows).items()}
    latent = arrays["latent"].astype(mx.bfloat16)
    tokens = arrays["tokens"][:, :, None, :].astype(mx.bfloat16)
    # DiffusionKit folds (timestep, pooled) into cached modulation parameters before sampling; not timed.
    model.cache_modulation_params(arrays["pooled"].astype(mx.bfloat16), arrays["timestep"][:1])
    out = []
    ms = per_step_ms(lambda: (out.clear(), out.append(model(latent, tokens, arrays["timestep"])), mx.async_eval(out)),
                  mx.synchronize, repeats)
    del model
    mx.clear_cache()
    return {"DiffusionKit (MLX)": ms}


def time_diffusers(resolution: int, rows: int, repeats: int, compile: bool) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD3_MEDIUM).to("cuda", torch.bfloat16).eval()
    data = inputs(resolution, rows)
    kwargs = dict(hidden_states=torch.from_numpy(data["latent"]).permute(0, 3, 1, 2).contiguous(),
                  encoder_hidden_states=torch.from_numpy(data["tokens"]),
                  pooled_projections=torch.from_numpy(data["pooled"]), timestep=torch.from_numpy(data["timestep"]))
    kwargs = {k: v.to("cuda", torch.bfloat16 if k != "timestep" else torch.float32) for k, v in kwargs.items()}
    result = {}
    with torch.inference_mode():
        result["diffusers eager"] = per_step_ms(lambda: model(**kwargs, return_dict=False), torch.cuda.synchronize,
                                             repeats)
        if compile:
            compiled = torch.compile(model, dynamic=False)
            start = time.perf_counter()
            compiled(**kwargs, return_dict=False)
            torch.cuda.synchronize()
            result["torch.compile build s"] = time.perf_counter() - start
            result["diffusers torch.compile"] = per_step_ms(lambda: compiled(**kwargs, return_dict=False),
                                                         torch.cuda.synchronize, repeats)
    del model
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--configs", nargs="+", default=["512x2", "1024x2", "1024x16"],
                        help="RESOLUTIONxROWS; a CFG step of B trajectories is 2B rows")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--no-diffusionkit", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]

    import taq  # noqa: F401  (before mlx: on a Linux CPU it loads a fast BLAS)
    import mlx.core as mx
    results = {f"{res}x{res}, {rows} rows": {} for res, rows in configs}

    def record(key, fn, *fn_args):
        try:
            results[key].update(fn(*fn_args))
        except Exception as exc:  # a missing optional runner must not lose the other columns
            results[key][fn.__name__ + " error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps({key: results[key]}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    for res, rows in configs:  # MLX first, then hand its memory back
        key = f"{res}x{res}, {rows} rows"
        record(key, time_taq, res, rows, args.repeats)
        mx.clear_cache()
        if not args.no_diffusionkit:
            record(key, time_diffusionkit, res, rows, args.repeats)
    for res, rows in configs:
        record(f"{res}x{res}, {rows} rows", time_diffusers, res, rows, args.repeats, not args.no_torch_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
