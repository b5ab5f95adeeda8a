"""What TaQ-DiT's block reconstruction costs on SD3 Medium's MMDiT (random weights): time per iteration and peak
device memory per joint block, and the paper recipe's projected cost.

    python benchmarks/sd3_reconstruction_cost.py --resolution 512 --blocks 2 --iters 20 --out cost.json

Builds a small calibration set (random bf16 weights, `--trajectories` x `--steps` Euler steps), calibrates a W4A8
per-timestep quantization with min-max observers, then reconstructs the first `--blocks` joint blocks for
`--iters` iterations each at `--batch-size` rows; seconds per iteration are the difference of a 4-iteration and an
`--iters`-iteration run after a warm-up (so compiling cancels).
Projection: 24 blocks x TaQ-DiT's 20,000 iterations at the measured seconds per iteration.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

import taq.quant.reconstruction as rec
from taq.calibration import calibrate, default_prompts
from taq.formats.calibration import load_calibration
from taq.loading import load_model
from taq.quant.calibration import QuantConfig, calibrate_quantization
from taq.quant.reconstruction import ReconstructionConfig

PAPER_ITERS = 20_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="sd3-medium", help="a preset, with seeded random weights")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per iteration (TaQ-DiT: 32)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = load_model(args.model, random_weights=True, dtype=mx.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cal.npz"
        calibrate(model, default_prompts(model.name)[:args.trajectories], output=path, resolution=args.resolution,
                  num_trajectories=args.trajectories, num_steps=args.steps, num_selected=min(4, args.steps),
                  batch_size=args.trajectories)
        cal = load_calibration(path)
    points = len(cal)
    quantization = calibrate_quantization(model, cal, QuantConfig(
        weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax", num_samples=points,
        batch_size=args.trajectories, layers=tuple(f"mm_{b:02d}_*" for b in range(args.blocks))))
    config = ReconstructionConfig(iters=args.iters, num_samples=points, batch_size=args.batch_size)
    inputs = rec._block_zero_inputs(model, cal, config)
    txt, img, c, sigma = inputs
    blocks = rec._layers_by_block(quantization)
    results = []
    for index in range(args.blocks):
        targets = rec._run_block(model.mmdit.joint_blocks[index], txt, img, c, args.trajectories)
        mx.reset_peak_memory()
        timings = []
        for iters in (2, 4, args.iters):  # a warm-up, then two lengths: their difference leaves out compiling
            mark = time.perf_counter()
            rec._reconstruct_block(model.mmdit, index, blocks[index], (txt, img, c, sigma), targets,
                                   replace(config, iters=iters), progress=False)
            timings.append((iters, time.perf_counter() - mark))
        (short_n, short_s), (long_n, long_s) = timings[1:]
        per_iter = (long_s - short_s) / (long_n - short_n)
        results.append({"block": index, "seconds_per_iter": per_iter, "peak_memory_gb": mx.get_peak_memory() / 1e9})
        print(json.dumps(results[-1]), flush=True)
        txt, img = targets
    per_iter = sum(r["seconds_per_iter"] for r in results) / len(results)
    doc = {"model": args.model, "resolution": args.resolution, "rows_per_iter": args.batch_size, "calibration_points": points,
           "device": str(mx.default_device()), "mlx": mx.__version__, "blocks": results,
           "paper_recipe_hours": per_iter * PAPER_ITERS * len(model.mmdit.joint_blocks) / 3600}
    print(json.dumps(doc, indent=1))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
