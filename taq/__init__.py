"""taq: time-aware quantization characterization of diffusion transformers on MLX."""

from taq._blas import load_fast_blas
from taq._cpu_memory import raise_cpu_cache_limit

# Must run before the first `import mlx.core` anywhere in the process.
BLAS = load_fast_blas()
CPU_CACHE_LIMIT = raise_cpu_cache_limit()

__version__ = "0.1.0"
