"""The C accounting of finished regions (``otel_ml/regions/_cregion_account.c``) against the Python loops.

The same scripted training (real regions on a fake clock) runs once with the C accounting and once
with the Python loops it replaces; statistics, windows and histogram snapshots must be equal to
the last bit. The C part runs whenever the C regions do; ``OTEL_ML_PURE_PYTHON=1`` runs the Python
loops alone (and skips the comparisons).
"""

from __future__ import annotations

import gc
import statistics
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

import otel_ml
from otel_ml.regions import aggregator as aggregation
from otel_ml.regions import recorder as timing
from otel_ml.regions.aggregator import Aggregator
from otel_ml.regions.cuda_events import PENDING
from otel_ml.regions.pathtree import PathTree
from otel_ml.regions.sampling import TraceSampler
from otel_ml.regions.stats import RESERVOIR, PathStats
from tests.support.clock import FakeClock

MS = 1_000_000
needs_c = pytest.mark.skipif(aggregation.ACCOUNTING_C is None, reason="the C accounting is not in use")


class StrictEvents:
    """CUDA events as the aggregator sees them: each pair is PENDING on its first poll, then
    ``ms`` milliseconds. ``record()`` gives an event only while ``on``; resolving or releasing an
    event that was never given out, or was given back already, fails the test."""

    def __init__(self, ms: float = 2.5) -> None:
        self.on = False
        self.ms = ms
        self.live: set[int] = set()
        self.polled: set[tuple[int, int]] = set()
        self._kept: list[object] = []

    def record(self) -> object | None:
        if not self.on:
            return None
        event = object()
        self._kept.append(event)
        self.live.add(id(event))
        return event

    def resolve(self, start: object, end: object) -> Any:
        assert id(start) in self.live and id(end) in self.live, "resolved an event not given out"
        key = (id(start), id(end))
        if key not in self.polled:
            self.polled.add(key)
            return PENDING
        self.release(start, end)
        return self.ms

    def release(self, *events: object) -> None:
        for event in events:
            assert id(event) in self.live, "released an event twice or never given out"
            self.live.remove(id(event))


def python_loops(agg: Aggregator) -> Aggregator:
    """``agg`` running the Python loops (what OTEL_ML_PURE_PYTHON=1 or a missing build runs)."""
    agg._account = agg._close_window = None
    return agg


def new_aggregator(recorder: timing.Recorder, *, c: bool) -> Aggregator:
    agg = Aggregator(
        recorder,
        TracerProvider(shutdown_on_exit=False).get_tracer("t"),
        {"rank": "0", "run_id": "r"},
        sampler=TraceSampler(every=3, factor=0),
        wall_offset_ns=0,
    )
    return agg if c else python_loops(agg)


def training(clock: FakeClock, recorder: timing.Recorder, events: StrictEvents) -> Iterator[None]:
    """Eight steps of nested, folded, failing and GPU-timed regions; yields where the export
    thread drains."""
    span = otel_ml.span
    for step in range(8):
        with span("data"):
            clock.advance(1 + step % 3)
        with span("forward"):
            clock.advance(1)
            with span("encoder"), span("attn"):
                clock.advance(2 + step)
            for layer in range(3):  # forward/layers.* : three paths, one histogram series
                with span(f"layers.{layer}"):
                    clock.advance(layer + 1)
        events.on = step in (2, 5)  # CUDA events in the middle of a drain
        with span("backward"):
            clock.advance(7)
            with span("grad"):
                clock.advance(1)
        events.on = False
        if step in (4, 6):
            with pytest.raises(ValueError), span("optimizer"):
                clock.advance(3)
                raise ValueError("step failed")
        else:
            with span("optimizer"):
                clock.advance(300 if step == 3 else 3)  # another bucket
        clock.advance(1)
        timing.record("external", 0.002 + step * 1e-4, {"part": 0.001})
        recorder.step_end(step)
        if step % 2:
            yield


def digest(agg: Aggregator) -> dict[str, Any]:
    """Everything the accounting produced, by path, compared exactly."""
    fields = ("count", "gpu_count", "total", "self_total", "host_total", "min", "max")
    fields += ("windows", "window_time", "sampled")
    return {
        "stats": {
            node.path: {**{f: getattr(s, f) for f in fields}, "samples": list(s.samples)}
            for node, s in agg.stats.items()
        },
        "order": [node.path for node in agg.stats],
        "histograms": agg.histograms.snapshot(),
        "steps": (agg.steps, agg.step_time, dict(agg.traced)),
        "open": [(e[timing.NODE].path, e[timing.CHILD], e[timing.GPU]) for e in agg._open],
        "left": len(agg.recorder.finished),
    }


def run_training(*, c: bool, drains: Callable[[Aggregator], None] | None = None) -> dict[str, Any]:
    clock = FakeClock(0, tick=MS)
    events = StrictEvents()
    recorder = timing.Recorder(PathTree(), clock=clock, events=events)
    agg = new_aggregator(recorder, c=c)
    timing.install(recorder)
    try:
        for _ in training(clock, recorder, events):
            clock.advance(1)
            agg.process()  # a GPU region stops this drain (PENDING) ...
            if drains is not None:
                drains(agg)
        agg.process()  # ... and the next one times it on the GPU
        agg.close_last_window()
    finally:
        timing.install(None)
    assert not events.live, "every event was resolved and given back"
    return digest(agg)


@needs_c
def test_c_and_python_accounting_give_identical_stats_windows_and_histograms():
    c, python = run_training(c=True), run_training(c=False)
    assert c == python
    stats = c["stats"]
    assert stats["backward"]["gpu_count"] == 2 and stats["backward"]["count"] == 8
    assert stats["backward"]["total"] != stats["backward"]["host_total"]  # two on the GPU
    assert stats["optimizer"]["count"] == 8 and stats["forward/encoder"]["self_total"] == 0.0
    assert stats["forward"]["self_total"] == pytest.approx(8 * 1e-3)
    assert c["steps"][0] == 8 and c["steps"][2] == {"every": 3, "slow": 0, "anomaly": 0, "error": 1}
    # Folded paths share one series: three layers, eight steps.
    counts, *_ = c["histograms"][("forward/layers.*",)]
    assert sum(counts) == 24


@needs_c
def test_a_region_waiting_for_its_gpu_events_stops_the_c_loop_and_keeps_its_place():
    waits = []

    def record_wait(agg: Aggregator) -> None:
        finished = agg.recorder.finished
        if finished:
            waits.append(finished[0][timing.NODE].path)
            assert finished[0][timing.EV_START] is not None  # left in place, events intact

    c = run_training(c=True, drains=record_wait)
    assert waits[0] == "backward/grad"  # the first region with events to end
    assert set(waits) == {"backward/grad", "backward"}
    assert c["left"] == 0 and c["stats"]["backward/grad"]["gpu_count"] == 2


@needs_c
def test_the_c_path_runs_when_the_regions_are_accelerated():
    from otel_ml.regions import _cregion

    assert timing.ACCELERATED
    calls = []

    def account(*args: Any) -> int:
        calls.append(len(args[0]))
        return _cregion.account(*args)

    recorder = timing.Recorder(PathTree())
    agg = new_aggregator(recorder, c=True)
    assert agg._account is _cregion.account and agg._close_window is _cregion.close_window
    agg._account = account
    timing.install(recorder)
    try:
        with otel_ml.span("forward"):
            pass
        recorder.step_end(0)
        agg.process()
    finally:
        timing.install(None)
    assert calls == [1]
    assert type(next(iter(agg.stats.values()))) is _cregion.PathStats
    assert agg.steps == 1 and next(iter(agg.stats.values())).windows == 1


def test_without_the_c_accounting_the_python_loops_and_python_stats_run():
    agg = new_aggregator(timing.Recorder(PathTree(), clock=FakeClock(0)), c=True)
    if not timing.ACCELERATED:  # OTEL_ML_PURE_PYTHON=1 or no build
        assert aggregation.ACCOUNTING_C is None and agg._account is None and agg._close_window is None
    python_loops(agg)
    entry = timing.new_record(
        agg.recorder.tree.resolve(agg.recorder.tree.root, ("a",)), None, timing._RECORDED
    )
    entry[timing.START], entry[timing.END] = 0, 5 * MS
    agg.recorder.finished.append(entry)
    agg.recorder.boundaries.append((0, 6 * MS, None))
    agg.process()
    (stats,) = agg.stats.values()
    assert type(stats) is PathStats and stats.count == 1 and stats.windows == 1


@needs_c
def test_a_stale_build_without_the_accounting_fails_loudly_under_require_c(monkeypatch):
    from otel_ml.regions import _cregion

    monkeypatch.setattr(_cregion, "ACCOUNTING", 0)
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "1")
    with pytest.raises(ImportError, match="stale build"):
        aggregation._load_accounting()
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "0")
    with pytest.warns(RuntimeWarning, match="accounting regions in Python"):
        assert aggregation._load_accounting() is None


@needs_c
def test_the_c_reservoir_is_bounded_exact_below_its_size_uniform_and_deterministic_per_seed():
    from otel_ml.regions import _cregion

    exact = _cregion.PathStats(seed=1)
    for i in range(RESERVOIR):
        exact.add(float(i), 0.0, float(i))
    assert exact.samples == [float(i) for i in range(RESERVOIR)]

    n = RESERVOIR * 20
    runs = []
    for seed in (7, 7, 8):
        stats = _cregion.PathStats(seed=seed)
        for i in range(n):
            stats.add(i / n, 0.0, i / n, gpu=i % 2 == 0)
        runs.append(stats)
    first, again, other = runs
    assert len(first.samples) == RESERVOIR and first.count == n and first.gpu_count == n // 2
    assert first.min == 0.0 and first.max == (n - 1) / n
    assert first.samples == again.samples and first.samples != other.samples
    # Uniform over the whole stream: the mean and each tenth hold what a uniform sample would.
    assert statistics.fmean(first.samples) == pytest.approx(0.5, abs=0.02)
    tenths = [0] * 10
    for value in first.samples:
        tenths[int(value * 10)] += 1
    assert all(abs(k / RESERVOIR - 0.1) < 0.02 for k in tenths), tenths
    assert sum(v >= 0.5 for v in first.samples) > RESERVOIR * 0.45  # late values replace early ones


@needs_c
def test_c_and_python_agree_on_a_path_past_the_reservoir_but_its_kept_samples():
    def drain(c: bool) -> tuple[Any, list[float]]:
        recorder = timing.Recorder(PathTree())
        agg = new_aggregator(recorder, c=c)
        node = recorder.tree.resolve(recorder.tree.root, ("busy",))
        for i in range(RESERVOIR + 500):
            entry = timing.new_record(node, None, timing._RECORDED)
            entry[timing.START], entry[timing.END] = i * MS, i * MS + (i % 97 + 1) * 1000
            recorder.finished.append(entry)
        agg.process()
        (stats,) = agg.stats.values()
        moments = (stats.count, stats.total, stats.self_total, stats.host_total, stats.min, stats.max)
        return (moments, agg.histograms.snapshot()), stats.samples

    (c, c_samples), (python, python_samples) = drain(True), drain(False)
    assert c == python
    assert len(c_samples) == len(python_samples) == RESERVOIR


def _entries(recorder: timing.Recorder, node: Any, parent: list, n: int, t0: int) -> list[list]:
    out = []
    for i in range(n):
        entry = timing.new_record(node, parent, timing._RECORDED)
        entry[timing.START], entry[timing.END] = t0 + i * 10, t0 + i * 10 + 7
        entry[timing.ERROR] = ValueError if i % 1000 == 0 else None
        out.append(entry)
    return out


@needs_c
def test_a_drain_of_100k_regions_leaks_no_reference_and_no_memory():
    recorder = timing.Recorder(PathTree(), clock=FakeClock(0))
    agg = new_aggregator(recorder, c=True)
    tree = recorder.tree
    node = tree.resolve(tree.root, ("outer", "inner"))
    parent = timing.new_record(tree.resolve(tree.root, ("outer",)), None, timing._RECORDED)
    probe = _entries(recorder, node, parent, 1, 0)[0]
    recorder.finished.append(probe)
    recorder.boundaries.append((0, 100, None))
    agg.process()
    agg._open.clear()
    baseline = (sys.getrefcount(node), sys.getrefcount(parent), sys.getrefcount(probe))
    assert baseline[2] == 2  # the local and getrefcount's argument: neither deque kept it
    gc.collect()
    tracemalloc.start()
    try:
        sizes = []
        for batch in range(10):
            t0 = (batch + 1) * 10**7
            recorder.finished.extend(_entries(recorder, node, parent, 10_000, t0))
            recorder.boundaries.append((batch + 1, t0 + 10**6, None))
            agg.process()
            assert not recorder.finished and not agg._open  # all accounted, all in closed steps
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert (sys.getrefcount(node), sys.getrefcount(parent), sys.getrefcount(probe)) == baseline
    assert sizes[-1] - sizes[1] < 32_000, sizes  # the reservoir filled in the first batches
    stats = agg.stats[node]
    assert stats.count == 100_001 and stats.windows == 11 and len(stats.samples) == RESERVOIR
    assert parent[timing.CHILD] == pytest.approx(100_001 * 7e-9)
    assert agg.traced["error"] + agg.traced["every"] == 11  # each step had a region that raised


@needs_c
def test_a_malformed_entry_raises_and_stays_queued_after_the_good_ones_are_accounted():
    recorder = timing.Recorder(PathTree())
    agg = new_aggregator(recorder, c=True)
    good = _entries(recorder, recorder.tree.resolve(recorder.tree.root, ("ok",)), None, 3, 0)
    bad = ["not", "an", "entry"]
    recorder.finished.extend([*good, bad])
    with pytest.raises(TypeError, match="entry list"):
        agg.process()
    assert list(recorder.finished) == [bad] and len(agg._open) == 3
    (stats,) = agg.stats.values()
    assert stats.count == 3
    ((counts, total, low, high),) = agg.histograms.snapshot().values()  # written back on the error
    assert sum(counts) == 3 and total == pytest.approx(21e-9) and low == high == 7e-9
