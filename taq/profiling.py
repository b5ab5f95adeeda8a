"""Phase 2: trace every FFN's post-GELU activations over a calibration set into per-(layer, timestep) statistics.

The plan (`taq.tracing.plan`): `num_samples` calibration points drawn uniformly without replacement, in forward
batches that share one timestep (the tracer files each forward's activations under one timestep), each point run
as 2 rows (CFG doubling: its prompt's embeddings, then the unconditional ones); both halves are counted in the
statistics (the file's metadata says so).

The same seed, calibration file, model and batch size give byte-identical statistics arrays.

`groups` > 1 also keeps the statistics of disjoint groups of the sampled points -- trajectory index mod `groups`,
since points of one trajectory are not independent -- traced group by group and stored beside the merged
statistics (`taq.formats.stats`), so every claim can get a bootstrap interval over groups
(`taq.analysis.uncertainty`). Counts are those of a single pass; the values differ from a single pass's by the
float32 rounding of differently composed forward batches (min and max by about 1e-6 on pocket).

Several processes (`mlx.launch -n N -- python -m taq.cli profile ...`, see taq.distributed): every rank plans the
same forward batches and runs batch k when k % N is its rank; rank 0 gathers the per-rank statistics and merges
them in rank order (`taq.distributed.gather_stats`: float64 arrays sent as raw bytes, Chan's update in float64).
Counts, histograms, min and max equal a single process's exactly; mean and std differ by float64 rounding only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

import taq
import mlx.core as mx

from taq.distributed import (World, check_agreement, collective_step, current_world, fail_together, gather_stats,
                             shard)
from taq.errors import Interrupted
from taq.formats import WriteError, check_output_path, check_outputs_spare_inputs, file_sha256
from taq.formats.calibration import CalibrationSet, load_calibration
from taq.formats.stats import save_stats
from taq.loading import Model, check_model_options, dtype_from_args, load_model
from taq.options import add_histogram_options, add_model_options, histogram_spec_from
from taq.tracing import ActivationStats, HistogramSpec, trace_ffn_activations
from taq.tracing.site_choice import SITES, traced_sites
from taq.tracing.tracer import traced_layer_names
from taq.tracing.plan import ForwardBatch, batch_inputs, check_calibration_fits, plan_batches, point_batches
from taq.tracing.stats import timestep_key

ROWS_NOTE = ("each sampled point runs as 2 rows (CFG doubling): its prompt's embeddings and the unconditional "
             "ones; both rows are counted, so count = 2 x points x tokens per channel")

BRANCHES_NOTE = ("each layer's conditional and unconditional CFG rows are also kept apart, as <layer>:cond and "
                 "<layer>:uncond; <layer> is their union")
RECORDED = {"output": "module outputs", "input": "module inputs",
            "probabilities": "attention probabilities, one channel per head"}  # by TracedSites.record
GROUPING_NOTE = ("groups of the sampled points by trajectory index mod groups, each traced on its own; the "
                 "statistics are their merge")

# --------------------------------------------------------------------------- the driver


def group_batches(cal: CalibrationSet, batches: list[ForwardBatch], groups: int,
                  batch_size: int) -> list[list[ForwardBatch]]:
    """The plan's points in `groups` groups by trajectory (index mod `groups`), each group in its own forward
    batches; one group is the plan itself."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if groups == 1:
        return [batches]
    points = np.concatenate([batch.points for batch in batches])
    which = cal.trajectory_indices[points] % groups
    empty = [g for g in range(groups) if not np.any(which == g)]
    if empty:
        found = len(np.unique(cal.trajectory_indices[points]))
        raise ValueError(f"{groups} groups need points from at least {groups} trajectories; the sample holds "
                         f"points of {found} (groups {empty} would be empty)")
    return [point_batches(cal, points[which == g], batch_size) for g in range(groups)]



@dataclass(frozen=True)
class ProfileSummary:
    path: Path
    num_samples: int
    num_forwards: int
    seconds: float
    layers: tuple[str, ...]
    timesteps: tuple[float, ...]
    ranks: int = 1  # processes that shared the work

    def line(self) -> str:
        ranks = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        return (f"wrote statistics of {len(self.layers)} layers x {len(self.timesteps)} timesteps from "
                f"{self.num_samples} points ({self.num_forwards} forwards) to {self.path} in {self.seconds:.1f} s"
                f"{ranks}")


def profile(model: Model, calibration_path: str | os.PathLike, *, num_samples: int = 512, seed: int = 0,
            batch_size: int = 32, layers: Optional[Sequence[str]] = None, hist_spec: HistogramSpec = HistogramSpec(),
            output: str | os.PathLike, progress: bool = True, world: Optional[World] = None,
            groups: int = 1, branches: bool = False, sites: str = "post-gelu") -> ProfileSummary:
    """Trace the FFN activations of `model` over sampled calibration points; write the stats file to `output`.

    Everything is checked before the first forward; nothing is written unless the whole run succeeds (on every
    rank, when `world`, by default the launched one, has several). Profiling keeps no partial results: after
    Ctrl-C or a failed write the same call starts over.
    """
    output = check_output_path(output)
    check_outputs_spare_inputs({"the output": output}, {"the calibration file": calibration_path})
    return _profile(model, load_calibration(calibration_path), calibration_path, num_samples=num_samples, seed=seed,
                    batch_size=batch_size, layers=layers, hist_spec=hist_spec, output=output, progress=progress,
                    world=world, groups=groups, branches=branches, sites=sites)


def _profile(model: Model, cal: CalibrationSet, calibration_path: str | os.PathLike, *, num_samples: int, seed: int,
             batch_size: int, layers: Optional[Sequence[str]], hist_spec: HistogramSpec, output: Path,
             progress: bool, world: Optional[World] = None, groups: int = 1,
             branches: bool = False, sites: str = "post-gelu") -> ProfileSummary:
    started = time.perf_counter()
    world = current_world() if world is None else world
    with collective_step(world, "checking the inputs") as setup:
        if layers is not None and len(layers) == 0:
            raise ValueError("layers is empty; give at least one layer name, or None for all")
        traced = traced_sites(model.mmdit, sites, layers)
        layer_paths = traced.paths
        check_calibration_fits(cal, model, str(calibration_path))
        batches = plan_batches(cal, num_samples, seed, batch_size)
        grouped = group_batches(cal, batches, groups, batch_size)
        batches = [batch for group in grouped for batch in group]
        setup.value = _run_record(model, cal, layer_paths, hist_spec, batches)
    check_agreement(setup.values, "the profiling run")

    try:
        with collective_step(world, "tracing", note=f"nothing was written to {output}"):
            shards = [shard(group, world) for group in grouped]
            desc = "profile" if world.size == 1 else f"profile ({world.label})"
            mine_per_group = []
            with tqdm(total=sum(len(batch.points) for mine in shards for batch in mine), unit="pt", desc=desc,
                      disable=not (progress and world.is_root)) as bar:
                for mine in shards:
                    stats = ActivationStats(hist_spec)  # the tracer fixes the layer order (and the branches)
                    with trace_ffn_activations(model.mmdit, layer_paths, stats, branches=branches,
                                               record=traced.record) as tracer:
                        # A GPU runs the forward and its reductions as one compiled graph; the CPU backend
                        # compiles slowly.
                        forward = tracer.compile(model.mmdit) if mx.default_device().type == mx.DeviceType.gpu \
                            else model.mmdit
                        for batch in mine:
                            tracer.timestep = batch.timestep
                            tracer.flush(forward(*batch_inputs(cal, batch)))
                            bar.update(len(batch.points))
                    mine_per_group.append(stats)
        # After the tracing step, so that a rank that failed in it never leaves the others waiting in a gather.
        per_group = [gather_stats(world, stats) for stats in mine_per_group]  # merged on rank 0, None elsewhere

        with collective_step(world, "writing the statistics", note=f"{output} was not written"):
            if world.is_root:
                merged = per_group[0]
                for stats in per_group[1:]:
                    merged = merged.merge(stats)
                meta = _stats_meta(model, cal, calibration_path, layer_paths, seed, num_samples, batch_size,
                                   hist_spec, batches, world)
                if groups > 1:
                    meta.update(groups=groups, grouping=GROUPING_NOTE)
                if branches:
                    meta["branches"] = BRANCHES_NOTE
                meta.update(sites=sites, recorded=RECORDED[traced.record])
                if traced.left_out:
                    meta["left_out"] = {"sites": list(traced.left_out), "why": "another channel width"}
                save_stats(output, merged, meta, groups=per_group if groups > 1 else None)
    except KeyboardInterrupt:
        raise Interrupted(f"nothing was written to {output} (profiling keeps no partial results); run the same "
                          "command again to start over") from None
    except OSError as exc:
        raise WriteError(f"{exc}; nothing was written (profiling keeps no partial results)") from None
    timesteps = tuple(sorted({timestep_key(batch.timestep) for batch in batches}))
    return ProfileSummary(output, int(num_samples), len(batches), time.perf_counter() - started,
                          tuple(traced_layer_names(layer_paths, branches)), timesteps, world.size)


def _run_record(model: Model, cal: CalibrationSet, layer_paths: dict, hist_spec: HistogramSpec,
                batches: list[ForwardBatch]) -> dict:
    """What every rank must agree on before its shard's statistics can be merged with the others'."""
    plan = hashlib.sha256(np.concatenate([batch.points for batch in batches]).astype(np.int64).tobytes())
    return {"model": model.name, "weights_id": model.weights_id, "layer_paths": layer_paths,
            "hist_spec": asdict(hist_spec), "calibration": hashlib.sha256(json.dumps(cal.meta, sort_keys=True)
                                                                          .encode()).hexdigest(),
            "calibration_points": len(cal), "plan": plan.hexdigest()}


def _stats_meta(model: Model, cal: CalibrationSet, calibration_path: str | os.PathLike, layer_paths: dict,
                seed: int, num_samples: int, batch_size: int, hist_spec: HistogramSpec,
                batches: list[ForwardBatch], world: World) -> dict:
    sampled = np.sort(np.concatenate([batch.points for batch in batches]))
    return {
        "calibration_file": str(Path(calibration_path).resolve()),
        "calibration_sha256": file_sha256(calibration_path),
        "calibration_points": len(cal),
        "model": model.name,
        "weights_id": model.weights_id,
        "random_weights": model.random_weights,
        "dtype": str(model.dtype),
        "gelu": model.mmdit.config.gelu,
        "layer_paths": layer_paths,
        "seed": int(seed),
        "num_samples": int(num_samples),
        "sampled_points": sampled.tolist(),
        "sampling": "numpy default_rng(seed).choice(calibration_points, num_samples, replace=False)",
        "batch_size": int(batch_size),
        "num_forwards": len(batches),
        "rows": ROWS_NOTE,
        "cfg_scale": cal.cfg_scale,
        "hist_spec": asdict(hist_spec),
        "histogram": hist_spec.describe(),
        "zero_count": "values exactly 0 (-0.0 included) are counted apart from those < 0: GELU rounds its far "
                      "negative side to -0.0 in float32 and bfloat16",
        "taq_version": taq.__version__,
        "mlx_version": mx.__version__,
        **({"ranks": world.size, "merge": "per-rank float64 statistics merged on rank 0 in rank order"}
           if world.size > 1 else {}),
    }


# --------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration-file", required=True, help="phase 1 output (taq calibrate)")
    parser.add_argument("--num-samples", type=int, default=512,
                        help="calibration points drawn without replacement (default: %(default)s)")
    parser.add_argument("--output", default="activation_stats.npz", help="output .npz (default: %(default)s)")
    add_model_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="points per forward, 2x rows with CFG (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", metavar="LAYER", help="only these layers, e.g. mm_00_img mm_04_txt")
    parser.add_argument("--groups", type=int, default=1,
                        help="also keep the statistics of this many trajectory groups (trajectory index mod N), so "
                             "the claims get bootstrap intervals; the suite and taq report use 8 (default: "
                             "%(default)s)")
    parser.add_argument("--sites", choices=SITES, default="post-gelu",
                        help="what to trace: every FFN's GELU output (fc2's input), the inputs of qkv / proj / fc1 "
                             "(names mm_03_img.qkv ...), the adaLN modulation outputs (mm_03_img.adaln) or the attention "
                             "probabilities per query stream, one channel per head (mm_03_img.attn) (default: "
                             "%(default)s)")
    parser.add_argument("--branches", action="store_true",
                        help="also keep the conditional and unconditional CFG rows apart, as layers "
                             "<layer>:cond and <layer>:uncond")
    add_histogram_options(parser.add_argument)


def run_cli(args: argparse.Namespace) -> None:
    hist_spec = histogram_spec_from(args)
    check_model_options(args.model, args.checkpoint, args.random_weights)
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError(f"--num-samples and --batch-size must be >= 1, got {args.num_samples} and {args.batch_size}")
    if args.groups < 1:
        raise ValueError(f"--groups must be >= 1, got {args.groups}")
    output = check_output_path(args.output)
    check_outputs_spare_inputs({"--output": output},
                               {"--calibration-file": args.calibration_file, "--checkpoint": args.checkpoint})
    cal = load_calibration(args.calibration_file)  # a bad file is reported before the model is loaded

    model = load_model(args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
                       dtype=dtype_from_args(args))
    with fail_together("profile"):
        summary = _profile(model, cal, args.calibration_file, num_samples=args.num_samples, seed=args.seed,
                           batch_size=args.batch_size, layers=args.layers, hist_spec=hist_spec, output=output,
                           progress=True, groups=args.groups, branches=args.branches, sites=args.sites)
    if current_world().is_root:
        print(summary.line())
