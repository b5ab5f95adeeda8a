"""Host-side cost of one traced step: merging a flush's reductions into the running statistics, before and after.

    nice -n 10 python benchmarks/tracing_merge.py [--steps 30] [--repeats 5] [--cells 47]

Per traced forward the tracer brings every traced cell's `BatchReduction` home as two packed arrays
(`pack_reductions`) and merges them into the per-(layer, timestep) statistics in float64. This times that merge
for `--cells` reductions (SD3 Medium traces 47 FFN activations per step) of pocket's width (512 channels) and
SD3 Medium's (6,144), side by side in one process, interleaved:

- per cell (before): `unpack_reductions`, then `CellStats.from_reduction` and `ActivationStats.update` for each
  reduction, as `FFNTracer._merge` did;
- vectorised (after): one `PackedMerger.merge` of the whole flush over stacked (cells, channels) arrays, plus its
  `write_back` into the stats (once per sync; its cost is spread over the steps).

Both start from empty stats and merge the same `--steps` flushes at one timestep; the script checks that they end
with bit-identical statistics, then prints ms per step (median and min over `--repeats`). The device-to-host copy
(`np.array` of the packed arrays) is the same for both and not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from taq.tracing.histogram import HistogramSpec
from taq.tracing.stats import (ActivationStats, CellStats, PackedMerger, pack_reductions, reduce_batch,
                               unpack_reductions)

WIDTHS = (("pocket", 512), ("sd3-medium", 6144))


def flushes(channels: int, cells: int, count: int, spec: HistogramSpec, rows: int = 64) -> list[tuple]:
    """`count` packed flushes of `cells` reductions of post-GELU-like (rows, channels) activations."""
    rng = np.random.default_rng(channels)
    out = []
    for _ in range(count):
        reductions = [reduce_batch(nn.gelu(mx.array(rng.standard_normal((rows, channels), dtype=np.float32)
                                                    * rng.uniform(0.5, 4))), spec) for _ in range(cells)]
        floats, ints = pack_reductions(reductions)
        mx.eval(floats, ints)
        out.append((np.array(floats), np.array(ints)))
    return out


def per_cell(stats: ActivationStats, layers: list[str], floats, ints, channels: int) -> None:
    sizes = [(channels, stats.spec.bins + 1)] * len(layers)
    for layer, reduction in zip(layers, unpack_reductions(floats, ints, sizes)):
        stats.update(layer, 500.0, CellStats.from_reduction(reduction, stats.spec))


def run(channels: int, cells: int, steps: int, repeats: int, spec: HistogramSpec) -> dict[str, list[float]]:
    data = flushes(channels, cells, 4, spec)
    layers = [f"mm_{i // 2:02d}_{'img' if i % 2 == 0 else 'txt'}" for i in range(cells)]
    times: dict[str, list[float]] = {"per cell": [], "vectorised": [], "write back": []}
    for _ in range(repeats):
        before = ActivationStats(spec, layers)
        start = time.perf_counter()
        for step in range(steps):
            per_cell(before, layers, *data[step % len(data)], channels)
        times["per cell"].append((time.perf_counter() - start) / steps)

        after = ActivationStats(spec, layers)
        merger = PackedMerger(after)
        start = time.perf_counter()
        for step in range(steps):
            merger.merge(layers, 500.0, *data[step % len(data)], channels, spec.bins + 1)
        merged = time.perf_counter()
        merger.write_back()
        done = time.perf_counter()
        times["vectorised"].append((done - start) / steps)
        times["write back"].append(done - merged)
        check_identical(before, after)
    return times


def check_identical(a: ActivationStats, b: ActivationStats) -> None:
    assert a.layers == b.layers and len(a) == len(b)
    for key, cell in a.items():
        other = b[key]
        for name in ("count", "mean", "m2", "min", "max", "hist"):
            x, y = np.ascontiguousarray(getattr(cell, name)), np.ascontiguousarray(getattr(other, name))
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (key, name)
        assert all(getattr(cell, n) == getattr(other, n) for n in ("negative", "zero", "nan", "posinf", "neginf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="flushes merged per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cells", type=int, default=47, help="reductions per flush (SD3 Medium: 47)")
    args = parser.parse_args()
    spec = HistogramSpec()
    print(f"host-side merge of {args.cells} reductions per traced step, {args.steps} steps x {args.repeats} repeats, "
          f"{spec.bins} bins; ms per step, median (min)")
    print("| width | channels | per cell (before) | vectorised (after) | speed-up | write back, once per sync |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, channels in WIDTHS:
        t = run(channels, args.cells, args.steps, args.repeats, spec)
        med = {k: 1e3 * statistics.median(v) for k, v in t.items()}
        low = {k: 1e3 * min(v) for k, v in t.items()}
        print(f"| {name} | {channels} | {med['per cell']:.2f} ({low['per cell']:.2f}) | "
              f"{med['vectorised']:.2f} ({low['vectorised']:.2f}) | {med['per cell'] / med['vectorised']:.1f}x | "
              f"{med['write back']:.2f} ms |")
    print("statistics bit-identical: yes")


if __name__ == "__main__":
    main()
