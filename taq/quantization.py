"""Phase 3: calibrate a quantization of the MMDiT and write the quantization file (`taq quantize`).

    taq quantize --calibration-file cal.npz --weights 4 --activations 8 --act-scales per-timestep --output q.safetensors

Weights are fake-quantized per output channel (or per group of input columns), activations per tensor with a grid
per calibrated timestep (`per-timestep`), one for all timesteps (`static`) or a polynomial in sigma
(`sigma-poly`); 16 bits means that side stays in full precision (W4A16: weights only). Every quantized layer's
grids go into the file with the options, the model and the calibration set they were made from; `taq evaluate`
applies it. `--shift`, `--migrate` and `--balance` add TaQ-DiT's and PTQ4DiT's exact input transforms
(`taq.quant.transforms`); `--reconstruct joint|separate` then trains each joint block's rounding and activation
steps (`taq.quant.reconstruction`). Which of these is real low-bit arithmetic: see `taq.quant.real` (weights
only, through MLX's quantized kernels); activation quantization is always simulated (fake quantization).
"""

from __future__ import annotations

import argparse
import time

from taq.formats import check_output_path, check_outputs_spare_inputs
from taq.formats.calibration import load_calibration
from taq.formats.quantization import save_quantization
from taq.loading import check_model_options, dtype_from_args, load_model
from taq.options import add_model_options
from taq.quant.calibration import FULL_PRECISION, OBSERVERS, QuantConfig, calibrate_quantization
from taq.quant.grid import GROUP_SIZES
from taq.quant.layers import parse_override
from taq.quant.reconstruction import MODES as RECONSTRUCTION_MODES, ReconstructionConfig, reconstruct
from taq.quant.schedules import MODES
from taq.quant.transforms import DEFAULT_MIGRATION_THRESHOLD
from taq.tracing.plan import check_calibration_fits


def bits_option(value: int, flag: str) -> int | None:
    """2..8 bits, or 16 for full precision (None)."""
    if value == FULL_PRECISION:
        return None
    if not 2 <= value <= 8:
        raise ValueError(f"{flag} must be 2..8, or {FULL_PRECISION} for full precision, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = QuantConfig()
    parser.add_argument("--calibration-file", required=True, help="phase 1 output (taq calibrate)")
    parser.add_argument("--output", required=True, help="the quantization file (.safetensors)")
    add_model_options(parser)
    parser.add_argument("--weights", type=int, default=defaults.weight_bits,
                        help=f"weight bits, 2..8 or {FULL_PRECISION} (default: %(default)s)")
    parser.add_argument("--activations", type=int, default=defaults.act_bits,
                        help=f"activation bits, 2..8 or {FULL_PRECISION} (default: %(default)s)")
    parser.add_argument("--act-scales", choices=MODES, default=defaults.act_mode,
                        help="activation grids over time (default: %(default)s)")
    parser.add_argument("--poly-degree", type=int, default=defaults.poly_degree,
                        help="degree of the sigma-poly polynomials (default: %(default)s)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                        help="weight grids per group of input columns instead of per output channel")
    parser.add_argument("--weight-observer", choices=OBSERVERS, default=defaults.weight_observer,
                        help="weight range observer (default: %(default)s, TaQ-DiT's L_2.4 search)")
    parser.add_argument("--act-observer", choices=OBSERVERS, default=defaults.act_observer,
                        help="activation range observer (default: %(default)s)")
    parser.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        default=defaults.percentiles, help="for the percentile observer (default: 0.01 99.99)")
    parser.add_argument("--layers", nargs="+", metavar="PATTERN",
                        help="quantize only layers matching these patterns, e.g. 'mm_*_img.fc2' "
                             "(default: every joint-block qkv, proj, fc1, fc2)")
    parser.add_argument("--include-adaln", action="store_true",
                        help="also quantize the adaLN modulation Linears (with the default layers)")
    parser.add_argument("--override", action="append", default=[], metavar="PATTERN=BITS",
                        help="weight bits for matching layers, e.g. 'mm_00_*.qkv=8' (repeatable)")
    parser.add_argument("--first-last-bits", type=int,
                        help="weight bits of the first (block 0 qkv) and last quantized layers (TaQ-DiT: 8)")
    parser.add_argument("--shift", action="store_true",
                        help="TaQ-DiT's shifting: centre each post-GELU channel on its midrange (per timestep unless "
                             "--act-scales static)")
    parser.add_argument("--migrate", type=float, nargs="?", const=DEFAULT_MIGRATION_THRESHOLD, metavar="THRESHOLD",
                        help="TaQ-DiT's outlier migration on post-GELU inputs: channels wider than THRESHOLD x the "
                             f"median channel (default {DEFAULT_MIGRATION_THRESHOLD:g}) move range into fc2's weight")
    parser.add_argument("--balance", action="store_true",
                        help="PTQ4DiT's salience balancing on every quantized layer (instead of --migrate)")
    parser.add_argument("--reconstruct", choices=RECONSTRUCTION_MODES,
                        help="block reconstruction after calibration: AdaRound weights and LSQ activation steps "
                             "trained together (joint, TaQ-DiT) or one after the other (separate)")
    parser.add_argument("--iters", type=int, default=ReconstructionConfig().iters,
                        help="reconstruction iterations per block (default: %(default)s; TaQ-DiT: 20000)")
    parser.add_argument("--resume-dir",
                        help="keep each reconstructed block here, and skip the blocks a rerun finds done")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples,
                        help="calibration points for the activation grids and the reconstruction "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="points per forward, 2x rows with CFG (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        weight_bits=bits_option(args.weights, "--weights"), act_bits=bits_option(args.activations, "--activations"),
        act_mode=args.act_scales, weight_granularity="group" if args.group_size else "channel",
        group_size=args.group_size, weight_observer=args.weight_observer, act_observer=args.act_observer,
        percentiles=tuple(args.percentiles), poly_degree=args.poly_degree,
        layers=tuple(args.layers) if args.layers else None, include_adaln=args.include_adaln,
        overrides=tuple(parse_override(text) for text in args.override), first_last_bits=args.first_last_bits,
        shift=args.shift, migrate=args.migrate, balance=args.balance,
        num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size)


def run_cli(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    config = config_from_args(args)
    reconstruction = None if not args.reconstruct else ReconstructionConfig(
        mode=args.reconstruct, iters=args.iters, num_samples=args.num_samples, seed=args.seed)
    if args.resume_dir and reconstruction is None:
        raise ValueError("--resume-dir keeps reconstructed blocks: it needs --reconstruct")
    check_model_options(args.model, args.checkpoint, args.random_weights)
    output = check_output_path(args.output)
    if output.suffix != ".safetensors":
        raise ValueError(f"--output {output} must end in .safetensors")
    check_outputs_spare_inputs({"--output": output},
                               {"--calibration-file": args.calibration_file, "--checkpoint": args.checkpoint})
    cal = load_calibration(args.calibration_file)
    model = load_model(args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                       dtype=dtype_from_args(args))
    check_calibration_fits(cal, model, args.calibration_file)
    quantization = calibrate_quantization(model, cal, config, calibration_path=args.calibration_file)
    if reconstruction is not None:
        quantization = reconstruct(model, cal, quantization, reconstruction, resume_dir=args.resume_dir)
    save_quantization(output, quantization)
    fractions = quantization.meta.get("outlier_fraction")
    if fractions:
        print("outlier channels migrated per post-GELU layer: " + ", ".join(f"{site} {100 * f:.1f}%"
                                                                          for site, f in fractions.items()))
    print(f"wrote {config.label} ({len(quantization.layers)} layers) to {output} in "
          f"{time.perf_counter() - started:.1f} s")
