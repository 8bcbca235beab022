"""Memory gauges and GPU identity: process RSS, and CUDA allocator stats through the strict stand-in."""

from __future__ import annotations

import os
import threading

from opentelemetry.sdk.metrics import MeterProvider

from otel_ml.collection import Collection, PullReader
from otel_ml.system import GpuMemorySampler, SystemGauges, resident_memory_bytes
from tests.support.fake_cuda import FakeCuda
from tests.support.metrics import points, value


def _three_gpus() -> FakeCuda:
    cuda = FakeCuda(devices=3)
    cuda.properties[2].total_memory = 32768
    for index in (0, 1):
        cuda.properties[index].total_memory = 16384
    cuda.set_memory(0, allocated=1024, reserved=4096, peak=3000)
    cuda.set_memory(2, allocated=2048, reserved=8192, peak=5000)
    return cuda


def _rows(sampler: GpuMemorySampler) -> list[tuple]:
    return [(r.device, r.allocated, r.reserved, r.peak, r.total) for r in sampler.read()]


def _on_a_thread(function):
    """Run ``function`` on a fresh thread (as the pump and scrape threads are) and return its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function()), name="collector")
    thread.start()
    thread.join()
    return result[0]


def _system_reader(cuda: FakeCuda) -> PullReader:
    """A reader whose collections run the system gauges' prepare hook, as the runtime's do."""
    collection = Collection()
    reader = PullReader(collection)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    gauges = SystemGauges(provider.get_meter("t"), {"rank": "1", "run_id": "r"}, GpuMemorySampler(cuda))
    collection.register(prepare=gauges.prepare)
    return reader


def test_resident_memory_is_positive_and_plausible():
    rss = resident_memory_bytes()
    assert 1 << 20 < rss < 1 << 40


def test_gpu_sampler_reports_used_devices_only():
    cuda = _three_gpus()
    rows = _on_a_thread(lambda: _rows(GpuMemorySampler(cuda)))
    assert rows == [("cuda:0", 1024, 4096, 3000, 16384), ("cuda:2", 2048, 8192, 5000, 32768)]
    assert cuda.clean()


def test_gpu_sampler_without_cuda_reports_nothing():
    # torch is imported in this test session, but CUDA is not available/initialised on CPU
    assert list(GpuMemorySampler().read()) == []
    uninitialised = FakeCuda(initialized=False)
    assert list(GpuMemorySampler(uninitialised).read()) == []
    assert uninitialised.cuinit == []  # it never initialised CUDA to find that out


def test_a_rank_on_gpu_3_never_reports_gpu_0_from_the_collection_thread():
    # torchrun rank 3 that never called set_device: its tensors live on cuda:3, and every
    # background thread's current device is 0 (the old sampler reported cuda:0 too).
    cuda = FakeCuda(devices=8)
    cuda.set_memory(3, allocated=10, reserved=20, peak=30)
    rows = _on_a_thread(lambda: _rows(GpuMemorySampler(cuda, own_device=3)))
    assert [r[0] for r in rows] == ["cuda:3"]
    # before it allocated anything, its own device (LOCAL_RANK) is still the one reported
    fresh = FakeCuda(devices=8)
    rows = _on_a_thread(lambda: _rows(GpuMemorySampler(fresh, own_device=5)))
    assert [r[0] for r in rows] == ["cuda:5"]
    assert cuda.clean() and fresh.clean()


def test_one_memory_stats_read_per_device_per_collection():
    cuda = _three_gpus()
    points(_system_reader(cuda))
    assert dict(cuda.memory_stats_calls) == {0: 1, 1: 1, 2: 1}


def test_gpu_gauges_and_info_carry_device_rank_run_id_and_the_dcgm_join_labels():
    cuda = _three_gpus()
    reader = _system_reader(cuda)
    got = _on_a_thread(lambda: points(reader))
    assert value(got, "otel_ml_gpu_memory_allocated_bytes", device="cuda:2", rank="1", run_id="r") == 2048
    assert value(got, "otel_ml_gpu_memory_reserved_bytes", device="cuda:0") == 4096
    assert value(got, "otel_ml_gpu_memory_peak_bytes", device="cuda:2") == 5000
    assert value(got, "otel_ml_gpu_memory_total_bytes", device="cuda:2") == 32768
    assert value(got, "otel_ml_process_resident_memory_bytes", rank="1") > 0
    info = [attrs for attrs, _ in got["otel_ml_gpu_info"]]
    assert [a["device"] for a in info] == ["cuda:0", "cuda:2"]
    assert info[1]["gpu_uuid"] == "GPU-00000002-0000-4000-8000-000000000002"
    assert info[1]["pci_bus_id"] == "00000000:1A:00.0"  # nvidia-smi / DCGM form
    assert info[1]["gpu_name"] == "Fake H2" and info[1]["host"] and info[1]["rank"] == "1"
    assert value(got, "otel_ml_gpu_info", device="cuda:0") == 1
    assert cuda.clean()


def test_a_failing_gpu_read_is_counted_and_the_other_devices_still_report():
    cuda = _three_gpus()
    errors = []
    sampler = GpuMemorySampler(cuda, on_error=lambda: errors.append(1))
    cuda.fail_next("memory_stats")
    assert [r[0] for r in _rows(sampler)] == ["cuda:2"]
    assert errors == [1]
    assert [r[0] for r in _rows(sampler)] == ["cuda:0", "cuda:2"]


def test_resident_memory_in_a_forked_child_is_the_childs_own():
    resident_memory_bytes()  # the parent's descriptor is open now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: grow by 200 MiB; read through the parent's descriptor it would not show
        try:
            before = resident_memory_bytes()
            ballast = bytearray(200 << 20)
            ballast[::4096] = b"x" * len(ballast[::4096])
            os.write(write, str(resident_memory_bytes() - before).encode())
        finally:
            os._exit(0)
    os.close(write)
    grown = int(os.read(read, 64))
    os.waitpid(pid, 0)
    assert grown > 150 << 20
