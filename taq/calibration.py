"""Phase 1: sample CFG Euler trajectories and keep the selected steps' model inputs as the calibration set.

The recipe (TaQ-DiT's, on SD3's flow schedule): T trajectories of N Euler steps with classifier-free guidance;
from each, the model input x_t of K selected steps (`taq.sampling.select_steps`); T * K points, shuffled.

Reproducibility does not depend on batching or on which run computed a trajectory:
- trajectory i uses prompt `prompts[i % len(prompts)]` (prompts cycle, so each gets T / len(prompts) of them);
- its starting noise is `numpy.random.default_rng([seed, 0, i]).standard_normal((H, W, C), float32)`;
- points are ordered trajectory-major (point i * K + j is trajectory i's j-th selected step), then permuted by
  `numpy.random.default_rng([seed, 1, 0]).permutation(T * K)`.
B trajectories go through the model together (2B rows with CFG); a batch of 1 gives the same result up to float
rounding, and the same batch size gives byte-identical arrays on the same platform.

Resume: after every batch the finished trajectories' selected x_t and the recipe's fingerprint are written
atomically to `<output>.partial.npz`. A rerun with the same recipe (batch size included, since batching changes
float rounding) continues after the last finished batch and writes the same arrays as an uninterrupted run. A
partial file from a different recipe is refused, naming the fields that differ (delete it or pass
`resume=False` / `--no-resume` to start over); it is removed once the output is written.

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
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

import taq
import mlx.core as mx

from taq.config import get_preset
from taq.distributed import (World, batch_ranges, check_agreement, collective_step, current_world, fail_together,
                             gather_buffers, shard)
from taq.io import TaqFormatError, load_npz, save_npz
from taq.models.loading import DEFAULT_MODEL, DEFAULT_RESOLUTION, LATENT_SCALE, Model, load_model
from taq.sampling import RULES, SD3_SHIFT, CFGDenoiser, euler_steps, flow_sigmas, select_steps

KIND, VERSION = "taq-calibration", 1
PARTIAL_KIND, PARTIAL_VERSION = "taq-calibration-partial", 1
UNCONDITIONAL_PROMPT = ""
SD3_PROMPTS_FILE = Path(__file__).resolve().parent / "prompts" / "sd3_calibration.txt"
NOISE_STREAM, SHUFFLE_STREAM = 0, 1  # second entry of the seed tuples, keeps the two random streams apart

# key -> ndim of every array in a calibration file (P points, M prompts)
REQUIRED_KEYS = {
    "xs": 4,  # (P, H, W, C) float32
    "ts": 1,  # (P,) float32, 1000 * sigma as the model received it
    "prompt_indices": 1,  # (P,) into prompts / cs
    "trajectory_indices": 1,  # (P,)
    "step_indices": 1,  # (P,) sampler step, 0 .. num_steps - 1
    "cs": 3,  # (M, L, token_dim)
    "cs_pooled": 2,  # (M, pooled_dim)
    "cs_uncond": 2,  # (L, token_dim) embedding of "" for the CFG branch
    "cs_pooled_uncond": 1,  # (pooled_dim,)
    "prompts": 1,  # (M,) str
    "cfg_scale": 0,
}


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class CalibrationRecipe:
    """Everything that decides the sampled points, besides the model, prompts and resolution."""

    num_trajectories: int = 256
    num_steps: int = 100
    num_selected: int = 25
    step_selection: str = "stride"
    cfg_scale: float = 1.5
    shift: float = SD3_SHIFT
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        for name in ("num_trajectories", "num_steps", "num_selected", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("num_trajectories", "num_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_selected > self.num_steps:
            raise ValueError(f"cannot select {self.num_selected} steps out of {self.num_steps} sampling steps")
        select_steps(self.num_steps, self.num_selected, self.step_selection)  # checks the rule and counts
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {self.cfg_scale}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a positive number, got {self.shift}")

    @property
    def selected_steps(self) -> list[int]:
        return select_steps(self.num_steps, self.num_selected, self.step_selection)

    @property
    def sigmas(self) -> np.ndarray:
        return flow_sigmas(self.num_steps, self.shift)


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


def model_timesteps(sigmas: np.ndarray) -> np.ndarray:
    """t = 1000 * sigma rounded as the sampler computes it (float32 sigma times 1000, in float32)."""
    return np.asarray(sigmas, dtype=np.float64).astype(np.float32) * np.float32(1000.0)


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


def calibrate(model: Model, prompts: Sequence[str], *, num_trajectories: int = 256, num_steps: int = 100,
              num_selected: int = 25, step_selection: str = "stride", cfg_scale: float = 1.5,
              shift: float = SD3_SHIFT, resolution: Optional[int] = None, seed: int = 0, batch_size: int = 16,
              output: str | os.PathLike, resume: bool = True, progress: bool = True,
              on_batch: Optional[Callable[[int], None]] = None, world: Optional[World] = None) -> CalibrationSummary:
    """Sample the calibration set and write it to `output` (see the module docstring for the recipe).

    `on_batch(finished_trajectories)` runs after each batch is checkpointed (counting this rank's trajectories).
    Every argument is checked before anything is sampled or written. `world` defaults to the launched one.
    """
    started = time.perf_counter()
    world = current_world() if world is None else world
    with collective_step(world, "checking the inputs") as setup:
        recipe = CalibrationRecipe(num_trajectories, num_steps, num_selected, step_selection, float(cfg_scale),
                                   float(shift), seed, batch_size)
        prompts = check_prompts(prompts)
        resolution = model.default_resolution if resolution is None else resolution
        latent_shape = model.latent_shape(resolution)
        output = check_output_path(output)
        partial = partial_path(output, world)
        cs, cs_pooled = (np.array(a.astype(mx.float32)) for a in model.encode(prompts))
        cs_uncond, cs_pooled_uncond = (np.array(a.astype(mx.float32))[0]
                                       for a in model.encode([UNCONDITIONAL_PROMPT]))
        fingerprint = _fingerprint(recipe, model, prompts, resolution, latent_shape,
                                   (cs, cs_pooled, cs_uncond, cs_pooled_uncond))
        all_batches = batch_ranges(num_trajectories, batch_size)
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
    with collective_step(world, "sampling", note=f"nothing was written to {output}; {kept}"):
        _sample_batches(model, recipe, cs, cs_pooled, (cs_uncond, cs_pooled_uncond), latent_shape, batches,
                        trajectories, done, partial, record, on_batch, progress=progress and world.is_root, desc=desc)
    if world.size > 1:
        trajectories = _gather_trajectories(world, trajectories, all_batches)

    with collective_step(world, "writing the calibration set", note=f"{output} was not written; {kept}") as written:
        if world.is_root:
            _write_set(output, trajectories, recipe, fingerprint, prompts,
                       (cs, cs_pooled, cs_uncond, cs_pooled_uncond), world)
            written.value = output.stat().st_size
    partial.unlink(missing_ok=True)
    return CalibrationSummary(output, num_trajectories * num_selected, num_trajectories, num_selected,
                              sum(value["resumed"] for value in setup.values), written.values[0],
                              time.perf_counter() - started, world.size)


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
    with tqdm(total=len(trajectories), initial=done, unit="traj", desc=desc, disable=not progress) as bar:
        for batch in batches:
            stop = finished + len(batch)
            if stop <= done:  # checkpointed by an earlier run
                finished = stop
                continue
            rows = mx.array(np.asarray(batch) % cs.shape[0])
            denoiser = CFGDenoiser(model.mmdit, (cond_tokens[rows], cond_pooled[rows]), uncond, recipe.cfg_scale)
            noise = mx.array(np.stack([trajectory_noise(recipe.seed, i, latent_shape) for i in batch]))
            trajectories[finished:stop] = sample_selected_steps(denoiser, noise, sigmas, selected)
            # Rewrites every finished trajectory each time (simple and atomic; I/O ~ T^2 / B, small next to sampling).
            save_npz(partial, {"xs": trajectories[:stop]}, {"recipe": record, "finished": stop},
                     kind=PARTIAL_KIND, version=PARTIAL_VERSION)
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
        "prompt_indices": trajectory_indices % len(prompts),
        "trajectory_indices": trajectory_indices,
        "step_indices": step_indices,
        "cs": cs, "cs_pooled": cs_pooled, "cs_uncond": cs_uncond, "cs_pooled_uncond": cs_pooled_uncond,
        "prompts": np.array(prompts),
        "cfg_scale": np.array(recipe.cfg_scale, dtype=np.float64),
    }
    meta = {
        **{k: v for k, v in fingerprint.items() if k != "prompts"},  # the prompts are an array
        "sigmas": sigmas.tolist(),
        "selected_steps": selected,
        "num_points": num_trajectories * num_selected,
        "prompt_assignment": "trajectory i uses prompts[i % num_prompts]",
        "noise": f"trajectory i starts from numpy default_rng([seed, {NOISE_STREAM}, i])"
                 ".standard_normal((H, W, C), float32)",
        "point_order": f"trajectory-major (i * K + j), permuted by numpy default_rng([seed, {SHUFFLE_STREAM}, 0])",
        "taq_version": taq.__version__,
        "mlx_version": mx.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"ranks": world.size} if world.size > 1 else {}),
    }
    save_npz(output, arrays, meta, kind=KIND, version=VERSION)


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
              "dtype": str(model.mmdit.context_embedder.weight.dtype), "resolution": resolution,
              "latent_shape": list(latent_shape), "prompts": prompts, "embeddings_sha256": digest.hexdigest()}
    return json.loads(json.dumps(record))


def _load_partial(path: Path, fingerprint: dict, trajectories: np.ndarray, batches: list[range]) -> int:
    """Copy a matching partial file's finished trajectories (whole `batches`, in order) into `trajectories`;
    return how many there are."""
    start_over = "delete it or pass --no-resume to start over"
    try:
        arrays, meta = load_npz(path, kind=PARTIAL_KIND, version=PARTIAL_VERSION, required={"xs": 5})
    except TaqFormatError as exc:
        raise TaqFormatError(f"cannot resume from {exc}; {start_over}") from None
    saved = meta.get("recipe", {})
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        raise ValueError(f"{path} is a partial run of a different recipe (differs in: {', '.join(differing)}); "
                         f"{start_over}")
    xs = arrays["xs"]
    finished = xs.shape[0]
    if xs.dtype != np.float32 or xs.shape[1:] != trajectories.shape[1:] or finished > trajectories.shape[0]:
        raise TaqFormatError(f"{path}: xs has {xs.dtype} {xs.shape}, expected float32 (<= "
                             f"{trajectories.shape[0]},) + {trajectories.shape[1:]}; {start_over}")
    if finished not in np.cumsum([0] + [len(batch) for batch in batches]):
        raise TaqFormatError(f"{path}: holds {finished} trajectories, not a whole number of this run's batches; "
                             f"{start_over}")
    trajectories[:finished] = xs
    return finished


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CalibrationSet:
    """A validated calibration file; per-point arrays have length P, per-prompt arrays length M."""

    xs: np.ndarray  # (P, H, W, C) float32
    ts: np.ndarray  # (P,) float32
    prompt_indices: np.ndarray  # (P,)
    trajectory_indices: np.ndarray  # (P,)
    step_indices: np.ndarray  # (P,)
    cs: np.ndarray  # (M, L, token_dim)
    cs_pooled: np.ndarray  # (M, pooled_dim)
    cs_uncond: np.ndarray  # (L, token_dim)
    cs_pooled_uncond: np.ndarray  # (pooled_dim,)
    prompts: list[str]
    cfg_scale: float
    meta: dict

    def __len__(self) -> int:
        return self.xs.shape[0]


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    """Read and validate a calibration file; any inconsistency is a TaqFormatError naming the key."""
    arrays, meta = load_npz(path, kind=KIND, version=VERSION, required=REQUIRED_KEYS)

    def fail(message: str) -> TaqFormatError:
        return TaqFormatError(f"{path}: {message}")

    for key in ("xs", "ts", "cs", "cs_pooled", "cs_uncond", "cs_pooled_uncond"):
        if arrays[key].dtype != np.float32:
            raise fail(f"{key!r} has dtype {arrays[key].dtype}, expected float32")
    for key in ("prompt_indices", "trajectory_indices", "step_indices"):
        if not np.issubdtype(arrays[key].dtype, np.integer):
            raise fail(f"{key!r} has dtype {arrays[key].dtype}, expected integers")
    if arrays["prompts"].dtype.kind != "U":
        raise fail(f"'prompts' has dtype {arrays['prompts'].dtype}, expected str")
    num_points = arrays["xs"].shape[0]
    for key in ("ts", "prompt_indices", "trajectory_indices", "step_indices"):
        if arrays[key].shape[0] != num_points:
            raise fail(f"{key!r} has {arrays[key].shape[0]} entries, 'xs' has {num_points} points")
    num_prompts = arrays["prompts"].shape[0]
    for key in ("cs", "cs_pooled"):
        if arrays[key].shape[0] != num_prompts:
            raise fail(f"{key!r} has {arrays[key].shape[0]} rows for {num_prompts} prompts")
    if arrays["cs_uncond"].shape != arrays["cs"].shape[1:]:
        raise fail(f"'cs_uncond' has shape {arrays['cs_uncond'].shape}, expected {arrays['cs'].shape[1:]}")
    if arrays["cs_pooled_uncond"].shape != arrays["cs_pooled"].shape[1:]:
        raise fail(f"'cs_pooled_uncond' has shape {arrays['cs_pooled_uncond'].shape}, "
                   f"expected {arrays['cs_pooled'].shape[1:]}")
    indices = arrays["prompt_indices"]
    if num_points and (indices.min() < 0 or indices.max() >= num_prompts):
        raise fail(f"'prompt_indices' range [{indices.min()}, {indices.max()}] is outside the {num_prompts} prompts")
    if not np.isfinite(arrays["xs"]).all():
        raise fail(f"'xs' holds {np.size(arrays['xs']) - np.isfinite(arrays['xs']).sum()} NaN or inf values")
    _check_timesteps(arrays, meta, fail)
    return CalibrationSet(**{k: arrays[k] for k in REQUIRED_KEYS if k not in ("prompts", "cfg_scale")},
                          prompts=[str(p) for p in arrays["prompts"]], cfg_scale=float(arrays["cfg_scale"]),
                          meta=meta)


def _check_timesteps(arrays: dict, meta: dict, fail: Callable[[str], TaqFormatError]) -> None:
    """Step indices must be selected steps and each t must be the model timestep of its step's sigma."""
    for key in ("sigmas", "selected_steps"):
        if key not in meta:
            raise fail(f"metadata has no {key!r}")
    steps = arrays["step_indices"]
    unknown = np.setdiff1d(steps, meta["selected_steps"])
    if unknown.size:
        raise fail(f"'step_indices' holds steps {unknown[:5].tolist()} that are not among the selected steps")
    if not np.array_equal(arrays["ts"], model_timesteps(np.asarray(meta["sigmas"]))[steps]):
        raise fail("'ts' does not match 1000 * sigmas[step_indices] from the metadata")


# --------------------------------------------------------------------------- command line


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; surrounding whitespace and blank lines are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    return check_prompts([line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()],
                         source=str(path))


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


def check_output_path(output: str | os.PathLike) -> Path:
    """The output file must be creatable: its directory exists and is writable, and it is not a directory."""
    output = Path(output)
    parent = output.parent
    if output.is_dir():
        raise ValueError(f"output {output} is a directory; give a file name")
    if not parent.exists():
        raise FileNotFoundError(f"output directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"output directory {parent} is not a directory")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        raise PermissionError(f"output directory {parent} is not writable") from None
    return output


def check_resolution(model_name: str, resolution: int) -> None:
    """The preset's resolution rule, checked before the model is loaded (Model.latent_shape checks it again)."""
    config = get_preset(model_name)
    step = LATENT_SCALE[model_name] * config.patch_size
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {step} for {model_name}")
    if resolution // step > config.pos_embed_max_size:
        raise ValueError(f"resolution {resolution} is larger than {model_name}'s positional grid allows "
                         f"({config.pos_embed_max_size * step})")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model preset (default: %(default)s)")
    parser.add_argument("--checkpoint", help="SD3-layout weights for the sd3-medium preset")
    parser.add_argument("--embeddings", help="precomputed prompt embeddings file (taq-embeddings), \"\" included")
    parser.add_argument("--prompts", help="prompts file, one per line (default: the model's shipped prompts)")
    parser.add_argument("--num-fid-samples", type=int, default=256, help="trajectories (default: %(default)s)")
    parser.add_argument("--num-sampling-steps", type=int, default=100, help="Euler steps (default: %(default)s)")
    parser.add_argument("--num-selected-steps", type=int, default=25,
                        help="steps kept per trajectory (default: %(default)s)")
    parser.add_argument("--step-selection", choices=RULES, default="stride",
                        help="stride: range(0, N, N // K) as TaQ-DiT's code; linspace: the seed's (default: stride)")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (default: %(default)s)")
    parser.add_argument("--shift", type=float, default=SD3_SHIFT, help="flow schedule shift (default: %(default)s)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise and shuffle seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="trajectories per model call, 2x rows with CFG (default: %(default)s)")
    parser.add_argument("--output", default="calibration.npz", help="output .npz (default: %(default)s)")
    parser.add_argument("--no-resume", action="store_true",
                        help="ignore and overwrite the partial file of an earlier run")


def run_cli(args: argparse.Namespace) -> None:
    recipe = CalibrationRecipe(args.num_fid_samples, args.num_sampling_steps, args.num_selected_steps,
                               args.step_selection, args.cfg_scale, args.shift, args.seed, args.batch_size)
    get_preset(args.model)
    if args.model == "pocket" and args.checkpoint is not None:
        raise ValueError("the pocket model ships its own weights; --checkpoint is for SD3-layout models")
    if args.embeddings is not None and not Path(args.embeddings).is_file():
        raise FileNotFoundError(f"embeddings file {args.embeddings} does not exist")
    prompts = read_prompts(args.prompts) if args.prompts is not None else default_prompts(args.model)
    resolution = DEFAULT_RESOLUTION[args.model] if args.resolution is None else args.resolution
    check_resolution(args.model, resolution)
    output = check_output_path(args.output)

    model = load_model(args.model, checkpoint=args.checkpoint, embeddings=args.embeddings)
    with fail_together("calibrate"):
        summary = calibrate(model, prompts, **asdict(recipe), resolution=resolution, output=output,
                            resume=not args.no_resume)
    if current_world().is_root:
        print(summary.line())
