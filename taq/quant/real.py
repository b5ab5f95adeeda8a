"""Real low-bit weights (W4A16 / W8A16): MLX's packed affine weights, and the faster of two matmul paths.

`LowBitLinear` holds a weight in MLX's quantized layout (`taq.quant.export.to_mlx`: 2/4/8-bit levels packed in
uint32, a scale and bias per group of input columns), so its bytes at rest are bits/16 of bf16 plus the grids.
Its forward picks by the number of rows (tokens x batch) it is called with, fixed when a graph is traced:

- few rows: `mx.quantized_matmul`, which reads the packed weight directly (memory-bound matmuls win);
- many rows: dequantize the weight to the activation dtype, then an ordinary GEMM (MLX's quantized GEMM loses to
  its bf16 GEMM wherever the matmul is compute-bound; the transient bf16 weight lives for one layer).

`DEQUANTIZE_FROM_ROWS` holds the switch-over per device kind, measured by benchmarks/quant_speed.py; on the CPU
MLX's quantized matmul loses at every size, so there it always dequantizes. Activations stay in the model's float
dtype: this is real low-bit storage and weight traffic, not low-bit arithmetic on the activations (MLX has no
integer-activation GEMM on Hopper or Metal; A8 is always simulated, `taq.quant.modules`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from taq.formats.quantization import Quantization
from taq.quant.export import EXPORT_BITS, to_mlx
from taq.quant.grid import GROUP_SIZES, QParams, QuantSpec
from taq.quant.observers import observe

DEQUANTIZE_FROM_ROWS = {"cpu": 0, "gpu": 512}  # rows at and above which dequantize-then-GEMM is used


def dequantize_from_rows() -> int:
    return DEQUANTIZE_FROM_ROWS["gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"]


class LowBitLinear(nn.Module):
    """x @ W.T (+ b) with W stored as `bits`-bit levels per group of `group_size` input columns."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array, bias: mx.array | None, bits: int,
                 group_size: int, dequantize_rows: int | None = None):
        super().__init__()
        self.weight, self.scales, self.biases = weight, scales, biases
        if bias is not None:
            self.bias = bias
        self.bits, self.group_size = bits, group_size
        self.dequantize_rows = dequantize_from_rows() if dequantize_rows is None else dequantize_rows
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, params: QParams, spec: QuantSpec, dtype: mx.Dtype | None = None,
                    dequantize_rows: int | None = None) -> "LowBitLinear":
        """The Linear's weight on `spec`'s grids (per group, or per channel repeated over groups of 64)."""
        group = spec.group_size if spec.granularity == "group" else 64
        weight, scales, biases = to_mlx(linear.weight.astype(mx.float32), params, spec, group,
                                        dtype or linear.weight.dtype)
        bias = linear.bias if "bias" in linear else None
        return cls(weight, scales, biases, bias, spec.bits, group, dequantize_rows)

    def dequantized_weight(self, dtype: mx.Dtype) -> mx.array:
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size,
                             bits=self.bits).astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows >= self.dequantize_rows:
            y = x @ self.dequantized_weight(x.dtype).T
        else:
            y = mx.quantized_matmul(x, self.weight, self.scales.astype(x.dtype), self.biases.astype(x.dtype),
                                    transpose=True, group_size=self.group_size, bits=self.bits)
        return y + self.bias if "bias" in self else y


def supports_real_weights(quantization: Quantization) -> bool:
    """Weights only (A16), on grids MLX can store: 2/4/8 bits, per channel or per group of 32/64/128, with no
    input transform (a shift or divisor would need an op before the packed matmul)."""
    return all(layer.act is None and layer.transform is None and layer.weight_spec is not None
               and layer.weight_spec.bits in EXPORT_BITS
               and (layer.weight_spec.granularity == "channel" or layer.weight_spec.group_size in GROUP_SIZES)
               for layer in quantization.layers.values())


@contextmanager
def real_weights_model(mmdit: nn.Module, quantization: Quantization) -> Iterator[nn.Module]:
    """The MMDiT with a LowBitLinear at every layer of a weight-only quantization; restored on exit."""
    if not supports_real_weights(quantization):
        raise ValueError(f"{quantization.describe()} has quantized activations or grids MLX cannot store; real "
                         "low-bit weights need a weight-only (A16) quantization at 2, 4 or 8 bits")
    modules = dict(mmdit.named_modules())
    originals = {layer.path: modules[layer.path] for layer in quantization.layers.values()}
    swapped = [(layer.path, LowBitLinear.from_linear(modules[layer.path], QParams(mx.array(layer.weight.scale),
                                                                                   mx.array(layer.weight.zero_point)),
                                                     layer.weight_spec))
               for layer in quantization.layers.values()]
    mmdit.update_modules(tree_unflatten(swapped))
    try:
        yield mmdit
    finally:
        mmdit.update_modules(tree_unflatten(list(originals.items())))


def quantize_weights(mmdit: nn.Module, paths: list[str], bits: int, group_size: int = 64,
                     dequantize_rows: int | None = None) -> None:
    """Replace the Linears at `paths` by min-max LowBitLinears in place (mx.quantize's grids): for benchmarks and
    deployment of weight-only models; the float weights are dropped."""
    spec = QuantSpec(bits=bits, granularity="group", group_size=group_size, anchor="mlx")
    modules = dict(mmdit.named_modules())
    layers = []
    for path in paths:
        linear = modules[path]
        params = observe(linear.weight.astype(mx.float32), spec, "minmax")
        layers.append((path, LowBitLinear.from_linear(linear, params, spec, dequantize_rows=dequantize_rows)))
        mx.eval(layers[-1][1].parameters())
    mmdit.update_modules(tree_unflatten(layers))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every array the module holds (parameters and frozen low-bit weights alike)."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))
