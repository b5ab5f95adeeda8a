"""The whole pipeline, calibrate -> profile -> claims -> report (`taq report`), with its data cached on disk.

The characterization suite (characterization/) uses the same recipes and cache. A cache entry's name carries a hash of everything that decides its contents (model name and weights, recipe,
seeds, file format versions), so a second run reuses it and any change makes a new one; entries are written
atomically by `calibrate` / `profile`, and an unreadable one is made again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


from taq import calibration, profiling
from taq.calibration import CalibrationRecipe, calibrate, default_prompts
from taq.io import TaqFormatError, file_sha256
from taq.models.loading import Model, load_model
from taq.profiling import StatsFile, load_stats, profile
from taq.tracing import HistogramSpec


@dataclass(frozen=True)
class Recipe:
    """How the pipeline makes its data: TaQ-DiT's calibration recipe (trajectories, steps, selection, CFG, seed)
    and how many of the calibration points are profiled."""

    name: str
    calibration: CalibrationRecipe
    num_samples: int = 512
    profile_seed: int = 0
    profile_batch_size: int = 32


RECIPES = {
    # CI: a quarter of the paper's trajectories keeps a cold run of the suite within minutes on 2 CPU cores.
    "ci": Recipe("ci", CalibrationRecipe(num_trajectories=64, num_steps=100, num_selected=25,
                                         step_selection="stride", cfg_scale=1.5, seed=0, batch_size=16)),
    "paper": Recipe("paper", CalibrationRecipe(num_trajectories=256, num_steps=100, num_selected=25,
                                               step_selection="stride", cfg_scale=1.5, seed=0, batch_size=16)),
}

Log = Callable[[str], None]


def get_recipe(name: str) -> Recipe:
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


def ensure_calibration(model: Model, recipe: Recipe, cache_dir: Path, log: Log, progress: bool = False) -> Path:
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
    summary = calibrate(model, default_prompts(model.name), **asdict(cal), output=path, progress=progress)
    log(summary.line())
    return path


def ensure_stats(model: Model, calibration_path: Path, recipe: Recipe, cache_dir: Path, log: Log,
                 variant: str = "as loaded", progress: bool = False) -> StatsFile:
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
                          batch_size=recipe.profile_batch_size, hist_spec=spec, output=path, progress=progress)
        log(summary.line())
    stats = load_stats(path)
    stats.meta["cache_file"] = str(path)
    stats.meta["variant"] = variant
    return stats


def claim_rows(arrays: dict) -> list[dict]:
    """Every claim for every layer as report rows (outcome: whether the measured value meets the threshold)."""
    from taq.claims import measure_all

    return [{"claim": m.claim, "layer": m.layer, "measured": m.value, "threshold": m.threshold,
             "outcome": "holds" if m.holds else "does not hold", "note": m.note} for m in measure_all(arrays)]


def run_report(model: Model, recipe: Recipe, report_dir: Path, cache_dir: Path, log: Log = print) -> Path:
    """Calibrate and profile (each reused from the cache when done before), measure the claims, write the report."""
    from taq.calibration import load_calibration
    from taq.report.html import write_report

    calibration_path = ensure_calibration(model, recipe, cache_dir, log, progress=True)
    stats = ensure_stats(model, calibration_path, recipe, cache_dir, log, progress=True)
    log("measuring the claims and drawing the figures")
    return write_report(report_dir, stats, calibration_meta=load_calibration(calibration_path).meta,
                        claims=claim_rows(stats.arrays))


def configure_parser(parser) -> None:
    parser.add_argument("--model", default="pocket", help="preset (default: the embedded pocket model)")
    parser.add_argument("--checkpoint", default=None, help="SD3-layout weights for --model sd3-medium")
    parser.add_argument("--recipe", default="ci", choices=sorted(RECIPES),
                        help="paper: 256 trajectories (TaQ-DiT); ci: 64 (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports/pocket"), help="the report directory")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/taq"), help="calibration and stats cache")


def run_cli(args) -> None:
    import time

    started = time.perf_counter()
    recipe = get_recipe(args.recipe)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output-dir {args.output_dir} exists and is not a directory")
    model = load_model(args.model, checkpoint=args.checkpoint)
    index = run_report(model, recipe, args.output_dir, args.cache_dir)
    print(f"report written in {time.perf_counter() - started:.0f} s:")
    print(index.resolve())
