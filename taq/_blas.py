"""Use a real BLAS under MLX's Linux CPU wheel, which links a slow reference BLAS.

Loading OpenBLAS with RTLD_GLOBAL before MLX's shared library is loaded makes MLX's
BLAS symbols resolve to it (about 30x faster float32 matmuls; docs/benchmarks/README.md).
Set TAQ_FAST_BLAS=0 to keep MLX's own.
"""

import ctypes
import os
import platform
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def load_fast_blas() -> str:
    """Load OpenBLAS globally if possible; return a one-line description of the BLAS in use."""
    if platform.system() != "Linux":
        return "platform default (Accelerate on macOS)"
    if os.environ.get("TAQ_FAST_BLAS", "1") == "0":
        return "MLX's bundled BLAS (TAQ_FAST_BLAS=0)"
    if "mlx.core" in sys.modules and not _openblas_mapped():
        return "MLX's bundled BLAS (mlx.core was imported before taq)"
    for path in [os.environ.get("TAQ_BLAS_PATH", "")] + list(CANDIDATES):
        if path and os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return f"OpenBLAS ({path})"
    return "MLX's bundled BLAS (no OpenBLAS found: apt-get install libopenblas0-pthread)"


def _openblas_mapped() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return "libopenblas" in maps.read()
    except OSError:
        return False
