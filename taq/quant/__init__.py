"""Phase 3's numerical core: quantization grids, observers, and export to MLX's quantized layers."""
