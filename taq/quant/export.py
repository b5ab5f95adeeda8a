"""Export fake-quantized weights to MLX's real quantized layout (`mx.quantize`'s, for `nn.QuantizedLinear`).

MLX's affine layout, per group of `group_size` consecutive input columns of a weight (out, in):

    w ~ scales * q + biases,  q in 0 .. 2^bits - 1
    weight (out, in * bits / 32) uint32: element j of a row in word j // (32 / bits), at bit (j % (32 / bits)) * bits
    scales, biases (out, in / group_size)

A grid of this module (levels (q - z) * s, q in qmin..qmax) is that with MLX's q = q - qmin,
scale = s and bias = (qmin - z) * s. `mx.quantize` cannot be used here: it takes no scales or biases, it always
derives them from each group's min and max (the grid of `QuantSpec(anchor="mlx")` with min-max ranges), so the
levels are computed with this module's rounding and packed here. Packing covers 2, 4 and 8 bits (power-of-two
widths share one uint32 layout); MLX's 3-, 5- and 6-bit layouts are not written.

Per-channel and per-tensor grids export too, their scale and bias repeated over every group of a row.
Dequantized by MLX the weight equals `fake_quant`'s to float32 rounding (MLX computes scale * q + bias, this
module (q - z) * s); with scales in float16/bfloat16 (`dtype`) it differs by their rounding instead.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from taq.quant.grid import GROUP_SIZES, QParams, QuantSpec, quantize

EXPORT_BITS = (2, 4, 8)
MLX_DEFAULT_GROUP = 64  # mx.quantize's default for affine


def pack_levels(q: mx.array, bits: int) -> mx.array:
    """Levels q (out, in), integers in 0..2^bits - 1, packed into MLX's uint32 layout (out, in * bits / 32)."""
    if bits not in EXPORT_BITS:
        raise ValueError(f"pack_levels packs {EXPORT_BITS}-bit levels, got bits={bits!r}")
    per_word = 32 // bits
    out_dim, in_dim = q.shape
    if in_dim % per_word:
        raise ValueError(f"{in_dim} columns do not fill whole uint32 words of {per_word} {bits}-bit levels")
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)  # (per_word,)
    words = q.astype(mx.uint32).reshape(out_dim, in_dim // per_word, per_word) << shifts
    return mx.sum(words, axis=-1).astype(mx.uint32)  # the fields do not overlap: the sum is their bitwise or


def unpack_levels(packed: mx.array, bits: int) -> mx.array:
    """The inverse of pack_levels: (out, words) uint32 -> (out, words * 32 / bits) uint32 levels."""
    if bits not in EXPORT_BITS:
        raise ValueError(f"unpack_levels unpacks {EXPORT_BITS}-bit levels, got bits={bits!r}")
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    fields = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)


def to_mlx(w: mx.array, params: QParams, spec: QuantSpec, group_size: int | None = None,
           dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """(weight, scales, biases) in MLX's affine layout for the weight w (out, in) on spec's grids.

    group_size: MLX's group; for granularity="group" it must be spec.group_size (the default), for "channel" and
    "tensor" any of 32/64/128 that divides `in` (default 64). dtype: of scales and biases (default w's).
    """
    group_size = _export_group(w, spec, group_size)
    if w.ndim != 2:
        raise ValueError(f"to_mlx exports weights of shape (out, in), got shape {tuple(w.shape)}")
    if spec.bits not in EXPORT_BITS:
        raise ValueError(f"to_mlx exports {EXPORT_BITS}-bit grids (MLX's 3/5/6-bit layouts are not packed here), "
                         f"got bits={spec.bits}")
    levels = quantize(w, params, spec) - spec.qmin  # (out, in), MLX's q in 0 .. 2^bits - 1
    out_dim, in_dim = w.shape
    scale, zero_point = params
    groups = (out_dim, in_dim // group_size)
    scales = mx.broadcast_to(scale, groups) if spec.granularity != "group" else scale
    biases = mx.broadcast_to((spec.qmin - zero_point) * scale, groups)
    dtype = w.dtype if dtype is None else dtype
    return pack_levels(levels, spec.bits), scales.astype(dtype), biases.astype(dtype)


def quantized_linear(w: mx.array, params: QParams, spec: QuantSpec, bias: mx.array | None = None,
                     group_size: int | None = None, dtype: mx.Dtype | None = None) -> nn.QuantizedLinear:
    """An nn.QuantizedLinear computing x @ fake_quant(w).T (+ bias) with MLX's quantized matmul.

    w (out, in) is the float weight as nn.Linear stores it; group_size and dtype as in `to_mlx`.
    """
    weight, scales, biases = to_mlx(w, params, spec, group_size, dtype)
    group_size = _export_group(w, spec, group_size)
    # Built at the smallest size (its constructor quantizes a random weight of the size it is given), then filled.
    layer = nn.QuantizedLinear(group_size, 1, bias=bias is not None, group_size=group_size, bits=spec.bits)
    layer.weight, layer.scales, layer.biases = weight, scales, biases
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias needs shape ({w.shape[0]},), got {tuple(bias.shape)}")
        layer.bias = bias
    layer.freeze()
    return layer


def _export_group(w: mx.array, spec: QuantSpec, group_size: int | None) -> int:
    if spec.granularity == "group":
        if group_size not in (None, spec.group_size):
            raise ValueError(f"a per-group spec exports with its own group size {spec.group_size}, "
                             f"got group_size={group_size}")
        return spec.group_size
    group_size = MLX_DEFAULT_GROUP if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise ValueError(f"MLX's group size must be one of {GROUP_SIZES}, got {group_size!r}")
    if w.ndim == 2 and w.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dimension {w.shape[1]}")
    return group_size
