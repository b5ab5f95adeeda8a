"""The suite's data: calibration set and statistics for a model and recipe, cached on disk under a content key.

A cache entry's name carries a hash of everything that decides its contents (model name and weights, recipe,
seeds, file format versions), so a second run reuses it and any change makes a new one; entries are written
atomically by `calibrate` / `profile`, and an unreadable one is made again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from taq import calibration, profiling
from taq.calibration import CalibrationRecipe, calibrate, default_prompts
from taq.io import TaqFormatError, file_sha256
from taq.models.loading import Model, load_model
from taq.profiling import StatsFile, load_stats, profile
from taq.tracing import HistogramSpec


@dataclass(frozen=True)
class SuiteRecipe:
    """How the suite makes its data: TaQ-DiT's calibration recipe (trajectories, steps, selection, CFG, seed)
    and how many of the calibration points are profiled."""

    name: str
    calibration: CalibrationRecipe
    num_samples: int = 512
    profile_seed: int = 0
    profile_batch_size: int = 32


RECIPES = {
    # CI: a quarter of the paper's trajectories keeps a cold run of the suite within minutes on 2 CPU cores.
    "ci": SuiteRecipe("ci", CalibrationRecipe(num_trajectories=64, num_steps=100, num_selected=25,
                                              step_selection="stride", cfg_scale=1.5, seed=0, batch_size=16)),
    "paper": SuiteRecipe("paper", CalibrationRecipe(num_trajectories=256, num_steps=100, num_selected=25,
                                                    step_selection="stride", cfg_scale=1.5, seed=0, batch_size=16)),
}

# The regression test's deliberate perturbation: one FFN's first projection, scaled.
PERTURBED_PARAMETER = "joint_blocks.2.x_block.mlp.fc1.weight"
PERTURBED_LAYER = "mm_02_img"
PERTURBATION_SCALE = 1.05

Log = Callable[[str], None]


def get_recipe(name: str) -> SuiteRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def cache_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _readable(path: Path, load: Callable[[Path], object], log: Log) -> bool:
    if not path.exists():
        return False
    try:
        load(path)
        return True
    except TaqFormatError as exc:
        log(f"cache entry {path} is unreadable ({exc}); making it again")
        path.unlink()
        return False


def ensure_calibration(model: Model, recipe: SuiteRecipe, cache_dir: Path, log: Log) -> Path:
    """The recipe's calibration set for `model` at its default resolution, sampled once and cached."""
    record = {"kind": calibration.KIND, "version": calibration.VERSION, "model": model.name,
              "weights_id": model.weights_id, "resolution": model.default_resolution,
              "prompts": default_prompts(model.name), **asdict(recipe.calibration)}
    path = cache_dir / f"calibration-{model.name}-{recipe.name}-{cache_key(record)}.npz"
    if _readable(path, calibration.load_calibration, log):
        return path
    cal = recipe.calibration
    log(f"sampling the {recipe.name} calibration set of {model.name} ({cal.num_trajectories} trajectories x "
        f"{cal.num_steps} steps, {cal.num_selected} kept, CFG {cal.cfg_scale}) into {path}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    summary = calibrate(model, default_prompts(model.name), **asdict(cal), output=path, progress=False)
    log(summary.line())
    return path


def ensure_stats(model: Model, calibration_path: Path, recipe: SuiteRecipe, cache_dir: Path, log: Log,
                 variant: str = "as loaded") -> StatsFile:
    """Statistics of `model` over `recipe.num_samples` points of the calibration set, profiled once and cached.
    `variant` names a modified model (its weights_id is still that of the file it was loaded from)."""
    spec = HistogramSpec()
    record = {"kind": profiling.KIND, "version": profiling.VERSION, "model": model.name,
              "weights_id": model.weights_id, "variant": variant, "calibration": file_sha256(calibration_path),
              "num_samples": recipe.num_samples, "seed": recipe.profile_seed,
              "batch_size": recipe.profile_batch_size, "hist_spec": asdict(spec)}
    path = cache_dir / f"stats-{model.name}-{recipe.name}-{cache_key(record)}.npz"
    if not _readable(path, load_stats, log):
        log(f"profiling {recipe.num_samples} points of {calibration_path.name} with {model.name} ({variant})")
        cache_dir.mkdir(parents=True, exist_ok=True)
        summary = profile(model, calibration_path, num_samples=recipe.num_samples, seed=recipe.profile_seed,
                          batch_size=recipe.profile_batch_size, hist_spec=spec, output=path, progress=False)
        log(summary.line())
    stats = load_stats(path)
    stats.meta["cache_file"] = str(path)
    stats.meta["variant"] = variant
    return stats


def perturbed_model(name: str, checkpoint=None, parameter: str = PERTURBED_PARAMETER,
                    scale: float = PERTURBATION_SCALE) -> Model:
    """A fresh copy of the model with one parameter multiplied by `scale`."""
    model = load_model(name, checkpoint=checkpoint)
    parameters = dict(tree_flatten(model.mmdit.parameters()))
    if parameter not in parameters:
        raise ValueError(f"{name} has no parameter {parameter!r}")
    model.mmdit.update(tree_unflatten([(parameter, parameters[parameter] * scale)]))
    mx.eval(model.mmdit.parameters())
    return model
