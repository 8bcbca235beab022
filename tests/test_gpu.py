"""GPU paths against the strict CUDA stand-in: no stray context, no cuInit, no exception into training.

Each of the eight defects of issue 14 has a test here (or in ``test_system.py`` for the memory
gauges) that fails on the code before the fix. The stand-in (``tests/support/fake_cuda.py``)
raises or records wherever real CUDA would misbehave, and is stricter where it cannot know.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

import otel_ml
from otel_ml.gpu import DeviceCalls
from otel_ml.health import TelemetryHealth
from otel_ml.regions import aggregator as aggregation
from otel_ml.regions import module_tracing
from otel_ml.regions import recorder as timing
from otel_ml.regions.aggregator import Aggregator
from otel_ml.regions.cuda_events import PENDING, CudaEvents, cuda_events_if_active
from otel_ml.regions.pathtree import PathTree
from otel_ml.regions.sampling import TraceSampler
from otel_ml.training import TrainingMetrics
from tests.support.clock import FakeClock
from tests.support.fake_cuda import CudaError, FakeCuda, on_thread
from tests.support.metrics import parse_exposition

MS = 1_000_000


class Timed:
    """A recorder with CUDA events on a stand-in, its aggregator, and the counted errors."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.clock = FakeClock(0, tick=MS)
        self.errors: list[int] = []
        self.events = CudaEvents(cuda, DeviceCalls(cuda, cuda.cudart), on_error=lambda: self.errors.append(1))
        self.recorder = timing.Recorder(
            PathTree(), clock=self.clock, events=self.events, on_error=lambda: self.errors.append(1),
            on_boundary=(module_tracing.step_boundary,),
        )  # fmt: skip
        self.aggregator = Aggregator(
            self.recorder,
            TracerProvider(shutdown_on_exit=False).get_tracer("t"),
            {"rank": "0", "run_id": "r"},
            sampler=TraceSampler(every=0, factor=0),
            wall_offset_ns=0,
        )

    def process(self) -> None:
        on_thread(self.aggregator.process)

    def stats(self) -> dict[str, Any]:
        return {node.path: s for node, s in self.aggregator.stats.items()}


@pytest.fixture
def timed():
    made: list[Timed] = []

    def make(cuda: FakeCuda) -> Timed:
        t = Timed(cuda)
        timing.install(t.recorder)
        made.append(t)
        return t

    yield make
    timing.install(None)


# 1. A stray CUDA context on GPU 0 from every rank -------------------------------------------


def test_background_event_reads_run_under_the_events_own_device(timed):
    cuda = FakeCuda(devices=8)
    cuda.set_device(5)  # rank 5 of a node; the pump thread's current device is 0
    t = timed(cuda)
    with otel_ml.span("forward"):
        cuda.kernel(3.0)
    cuda.complete()
    t.process()
    assert t.stats()["forward"].gpu_count == 1
    assert cuda.stray_contexts == [] and cuda.unguarded == []


def test_a_deferred_loss_is_read_under_its_devices_guard():
    cuda = FakeCuda(devices=4)
    tm = TrainingMetrics(
        MeterProvider(shutdown_on_exit=False).get_meter("t"), {}, cuda=cuda, cudart=cuda.cudart
    )
    tm.log(1, {"loss": cuda.tensor(0.75, device=3)})
    cuda.complete()
    on_thread(tm.refresh)
    assert tm._latest["loss"] == 0.75
    assert cuda.stray_contexts == [] and cuda.unguarded == []


# 2. cuInit from the pump thread ----------------------------------------------------------------


def test_no_otel_ml_thread_initialises_cuda_before_the_training_code(monkeypatch):
    cuda = FakeCuda(initialized=False)
    monkeypatch.setattr(torch, "cuda", cuda)  # what the default path reads from sys.modules
    assert on_thread(lambda: cuda_events_if_active("auto")) is None
    assert on_thread(lambda: cuda_events_if_active("on")) is None
    assert cuda.cuinit == []
    cuda.init()  # the training code's first CUDA call
    assert on_thread(lambda: cuda_events_if_active("auto")) is not None
    assert cuda.cuinit == []


def test_a_whole_run_with_cuda_never_initialised_makes_no_cuinit(tmp_path):
    cuda = FakeCuda(initialized=False)
    t = otel_ml.Telemetry(
        otel_ml.Config.resolve(prometheus_port=0, run_dir=str(tmp_path), files="off", summary=False),
        cuda=cuda,
        cudart=cuda.cudart,
    )
    try:
        for step in range(5):
            with otel_ml.span("forward"):
                pass
            t.log(step, loss=1.0)
        t.flush(timeout=5)
        assert t.timekeeper is not None and t.timekeeper.recorder.events is None
    finally:
        t.shutdown(timeout=5)
    assert cuda.cuinit == [] and cuda.clean()


# 3. An exception into the training loop ----------------------------------------------------


def test_regions_on_two_devices_never_record_an_event_on_the_wrong_device(timed):
    # torchrun without set_device: forward on the training thread (device 0), backward regions
    # on autograd's device-1 thread. One pool for both devices raised "Event device 1 does not
    # match recording stream's device 0" from the second forward region.
    cuda = FakeCuda(devices=2)
    t = timed(cuda)

    def backward_on_device_1() -> None:
        cuda.set_device(1)
        cuda.use(1)
        with otel_ml.span("backward"):
            cuda.kernel(2.0)

    for _ in range(3):
        on_thread(backward_on_device_1, name="autograd-device-1")  # reuses what forward released
        with otel_ml.span("forward"):
            cuda.kernel(1.0)
        cuda.complete()
        t.process()
    stats = t.stats()
    assert stats["forward"].gpu_count == 3 and stats["backward"].gpu_count == 3
    assert stats["backward"].total == pytest.approx(0.006)
    assert t.errors == [] and cuda.unguarded == [] and cuda.stray_contexts == []


@pytest.mark.parametrize("operation", ["record", "current_device", "is_current_stream_capturing"])
def test_a_failing_cuda_call_in_a_region_is_counted_and_the_region_is_host_timed(timed, operation):
    cuda = FakeCuda(devices=1)
    t = timed(cuda)
    cuda.fail_next(operation)
    with otel_ml.span("forward"):  # must not raise
        t.clock.advance(2)
    with otel_ml.span("forward"):
        t.clock.advance(2)
    cuda.complete()
    t.process()
    forward = t.stats()["forward"]
    assert forward.count == 2 and forward.gpu_count == 1  # the failed one fell back to host time
    assert t.errors == [1]


def test_a_failing_cuda_call_never_reaches_a_timed_modules_forward_or_backward(timed):
    cuda = FakeCuda(devices=1)
    t = timed(cuda)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    tracer = otel_ml.trace_modules(model, depth=None, every=1)
    try:
        cuda.fail_next("record", times=50)  # every event of this step and the next fails
        for step in range(3):
            loss = model(torch.randn(2, 4)).sum()
            loss.backward()  # must not raise
            t.recorder.step_end(step)
        cuda.complete()
        t.process()
    finally:
        tracer.remove()
    assert t.stats()["Sequential"].count == 3
    assert len(t.errors) >= 1


# 4. Silently wrong values -----------------------------------------------------------------------


def test_a_deferred_value_waits_for_the_copy_on_its_own_devices_stream():
    # The copy runs on cuda:1's stream while the training thread's current device is 0; an event
    # recorded on the current device's stream turned ready before the copy landed.
    cuda = FakeCuda(devices=2)
    health = TelemetryHealth()
    tm = TrainingMetrics(
        MeterProvider(shutdown_on_exit=False).get_meter("t"), {}, cuda=cuda, cudart=cuda.cudart, health=health
    )
    tm.log(1, {"loss": cuda.tensor(2.5, device=1)})
    cuda.complete(cuda.default_streams[0])  # device 0 is done; the copy on device 1 is not
    on_thread(tm.refresh)
    assert "loss" not in tm._latest and cuda.early_reads == 0
    cuda.complete()
    on_thread(tm.refresh)
    assert tm._latest["loss"] == 2.5 and cuda.early_reads == 0


def test_regions_of_a_rank_that_never_calls_set_device_time_the_gpu_it_works_on(timed):
    # model.to("cuda:2") without set_device: kernels run on cuda:2, the current device stays 0,
    # and events on device 0's idle stream measured nothing (GPU times near 0).
    cuda = FakeCuda(devices=4)
    cuda.set_memory(2, allocated=1 << 20, reserved=2 << 20, peak=1 << 20)
    t = timed(cuda)
    assert on_thread(t.events.find_work_device) == 2
    with otel_ml.span("forward"):
        cuda.kernel(3.0, stream=cuda.current_stream(2))
    cuda.complete()
    t.process()
    assert t.stats()["forward"].total == pytest.approx(0.003)
    assert t.events.devices == {2} and cuda.unguarded == [] and cuda.stray_contexts == []


def test_a_failing_deferred_read_is_counted_and_later_values_still_arrive():
    cuda = FakeCuda(devices=1)
    health = TelemetryHealth()
    tm = TrainingMetrics(
        MeterProvider(shutdown_on_exit=False).get_meter("t"), {}, cuda=cuda, cudart=cuda.cudart, health=health
    )
    tm.log(1, {"loss": cuda.tensor(1.0)})
    tm.log(2, {"loss": cuda.tensor(0.5)})
    cuda.complete()
    cuda.fail_next("query")
    on_thread(tm.refresh)
    assert tm._latest["loss"] == 0.5
    assert health.errors["values"] == 1 and health.drops["values"] == 1


def test_a_cuda_value_logged_during_a_capture_is_refused_not_captured():
    cuda = FakeCuda(devices=1)
    health = TelemetryHealth()
    tm = TrainingMetrics(MeterProvider(shutdown_on_exit=False).get_meter("t"), {}, cuda=cuda, health=health)
    with cuda.graph():
        tm.log(1, {"loss": cuda.tensor(1.0)})
    assert not tm._pending and health.drops["values"] == 1


# 5. One bad record stops region aggregation for good ---------------------------------------------


def test_a_region_left_on_another_stream_waits_for_both_events_then_falls_back(timed, monkeypatch):
    cuda = FakeCuda(devices=1)
    t = timed(cuda)
    side = cuda.Stream()
    with cuda.stream(side):
        region = otel_ml.span("copy")
        region.__enter__()  # start event on the side stream
    region.__exit__(None, None, None)  # end event on the default stream
    with otel_ml.span("forward"):
        cuda.kernel(1.0)
    cuda.complete(cuda.default_streams[0])  # the end is done, the start is not
    t.process()
    assert t.stats() == {}  # waits: reading elapsed_time now would raise
    t.clock.advance(aggregation.GPU_WAIT_NS / MS + 1)
    t.process()  # waited too long: host time, counted, and the queue moves on
    stats = t.stats()
    assert stats["copy"].gpu_count == 0 and stats["forward"].gpu_count == 1
    assert t.errors == [1]


def test_an_unreadable_pair_is_dropped_and_counted_and_the_next_regions_flow(timed):
    cuda = FakeCuda(devices=1)
    t = timed(cuda)
    for _ in range(3):
        with otel_ml.span("forward"):
            cuda.kernel(1.0)
    cuda.complete()
    cuda.fail_next("elapsed_time")
    t.process()
    forward = t.stats()["forward"]
    assert forward.count == 3 and forward.gpu_count == 2
    assert t.errors == [1]


def test_regions_waiting_for_a_gpu_that_never_finishes_stay_bounded(timed, monkeypatch):
    monkeypatch.setattr(aggregation, "MAX_GPU_BACKLOG", 8)
    cuda = FakeCuda(devices=1)
    t = timed(cuda)
    for _ in range(20):
        with otel_ml.span("forward"):
            pass
        t.process()
    assert len(t.recorder.finished) <= 8
    assert t.stats()["forward"].count == 20 - len(t.recorder.finished)


def _events(cuda: FakeCuda) -> CudaEvents:
    return CudaEvents(cuda, DeviceCalls(cuda, cuda.cudart))


def test_events_recorded_across_devices_in_one_region_fall_back_to_host_time():
    cuda = FakeCuda(devices=2)
    events = _events(cuda)
    start = events.record()
    cuda.set_device(1)
    end = events.record()
    cuda.complete()
    assert on_thread(lambda: events.resolve(start, end)) is None
    assert cuda.unguarded == []


# 6. CUDA graphs -----------------------------------------------------------------------------------


def test_a_region_inside_a_capture_records_no_event_and_keeps_the_capture(timed):
    cuda = FakeCuda(devices=1)
    t = timed(cuda)
    with cuda.graph(), otel_ml.span("graphed"):
        t.clock.advance(1)
    assert cuda.calls["record"] == 0 and cuda.broken_captures() == []
    t.process()
    assert t.stats()["graphed"].count == 1 and t.stats()["graphed"].gpu_count == 0


def test_the_pump_reading_events_during_a_capture_does_not_break_it(timed):
    cuda = FakeCuda(devices=1)
    t = timed(cuda)
    with otel_ml.span("before"):
        cuda.kernel(1.0)
    cuda.complete()
    with cuda.graph():  # global mode, the default of torch.cuda.graph
        t.process()  # the pump queries the events of "before" meanwhile
    assert cuda.broken_captures() == []
    assert t.stats()["before"].gpu_count == 1


def test_without_thread_local_capture_mode_the_stand_in_breaks_the_capture():
    # The stand-in must catch what the fix prevents: the same query, without the mode switch.
    cuda = FakeCuda(devices=1)
    event = cuda.Event(enable_timing=True)
    event.record()
    with (
        pytest.raises(CudaError, match="capture invalidated"),
        cuda.graph(),
        pytest.raises(CudaError, match="capturing"),
    ):
        on_thread(event.query)
    assert cuda.broken_captures()


# The stand-in itself: strict where the fixes rely on it -----------------------------------------


def test_the_stand_in_flags_an_unguarded_query_a_wrong_device_record_and_early_elapsed_time():
    cuda = FakeCuda(devices=2)
    cuda.set_device(1)
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    start.record()
    end.record()
    on_thread(end.query)
    assert cuda.unguarded and cuda.stray_contexts  # from device 0, never used by this process
    with pytest.raises(CudaError, match="does not match"):
        cuda.set_device(0)
        start.record()
    with pytest.raises(CudaError, match="completed"):
        start.elapsed_time(end)
    with pytest.raises(AssertionError):
        cuda.synchronize()


def test_pending_means_the_gpu_is_not_there_yet():
    cuda = FakeCuda(devices=1)
    events = _events(cuda)
    start = events.record()
    cuda.kernel(4.0)
    end = events.record()
    assert on_thread(lambda: events.resolve(start, end)) is PENDING
    cuda.complete()
    assert on_thread(lambda: events.resolve(start, end)) == pytest.approx(4.0)


# Every CUDA call failing once: the loop still finishes, telemetry is host-timed and counted -----

OPERATIONS = (
    "record", "query", "elapsed_time", "current_device", "current_stream", "device",
    "is_current_stream_capturing", "memory_stats", "get_device_properties", "copy", "exchange",
)  # fmt: skip


def test_a_run_where_every_cuda_call_fails_once_finishes_with_host_time_and_counted_errors(tmp_path):
    cuda = FakeCuda(devices=1)
    cuda.set_memory(0, allocated=1, reserved=2, peak=3)
    for operation in OPERATIONS:
        cuda.fail_next(operation)
    t = otel_ml.Telemetry(
        otel_ml.Config.resolve(
            prometheus_port=0, run_dir=str(tmp_path), files="off", summary=False, set_global_providers=False
        ),
        cuda=cuda,
        cudart=cuda.cudart,
    )
    assert t.timekeeper is not None and t.metrics_url is not None
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    tracer = otel_ml.trace_modules(model, depth=None, every=1)
    try:
        for step in range(20):
            with otel_ml.span("forward"):
                loss = model(torch.randn(2, 4)).sum()
            with otel_ml.span("backward"):
                loss.backward()
            t.log(step, loss=cuda.tensor(1.0 / (step + 1)))
            cuda.complete()
        t.flush(timeout=5)
        cuda.complete()
        # Real scrapes; the first ones meet the injected GPU-memory failures, then it recovers.
        for _ in range(4):
            text = urllib.request.urlopen(t.metrics_url, timeout=10).read().decode()
    finally:
        tracer.remove()
        t.shutdown(timeout=5)
    got = parse_exposition(text)
    counts = {labels["path"]: n for labels, n in got["otel_ml_span_duration_seconds_count"]}
    assert counts["forward"] == 20 and counts["backward"] == 20  # every region, host-timed or not
    (loss,) = [v for _, v in got["otel_ml_loss"]]
    assert loss == pytest.approx(1 / 20)
    errors = {labels["exporter"]: v for labels, v in got["otel_ml_export_errors_total"]}
    assert errors["timing"] >= 1
    reserved = {labels["device"]: v for labels, v in got["otel_ml_gpu_memory_reserved_bytes"]}
    assert reserved == {"cuda:0": 2}
    assert cuda.cuinit == [] and cuda.stray_contexts == [] and cuda.unguarded == []
