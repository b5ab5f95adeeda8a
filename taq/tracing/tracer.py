"""Record statistics of every FFN activation of a model, by swapping in a recording wrapper module.

MLX has no forward hooks and looks `__call__` up on the class, so each traced module is replaced (through
`Module.update_modules`) by a `RecordingModule` that calls it and reduces its output on the device; the originals
are put back on exit, also when the block raises.

    paths = mmdit_layer_paths(model)                       # {"mm_00_img": "joint_blocks.0.x_block.mlp.act", ...}
    with trace_ffn_activations(model, paths, stats) as tracer:
        forward = tracer.compile(model)                    # optional: one fused graph, reductions included
        for x, t, tokens, pooled, timestep in batches:     # one timestep per forward batch
            tracer.timestep = timestep
            v = forward(x, t, tokens, pooled)
            tracer.flush(v)                                # evaluates v and every layer's reductions at once

Compile through `tracer.compile`, not `mx.compile(model)`: in a compiled graph the wrapper runs only while the
graph is traced, so `tracer.compile` makes the reductions outputs of the graph and re-files them on every call.
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from taq.cuda import cuda_available
from taq.tracing.cuda_reduce import cuda_reducer, histogram_copies
from taq.tracing.histogram import HistogramSpec
from taq.tracing.sites import stream_of
from taq.tracing.stats import (FLOAT_FIELDS, SIGNS, ActivationStats, BatchReduction, PackedMerger, compiled_reducer,
                               pack_reductions, reduce_batch, timestep_key)

# Module path of an FFN activation -> layer name; one entry per stream of each model family.
FFN_ACTIVATION_NAMES: tuple[tuple[str, str], ...] = (
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.act", "mm_{:02d}_img"),  # taq / SD3 checkpoint layout
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.act", "mm_{:02d}_txt"),
    (r"multimodal_transformer_blocks\.(\d+)\.image_transformer_block\.mlp\.act_fn", "mm_{:02d}_img"),  # DiffusionKit
    (r"multimodal_transformer_blocks\.(\d+)\.text_transformer_block\.mlp\.act_fn", "mm_{:02d}_txt"),
)


def mmdit_layer_paths(model: nn.Module, layers=None) -> dict[str, str]:
    """{layer name: module path} of every FFN activation found in `model`, in name order (block, then img/txt).

    `layers` (names) keeps only those; an unknown name is an error that lists the known ones.
    """
    rules = [(re.compile(pattern), template) for pattern, template in FFN_ACTIVATION_NAMES]
    found = {}
    for path, _ in model.named_modules():
        for pattern, template in rules:
            match = pattern.fullmatch(path)
            if match:
                found[template.format(int(match.group(1)))] = path
    if not found:
        raise ValueError(f"no FFN activation modules found in {type(model).__name__}; "
                         f"known path patterns: {[pattern for pattern, _ in FFN_ACTIVATION_NAMES]}")
    found = dict(sorted(found.items()))
    if layers is None:
        return found
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [name for name in layers if name not in found]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; this model's layers are: {', '.join(found)}")
    return {name: path for name, path in found.items() if name in layers}


BRANCHES = ("cond", "uncond")  # CFG rows of a forward: conditional first, then unconditional (plan.batch_inputs)


def branch_layer(layer: str, branch: str) -> str:
    """The name under which one CFG branch's rows of `layer` are kept: `mm_03_img:cond`, `mm_03_img:uncond`."""
    return f"{layer}:{branch}"


def traced_layer_names(layers, branches: bool) -> list[str]:
    """The names a trace files its statistics under: each layer, followed by its two CFG branches if `branches`."""
    return [n for name in layers for n in ((name, *(branch_layer(name, b) for b in BRANCHES)) if branches else (name,))]


class RecordingModule(nn.Module):
    """Calls the wrapped module unchanged and passes its output (or, with `input=True`, its first argument) to
    `record`."""

    def __init__(self, module: nn.Module, record: Callable[[mx.array], None], input: bool = False):
        super().__init__()
        self.module = module
        self._record = record
        self._input = input

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self._record(args[0] if self._input else out)
        return out


class ProbabilityRecording(nn.Module):
    """Calls the wrapped JointAttention unchanged and records its attention probabilities softmax(scale q k^T) in
    float32, formed again beside the (fused) attention: the text queries' rows and the image queries' rows each
    to their stream's `record` ({"txt" | "img": record}), as (rows, queries, keys, heads), one channel per head."""

    def __init__(self, module: nn.Module, records: dict[str, Callable[[mx.array], None]]):
        super().__init__()
        self.module = module
        self._records = records

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, text_tokens: int) -> mx.array:
        out = self.module(q, k, v, text_tokens)
        scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * self.module.scale
        probabilities = mx.softmax(scores, axis=-1, precise=True).transpose(0, 2, 3, 1)
        for stream, record in self._records.items():
            record(probabilities[:, :text_tokens] if stream == "txt" else probabilities[:, text_tokens:])
        return out


RECORDS = ("output", "input", "probabilities")  # what a traced module's wrapper records


class FFNTracer:
    """Collects device-side reductions per forward; `flush` evaluates them and merges them into `stats`.

    Merging is pipelined: `flush` starts evaluating this forward's reductions and queues the previous flush's for
    a merging thread (float64, on the host), so host work overlaps the next forwards. The thread merges a whole
    flush in one vectorised step into running statistics of its own (`PackedMerger`, bit-identical to updating
    the cells one by one), which `sync()` (called when `trace_ffn_activations` exits) stores into `stats` after
    waiting for the merges: `stats` is complete only after it, and must not be updated otherwise in between.
    """

    def __init__(self, stats: ActivationStats, reduce: Callable[[mx.array], BatchReduction], branches: bool = False):
        self.stats = stats
        self._reduce = reduce
        self._branches = branches
        self._timestep: float | None = None
        self._pending: list[tuple[str, float, BatchReduction]] = []
        self._in_flight: tuple[list, tuple[mx.array, mx.array]] | None = None
        self._merger: ThreadPoolExecutor | None = None
        self._merges: list[Future] = []
        self._merged: PackedMerger | None = None  # the merging thread's running statistics, stored at sync

    @property
    def timestep(self) -> float | None:
        return self._timestep

    @timestep.setter
    def timestep(self, value) -> None:
        self._timestep = timestep_key(value)

    @property
    def pending(self) -> int:
        """Reductions recorded but not yet flushed."""
        return len(self._pending)

    def recorder(self, layer: str) -> Callable[[mx.array], None]:
        def record(out: mx.array) -> None:
            if self._timestep is None:
                raise RuntimeError(f"layer {layer!r} ran before tracer.timestep was set; "
                                   "set it before each forward")
            if not isinstance(out, mx.array):
                raise TypeError(f"layer {layer!r} returned {type(out).__name__}, expected an mx.array")
            self._pending.append((layer, self._timestep, self._reduce(out)))
            if self._branches:  # also each CFG half on its own; the layer itself stays their union
                if out.shape[0] % 2:
                    raise ValueError(f"layer {layer!r}: {out.shape[0]} rows cannot be split into conditional and "
                                     "unconditional halves")
                half = out.shape[0] // 2
                for branch, rows in zip(BRANCHES, (out[:half], out[half:])):
                    self._pending.append((branch_layer(layer, branch), self._timestep, self._reduce(rows)))
        return record

    def compile(self, fn: Callable[..., mx.array]) -> Callable[..., mx.array]:
        """`mx.compile(fn)` that still records: each call files this forward's reductions under `timestep`."""
        layers: list[str] = []  # recording order, captured whenever mx.compile (re)traces fn
        width = len(BatchReduction.__dataclass_fields__)

        def traced(*args):
            start = len(self._pending)
            out = fn(*args)
            recorded = self._pending[start:]
            del self._pending[start:]  # placeholders of the graph being traced
            layers[:] = [layer for layer, _, _ in recorded]
            return out, [array for _, _, reduction in recorded for array in reduction.arrays()]

        graph = mx.compile(traced)

        def forward(*args):
            if self._timestep is None:
                raise RuntimeError("tracer.timestep must be set before each forward")
            out, arrays = graph(*args)
            for i, layer in enumerate(layers):
                self._pending.append((layer, self._timestep, BatchReduction(*arrays[i * width:(i + 1) * width])))
            return out

        return forward

    def flush(self, *also_eval) -> None:
        """Start one evaluation of every pending reduction (and `also_eval`, e.g. the forward's output); hand the
        previous flush's reductions, by now on the host, to the merging thread."""
        self._raise_merge_error()
        pending, self._pending = self._pending, []
        if not pending:
            mx.async_eval(also_eval)
            return
        packed = pack_reductions([reduction for _, _, reduction in pending])
        mx.async_eval(also_eval, packed)
        cells = [(layer, timestep, (reduction.count.shape[0], reduction.slots.shape[0]))
                 for layer, timestep, reduction in pending]
        previous, self._in_flight = self._in_flight, (cells, packed)
        self._hand_over(previous)

    def sync(self) -> None:
        """Wait until everything flushed so far is merged into `stats`."""
        previous, self._in_flight = self._in_flight, None
        self._hand_over(previous)
        try:
            while self._merges:
                self._merges.pop(0).result()  # re-raises a merge's exception
        finally:
            self._write_back()

    def _hand_over(self, in_flight) -> None:
        """Copy an evaluated flush to the host (here: MLX stays on this thread) and queue its float64 merge."""
        if in_flight is None:
            return
        cells, (floats, ints) = in_flight
        floats, ints = np.array(floats), np.array(ints)
        if self._merger is None:
            self._merger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taq-merge")  # FIFO: same order
        if self._merged is None:
            self._merged = PackedMerger(self.stats)
        self._merges.append(self._merger.submit(self._merge, cells, floats, ints))

    def _merge(self, cells, floats: np.ndarray, ints: np.ndarray) -> None:
        """Merge one flush: each run of reductions with one timestep, one shape and distinct layers (usually the
        whole flush) in one vectorised step (`PackedMerger`), runs in recording order."""
        f = i = 0
        for run in _runs(cells):
            (_, timestep, (channels, slots)), n = run[0], len(run)
            df, di = n * len(FLOAT_FIELDS) * channels, n * (channels + slots + SIGNS)
            self._merged.merge([layer for layer, _, _ in run], timestep, floats[f:f + df], ints[i:i + di],
                               channels, slots)
            f, i = f + df, i + di

    def _write_back(self) -> None:
        if self._merged is not None:
            self._merged.write_back()

    def _raise_merge_error(self) -> None:
        while self._merges and self._merges[0].done():
            self._merges.pop(0).result()

    def close(self) -> None:
        """Drop what is not merged yet and stop the merging thread."""
        self._pending.clear()
        self._in_flight = None
        if self._merger is not None:
            self._merger.shutdown(wait=True, cancel_futures=True)
            self._merger = None
        self._merges.clear()
        self._write_back()  # what the merges finished so far, as when each merge updated the stats itself
        self._merged = None


def _runs(cells: list) -> Iterator[list]:
    """Consecutive runs of (layer, timestep, size) with one timestep and size and no layer twice."""
    run: list = []
    layers: set = set()
    for cell in cells:
        layer, timestep, size = cell
        if run and (timestep != run[0][1] or size != run[0][2] or layer in layers):
            yield run
            run, layers = [], set()
        run.append(cell)
        layers.add(layer)
    if run:
        yield run


def _swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    model.update_modules(tree_unflatten(list(modules.items())))


def device_reducer(spec: HistogramSpec) -> Callable[[mx.array], BatchReduction]:
    """The fastest exact reduction here: the one-pass kernel on CUDA, mx.compile-fused ops on another GPU, plain
    ops on the CPU (whose backend compiles each new shape slowly)."""
    if cuda_available() and histogram_copies(spec.bins):
        return cuda_reducer(spec)
    if mx.default_device().type == mx.DeviceType.gpu:
        return compiled_reducer(spec)
    return partial(reduce_batch, spec=spec)


@contextmanager
def trace_ffn_activations(model: nn.Module, layer_paths: dict[str, str], stats: ActivationStats,
                          reduce: Callable[[mx.array], BatchReduction] | None = None,
                          branches: bool = False, record: str = "output") -> Iterator[FFNTracer]:
    """Wrap the module at each path of `layer_paths` ({layer name: module path}) for the block's duration.

    Pending reductions are flushed on a normal exit and discarded when the block raises. `reduce` turns one
    activation into a BatchReduction; None picks `device_reducer(stats.spec)`. `branches`: also keep each
    forward's conditional and unconditional halves as layers `<layer>:cond` and `<layer>:uncond`. `record`: each
    module's "output", its "input" (a Linear's input), or, for a JointAttention, its "probabilities", filed under
    the names of its query streams (`mm_03_img.attn` and `mm_03_txt.attn` share one path).
    """
    if record not in RECORDS:
        raise ValueError(f"record must be one of {', '.join(RECORDS)}, got {record!r}")
    modules = dict(model.named_modules())
    missing = {name: path for name, path in layer_paths.items() if path not in modules}
    if missing:
        raise ValueError(f"no module at {missing} in {type(model).__name__}")
    keys = [(path, stream_of(name)) if record == "probabilities" else path for name, path in layer_paths.items()]
    if len(set(keys)) != len(keys):
        raise ValueError(f"layer paths must be distinct{' per query stream' if record == 'probabilities' else ''}, "
                         f"got {layer_paths}")
    reduce = reduce or device_reducer(stats.spec)
    originals = {path: modules[path] for path in layer_paths.values()}
    tracer = FFNTracer(stats, reduce, branches)
    stats.add_layers(traced_layer_names(layer_paths, branches))
    if record == "probabilities":
        streams: dict[str, dict] = {}
        for name, path in layer_paths.items():
            streams.setdefault(path, {})[stream_of(name)] = tracer.recorder(name)
        wrappers = {path: ProbabilityRecording(originals[path], records) for path, records in streams.items()}
    else:
        wrappers = {path: RecordingModule(originals[path], tracer.recorder(name), input=record == "input")
                    for name, path in layer_paths.items()}
    _swap_modules(model, wrappers)
    try:
        yield tracer
        tracer.flush()
        tracer.sync()
    finally:
        tracer.close()
        _swap_modules(model, originals)
