"""The whole pipeline, calibrate -> profile -> claims -> report (`taq report`), with its data cached on disk.

The characterization suite (characterization/) uses the same recipes and cache. A cache entry's name carries a
hash of everything that decides its contents (model name and weights, recipe, seeds, file format versions), so a
second run reuses it and any change makes a new one; entries are written atomically by `calibrate` / `profile`.
A warm run reads the calibration file's metadata record only and the statistics file once; an entry that cannot be
read is made again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from taq.analysis.claims import CLAIMS, measure_all
from taq.analysis.uncertainty import claim_intervals
from taq.calibration import calibrate, default_prompts
from taq.errors import Interrupted
from taq.formats import TaqFormatError, check_outputs_in_spare
from taq.formats import calibration as calibration_format
from taq.formats import stats as stats_format
from taq.formats.stats import StatsFile, load_stats
from taq.loading import Model, check_model_options, dtype_from_args, load_model
from taq.options import add_histogram_options, add_model_options, histogram_spec_from
from taq.profiling import profile
from taq.recipes import DEFAULT_RECIPE, RECIPES, Recipe, get_recipe

Log = Callable[[str], None]
REPORT_FILES = ("index.html", "summary.*", "figures/*.png")  # what the report writes into its directory
CACHE_FILES = ("calibration-*.npz*", "stats-*.npz*")


def cache_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, read: Callable[[Path], object], log: Log):
    """`read(path)` of a cache entry, or None when it is absent or unreadable (then it is removed)."""
    if not path.exists():
        return None
    try:
        return read(path)
    except TaqFormatError as exc:
        log(f"cache entry {path} is unreadable ({exc}); making it again")
        path.unlink()
        return None


def calibration_record(model: Model, recipe: Recipe) -> dict:
    """What decides the contents of the recipe's calibration set for `model` (its cache key)."""
    return {"kind": calibration_format.KIND, "version": calibration_format.VERSION, "model": model.name,
            "weights_id": model.weights_id, "resolution": model.default_resolution,
            "prompts": default_prompts(model.name), **asdict(recipe.calibration)}


def ensure_calibration(model: Model, recipe: Recipe, cache_dir: Path, log: Log,
                       progress: bool = False) -> tuple[Path, dict]:
    """(path, metadata) of the recipe's calibration set for `model` at its default resolution, sampled once and
    cached; a cached set is checked by its metadata record alone."""
    key = cache_key(calibration_record(model, recipe))
    path = cache_dir / f"calibration-{model.name}-{recipe.name}-{key}.npz"
    meta = _cached(path, calibration_format.read_meta, log)
    if meta is not None:
        return path, meta
    log(f"sampling the {recipe.name} calibration set of {model.name} ({recipe.calibration.describe()}) into {path}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    summary = calibrate(model, default_prompts(model.name), **asdict(recipe.calibration), output=path,
                        progress=progress)
    log(summary.line())
    return path, calibration_format.read_meta(path)


def ensure_stats(model: Model, calibration_path: Path, recipe: Recipe, cache_dir: Path, log: Log,
                 variant: str = "as loaded", progress: bool = False) -> StatsFile:
    """Statistics of `model` over `recipe.num_samples` points of the calibration set, profiled once and cached.
    `variant` names a modified model (its weights_id is still that of the file it was loaded from). The calibration
    set is identified by a hash of its metadata record (recipe, weights, embeddings hash, creation time), read
    without its arrays."""
    record = {"kind": stats_format.KIND, "version": stats_format.VERSION, "model": model.name,
              "weights_id": model.weights_id, "variant": variant,
              "calibration": cache_key(calibration_format.read_meta(calibration_path)),
              "num_samples": recipe.num_samples, "seed": recipe.profile_seed,
              "batch_size": recipe.profile_batch_size, "groups": recipe.profile_groups,
              **({"branches": True} if recipe.profile_branches else {}),
              "hist_spec": asdict(recipe.histogram)}
    path = cache_dir / f"stats-{model.name}-{recipe.name}-{cache_key(record)}.npz"
    stats = _cached(path, load_stats, log)
    if stats is None:
        log(f"profiling {recipe.num_samples} points of {calibration_path.name} with {model.name} ({variant})")
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            summary = profile(model, calibration_path, num_samples=recipe.num_samples, seed=recipe.profile_seed,
                              batch_size=recipe.profile_batch_size, hist_spec=recipe.histogram, output=path,
                              progress=progress, groups=recipe.profile_groups, branches=recipe.profile_branches)
        except KeyboardInterrupt:
            raise Interrupted(f"the calibration set is kept in {calibration_path}; run the same command again to "
                              "profile it") from None
        log(summary.line())
        stats = load_stats(path)
    stats.meta["cache_file"] = str(path)
    stats.meta["variant"] = variant
    return stats


def claim_rows(stats: StatsFile) -> list[dict]:
    """Every claim for every layer as report rows, with the bootstrap interval where the file holds groups."""
    intervals = claim_intervals(stats)
    rows = []
    for m in measure_all(stats.arrays):
        m = replace(m, interval=intervals.get((m.claim, m.layer)))
        rows.append({"claim": m.claim, "layer": m.layer, "measured": m.value, "interval": m.interval,
                     "threshold": m.threshold, "outcome": m.outcome, "note": m.note})
    return rows


def run_report(model: Model, recipe: Recipe, report_dir: Path, cache_dir: Path, log: Log = print) -> Path:
    """Calibrate and profile (each reused from the cache when done before), measure the claims, write the report."""
    from taq.report.html import write_report  # matplotlib only when a report is drawn

    calibration_path, calibration_meta = ensure_calibration(model, recipe, cache_dir, log, progress=True)
    stats = ensure_stats(model, calibration_path, recipe, cache_dir, log, progress=True)
    log("measuring the claims and drawing the figures")
    return write_report(report_dir, stats, calibration_meta=calibration_meta, claims=claim_rows(stats),
                        claim_info=CLAIMS)


def configure_parser(parser) -> None:
    add_model_options(parser)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                        help="; ".join(recipe.describe() for recipe in RECIPES.values()) + " (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports/pocket"), help="the report directory")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/taq"), help="calibration and stats cache")
    add_histogram_options(parser.add_argument)


def run_cli(args) -> None:
    started = time.perf_counter()
    recipe = replace(get_recipe(args.recipe), histogram=histogram_spec_from(args))
    check_model_options(args.model, args.checkpoint, args.random_weights)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output-dir {args.output_dir} exists and is not a directory")
    for directory, patterns in ((args.output_dir, REPORT_FILES), (args.cache_dir, CACHE_FILES)):
        check_outputs_in_spare(directory, patterns, {"--checkpoint": args.checkpoint})
    model = load_model(args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                       dtype=dtype_from_args(args))
    index = run_report(model, recipe, args.output_dir, args.cache_dir)
    print(f"report written in {time.perf_counter() - started:.0f} s:")
    print(index.resolve())
