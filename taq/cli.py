"""`taq` command line: one subcommand per pipeline stage, each a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys

import taq
from taq.errors import Interrupted
from taq.options import Parser, one_line_warnings


def cmd_info(args: argparse.Namespace) -> None:
    import platform

    import mlx.core as mx
    import numpy as np

    from taq._blas import _openblas_mapped
    from taq.config import PRESETS

    print(f"taq        {taq.__version__}")
    print(f"python     {platform.python_version()} ({platform.system()} {platform.machine()})")
    print(f"mlx        {mx.__version__}")
    print(f"numpy      {np.__version__}")
    print(f"device     {mx.default_device()}")
    blas = taq.BLAS if platform.system() != "Linux" or _openblas_mapped() else "MLX's bundled reference BLAS"
    print(f"blas       {blas}")
    print("presets")
    for name, preset in PRESETS.items():
        cfg = preset.mmdit
        print(f"  {name:<11} depth {cfg.depth:>2}  hidden {cfg.hidden_size:>4}  heads {cfg.num_heads:>2}  "
              f"patch {cfg.patch_size}  channels {cfg.in_channels:>2}  gelu {cfg.gelu}  "
              f"{'weights shipped' if preset.ships_weights else 'weights from --checkpoint (or --random-weights)'}")


# Each stage module exposes `configure_parser(parser)` and `run_cli(args)`.
STAGES = {
    "generate": ("taq.generate", "sample images for prompts (the pocket model's are PNGs)"),
    "calibrate": ("taq.calibration", "phase 1: sample trajectories and write the calibration set"),
    "profile": ("taq.profiling", "phase 2: trace post-GELU FFN activations into statistics"),
    "plot": ("taq.report.plots", "figures and summary tables from a stats file"),
    "quantize": ("taq.quantization", "phase 3: calibrate weight and time-aware activation grids into a file"),
    "evaluate": ("taq.evaluate", "quantized vs full-precision sampling, paired, with intervals and a report"),
    "report": ("taq.pipeline", "the main job: calibrate, profile, measure the claims, write the HTML report"),
    "bench": ("taq.bench", "time one CFG step, untraced and traced, as JSON"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(prog="taq", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, MLX device, BLAS in use, model presets",
                   allow_abbrev=False).set_defaults(func=cmd_info)
    for name, (module_name, help_text) in STAGES.items():
        module = importlib.import_module(module_name)
        stage = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        module.configure_parser(stage)
        stage.set_defaults(func=module.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input and failed reads or writes (a full disk included) are one line and exit
    status 2; Ctrl-C is one line saying what was kept, and exit status 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with one_line_warnings(args.command):
            args.func(args)
    except (ValueError, OSError) as exc:  # OSError: FileNotFoundError, PermissionError, a full disk, ...
        print(f"taq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        kept = str(exc) if isinstance(exc, Interrupted) else "no output was finished"
        print(f"taq {args.command}: interrupted; {kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
