"""Memory gauges: process RSS, and CUDA allocator stats through the same code path as on a GPU."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ml.system import GpuMemorySampler, register_system_metrics, resident_memory_bytes
from tests.support.metrics import points, value


class TwoGpuAllocator:
    """Stand-in for ``torch.cuda`` on this GPU-less machine: the calls GpuMemorySampler makes."""

    def device_count(self) -> int:
        return 3

    def current_device(self) -> int:
        return 0

    def memory_reserved(self, index: int) -> int:
        return {0: 4096, 1: 0, 2: 8192}[index]

    def memory_allocated(self, index: int) -> int:
        return {0: 1024, 1: 0, 2: 2048}[index]

    def max_memory_allocated(self, index: int) -> int:
        return {0: 3000, 1: 0, 2: 5000}[index]

    def get_device_properties(self, index: int):
        class Properties:
            total_memory = {0: 16384, 1: 16384, 2: 32768}[index]

        return Properties()


def test_resident_memory_is_positive_and_plausible():
    rss = resident_memory_bytes()
    assert 1 << 20 < rss < 1 << 40


def test_gpu_sampler_reports_used_devices_only():
    rows = list(GpuMemorySampler(TwoGpuAllocator()).read())
    assert rows == [("cuda:0", 1024, 4096, 3000, 16384), ("cuda:2", 2048, 8192, 5000, 32768)]


def test_gpu_sampler_without_cuda_reports_nothing():
    # torch is imported in this test session, but CUDA is not available/initialised on CPU
    assert list(GpuMemorySampler().read()) == []


def test_gpu_gauges_carry_device_rank_and_run_id():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    register_system_metrics(
        provider.get_meter("t"), {"rank": "1", "run_id": "r"}, GpuMemorySampler(TwoGpuAllocator())
    )
    got = points(reader)
    assert value(got, "otel_ml_gpu_memory_allocated_bytes", device="cuda:2", rank="1", run_id="r") == 2048
    assert value(got, "otel_ml_gpu_memory_reserved_bytes", device="cuda:0") == 4096
    assert value(got, "otel_ml_gpu_memory_peak_bytes", device="cuda:2") == 5000
    assert value(got, "otel_ml_gpu_memory_total_bytes", device="cuda:2") == 32768
    assert value(got, "otel_ml_process_resident_memory_bytes", rank="1") > 0
