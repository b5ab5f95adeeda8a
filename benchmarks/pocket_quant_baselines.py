"""The phase 3 baseline table on pocket, in one process: calibrate (paper recipe), quantize every baseline
configuration, evaluate them all against full precision from the same noise and prompts.

    python benchmarks/pocket_quant_baselines.py --out-dir reports/pocket-baselines [--samples 500 --steps 50]

Rows: W8A8 / W8A6 / W8A4 with static, per-timestep and sigma-poly activation grids and the per-call dynamic
reference (each call's own min-max grid, the ideal a table can approach), W4A8 static and per-timestep (all fake
quantization), W8A16 and W4A16 (real MLX low-bit weights, group 64). Writes evaluation.json, the figures and
index.html (taq evaluate's report) and baselines.md (the README's table) into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from taq.calibration import calibrate, default_prompts
from taq.formats.calibration import load_calibration
from taq.loading import load_model
from taq.quant.calibration import QuantConfig, calibrate_quantizations
from taq.quant.evaluation import Setup
from taq.recipes import RECIPES
from taq.evaluate import evaluate, evaluation_prompts, table
from taq.report.quantization import write_evaluation_report

# Weights: TaQ-DiT's L_2.4 search; activations: min-max, so that the per-call dynamic reference (min-max of each
# call) and the tables differ only in when the range is taken. 1024 points: about 41 per calibrated timestep.
BASE = QuantConfig(weight_observer="mse", act_observer="minmax", num_samples=1024)


def configurations() -> list[QuantConfig]:
    rows = [replace(BASE, weight_bits=8, act_bits=bits, act_mode=mode) for bits in (8, 6, 4)
            for mode in ("static", "per-timestep", "sigma-poly", "dynamic")]
    rows += [replace(BASE, weight_bits=4, act_bits=8, act_mode=mode) for mode in ("static", "per-timestep")]
    rows += [replace(BASE, weight_bits=bits, act_bits=None, weight_granularity="group", group_size=64)
             for bits in (8, 4)]
    return rows


def markdown(doc: dict) -> str:
    lines = ["| configuration | PSNR dB, mean [95% CI] | p10 | worst | digit accuracy | FD to FP | arithmetic |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |",
             f"| FP | | | | {doc['fp']['digits']['accuracy']['mean']:.1%} | | reference |"]
    for c in doc["configs"]:
        p = c["psnr_db"]
        lines.append(f"| {c['label']} | {p['mean']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}] | {p['p10']:.2f} | "
                     f"{p['min']:.2f} | {c['digits']['accuracy']['mean']:.1%} | {c['digits']['frechet_to_fp']:.3g} | "
                     f"{'real W' + c['label'][1] + ' weights' if c['arithmetic'].startswith('real') else 'simulated'} |")
    lines += ["", "| paired PSNR difference | mean dB | 95% CI | share of the static-to-dynamic gap recovered |",
              "| --- | ---: | --- | --- |"]
    for c in doc["comparisons"]:
        gap = c.get("gap_recovered")
        share = f"{gap['share']:.0%} [{gap['ci'][0]:.0%}, {gap['ci'][1]:.0%}]" if gap else ""
        lines.append(f"| {c['a']} - {c['b']} | {c['mean']:+.2f} | [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] | {share} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out-dir", type=Path, default=Path("reports/pocket-baselines"))
    parser.add_argument("--recipe", default="paper", choices=sorted(RECIPES))
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=250, help="trajectories per sampler call")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()
    model = load_model()
    calibration = args.out_dir / f"calibration-{args.recipe}.npz"
    if not calibration.exists():
        calibrate(model, default_prompts(model.name), **asdict(RECIPES[args.recipe].calibration), output=calibration)
    timings["calibrate_s"] = round(time.perf_counter() - started, 1)
    cal = load_calibration(calibration)
    mark = time.perf_counter()
    quantizations = calibrate_quantizations(model, cal, configurations(), calibration_path=calibration)
    timings["quantize_s"] = round(time.perf_counter() - mark, 1)
    setup = Setup(evaluation_prompts(model, args.samples), model.latent_shape(model.default_resolution),
                  args.steps, batch_size=args.batch_size)
    mark = time.perf_counter()
    doc, runs = evaluate(model, {q.describe(): q for q in quantizations}, setup, real_weights=True)
    timings["evaluate_s"] = round(time.perf_counter() - mark, 1)
    doc["timings"] = timings
    doc["command"] = "python benchmarks/pocket_quant_baselines.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (args.out_dir / "evaluation.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out_dir / "baselines.md").write_text(markdown(doc))
    write_evaluation_report(args.out_dir, doc, runs)
    print(table(doc))
    print(markdown(doc))
    print(json.dumps({**timings, "device": str(mx.default_device())}))


if __name__ == "__main__":
    main()
