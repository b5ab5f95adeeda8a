"""Phase 1: sample CFG Euler trajectories and keep the selected steps' model inputs as the calibration set.

The recipe (TaQ-DiT's, on SD3's flow schedule): T trajectories of N Euler steps with classifier-free guidance;
from each, the model input x_t of K selected steps (`taq.sampling.select_steps`); T * K points, shuffled.

Reproducibility does not depend on batching or on which run computed a trajectory:
- trajectory i uses prompt `prompts[i % len(prompts)]` (prompts cycle, so each gets T / len(prompts) of them);
  only the prompts some trajectory uses, the first min(T, M), are encoded and stored, so the stored indices
  i % M point into the stored list as they would into the full one;
- its starting noise is `numpy.random.default_rng([seed, 0, i]).standard_normal((H, W, C), float32)`;
- points are ordered trajectory-major (point i * K + j is trajectory i's j-th selected step), then permuted by
  `numpy.random.default_rng([seed, 1, 0]).permutation(T * K)`.
B trajectories go through the model together (2B rows with CFG); a batch of 1 gives the same result up to float
rounding, and the same batch size gives byte-identical arrays on the same platform.

Resume: after every batch the finished trajectories' selected x_t and the recipe's fingerprint are written
atomically to `<output>.partial.npz` (Ctrl-C or a full disk leaves the last one in place and says so). A rerun with
the same recipe (batch size included, since batching changes float rounding) continues after the last finished batch
and writes the same arrays as an uninterrupted run. A partial file from a different recipe is refused, naming the
fields that differ (delete it or pass `resume=False` / `--no-resume` to start over); it is removed once the output
is written.

Several processes (`mlx.launch -n N -- python -m taq.cli calibrate ...`, see taq.distributed): global batch k
(trajectories [k B, (k + 1) B)) runs on rank k % N, so every batch is computed as in a single process and the
file is byte-identical to a single process's for the same recipe and batch size. Each rank checkpoints its
finished batches to `<output>.rank{r}of{N}.partial.npz`; a rerun with the same N resumes each rank's shard.
Rank 0 gathers the trajectories and writes the output; a failure on any rank fails every rank, writing nothing.

Real SD3: `taq calibrate --model sd3-medium --checkpoint PATH` encodes prompts with DiffusionKit's CLIP-L/G + T5
encoders when DiffusionKit is installed (scripts/install_diffusionkit.sh), or `--embeddings FILE` reads them
precomputed (`taq.conditioning.save_embeddings`, with "" among the prompts for the unconditional branch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

import taq
import mlx.core as mx

from taq.conditioning import UNCONDITIONAL_PROMPT
from taq.distributed import (World, batch_ranges, check_agreement, collective_step, current_world, fail_together,
                             gather_buffers, shard)
from taq.errors import Interrupted
from taq.formats import TaqFormatError, WriteError, check_input_file, check_output_path, check_outputs_spare_inputs
from taq.formats.calibration import load_partial, partial_progress, save_calibration, save_partial
from taq.loading import Model, check_model_options, dtype_from_args, load_model
from taq.options import add_model_options, number
from taq.recipes import CalibrationRecipe
from taq.sampling import RULES, CFGDenoiser, euler_steps, model_timesteps

SD3_PROMPTS_FILE = Path(__file__).resolve().parent / "prompts" / "sd3_calibration.txt"
NOISE_STREAM, SHUFFLE_STREAM = 0, 1  # second entry of the seed tuples, keeps the two random streams apart


@dataclass(frozen=True)
class CalibrationSummary:
    path: Path
    num_points: int
    num_trajectories: int
    num_selected: int
    resumed_trajectories: int  # finished trajectories taken over from a partial file
    file_bytes: int
    seconds: float
    ranks: int = 1  # processes that shared the work

    def line(self) -> str:
        resumed = f", resumed after {self.resumed_trajectories} trajectories" if self.resumed_trajectories else ""
        ranks = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        return (f"wrote {self.num_points} points ({self.num_trajectories} trajectories x {self.num_selected} steps) "
                f"to {self.path} ({self.file_bytes / 2**20:.2f} MiB) in {self.seconds:.1f} s{ranks}{resumed}")


# --------------------------------------------------------------------------- sampling


def trajectory_noise(seed: int, index: int, latent_shape: Sequence[int]) -> np.ndarray:
    """Trajectory `index`'s starting latent (H, W, C): a function of (seed, index) only."""
    rng = np.random.default_rng([seed, NOISE_STREAM, index])
    return rng.standard_normal(tuple(latent_shape), dtype=np.float32)


def sample_selected_steps(denoiser, x: mx.array, sigmas: np.ndarray, selected: Sequence[int]) -> np.ndarray:
    """Euler-sample from x (B, H, W, C) and return the selected steps' x_t as (B, K, H, W, C) float32.

    Each selected x_t is copied to the host as soon as it is computed and nothing else is kept; sampling stops
    at the last selected step, since later model calls would only feed steps nobody keeps.
    """
    position = {step: j for j, step in enumerate(selected)}
    out = np.empty((x.shape[0], len(selected)) + tuple(x.shape[1:]), dtype=np.float32)
    for step in euler_steps(denoiser, x, sigmas):
        mx.async_eval(step.x_t)  # bounds the lazy graph to one step
        if step.index in position:
            out[:, position[step.index]] = np.array(step.x_t.astype(mx.float32))
            if step.index == selected[-1]:
                break
    return out


def shuffled_points(num_trajectories: int, num_selected: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(trajectory index, selected-step position) of each output point, after the seeded shuffle."""
    order = np.random.default_rng([seed, SHUFFLE_STREAM, 0]).permutation(num_trajectories * num_selected)
    return order // num_selected, order % num_selected


# --------------------------------------------------------------------------- the set


def calibrate(model: Model, prompts: Sequence[str], *, output: str | os.PathLike, resolution: Optional[int] = None,
              resume: bool = True, progress: bool = True, on_batch: Optional[Callable[[int], None]] = None,
              world: Optional[World] = None, **recipe) -> CalibrationSummary:
    """Sample the calibration set and write it to `output` (see the module docstring for the recipe).

    `recipe` holds `CalibrationRecipe` fields (num_trajectories, num_steps, ...); the ones not given keep the
    recipe's defaults. `on_batch(finished_trajectories)` runs after each batch is checkpointed (counting this
    rank's trajectories). Every argument is checked before anything is sampled or written. `world` defaults to the
    launched one.
    """
    started = time.perf_counter()
    world = current_world() if world is None else world
    with collective_step(world, "checking the inputs") as setup:
        recipe = CalibrationRecipe(**recipe)
        num_trajectories, num_selected = recipe.num_trajectories, recipe.num_selected
        prompts = check_prompts(prompts)
        resolution = model.default_resolution if resolution is None else resolution
        latent_shape = model.latent_shape(resolution)
        output = check_output_path(output)
        partial = partial_path(output, world)
        used = prompts[:min(num_trajectories, len(prompts))]  # trajectory i uses prompt i % M
        cs, cs_pooled = (np.array(a.astype(mx.float32)) for a in model.encode(used))
        cs_uncond, cs_pooled_uncond = (np.array(a.astype(mx.float32))[0]
                                       for a in model.encode([UNCONDITIONAL_PROMPT]))
        fingerprint = _fingerprint(recipe, model, prompts, resolution, latent_shape,
                                   (cs, cs_pooled, cs_uncond, cs_pooled_uncond))
        all_batches = batch_ranges(num_trajectories, recipe.batch_size)
        batches = shard(all_batches, world)
        # (this rank's T, K, H, W, C): its trajectories in batch order, filled one batch at a time
        trajectories = np.empty((sum(map(len, batches)), num_selected) + latent_shape, dtype=np.float32)
        record = fingerprint if world.size == 1 else {**fingerprint, "shard": world.label}
        done = _load_partial(partial, record, trajectories, batches) if resume and partial.exists() else 0
        setup.value = {"fingerprint": fingerprint, "resumed": done}
    check_agreement([value["fingerprint"] for value in setup.values], "the calibration recipe")

    kept = (f"each rank's finished batches are kept in {output.name}.rank*of{world.size}.partial.npz; "
            "rerun the same command to resume")
    desc = "calibrate" if world.size == 1 else f"calibrate ({world.label})"
    try:
        with collective_step(world, "sampling", note=f"nothing was written to {output}; {kept}"):
            _sample_batches(model, recipe, cs, cs_pooled, (cs_uncond, cs_pooled_uncond), latent_shape, batches,
                            trajectories, done, partial, record, on_batch, progress=progress and world.is_root,
                            desc=desc)
        if world.size > 1:
            trajectories = _gather_trajectories(world, trajectories, all_batches)

        with collective_step(world, "writing the calibration set",
                             note=f"{output} was not written; {kept}") as written:
            if world.is_root:
                _write_set(output, trajectories, recipe, fingerprint, prompts,
                           (cs, cs_pooled, cs_uncond, cs_pooled_uncond), world)
                written.value = output.stat().st_size
    except KeyboardInterrupt:
        raise Interrupted(_kept(partial, len(trajectories))) from None
    except OSError as exc:  # a full disk: the last checkpoint survives, since every write is atomic
        raise WriteError(f"{exc}; {_kept(partial, len(trajectories))}") from None
    partial.unlink(missing_ok=True)
    return CalibrationSummary(output, num_trajectories * num_selected, num_trajectories, num_selected,
                              sum(value["resumed"] for value in setup.values), written.values[0],
                              time.perf_counter() - started, world.size)


def _kept(partial: Path, num_trajectories: int) -> str:
    """What a stopped run leaves behind, as the second half of its one-line message."""
    finished = partial_progress(partial)
    if not finished:
        return "no batch had finished, nothing was kept; run the same command again to start over"
    return (f"{finished} of {num_trajectories} trajectories are kept in {partial}; run the same command again to "
            "resume")


def _sample_batches(model: Model, recipe: CalibrationRecipe, cs: np.ndarray, cs_pooled: np.ndarray,
                    uncond: tuple[np.ndarray, np.ndarray], latent_shape: tuple[int, ...], batches: list[range],
                    trajectories: np.ndarray, done: int, partial: Path, record: dict,
                    on_batch: Optional[Callable[[int], None]], *, progress: bool, desc: str) -> None:
    """Sample `batches` (trajectory ranges) into `trajectories`, whose first `done` rows are finished already;
    checkpoint to `partial` after every batch."""
    selected, sigmas = recipe.selected_steps, recipe.sigmas
    cond_tokens, cond_pooled = mx.array(cs), mx.array(cs_pooled)
    uncond = (mx.array(uncond[0][None]), mx.array(uncond[1][None]))
    finished = 0
    forward = model.forward()
    with tqdm(total=len(trajectories), initial=done, unit="traj", desc=desc, disable=not progress) as bar:
        for batch in batches:
            stop = finished + len(batch)
            if stop <= done:  # checkpointed by an earlier run
                finished = stop
                continue
            rows = mx.array(np.asarray(batch) % cs.shape[0])
            denoiser = CFGDenoiser(forward, (cond_tokens[rows], cond_pooled[rows]), uncond, recipe.cfg_scale)
            noise = mx.array(np.stack([trajectory_noise(recipe.seed, i, latent_shape) for i in batch]))
            trajectories[finished:stop] = sample_selected_steps(denoiser, noise, sigmas, selected)
            # Rewrites every finished trajectory each time (simple and atomic; I/O ~ T^2 / B, small next to sampling).
            save_partial(partial, trajectories[:stop], record)
            bar.update(len(batch))
            finished = stop
            if on_batch is not None:
                on_batch(finished)


def _gather_trajectories(world: World, trajectories: np.ndarray, all_batches: list[range]) -> Optional[np.ndarray]:
    """Every rank's (its T, K, H, W, C) trajectories put in trajectory order on rank 0 (None on the others)."""
    buffers = gather_buffers(world, trajectories)
    if buffers is None:
        return None
    full = np.empty((all_batches[-1].stop,) + trajectories.shape[1:], dtype=np.float32)
    for rank, buffer in enumerate(buffers):
        indices = [i for batch in shard(all_batches, World(rank, world.size)) for i in batch]
        full[indices] = buffer.view(np.float32).reshape((len(indices),) + trajectories.shape[1:])
    return full


def _write_set(output: Path, trajectories: np.ndarray, recipe: CalibrationRecipe, fingerprint: dict,
               prompts: list[str], embeddings: tuple[np.ndarray, ...], world: World) -> None:
    """Shuffle the (T, K, H, W, C) trajectories into points and write the calibration file atomically."""
    num_trajectories, num_selected = trajectories.shape[:2]
    selected, sigmas = recipe.selected_steps, recipe.sigmas
    cs, cs_pooled, cs_uncond, cs_pooled_uncond = embeddings
    trajectory_indices, positions = shuffled_points(num_trajectories, num_selected, recipe.seed)
    step_indices = np.asarray(selected, dtype=np.int64)[positions]
    arrays = {
        "xs": trajectories[trajectory_indices, positions],  # (P, H, W, C); a second copy of the output, briefly
        "ts": model_timesteps(sigmas)[step_indices],
        "prompt_indices": trajectory_indices % len(prompts),  # < len(cs): the prompts used are stored
        "trajectory_indices": trajectory_indices,
        "step_indices": step_indices,
        "cs": cs, "cs_pooled": cs_pooled, "cs_uncond": cs_uncond, "cs_pooled_uncond": cs_pooled_uncond,
        "prompts": np.array(prompts[:cs.shape[0]]),
        "cfg_scale": np.array(recipe.cfg_scale, dtype=np.float64),
    }
    meta = {
        **{k: v for k, v in fingerprint.items() if k != "prompts"},  # the prompts are an array
        "sigmas": sigmas.tolist(),
        "selected_steps": selected,
        "num_points": num_trajectories * num_selected,
        "prompt_assignment": f"trajectory i uses prompt i % {len(prompts)} of the {len(prompts)} given; the "
                             f"{cs.shape[0]} used are stored",
        "noise": f"trajectory i starts from numpy default_rng([seed, {NOISE_STREAM}, i])"
                 ".standard_normal((H, W, C), float32)",
        "point_order": f"trajectory-major (i * K + j), permuted by numpy default_rng([seed, {SHUFFLE_STREAM}, 0])",
        "taq_version": taq.__version__,
        "mlx_version": mx.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"ranks": world.size} if world.size > 1 else {}),
    }
    save_calibration(output, arrays, meta)


def partial_path(output: Path, world: World = World()) -> Path:
    """Where a run checkpoints its finished trajectories: one file per rank when several share the work."""
    suffix = ".partial.npz" if world.size == 1 else f".rank{world.rank}of{world.size}.partial.npz"
    return output.with_name(output.name + suffix)


def _fingerprint(recipe: CalibrationRecipe, model: Model, prompts: list[str], resolution: int,
                 latent_shape: tuple[int, ...], embeddings: tuple[np.ndarray, ...]) -> dict:
    """What a partial file must match to be resumed (JSON-normalized so it compares equal after a round trip)."""
    digest = hashlib.sha256()
    for array in embeddings:
        digest.update(np.ascontiguousarray(array).tobytes())
    record = {**asdict(recipe), "model": model.name, "weights_id": model.weights_id,
              "random_weights": model.random_weights,
              "dtype": str(model.dtype), "resolution": resolution,
              "latent_shape": list(latent_shape), "prompts": prompts, "embeddings_sha256": digest.hexdigest()}
    return json.loads(json.dumps(record))


def _load_partial(path: Path, fingerprint: dict, trajectories: np.ndarray, batches: list[range]) -> int:
    """Copy a matching partial file's finished trajectories (whole `batches`, in order) into `trajectories`;
    return how many there are."""
    start_over = "delete it or pass --no-resume to start over"
    try:
        xs, saved = load_partial(path)
    except TaqFormatError as exc:
        raise TaqFormatError(f"cannot resume from {exc}; {start_over}") from None
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        raise ValueError(f"{path} is a partial run of a different recipe (differs in: {', '.join(differing)}); "
                         f"{start_over}")
    finished = xs.shape[0]
    if xs.dtype != np.float32 or xs.shape[1:] != trajectories.shape[1:] or finished > trajectories.shape[0]:
        raise TaqFormatError(f"{path}: xs has {xs.dtype} {xs.shape}, expected float32 (<= "
                             f"{trajectories.shape[0]},) + {trajectories.shape[1:]}; {start_over}")
    if finished not in np.cumsum([0] + [len(batch) for batch in batches]):
        raise TaqFormatError(f"{path}: holds {finished} trajectories, not a whole number of this run's batches; "
                             f"{start_over}")
    trajectories[:finished] = xs
    return finished


# --------------------------------------------------------------------------- command line


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line of a UTF-8 file; surrounding whitespace and blank lines are dropped."""
    path = check_input_file(path, "prompts file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompts file {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                         "save it as UTF-8") from None
    return check_prompts([line.strip() for line in text.splitlines() if line.strip()], source=str(path))


def default_prompts(model_name: str) -> list[str]:
    """The pocket model's own calibration prompts; the SD3 list for SD3 and the random-weight presets."""
    if model_name == "pocket":
        from taq.pocket.prompts import CALIBRATION_PROMPTS

        return list(CALIBRATION_PROMPTS)
    return read_prompts(SD3_PROMPTS_FILE)


def check_prompts(prompts: Sequence[str], source: str = "prompts") -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{source}: expected a list of strings, got {prompts!r:.80}")
    if len(prompts) == 0:
        raise ValueError(f"{source}: no prompts")
    return list(prompts)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    recipe = CalibrationRecipe()  # the defaults shown are the recipe's
    add_model_options(parser)
    parser.add_argument("--embeddings", help="precomputed prompt embeddings file (taq-embeddings), \"\" included")
    parser.add_argument("--prompts", help="prompts file, one per line (default: the model's shipped prompts)")
    parser.add_argument("--num-trajectories", "--num-fid-samples", dest="num_trajectories", type=int,
                        default=recipe.num_trajectories,
                        help="trajectories (--num-fid-samples is the seed's name) (default: %(default)s)")
    parser.add_argument("--num-sampling-steps", dest="num_steps", type=int, default=recipe.num_steps,
                        help="Euler steps (default: %(default)s)")
    parser.add_argument("--num-selected-steps", dest="num_selected", type=int, default=recipe.num_selected,
                        help="steps kept per trajectory (default: %(default)s)")
    parser.add_argument("--step-selection", choices=RULES, default=recipe.step_selection,
                        help="stride: range(0, N, N // K) as TaQ-DiT's code; linspace: the seed's "
                             "(default: %(default)s)")
    parser.add_argument("--cfg-scale", type=number(float, at_least=0), default=recipe.cfg_scale,
                        help="guidance scale, >= 0 (default: %(default)s)")
    parser.add_argument("--shift", type=float, default=recipe.shift, help="flow schedule shift (default: %(default)s)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--seed", type=int, default=recipe.seed, help="noise and shuffle seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size,
                        help="trajectories per model call, 2x rows with CFG (default: %(default)s)")
    parser.add_argument("--output", default="calibration.npz", help="output .npz (default: %(default)s)")
    parser.add_argument("--no-resume", action="store_true",
                        help="ignore and overwrite the partial file of an earlier run")


def run_cli(args: argparse.Namespace) -> None:
    recipe = CalibrationRecipe(**{name: getattr(args, name) for name in CalibrationRecipe.__dataclass_fields__})
    preset = check_model_options(args.model, args.checkpoint, args.random_weights)
    if args.embeddings is not None:
        check_input_file(args.embeddings, "embeddings file")
    prompts = read_prompts(args.prompts) if args.prompts is not None else default_prompts(args.model)
    resolution = preset.default_resolution if args.resolution is None else args.resolution
    preset.latent_shape(resolution)  # before the model is loaded
    output = check_output_path(args.output)
    check_outputs_spare_inputs(
        {"--output": output, "its partial file": partial_path(output, current_world())},
        {"--prompts": args.prompts, "--embeddings": args.embeddings, "--checkpoint": args.checkpoint})

    model = load_model(args.model, checkpoint=args.checkpoint, embeddings=args.embeddings,
                       random_weights=args.random_weights, dtype=dtype_from_args(args))
    with fail_together("calibrate"):
        summary = calibrate(model, prompts, **asdict(recipe), resolution=resolution, output=output,
                            resume=not args.no_resume)
    if current_world().is_root:
        print(summary.line())
