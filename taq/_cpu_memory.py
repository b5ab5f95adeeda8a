"""Let MLX's CPU allocator keep freed buffers, as its Metal and CUDA allocators do.

MLX's CPU allocator caches at most 32 MB of freed buffers; larger ones go back to malloc, which hands buffers of
more than 32 MB back to the kernel, so every large activation of the next op is page-faulted in afresh (a pocket
forward of 512 rows has 64 MB activations). With the default device on the CPU, `import taq` raises the cache
limit to a quarter of physical memory; `mx.set_cache_limit` changes it again.
"""

import os


def raise_cpu_cache_limit() -> int | None:
    """Set the CPU allocator's cache limit to a quarter of physical memory; return it (None off the CPU, or
    without MLX: taq.analysis and the file formats work without it)."""
    try:
        import mlx.core as mx  # only after taq._blas has loaded OpenBLAS
    except ImportError:
        return None

    if mx.default_device().type != mx.DeviceType.cpu:
        return None
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    mx.set_cache_limit(limit)
    return limit
