"""taq: time-aware quantization characterization of diffusion transformers on MLX."""

from taq._blas import load_fast_blas

# Must run before the first `import mlx.core` anywhere in the process.
BLAS = load_fast_blas()

__version__ = "0.1.0"
