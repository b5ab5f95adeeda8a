"""Record statistics of every FFN activation of a model, by swapping in a recording wrapper module.

MLX has no forward hooks and looks `__call__` up on the class, so each traced module is replaced (through
`Module.update_modules`) by a `RecordingModule` that calls it and reduces its output on the device; the originals
are put back on exit, also when the block raises. Do not call an `mx.compile`d model while it is traced: the
recorded activations would be placeholders of the compiled graph.

    paths = mmdit_layer_paths(model)                       # {"mm_00_img": "joint_blocks.0.x_block.mlp.act", ...}
    with trace_ffn_activations(model, paths, stats) as tracer:
        for x, t, tokens, pooled, timestep in batches:     # one timestep per forward batch
            tracer.timestep = timestep
            v = model(x, t, tokens, pooled)
            tracer.flush(v)                                # one mx.eval for v and every layer's reductions
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from taq.tracing.stats import ActivationStats, BatchReduction, CellStats, compiled_reducer, reduce_batch, timestep_key

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


class RecordingModule(nn.Module):
    """Calls the wrapped module unchanged and passes its output to `record`."""

    def __init__(self, module: nn.Module, record: Callable[[mx.array], None]):
        super().__init__()
        self.module = module
        self._record = record

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self._record(out)
        return out


class FFNTracer:
    """Collects device-side reductions per forward; `flush` evaluates them all at once and merges into `stats`."""

    def __init__(self, stats: ActivationStats, reduce: Callable[[mx.array], BatchReduction]):
        self.stats = stats
        self._reduce = reduce
        self._timestep: float | None = None
        self._pending: list[tuple[str, float, BatchReduction]] = []

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
        return record

    def flush(self, *also_eval) -> None:
        """One `mx.eval` over every pending reduction (and `also_eval`, e.g. the forward's output), then merge."""
        mx.eval(also_eval, [reduction.arrays() for _, _, reduction in self._pending])
        pending, self._pending = self._pending, []
        for layer, timestep, reduction in pending:
            self.stats.update(layer, timestep, CellStats.from_reduction(reduction, self.stats.spec))

    def discard(self) -> None:
        self._pending.clear()


def _swap_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    model.update_modules(tree_unflatten(list(modules.items())))


@contextmanager
def trace_ffn_activations(model: nn.Module, layer_paths: dict[str, str], stats: ActivationStats,
                          compile: bool | None = None) -> Iterator[FFNTracer]:
    """Wrap the module at each path of `layer_paths` ({layer name: module path}) for the block's duration.

    Pending reductions are flushed on a normal exit and discarded when the block raises. `compile`: fuse the
    device-side reductions with mx.compile; None compiles on a GPU only (the CPU backend compiles slowly).
    """
    modules = dict(model.named_modules())
    missing = {name: path for name, path in layer_paths.items() if path not in modules}
    if missing:
        raise ValueError(f"no module at {missing} in {type(model).__name__}")
    if len(set(layer_paths.values())) != len(layer_paths):
        raise ValueError(f"layer paths must be distinct, got {layer_paths}")
    if compile is None:
        compile = mx.default_device().type == mx.DeviceType.gpu
    reduce = compiled_reducer(stats.spec) if compile else partial(reduce_batch, spec=stats.spec)
    originals = {path: modules[path] for path in layer_paths.values()}
    tracer = FFNTracer(stats, reduce)
    stats.add_layers(layer_paths)
    _swap_modules(model, {path: RecordingModule(originals[path], tracer.recorder(name))
                          for name, path in layer_paths.items()})
    try:
        yield tracer
        tracer.flush()
    except BaseException:
        tracer.discard()
        raise
    finally:
        _swap_modules(model, originals)
