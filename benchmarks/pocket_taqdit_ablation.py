"""TaQ-DiT's ablation on pocket, in one process: one calibration file, every configuration evaluated against full
precision from the same noise and prompts.

    python benchmarks/pocket_taqdit_ablation.py --out-dir reports/pocket-taqdit [--samples 500 --steps 20]

Ladders at W4A8 and W8A6 (W4A6: its ends): round-to-nearest with static activation grids -> + per-timestep grids
-> + shifting -> + outlier migration -> + joint block reconstruction; at W4A8 also separate reconstruction instead
of joint, and PTQ4DiT's salience balancing instead of migration. All fake quantization (simulated low-bit
arithmetic). Writes evaluation.json, ablation.md (the README's table: PSNR with its interval, the paired step over
the previous row and over round-to-nearest, digit accuracy, Frechet distance, wall time to quantize) and
taq evaluate's figures and index.html into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np

from taq.calibration import calibrate, default_prompts
from taq.evaluate import evaluate, evaluation_prompts, table
from taq.formats.calibration import load_calibration
from taq.loading import load_model
from taq.quant.calibration import QuantConfig, calibrate_quantizations
from taq.quant.evaluation import Setup, paired_difference
from taq.quant.reconstruction import ReconstructionConfig, reconstruct
from taq.recipes import RECIPES
from taq.report.quantization import write_evaluation_report

# As the baseline table: TaQ-DiT's L_2.4 weight search, min-max activation ranges, 1024 calibration points.
BASE = QuantConfig(weight_observer="mse", act_observer="minmax", num_samples=1024)
MIGRATION_THRESHOLD = 2.0  # pocket's post-GELU channels are even: at TaQ-DiT-like 4x almost none qualify


def ladder(weights: int, acts: int, full: bool, base: QuantConfig) -> list[tuple[str, QuantConfig, str | None]]:
    """(row name, calibration config, reconstruction mode) from round-to-nearest to TaQ-DiT's full method."""
    static = replace(base, weight_bits=weights, act_bits=acts, act_mode="static")
    timed = replace(static, act_mode="per-timestep")
    shifted = replace(timed, shift=True)
    migrated = replace(shifted, migrate=MIGRATION_THRESHOLD)
    name = f"W{weights}A{acts}"
    rows = [(f"{name} RTN static", static, None), (f"{name} + per-timestep", timed, None)]
    if full:
        rows += [(f"{name} + shift", shifted, None), (f"{name} + migrate", migrated, None)]
    rows += [(f"{name} + joint reconstruction", migrated, "joint")]
    if weights == 4 and acts == 8:
        rows += [(f"{name} separate reconstruction instead", migrated, "separate"),
                 (f"{name} balancing instead of migration", replace(shifted, balance=True), None)]
    return rows


def rows(base: QuantConfig) -> list[tuple[str, QuantConfig, str | None]]:
    return ladder(4, 8, True, base) + ladder(8, 6, True, base) + ladder(4, 6, False, base)


def markdown(doc: dict, names: list[str]) -> str:
    by_label = {c["label"]: c for c in doc["configs"]}
    lines = ["| configuration | PSNR dB, mean [95% CI] | step over the row above | over RTN static | worst | "
             "digit accuracy | FD to FP | quantize s |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
             f"| FP | | | | | {doc['fp']['digits']['accuracy']['mean']:.1%} | | |"]
    for name in names:
        c = by_label[name]
        p = c["psnr_db"]

        def step(key):
            d = c.get(key)
            return f"{d['mean']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d else ""
        lines.append(f"| {name} | {p['mean']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}] | {step('over_previous')} | "
                     f"{step('over_rtn')} | {p['min']:.2f} | {c['digits']['accuracy']['mean']:.1%} | "
                     f"{c['digits']['frechet_to_fp']:.3g} | {c['quantize_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out-dir", type=Path, default=Path("reports/pocket-taqdit"))
    parser.add_argument("--recipe", default="paper", choices=sorted(RECIPES))
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=BASE.num_samples,
                        help="calibration points for the grids and the reconstruction")
    parser.add_argument("--iters", type=int, default=ReconstructionConfig().iters, help="reconstruction iterations")
    parser.add_argument("--batch-size", type=int, default=250, help="trajectories per sampler call")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model()
    calibration = args.out_dir / f"calibration-{args.recipe}.npz"
    if not calibration.exists():
        calibrate(model, default_prompts(model.name), **asdict(RECIPES[args.recipe].calibration), output=calibration)
    cal = load_calibration(calibration)
    table_rows = rows(replace(BASE, num_samples=args.num_samples))
    configs = list(dict.fromkeys(config for _, config, _ in table_rows))
    mark = time.perf_counter()
    calibrated = dict(zip(configs, calibrate_quantizations(model, cal, configs, calibration_path=calibration)))
    calibrate_s = (time.perf_counter() - mark) / len(configs)  # shared capture: the mean per configuration
    quantizations, seconds = {}, {}
    for name, config, mode in table_rows:
        q, mark = calibrated[config], time.perf_counter()
        if mode is not None:
            q = reconstruct(model, cal, q, ReconstructionConfig(mode=mode, iters=args.iters,
                                                                num_samples=config.num_samples, seed=config.seed))
        quantizations[name] = replace(q, meta=dict(q.meta, label=name))
        seconds[name] = calibrate_s + time.perf_counter() - mark
    setup = Setup(evaluation_prompts(model, args.samples), model.latent_shape(model.default_resolution),
                  args.steps, batch_size=args.batch_size)
    mark = time.perf_counter()
    doc, runs = evaluate(model, quantizations, setup, layer_errors=True)
    evaluate_s = time.perf_counter() - mark
    by_label = {c["label"]: c for c in doc["configs"]}
    per_sample = {label: np.array(c["psnr_per_sample"], dtype=float) for label, c in by_label.items()}
    names = [name for name, _, _ in table_rows]
    for index, name in enumerate(names):
        entry = by_label[name]
        entry["quantize_s"] = round(seconds[name], 1)
        entry["outlier_fraction"] = quantizations[name].meta.get("outlier_fraction")
        rtn = name.split()[0] + " RTN static"
        previous = names[index - 1] if index and names[index - 1].split()[0] == name.split()[0] else None
        if "instead" in name:
            previous = names[names.index(name.split()[0] + " + migrate")]
        if previous:
            entry["over_previous"] = paired_difference(per_sample[name], per_sample[previous])
            entry["previous"] = previous
        if rtn in per_sample and rtn != name:
            entry["over_rtn"] = paired_difference(per_sample[name], per_sample[rtn])
    doc["timings"] = {"evaluate_s": round(evaluate_s, 1)}
    doc["command"] = "python benchmarks/pocket_taqdit_ablation.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (args.out_dir / "evaluation.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out_dir / "ablation.md").write_text(markdown(doc, names))
    write_evaluation_report(args.out_dir, doc, runs)
    print(table(doc))
    print(markdown(doc, names))
    print(json.dumps({**doc["timings"], "device": str(mx.default_device())}))


if __name__ == "__main__":
    main()
