"""`taq generate`: sample one image per prompt with the CFG Euler sampler (a quick look at what a model draws).

The pocket model's latent is the image itself, so it is saved as a PNG; other models' latents need SD3's VAE,
which taq does not ship, so they are saved as .npy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from taq.conditioning import UNCONDITIONAL_PROMPT
from taq.formats import atomic_path, check_output_path, check_outputs_spare_inputs
from taq.loading import check_model_options, dtype_from_args, load_model
from taq.options import add_model_options, number
from taq.sampling import SD3_SHIFT, CFGDenoiser, flow_sigmas, sample


def generate(model, prompts: list[str], *, steps: int = 100, cfg_scale: float = 1.5, shift: float = SD3_SHIFT,
             seed: int = 0, resolution: int | None = None) -> np.ndarray:
    """Latents (len(prompts), H, W, C); prompt i starts from noise seeded by (seed, i)."""
    if not prompts:
        raise ValueError("give at least one prompt")
    shape = model.latent_shape(resolution or model.default_resolution)
    noise = np.stack([np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
                      for i in range(len(prompts))])
    denoiser = CFGDenoiser(model.forward(), model.encode(prompts), model.encode([UNCONDITIONAL_PROMPT]), scale=cfg_scale)
    return np.array(sample(denoiser, mx.array(noise), flow_sigmas(steps, shift=shift)).astype(mx.float32))


def save_png(path: Path, latents: np.ndarray, prompts: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(latents), figsize=(2.2 * len(latents), 2.6), squeeze=False)
    for ax, latent, prompt in zip(axes[0], latents, prompts):
        ax.imshow(latent[..., 0], cmap="gray_r", vmin=-1, vmax=1)  # pocket latents: ink = +1
        ax.set_title(prompt, fontsize=7, wrap=True)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", help='e.g. "a handwritten digit seven"')
    parser.add_argument("--output", type=Path, default=Path("generated.png"), help=".png (pocket) or .npy")
    add_model_options(parser)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cfg-scale", type=number(float, at_least=0), default=1.5, help="guidance scale, >= 0")
    parser.add_argument("--seed", type=int, default=0)


def run_cli(args: argparse.Namespace) -> None:
    if args.output.suffix not in (".png", ".npy"):
        raise ValueError(f"--output must end in .png or .npy, got {args.output}")
    if args.output.suffix == ".png" and args.model != "pocket":
        raise ValueError(f"{args.model}'s latents need a VAE to become images; use --output NAME.npy")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    check_model_options(args.model, args.checkpoint, args.random_weights)
    check_output_path(args.output)
    check_outputs_spare_inputs({"--output": args.output}, {"--checkpoint": args.checkpoint})
    started = time.perf_counter()
    model = load_model(args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                       dtype=dtype_from_args(args))
    loaded = time.perf_counter() - started
    latents = generate(model, args.prompts, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    if args.output.suffix == ".png":
        save_png(args.output, latents, args.prompts)
    else:
        with atomic_path(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, latents)
    print(f"wrote {args.output} ({len(latents)} sample(s); model loaded in {loaded:.2f} s, "
          f"total {time.perf_counter() - started:.1f} s)")
