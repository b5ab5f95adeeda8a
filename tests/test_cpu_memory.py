import taq
import mlx.core as mx
import pytest


@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="the CPU allocator's setting")
def test_import_raises_the_cpu_cache_limit_to_a_quarter_of_memory():
    assert taq.CPU_CACHE_LIMIT >= 256 << 20
    previous = mx.set_cache_limit(taq.CPU_CACHE_LIMIT)
    assert previous == taq.CPU_CACHE_LIMIT
