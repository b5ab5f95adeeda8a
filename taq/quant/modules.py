"""Quantized Linear layers swapped into an MMDiT, and the model call that hands them the timestep.

Like the tracer, quantization replaces modules through `Module.update_modules` and puts the originals back on exit
(also when the block raises), so the model is bit-identical afterwards. Each `QuantLinear` keeps the original
Linear, uses its weight fake-quantized once on entry, and fake-quantizes its input on a per-tensor grid that
depends on the timestep, after the layer's exact input transform if it has one (shift and divisor,
`taq.quant.transforms`). The timestep reaches it explicitly: `QuantizedModel(x, t, tokens, pooled)` is the model
call, and it passes each row's sigma = t / 1000 to every quantized layer before running the MMDiT (no global
state; rows at different timesteps each get their own grid).

    with quantize_model(mmdit, quantization) as model:   # model(x, t, tokens, pooled) -> velocity
        v = model(x, t, tokens, pooled)

With `probe=True` each layer also measures its own output error on the input it receives (quantized output vs
the full-precision Linear on the same input), summed per call, for `QuantizedModel.layer_errors`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from taq.formats.quantization import LayerQuantization, Quantization
from taq.quant.grid import dequantize, fake_quant, fake_quant_affine
from taq.quant.schedules import dynamic_grid
from taq.sampling.schedule import timestep_to_sigma


class QuantLinear(nn.Module):
    """A Linear computing x_hat @ w_hat.T + b: w_hat the fake-quantized weight, x_hat the input on the grid of the
    current rows' sigma (or x itself when the layer's inputs stay in full precision)."""

    def __init__(self, linear: nn.Linear, layer: LayerQuantization, probe: bool = False):
        super().__init__()
        self.linear = linear
        self.layer = layer
        self.transform = layer.transform
        weight = linear.weight if self.transform is None else self.transform.weight(linear.weight)
        if layer.weight_spec is not None:
            spec = layer.weight_spec
            expected = spec.param_shape(weight.shape)
            if tuple(layer.weight.scale.shape) != expected:
                raise ValueError(f"{layer.site}: weight grids of shape {tuple(layer.weight.scale.shape)} do not fit "
                                 f"the weight {tuple(weight.shape)} ({spec.granularity} needs {expected})")
            params = type(layer.weight)(mx.array(layer.weight.scale), mx.array(layer.weight.zero_point))
            if layer.levels is not None:  # rounding chosen by reconstruction
                weight = dequantize(mx.array(layer.levels), params, spec).astype(weight.dtype)
            else:
                weight = fake_quant(weight.astype(mx.float32), params, spec).astype(weight.dtype)
        if self.transform is not None and self.transform.channels != weight.shape[1]:
            raise ValueError(f"{layer.site}: an input transform of {self.transform.channels} channels does not fit "
                             f"the weight {tuple(weight.shape)}")
        self._weight = weight
        self._sigma: mx.array | None = None
        self._probe = probe
        self._errors: list[tuple[mx.array, mx.array]] = []  # per call: (sum of squared error, sum of squares)

    def set_sigma(self, sigma: mx.array) -> None:
        self._sigma = sigma

    def quantize_input(self, x: mx.array) -> mx.array:
        """The input the weight W m multiplies: Q((x - s) / m) + s / m (x itself where nothing applies)."""
        act = self.layer.act
        offset = None
        if self.transform is not None:
            x, offset = self.transform.forward(x, self._current_sigma())
        if act is not None:
            scale, zero_point = dynamic_grid(x, act.bits) if act.mode == "dynamic" else act.grid_at(
                self._current_sigma())
            shape = (-1,) + (1,) * (x.ndim - 1)  # (B,) per row, or (1,) for the whole call
            x = fake_quant_affine(x, scale.reshape(shape), zero_point.reshape(shape), 0, act.qmax)
        return x if offset is None else x + offset

    def _current_sigma(self) -> mx.array:
        if self._sigma is None:
            raise RuntimeError(f"{self.layer.site}: called outside QuantizedModel (no timestep was handed over)")
        return self._sigma

    def __call__(self, x: mx.array) -> mx.array:
        y = self.quantize_input(x) @ self._weight.T
        if "bias" in self.linear:
            y = y + self.linear.bias
        if self._probe:
            reference = self.linear(x)
            self._errors.append((mx.square(y - reference).astype(mx.float32).sum(),
                                 mx.square(reference).astype(mx.float32).sum()))
        return y

    def take_errors(self) -> list[tuple[mx.array, mx.array]]:
        errors, self._errors = self._errors, []
        return errors


class QuantizedModel:
    """`model(x, t, tokens, pooled)`: the MMDiT with its quantized layers told each row's sigma first."""

    def __init__(self, mmdit: nn.Module, layers: dict[str, QuantLinear]):
        self.mmdit = mmdit
        self.layers = layers  # site -> QuantLinear

    def __call__(self, x: mx.array, t: mx.array, tokens: mx.array, pooled: mx.array) -> mx.array:
        sigma = timestep_to_sigma(t.astype(mx.float32))
        for layer in self.layers.values():
            layer.set_sigma(sigma)
        return self.mmdit(x, t, tokens, pooled)

    def layer_errors(self) -> dict[str, list[tuple[mx.array, mx.array]]]:
        """Per site, the (squared error, squared reference) sums of each call since the last time (probe only)."""
        return {site: layer.take_errors() for site, layer in self.layers.items()}


@contextmanager
def quantize_model(mmdit: nn.Module, quantization: Quantization, probe: bool = False) -> Iterator[QuantizedModel]:
    """Swap a QuantLinear in at every layer of `quantization` for the block's duration; restore on exit."""
    modules = dict(mmdit.named_modules())
    missing = [f"{layer.site} ({layer.path})" for layer in quantization.layers.values()
               if not isinstance(modules.get(layer.path), nn.Linear)]
    if missing:
        raise ValueError(f"the quantization lists layers this model has no Linear for: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    originals = {layer.path: modules[layer.path] for layer in quantization.layers.values()}
    wrapped = {site: QuantLinear(originals[layer.path], layer, probe) for site, layer in quantization.layers.items()}
    mmdit.update_modules(tree_unflatten([(quantization.layers[site].path, module)
                                         for site, module in wrapped.items()]))
    try:
        yield QuantizedModel(mmdit, wrapped)
    finally:
        mmdit.update_modules(tree_unflatten(list(originals.items())))
