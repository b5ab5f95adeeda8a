"""`taq evaluate`: quantized models against full precision, paired (same noise, same prompts), with intervals.

    taq evaluate --quantization w8a8.safetensors w4a8.safetensors --samples 500 --steps 50 --output-dir reports/quant

Samples the full-precision model once and every quantization file's model from the same noise and prompts
(`taq.quant.evaluation`), then writes `evaluation.json` (every number: per-configuration PSNR / MSE summaries
with bootstrap 95% intervals, the per-step error trajectory, per-layer output SQNR per step, digit accuracy and
Frechet distances on pocket, paired differences between configurations, seconds), figures and `index.html`
into the output directory, and prints a table. Which configurations are real low-bit arithmetic and which are
simulated is stated per configuration (`arithmetic`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np

import taq
from taq.calibration import default_prompts
from taq.formats import atomic_path, check_outputs_in_spare
from taq.formats.quantization import Quantization, load_quantization
from taq.loading import Model, check_model_options, dtype_from_args, load_model
from taq.options import add_model_options, number
from taq.quant.evaluation import (Run, Setup, frechet_distance, gap_recovered, images01, layer_sqnr,
                                  paired_difference, psnr, sample, step_error_summary, summary)
from taq.quant.modules import quantize_model
from taq.quant.real import real_weights_model, supports_real_weights
from taq.sampling import SD3_SHIFT

SIMULATED = "simulated: fake-quantized weights and activations in float32"
REAL = "real low-bit weights (MLX quantized kernels or dequantize-then-GEMM), full-precision activations"


def evaluation_prompts(model: Model, num_samples: int) -> tuple[str, ...]:
    """Pocket: the digits' canonical prompts in turn (sample i draws digit i % 10); others: the calibration
    prompts in turn."""
    if model.name == "pocket":
        from taq.pocket.prompts import canonical_prompt

        return tuple(canonical_prompt(i % 10) for i in range(num_samples))
    prompts = default_prompts(model.name)
    return tuple(prompts[i % len(prompts)] for i in range(num_samples))


def check_fits(quantization: Quantization, model: Model, source: str) -> None:
    """A quantization file is made for one model and its weights."""
    made_for = quantization.meta.get("model")
    if made_for != model.name:
        raise ValueError(f"{source} was calibrated for model {made_for!r}, not {model.name!r}")
    if quantization.meta.get("weights_id") != model.weights_id:
        raise ValueError(f"{source} was calibrated for other weights of {model.name!r} "
                         f"({quantization.meta.get('weights_id')}, these are {model.weights_id})")


def evaluate(model: Model, quantizations: dict[str, Quantization], setup: Setup, *, real_weights: bool = False,
             layer_errors: bool = True, progress: bool = True) -> tuple[dict, dict[str, Run]]:
    """The evaluation document and the runs (FP under "FP", then one per configuration label)."""
    runs = {"FP": sample(model.forward(), model.encode, setup, keep_trajectory=True, progress=progress,
                         desc="full precision")}
    arithmetic = {}
    for label, quantization in quantizations.items():
        if real_weights and supports_real_weights(quantization):
            with real_weights_model(model.mmdit, quantization) as quantized:
                runs[label] = sample(quantized, model.encode, setup, reference=runs["FP"], progress=progress,
                                     desc=label)
            arithmetic[label] = REAL
        else:
            with quantize_model(model.mmdit, quantization, probe=layer_errors) as quantized:
                runs[label] = sample(quantized, model.encode, setup, reference=runs["FP"],
                                     probe=quantized if layer_errors else None, progress=progress, desc=label)
            arithmetic[label] = SIMULATED
    return document(model, quantizations, setup, runs, arithmetic), runs


def document(model: Model, quantizations: dict[str, Quantization], setup: Setup, runs: dict[str, Run],
             arithmetic: dict[str, str]) -> dict:
    fp = runs["FP"]
    pocket = model.name == "pocket"
    if pocket:
        reference, data_range = images01(fp.final), 1.0
        digits = _digit_scorer(setup)
    else:
        reference = fp.final
        data_range = np.ptp(fp.final.reshape(len(fp.final), -1), axis=1)
    configs, psnrs = [], {}
    for label, quantization in quantizations.items():
        run = runs[label]
        test = images01(run.final) if pocket else run.final
        psnrs[label] = psnr(reference, test, data_range)
        mse = np.square(run.final.astype(np.float64) - fp.final).reshape(len(fp.final), -1).mean(axis=1)
        entry = {"label": label, "file_meta": {k: quantization.meta.get(k) for k in ("config", "calibration")},
                 "arithmetic": arithmetic[label], "psnr_db": summary(psnrs[label], setup.seed),
                 "final_latent_mse": summary(mse, setup.seed), "step_mse": step_error_summary(run.step_mse),
                 "layer_sqnr_db": layer_sqnr(run.layer_error), "seconds": round(run.seconds, 2),
                 "psnr_per_sample": [round(float(v), 3) if math.isfinite(v) else str(v) for v in psnrs[label]]}
        if pocket:
            entry["digits"] = digits(run.final, fp.final)
        configs.append(entry)
    doc = {"model": model.name, "weights_id": model.weights_id, "dtype": str(model.dtype), "setup": {**asdict(setup), "prompts": None,
           "num_samples": len(setup.prompts)}, "fp": {"seconds": round(fp.seconds, 2)}, "configs": configs,
           "comparisons": _comparisons(quantizations, psnrs, setup.seed), "taq_version": taq.__version__,
           "mlx_version": mx.__version__, "device": str(mx.default_device()),
           "psnr_definition": ("10 log10(1 / MSE) on the images in [0, 1] (latents [-1, 1] mapped)" if pocket else
                               "10 log10(range^2 / MSE) on latents, range = the full-precision twin's peak to peak")}
    if pocket:
        doc["fp"]["digits"] = digits(fp.final, None)
    return doc


def _digit_scorer(setup: Setup):
    """(latents, fp latents or None) -> accuracy, its interval, Frechet distances (pocket only)."""
    from taq.pocket import DEFAULT_WEIGHTS, load_pocket
    from taq.pocket.data import latents_to_images, split_digits
    from taq.pocket.evaluate import digit_logits, fit_digit_classifier

    _, metadata = load_pocket(DEFAULT_WEIGHTS)
    split = split_digits(seed=metadata.get("train_config", {}).get("split_seed", 0))
    classifier, _ = fit_digit_classifier(split)
    real = digit_logits(classifier, split.test_images)
    prompted = np.array([i % 10 for i in range(len(setup.prompts))])

    def score(latents: np.ndarray, fp_latents: np.ndarray | None) -> dict:
        images = latents_to_images(latents)
        features = digit_logits(classifier, images)
        correct = (classifier.predict(images.reshape(len(images), -1) / 16.0) == prompted).astype(np.float64)
        result = {"accuracy": summary(correct, setup.seed), "frechet_to_real": frechet_distance(features, real)}
        if fp_latents is not None:
            fp_features = digit_logits(classifier, latents_to_images(fp_latents))
            result["frechet_to_fp"] = frechet_distance(features, fp_features)
        return result

    return score


def _comparisons(quantizations: dict[str, Quantization], psnrs: dict[str, np.ndarray], seed: int) -> list[dict]:
    """Paired PSNR differences between configurations of the same bits that differ only in their activation grids
    over time (per-timestep, sigma-poly and dynamic minus static), and, where the per-call dynamic reference ran,
    the share of the static-to-dynamic gap each time-aware table recovers (with a paired bootstrap interval)."""
    by_bits: dict[tuple, dict[str, str]] = {}
    for label, quantization in quantizations.items():
        config = quantization.meta.get("config", {})
        key = (config.get("weight_bits"), config.get("act_bits"))
        by_bits.setdefault(key, {})[config.get("act_mode")] = label
    out = []
    for modes in by_bits.values():
        if "static" not in modes:
            continue
        static = psnrs[modes["static"]]
        for mode in ("per-timestep", "sigma-poly", "dynamic"):
            if mode in modes:
                entry = {"a": modes[mode], "b": modes["static"], "metric": "psnr_db",
                         **paired_difference(psnrs[modes[mode]], static, seed)}
                if mode != "dynamic" and "dynamic" in modes:
                    entry["gap_recovered"] = gap_recovered(psnrs[modes[mode]], static, psnrs[modes["dynamic"]], seed)
                out.append(entry)
    return out


# --------------------------------------------------------------------------- output


def table(doc: dict) -> str:
    lines = [f"{'configuration':<26} {'PSNR dB (95% CI)':>24} {'p10':>7} {'worst':>7}"
             + ("  accuracy" if doc["model"] == "pocket" else "") + f"  {'seconds':>8}  arithmetic"]
    if "digits" in doc["fp"]:
        lines.append(f"{'FP':<26} {'':>24} {'':>7} {'':>7}  {doc['fp']['digits']['accuracy']['mean']:>8.1%}"
                     f"  {doc['fp']['seconds']:>8.1f}")
    for c in doc["configs"]:
        p = c["psnr_db"]
        ci = f"{p['mean']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]"
        row = f"{c['label']:<26} {ci:>24} {p['p10']:>7.2f} {p['min']:>7.2f}"
        if "digits" in c:
            row += f"  {c['digits']['accuracy']['mean']:>8.1%}"
        lines.append(row + f"  {c['seconds']:>8.1f}  {'real' if c['arithmetic'] == REAL else 'simulated'}")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", nargs="+", required=True, metavar="FILE",
                        help="quantization files (taq quantize); each is one configuration")
    add_model_options(parser)
    parser.add_argument("--samples", type=int, default=500, help="samples per configuration (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps (default: %(default)s)")
    parser.add_argument("--cfg-scale", type=number(float, at_least=0), default=1.5,
                        help="guidance scale, >= 0 (default: %(default)s)")
    parser.add_argument("--shift", type=float, default=SD3_SHIFT, help="flow schedule shift (default: %(default)s)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="trajectories per model call, 2x rows with CFG (default: %(default)s)")
    parser.add_argument("--real-weights", action="store_true",
                        help="run weight-only configurations (A16) with MLX's real low-bit weights")
    parser.add_argument("--no-layer-errors", action="store_true", help="skip the per-layer output error probe")
    parser.add_argument("--output-dir", type=Path, default=Path("reports/quantization"),
                        help="for evaluation.json, the figures and index.html (default: %(default)s)")


def run_cli(args: argparse.Namespace) -> None:
    from taq.report.quantization import write_evaluation_report

    started = time.perf_counter()
    preset = check_model_options(args.model, args.checkpoint, args.random_weights)
    for name, value, low in (("--samples", args.samples, 1), ("--steps", args.steps, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output-dir {args.output_dir} exists and is not a directory")
    for name, path in [("--checkpoint", args.checkpoint)] + [("--quantization", q) for q in args.quantization]:
        check_outputs_in_spare(args.output_dir, ("evaluation.json", "index.html", "figures/*.png"), {name: path})
    resolution = preset.default_resolution if args.resolution is None else args.resolution
    latent_shape = preset.latent_shape(resolution)
    quantizations = {}
    for path in args.quantization:
        quantization = load_quantization(path)
        label = quantization.describe()
        while label in quantizations:
            label += "'"
        quantizations[label] = (path, quantization)
    model = load_model(args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                       dtype=dtype_from_args(args))
    for path, quantization in quantizations.values():
        check_fits(quantization, model, path)
    setup = Setup(evaluation_prompts(model, args.samples), latent_shape, args.steps, args.cfg_scale, args.shift,
                  args.seed, args.batch_size)
    doc, runs = evaluate(model, {label: q for label, (_, q) in quantizations.items()}, setup,
                         real_weights=args.real_weights, layer_errors=not args.no_layer_errors)
    for entry, (path, _) in zip(doc["configs"], quantizations.values()):
        entry["file"] = str(path)
    doc["seconds"] = round(time.perf_counter() - started, 1)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output_dir / "evaluation.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    index = write_evaluation_report(args.output_dir, doc, runs)
    print(table(doc))
    print(f"wrote {args.output_dir / 'evaluation.json'} and {index} in {doc['seconds']:.0f} s")
