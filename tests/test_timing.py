"""Regions: nesting, explicit paths, decorators, exceptions, threads, tasks, sampling, GPU path.

Time is a fake clock in nanoseconds; spans go to the SDK's in-memory exporter with a zero
wall-clock offset, so every timestamp is checked exactly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import otel_ml
from otel_ml import _cbuild
from otel_ml.gpu import DeviceCalls
from otel_ml.regions import recorder as timing
from otel_ml.regions.aggregator import Aggregator
from otel_ml.regions.cuda_events import CudaEvents
from otel_ml.regions.pathtree import PathTree
from otel_ml.regions.sampling import TraceSampler
from otel_ml.semconv import ATTR_PATH
from tests.support.clock import FakeClock
from tests.support.fake_cuda import FakeCuda

MS = 1_000_000


@pytest.fixture
def env():
    clock = FakeClock(0, tick=MS)
    recorder = timing.Recorder(PathTree(max_paths=50), clock=clock)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    aggregator = Aggregator(
        recorder,
        provider.get_tracer("t"),
        {"rank": "0", "run_id": "r"},
        span_attributes={"otel_ml.rank": 0},
        sampler=TraceSampler(every=1, factor=0),
        wall_offset_ns=0,
    )
    timing.install(recorder)
    yield recorder, aggregator, exporter, clock
    timing.install(None)


def _spans(exporter):
    return {s.name: s for s in exporter.get_finished_spans()}


def test_nesting_and_explicit_paths_build_the_same_tree(env):
    recorder, aggregator, _, _ = env
    with otel_ml.span("forward"), otel_ml.span("encoder"):
        pass
    with otel_ml.span("forward/encoder"):
        pass
    aggregator.process()
    (node,) = [n for n in aggregator.stats if n.path == "forward/encoder"]
    assert aggregator.stats[node].count == 2
    assert [n.path for n in recorder.tree.walk()] == ["forward", "forward/encoder"]


def test_spans_have_the_nesting_as_parents_and_the_recorded_timestamps(env):
    recorder, aggregator, exporter, clock = env
    clock.advance(1)
    with otel_ml.span("forward"):
        clock.advance(2)
        with otel_ml.span("encoder"):
            clock.advance(3)
        with otel_ml.span("head"):
            clock.advance(4)
    clock.advance(5)
    recorder.step_end(7)
    aggregator.process()
    spans = _spans(exporter)
    root, forward, encoder, head = (spans[n] for n in ("otel_ml.step", "forward", "encoder", "head"))
    assert root.parent is None and root.attributes["otel_ml.step"] == 7
    assert root.attributes["otel_ml.sampled_by"] == "every"
    assert (root.start_time, root.end_time) == (0, 15 * MS)
    assert forward.parent.span_id == root.context.span_id
    assert encoder.parent.span_id == forward.context.span_id
    assert head.parent.span_id == forward.context.span_id
    assert {s.context.trace_id for s in spans.values()} == {root.context.trace_id}
    assert (forward.start_time, forward.end_time) == (1 * MS, 10 * MS)
    assert (encoder.start_time, encoder.end_time) == (3 * MS, 6 * MS)
    assert (head.start_time, head.end_time) == (6 * MS, 10 * MS)
    assert encoder.attributes["otel_ml.path"] == "forward/encoder"


def test_self_time_excludes_children(env):
    _, aggregator, _, clock = env
    with otel_ml.span("forward"):
        clock.advance(2)
        with otel_ml.span("encoder"):
            clock.advance(3)
    aggregator.process()
    by_path = {n.path: s for n, s in aggregator.stats.items()}
    assert by_path["forward"].total == pytest.approx(0.005)
    assert by_path["forward"].self_total == pytest.approx(0.002)
    assert by_path["forward/encoder"].self_total == pytest.approx(0.003)


def test_decorator_times_sync_and_async_functions(env):
    _, aggregator, _, clock = env

    @otel_ml.span("data/collate")
    def collate(x):
        clock.advance(2)
        return x * 2

    @otel_ml.span("rollout")
    async def rollout(x):
        clock.advance(3)
        await asyncio.sleep(0)
        return x + 1

    assert collate(4) == 8
    assert asyncio.run(rollout(1)) == 2
    assert collate.__name__ == "collate" and rollout.__name__ == "rollout"
    aggregator.process()
    by_path = {n.path: s for n, s in aggregator.stats.items()}
    assert by_path["data/collate"].total == pytest.approx(0.002)
    assert by_path["rollout"].total == pytest.approx(0.003)


def test_concurrent_asyncio_tasks_keep_their_own_nesting(env):
    _, aggregator, _, _ = env

    async def worker(name):
        async with otel_ml.span(name):
            await asyncio.sleep(0)
            with otel_ml.span("step"):
                await asyncio.sleep(0)

    async def main():
        await asyncio.gather(worker("a"), worker("b"))

    asyncio.run(main())
    aggregator.process()
    assert sorted(n.path for n in aggregator.stats) == ["a", "a/step", "b", "b/step"]


def test_tasks_started_inside_a_region_nest_under_it_each_with_its_own_stack(env):
    recorder, aggregator, exporter, clock = env

    async def worker(name):
        with otel_ml.span(name):
            await asyncio.sleep(0)  # the other task runs its region meanwhile
            with otel_ml.span("inner"):
                clock.advance(1)

    async def main():
        await asyncio.gather(worker("a"), worker("b"))

    with otel_ml.span("serve"):
        asyncio.run(main())
        assert timing.current_path() == "serve"  # the tasks left this thread's nesting alone
    recorder.step_end(0)
    aggregator.process()
    assert sorted(n.path for n in aggregator.stats) == [
        "serve",
        "serve/a",
        "serve/a/inner",
        "serve/b",
        "serve/b/inner",
    ]
    spans = {s.attributes.get(ATTR_PATH): s for s in exporter.get_finished_spans()}
    assert spans["serve/a/inner"].parent.span_id == spans["serve/a"].context.span_id
    assert spans["serve/a"].parent.span_id == spans["serve"].context.span_id


def test_an_exception_marks_the_span_as_error_closes_it_and_propagates(env):
    recorder, aggregator, exporter, _ = env
    with pytest.raises(KeyError), otel_ml.span("forward"), otel_ml.span("encoder"):
        raise KeyError("boom")
    assert timing.current_path() is None
    recorder.step_end(0)
    aggregator.process()
    spans = _spans(exporter)
    assert spans["encoder"].status.status_code == StatusCode.ERROR
    assert spans["encoder"].attributes["exception.type"] == "KeyError"
    assert spans["forward"].status.status_code == StatusCode.ERROR


def test_other_threads_use_their_own_stack(env):
    _, aggregator, _, _ = env
    done = threading.Event()

    def loader():
        with otel_ml.span("loader"):
            pass
        done.set()

    with otel_ml.span("forward"):
        thread = threading.Thread(target=loader)
        thread.start()
        thread.join()
    assert done.is_set()
    aggregator.process()
    assert sorted(n.path for n in aggregator.stats) == ["forward", "loader"]


def test_unicode_names(env):
    _, aggregator, _, _ = env
    with otel_ml.span("前向传播总耗时"), otel_ml.span("编码器"):
        pass
    aggregator.process()
    assert sorted(n.path for n in aggregator.stats) == ["前向传播总耗时", "前向传播总耗时/编码器"]


def test_regions_are_no_ops_when_disabled_compiling_or_not_installed(env, monkeypatch):
    recorder, aggregator, _, _ = env
    recorder.enabled = False
    with otel_ml.span("off"):
        pass
    recorder.enabled = True
    with monkeypatch.context() as patch:  # a compile or export session
        patch.setattr(timing._compile_state, "_is_compiling_flag", True)
        with otel_ml.span("compiling"):
            pass
    timing.install(None)
    with otel_ml.span("before-init"):
        pass
    timing.install(recorder)
    aggregator.process()
    assert aggregator.stats == {}
    assert timing.current_path() is None


def test_out_of_order_close_does_not_corrupt_nesting(env):
    _, aggregator, _, _ = env
    outer, inner = otel_ml.span("outer"), otel_ml.span("inner")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # closed before its child (e.g. a hook that fired late)
    with otel_ml.span("next"):
        assert timing.current_path() == "outer/inner/next"
    inner.__exit__(None, None, None)
    with otel_ml.span("after"):
        assert timing.current_path() == "after"
    aggregator.process()
    assert {n.path for n in aggregator.stats} == {"outer", "outer/inner", "outer/inner/next", "after"}


def test_every_nth_and_slow_steps_are_traced(env):
    recorder, aggregator, exporter, clock = env
    aggregator.sampler = TraceSampler(every=5, factor=2.0, window=20, min_steps=4)
    durations = [10, 10, 10, 10, 10, 10, 35, 10, 10, 10, 10]
    for step, ms in enumerate(durations):
        with otel_ml.span("work"):
            clock.advance(ms)
        recorder.step_end(step)
    aggregator.process()
    roots = [s for s in exporter.get_finished_spans() if s.name == "otel_ml.step"]
    assert sorted((s.attributes["otel_ml.step"], s.attributes["otel_ml.sampled_by"]) for s in roots) == [
        (0, "every"),
        (5, "every"),
        (6, "slow"),
        (10, "every"),
    ]
    assert aggregator.traced == {"every": 3, "slow": 1, "anomaly": 0, "error": 0}
    work = [s for s in exporter.get_finished_spans() if s.name == "work"]
    assert len(work) == 4  # regions only for traced steps


def test_log_implies_step_boundaries_until_step_end_is_used(env):
    recorder, aggregator, _, clock = env
    recorder.implied_step_end(3, 0.001, {"loss": 1.0})
    clock.advance(2)
    recorder.step_end(4)
    recorder.implied_step_end(5, 0.002, {"loss": 1.0})  # ignored: explicit mode
    aggregator.process()
    assert aggregator.steps == 2


def test_sampled_steps_build_spans_only_while_a_span_processor_listens():
    clock = FakeClock(0, tick=MS)
    recorder = timing.Recorder(PathTree(max_paths=50), clock=clock)
    provider = TracerProvider(shutdown_on_exit=False)  # no processor yet: nothing receives spans
    aggregator = Aggregator(
        recorder, provider.get_tracer("t"), {"rank": "0", "run_id": "r"}, sampler=TraceSampler(every=1)
    )
    timing.install(recorder)
    try:
        with otel_ml.span("work"):
            clock.advance(3)
        recorder.step_end(0)
        aggregator.process()
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))  # added later: honoured from now
        with otel_ml.span("work"):
            clock.advance(3)
        recorder.step_end(1)
        aggregator.process()
    finally:
        timing.install(None)
    assert aggregator.traced["every"] == 2  # both steps were sampled and counted
    roots = [s for s in exporter.get_finished_spans() if s.name == "otel_ml.step"]
    assert [s.attributes["otel_ml.step"] for s in roots] == [1]
    assert aggregator.stats and aggregator.steps == 2  # timing itself is unaffected


def test_a_logged_loss_tensor_is_not_kept_alive_by_the_step_boundary(env):
    torch = pytest.importorskip("torch")
    import gc
    import weakref

    recorder, aggregator, exporter, _ = env
    weight = torch.ones(3, requires_grad=True)
    loss = (weight * 2).sum()
    alive = weakref.ref(loss)  # with it, its autograd graph
    recorder.implied_step_end(1, 0.001, {"loss": loss, "lr": 0.5, "step_count": 3})
    del loss
    gc.collect()
    assert alive() is None  # freed by the training thread, as without otel_ml
    recorder.implied_step_end(2, 0.002, {})
    aggregator.process()
    root = next(s for s in exporter.get_finished_spans() if s.name == "otel_ml.step")
    assert root.attributes["otel_ml.value.lr"] == 0.5 and root.attributes["otel_ml.value.step_count"] == 3


def _on_a_thread(function) -> None:
    """Run ``function`` on another thread, as the pump does (its current CUDA device is 0)."""
    thread = threading.Thread(target=function, name="otel-ml-pump")
    thread.start()
    thread.join()


def test_gpu_timed_regions_wait_for_their_events_and_report_gpu_time(env):
    recorder, aggregator, exporter, clock = env
    cuda = FakeCuda(devices=2)
    cuda.set_device(1)  # the training thread works on cuda:1; the pump thread's device is 0
    events = recorder.events = CudaEvents(cuda, DeviceCalls(cuda, cuda.cudart))
    with otel_ml.span("forward"):
        clock.advance(4)
        cuda.kernel(8.0)  # 8 ms on the GPU, to tell GPU time from host time
    recorder.step_end(0)
    _on_a_thread(aggregator.process)
    assert aggregator.stats == {} and aggregator.steps == 0  # the GPU is not there yet
    cuda.complete()
    _on_a_thread(aggregator.process)
    (stats,) = aggregator.stats.values()
    assert stats.total == pytest.approx(0.008) and stats.host_total == pytest.approx(0.004)
    assert stats.gpu_count == 1
    assert len(events._free[1]) == 2  # both events back in cuda:1's pool
    span = _spans(exporter)["forward"]
    assert span.attributes["otel_ml.gpu_duration_ms"] == pytest.approx(8.0)
    assert span.attributes["otel_ml.host_duration_ms"] == pytest.approx(4.0)
    assert cuda.clean(), (cuda.stray_contexts, cuda.unguarded)


def test_histogram_metric_counts_durations_per_path(env):
    _, aggregator, _, clock = env
    for ms in (0.2, 3, 3, 40):
        with otel_ml.span("forward"):
            clock.advance(ms)
    aggregator.process()  # the collection's prepare hook does this before each collection
    (metric,) = aggregator.metrics()
    assert metric.name == "otel_ml_span_duration_seconds" and metric.unit == "s"
    (point,) = metric.data.data_points
    assert point.attributes == {"rank": "0", "run_id": "r", "path": "forward"}
    assert point.count == 4 and point.sum == pytest.approx(0.0462)
    bounds = list(point.explicit_bounds)
    assert point.bucket_counts[bounds.index(0.00025)] == 1
    assert point.bucket_counts[bounds.index(0.005)] == 2
    assert point.bucket_counts[bounds.index(0.05)] == 1


def test_path_cap_sends_new_paths_to_overflow_with_one_warning(env, caplog):
    _, aggregator, _, _ = env
    for i in range(60):
        with otel_ml.span(f"p{i}"):
            pass
    aggregator.process()
    paths = {n.path for n in aggregator.stats}
    assert len(paths) == 51 and "(overflow)" in paths
    assert caplog.text.count("distinct span paths") == 1


def test_span_cache_is_bounded():
    for i in range(10_050):
        otel_ml.span(f"sample-{i}")
    assert otel_ml.span.cache_info().currsize <= 10_000
    assert otel_ml.span("sample-10049") is otel_ml.span("sample-10049")


def test_regions_inside_torch_compile_break_no_graph_and_record_nothing(env):
    _, aggregator, _, _ = env
    made_before = otel_ml.span("made-before")

    @otel_ml.span("decorated")
    def double(x):
        return x * 2

    def fn(x):
        with otel_ml.span("made-before"), otel_ml.span("made-inside"):
            y = double(x)
        return y + 1

    with made_before:
        pass
    import torch._dynamo  # what torch.compile imports; the pump tick then does this:

    assert timing.allow_under_dynamo()
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about tracing through span's cache either
        compiled = torch.compile(fn, backend="eager", fullgraph=True)  # raises on a graph break
        for _ in range(3):
            assert compiled(torch.ones(2)).tolist() == [3.0, 3.0]
    assert graphs["unique_graphs"] - before == 1  # compiled once: no guard on otel_ml's state
    with otel_ml.span("eager"):
        assert double(torch.ones(1)).tolist() == [2.0]
    aggregator.process()
    assert sorted(n.path for n in aggregator.stats) == ["eager", "eager/decorated", "made-before"]


def test_regions_free_what_they_allocate():
    """A reference leaked by the C hot path would keep every entry alive: count blocks."""
    recorder = timing.Recorder(PathTree())
    timing.install(recorder)
    try:
        outer, inner = otel_ml.span("leak/outer"), otel_ml.span("inner")

        def run(n):
            for i in range(n):
                with outer, inner:
                    pass
                with pytest.raises(ValueError), outer:
                    raise ValueError
                if i % 100 == 0:  # what the export thread does
                    recorder.collect()
                    recorder.finished.clear()
            for _ in range(3):  # a drain keeps the previous one's entries for late children
                recorder.collect()
                recorder.finished.clear()

        run(1_000)  # warm up: caches, the path tree, interned objects
        before = sys.getallocatedblocks()
        run(20_000)
        assert sys.getallocatedblocks() - before < 2_000  # 60,000 entries were made
    finally:
        timing.install(None)


def test_region_timestamps_read_the_same_clock_as_perf_counter_ns():
    recorder = timing.Recorder(PathTree())  # the default clock: the C path reads it natively
    timing.install(recorder)
    try:
        before = time.perf_counter_ns()
        with otel_ml.span("clock"):
            pass
        after = time.perf_counter_ns()
        recorder.collect()
        (entry,) = recorder.finished
        assert before <= entry[timing.START] <= entry[timing.END] <= after
    finally:
        timing.install(None)


def test_the_c_hot_path_is_built_where_ci_requires_it():
    if not _cbuild.require_c():
        pytest.skip("OTEL_ML_REQUIRE_C is not set (.ci/run sets it)")
    assert timing.ACCELERATED, "otel_ml/regions/_cregion.c was not built: is a C compiler installed?"
    region = otel_ml.span("built")
    assert type(region).__enter__ is timing._cregion.RegionBase.__enter__
    assert type(region).__exit__ is timing._cregion.RegionBase.__exit__


@pytest.mark.skipif(not timing.ACCELERATED, reason="this run already uses the Python regions")
def test_the_python_regions_and_detectors_pass_their_tests_too():
    root = Path(__file__).resolve().parent.parent
    tests = ["tests/test_timing.py", "tests/test_modules.py", "tests/test_summary.py", "tests/test_gpu.py"]
    tests.append("tests/test_anomaly.py")  # the monitor on the Python detectors (otel_ml.detectors)
    env = {**os.environ, "OTEL_ML_PURE_PYTHON": "1", "OTEL_ML_REQUIRE_C": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_regions_past_the_queue_bound_are_dropped_and_counted(monkeypatch):
    drops = []
    monkeypatch.setattr(timing, "MAX_FINISHED", 10)  # read by install() and by PyRegion
    recorder = timing.Recorder(PathTree(), on_drop=drops.append)
    timing.install(recorder)
    try:
        for _ in range(15):  # the export thread is late: nothing drains meanwhile
            with otel_ml.span("busy"):
                pass
        recorder.collect()
        assert len(recorder.finished) == 10
        assert sum(drops) == 5
    finally:
        timing.install(None)


def test_nesting_deeper_than_the_stack_bound_keeps_the_outer_levels_and_balance():
    recorder = timing.Recorder(PathTree(max_paths=1_000))
    aggregator = Aggregator(recorder, TracerProvider().get_tracer("t"), {"rank": "0", "run_id": "r"})
    timing.install(recorder)
    try:
        regions = [otel_ml.span(f"d{i}") for i in range(300)]
        for region in regions:
            region.__enter__()
        for region in reversed(regions):
            region.__exit__(None, None, None)
        assert timing.current_path() is None
        with otel_ml.span("after"):
            assert timing.current_path() == "after"  # at the root again
        aggregator.process()
        assert "after" in {n.path for n in aggregator.stats}
        depths = sorted(n.depth for n in aggregator.stats if n.path != "after")
        assert depths == list(range(1, 257 if timing.ACCELERATED else 301))  # C keeps 256 levels
    finally:
        timing.install(None)


def test_modules_timed_every_nth_step_are_summarised_per_timed_step():
    import torch
    from torch import nn

    from otel_ml.regions import module_tracing
    from otel_ml.regions.render import render_text
    from otel_ml.regions.stats import outside

    recorder = timing.Recorder(PathTree(), on_boundary=(module_tracing.step_boundary,))
    aggregator = Aggregator(
        recorder, TracerProvider(shutdown_on_exit=False).get_tracer("t"), {}, sampler=TraceSampler(0, 0)
    )
    timing.install(recorder)
    try:
        net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        tracer = otel_ml.trace_modules(net, depth=1, every=2, name="net")
        for step in range(7):  # steps 2, 4 and 6 are timed
            with otel_ml.span("step"):
                net(torch.ones(4, 8, requires_grad=True)).sum().backward()
            recorder.step_end(step)
        tracer.remove()
        aggregator.process()
        rows = {r.path: r for r in aggregator.summary_rows()}
        layer = rows["step/net/0"]
        assert layer.sampled and layer.timed_steps == 3 and layer.count == 3
        assert layer.ms_per_step == pytest.approx(layer.total_ms / 3)
        top = rows["step"]
        assert not top.sampled and top.ms_per_step == pytest.approx(top.total_ms / 7)
        rest = outside(list(rows.values()), aggregator.step_time, aggregator.steps)
        assert top.total_ms + rest.total_ms == pytest.approx(aggregator.step_time * 1e3)
        text = render_text(list(rows.values()), "t", rest)
        assert "sampled 3/7" in next(line for line in text.splitlines() if line.strip().startswith("0 "))
    finally:
        timing.install(None)
