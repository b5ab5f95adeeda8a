"""Phase 3's numerical core: quantization grids with straight-through fake quantization, observers (min-max,
percentile, TaQ-DiT's L_p search, from tensors or histograms), and export to MLX's quantized layers."""

from taq.quant.export import pack_levels, quantized_linear, to_mlx, unpack_levels
from taq.quant.grid import (QParams, QuantSpec, dequantize, fake_quant, fake_quant_affine, grad_scale, grid_from_range,
                            grid_range, lsq_grad_factor, quantize, round_ste)
from taq.quant.histogram import (histogram_lp_error, histogram_minmax_range, histogram_mse_search, histogram_observe,
                                 histogram_percentile_range, histogram_with_tails)
from taq.quant.observers import lp_error, minmax_range, mse_search, observe, percentile_range, search_candidates

__all__ = [
    "QParams", "QuantSpec", "dequantize", "fake_quant", "fake_quant_affine", "grad_scale", "grid_from_range",
    "grid_range", "lsq_grad_factor", "quantize", "round_ste",
    "lp_error", "minmax_range", "mse_search", "observe", "percentile_range", "search_candidates",
    "histogram_lp_error", "histogram_minmax_range", "histogram_mse_search", "histogram_observe",
    "histogram_percentile_range", "histogram_with_tails",
    "pack_levels", "quantized_linear", "to_mlx", "unpack_levels",
]
