"""Export-thread side of region timing: statistics, histograms, sampled traces.

:class:`Aggregator` drains the regions the training thread finished (:mod:`otel_ml.regions.recorder`),
in the order they finished, resolving CUDA events a few steps behind when there are any. Each
region feeds its path's statistics and duration histogram; its duration is added to its
parent's child time, which gives self time. Step windows (between step boundaries) decide
sampling: every Nth step and every slow step (:class:`otel_ml.regions.sampling.TraceSampler`) get real
OTel spans built with the regions' original timestamps: a root ``otel_ml.step`` span per step and
one span per region, with the parent/child structure of the nesting.

The per-region accounting runs in C (``_cregion.account``, ``otel_ml/regions/_cregion_account.c``)
when the C regions do, with the same results; the Python loop is the fallback.

Over 400 lines: the drain of finished regions is here twice, the loop around the C accounting
and the Python one it falls back to, side by side so that the two cannot drift apart.

Example::

    agg = Aggregator(recorder, tracer, {"rank": "0", "run_id": "r"}, sampler=TraceSampler(every=10))
    agg.process()                      # called by the pump thread and before each collection
    agg.summary_rows()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import Metric
from opentelemetry.trace import Status, StatusCode, Tracer

from otel_ml import semconv
from otel_ml._cbuild import stale_build
from otel_ml.collection import Collection
from otel_ml.histogram import LabeledHistograms
from otel_ml.names import valid_text
from otel_ml.regions.cuda_events import PENDING
from otel_ml.regions.pathtree import PathNode
from otel_ml.regions.recorder import (
    ACCELERATED,
    CHILD,
    END,
    ERROR,
    EV_END,
    EV_START,
    GPU,
    NODE,
    PARENT,
    REGION,
    START,
    Recorder,
)
from otel_ml.regions.sampling import ANOMALY, ERROR_REASON, EVERY, SLOW, StepFlags, TraceSampler
from otel_ml.regions.stats import RESERVOIR, PathStats, SummaryRow, build_summary

#: Finished regions kept while waiting for their step's sampling decision.
MAX_OPEN = 1 << 16
#: A region waits at most this long (ns after it ended) for its GPU events, and at most this many
#: finished regions queue behind one that waits; then it is timed on the host (and counted).
GPU_WAIT_NS = 30_000_000_000
MAX_GPU_BACKLOG = 1 << 16


#: The contract of ``_cregion.account()`` this module calls (``ACCOUNTING`` in ``_cregion_account.c``).
ACCOUNTING = 1


def _load_accounting() -> Any:
    """The C extension when it does the accounting of :meth:`Aggregator._drain_finished` and the
    common part of :meth:`Aggregator._drain_boundaries` (``otel_ml/regions/_cregion_account.c``),
    or None for the Python loops: with the Python regions (``OTEL_ML_PURE_PYTHON=1``, no build), or
    when the built extension predates it or disagrees (then a warning, or ImportError under
    ``OTEL_ML_REQUIRE_C=1``, as :func:`otel_ml.regions.recorder._load_c` does for the regions)."""
    if not ACCELERATED:
        return None
    from otel_ml.regions import _cregion

    version, reservoir = getattr(_cregion, "ACCOUNTING", None), getattr(_cregion, "RESERVOIR", None)
    if version == ACCOUNTING and reservoir == RESERVOIR and hasattr(_cregion, "PathStats"):
        return _cregion
    message = (
        f"otel_ml.regions._cregion is a stale build (accounting {version}, reservoir {reservoir}; "
        f"this otel_ml needs {ACCOUNTING} and {RESERVOIR}); rebuild it (pip install -e .)"
    )
    return stale_build(message, "accounting regions in Python")


#: The C extension when the accounting runs in C, None for the Python loops.
ACCOUNTING_C = _load_accounting()


def has_span_destination(tracer: Tracer) -> bool:
    """False when ``tracer`` is an SDK tracer with no span processor (nothing would receive the
    spans of a sampled step, so building them is skipped; the step still counts as traced).
    Read on every sampled step: a processor added later is honoured from then on."""
    processors = getattr(getattr(tracer, "span_processor", None), "_span_processors", None)
    return processors is None or len(processors) > 0


class Aggregator:
    """Aggregates finished regions and emits spans for sampled steps (see module docstring).

    ``before`` hooks run at the start of every :meth:`process` (anomaly detection, so that it can
    flag steps in ``flags`` before their windows close); ``on_window(aggregator, step,
    duration_s)`` callbacks run after each closed step (the live table).

    Example::

        agg = Aggregator(Recorder(), tracer, {"rank": "0", "run_id": "r"})
    """

    def __init__(
        self,
        recorder: Recorder,
        tracer: Tracer,
        labels: Mapping[str, str],
        *,
        span_attributes: Mapping[str, Any] | None = None,
        sampler: TraceSampler | None = None,
        wall_offset_ns: int | None = None,
        flags: StepFlags | None = None,
        before: Sequence[Callable[[], None]] = (),
        on_window: Sequence[Callable[[Aggregator, int | None, float], None]] = (),
    ) -> None:
        self.recorder = recorder
        self._tracer = tracer
        self._labels = dict(labels)
        self._span_attributes = dict(span_attributes or {})
        self.sampler = sampler or TraceSampler()
        self._wall_offset = (
            time.time_ns() - time.perf_counter_ns() if wall_offset_ns is None else wall_offset_ns
        )
        #: Per path node; with the C accounting the values are ``_cregion.PathStats``, the C twin
        #: of :class:`PathStats` (same attributes).
        self.stats: dict[PathNode, PathStats] = {}
        #: The C loops of :meth:`_drain_finished` and :meth:`_drain_boundaries` (``account`` and
        #: ``close_window`` of :data:`ACCOUNTING_C`), or None for the Python ones.
        self._account = None if ACCOUNTING_C is None else ACCOUNTING_C.account
        self._close_window = None if ACCOUNTING_C is None else ACCOUNTING_C.close_window
        self.histograms = LabeledHistograms(semconv.SPAN_DURATION_BUCKETS)
        self.traced = {EVERY: 0, SLOW: 0, ANOMALY: 0, ERROR_REASON: 0}
        self.steps = 0
        self.step_time = 0.0
        self._on_window = tuple(on_window)
        self._before = tuple(before)
        self.flags = flags or StepFlags()
        self._open: deque[list] = deque(maxlen=MAX_OPEN)
        self._window_start = recorder.started_ns
        self._lock = threading.RLock()  # on_window callbacks read the stats while processing

    def pending_seconds(self) -> dict[PathNode, float]:
        """Per path node, the seconds of drained regions whose step has not closed yet.

        :attr:`stats` already holds them (regions drain before the steps they belong to close);
        an ``on_window`` callback, which runs under the lock, takes them out to count only the
        closed steps (:func:`otel_ml.regions.render.closed_totals`).
        """
        pending: dict[PathNode, float] = {}
        for entry in self._open:
            gpu = entry[GPU]
            seconds = gpu if gpu is not None else (entry[END] - entry[START]) / 1e9
            pending[entry[NODE]] = pending.get(entry[NODE], 0.0) + seconds
        return pending

    # ------------------------------------------------------------------ draining
    def process(self) -> None:
        """Drain finished regions and closed steps (safe from any thread; serialised)."""
        with self._lock:
            self.recorder.collect()
            for hook in self._before:
                hook()
            self._drain_finished()
            self._drain_boundaries()

    def _drain_finished(self) -> None:
        """Account finished regions in the order they ended (one histogram lock per drain)."""
        if self._account is None:
            self._drain_finished_python()
            return
        # The C loop accounts the regions timed on the host and stops at one with CUDA events,
        # resolved here as below; the C loop then accounts it with its GPU time, and goes on.
        finished, account = self.recorder.finished, self._account
        opened, all_stats, histograms = self._open, self.stats, self.histograms
        now = None
        gpu = None
        with histograms.lock:
            while True:
                account(finished, opened, all_stats, histograms, gpu)
                if not finished:
                    return
                gpu, now = self._resolve_gpu(finished[0], len(finished), now)
                if gpu is PENDING:
                    return  # the GPU is not there yet: later regions wait too, keeping order

    def _resolve_gpu(self, entry: list, backlog: int, now: int | None) -> tuple[Any, int | None]:
        """The GPU seconds of ``entry`` from its CUDA events (None: timed on the host), or PENDING
        while they are not there yet and it may wait longer; and the clock, read once per drain."""
        events = self.recorder.events
        start_event, end_event = entry[EV_START], entry[EV_END]
        ms = events.resolve(start_event, end_event) if events is not None else None
        if ms is PENDING:
            now = self.recorder.clock() if now is None else now
            if now - entry[END] < GPU_WAIT_NS and backlog < MAX_GPU_BACKLOG:
                return PENDING, now
            events.release(start_event, end_event)  # stuck or too far behind: host time
            self.recorder.count_error()
            ms = None
        entry[EV_START] = entry[EV_END] = None
        return (None if ms is None else ms / 1e3), now

    def _drain_finished_python(self) -> None:
        """:meth:`_drain_finished` in Python: without the C extension, or ``OTEL_ML_PURE_PYTHON=1``."""
        finished = self.recorder.finished
        all_stats, opened, observed = self.stats, self._open, []
        now = None
        popleft, keep, observe = finished.popleft, opened.append, observed.append
        while finished:
            entry = finished[0]
            gpu = None
            if entry[EV_START] is not None or entry[EV_END] is not None:
                gpu, now = self._resolve_gpu(entry, len(finished), now)
                if gpu is PENDING:
                    break  # the GPU is not there yet: later regions wait too, keeping order
            popleft()
            host = (entry[END] - entry[START]) / 1e9
            duration = host if gpu is None else gpu
            entry[GPU] = gpu
            parent = entry[PARENT]
            if parent is not None:
                parent[CHILD] += duration
            node: PathNode = entry[NODE]
            stats = all_stats.get(node)
            if stats is None:
                stats = all_stats[node] = PathStats(seed=len(all_stats))
                stats.sampled = entry[REGION].sampled
            self_time = duration - entry[CHILD]
            stats.add(duration, self_time if self_time > 0.0 else 0.0, host, gpu is not None)
            observe(((node.export,), duration))
            keep(entry)
        if observed:
            self.histograms.observe_many(observed)

    def _drain_boundaries(self) -> None:
        boundaries = self.recorder.boundaries
        finished = self.recorder.finished
        pending = self._open
        all_stats, sampler, flags, callbacks = self.stats, self.sampler, self.flags, self._on_window
        close_window = self._close_window
        while boundaries:
            step, end_ns, values = boundaries[0]
            if finished and finished[0][END] <= end_ns:
                return  # regions of this step still wait for their GPU events
            boundaries.popleft()
            start_ns, self._window_start = self._window_start, end_ns
            duration = (end_ns - start_ns) / 1e9
            if duration < 0:
                continue
            self.steps += 1
            self.step_time += duration
            # Regions arrive in the order they ended, so this step's are a prefix: O(its size).
            inside: list[list] = []
            if close_window is not None:  # the loop below, in C (_cregion_account.c)
                errored = close_window(pending, end_ns, duration, all_stats, inside)
            else:
                ran: dict[PathNode, None] = {}  # the paths that ran in this step, each once
                errored = False
                while pending and pending[0][END] <= end_ns:
                    entry = pending.popleft()
                    inside.append(entry)
                    ran[entry[NODE]] = None
                    if entry[ERROR] is not None:
                        errored = True
                for node in ran:
                    stats = all_stats.get(node)
                    if stats is not None:
                        stats.windows += 1  # steps in which this path ran (module timing is sampled)
                        stats.window_time += duration
            reason = sampler.decide(step, duration)
            events = flags.pop(step)
            if events and reason is None:
                reason = ANOMALY
            if reason is None and errored:
                reason = ERROR_REASON  # a step where a region raised is always traced
            if reason is not None:
                self.traced[reason] += 1
                if has_span_destination(self._tracer):
                    self._emit(step, start_ns, end_ns, values or {}, reason, inside, events or ())
            for callback in callbacks:
                callback(self, step, duration)

    # ------------------------------------------------------------------ spans
    def _emit(
        self,
        step: int | None,
        start_ns: int,
        end_ns: int,
        values: Mapping[str, Any],
        reason: str,
        entries: list,
        events: Iterable[tuple[str, Mapping[str, Any]]] = (),
    ) -> None:
        wall = self._wall_offset
        attributes = {**self._span_attributes, semconv.ATTR_SAMPLED_BY: reason}
        if step is not None:
            attributes[semconv.ATTR_STEP] = step
        for key, value in values.items():
            if value.__class__ in (float, int) and value == value:
                attributes[semconv.ATTR_VALUE_PREFIX + valid_text(str(key))] = value
        root = self._tracer.start_span(semconv.SPAN_STEP, start_time=start_ns + wall, attributes=attributes)
        for name, event_attributes in events:
            root.add_event(name, event_attributes, timestamp=end_ns + wall)
        root_context = trace.set_span_in_context(root)
        spans: dict[int, Any] = {}
        # Parents before children: a coarse clock can give both the same start.
        for entry in sorted(entries, key=lambda e: (e[START], e[NODE].depth)):
            parent = entry[PARENT]
            parent_span = spans.get(id(parent)) if parent is not None else None
            context = trace.set_span_in_context(parent_span) if parent_span is not None else root_context
            node: PathNode = entry[NODE]
            span_attributes: dict[str, Any] = {semconv.ATTR_PATH: node.path}
            if entry[GPU] is not None:
                span_attributes[semconv.ATTR_GPU_MS] = entry[GPU] * 1e3
                span_attributes[semconv.ATTR_HOST_MS] = (entry[END] - entry[START]) / 1e6
            span = self._tracer.start_span(
                node.name, context=context, start_time=entry[START] + wall, attributes=span_attributes
            )
            if entry[ERROR] is not None:
                name = getattr(entry[ERROR], "__name__", str(entry[ERROR]))
                span.set_attribute("exception.type", name)
                span.set_status(Status(StatusCode.ERROR, name))
            spans[id(entry)] = span
        for entry in entries:
            spans[id(entry)].end(end_time=entry[END] + wall)
        root.end(end_time=end_ns + wall)

    # ------------------------------------------------------------------ outputs
    def metrics(self) -> Iterable[Metric]:
        """The span-duration histogram, a source of :class:`otel_ml.collection.Collection`.

        The collection's prepare hook has called :meth:`process`, which drained the finished regions.
        """
        spec = semconv.SPAN_DURATION
        metric = self.histograms.to_metric(
            spec.name, spec.unit, spec.description, (semconv.LABEL_PATH,), self._labels
        )
        return [] if metric is None else [metric]

    def register(self, meter: Meter, collection: Collection) -> None:
        """Observable counters (self and host seconds per path, traced steps per reason), and the
        span histogram as a source of ``collection``. Whoever owns the collection calls
        :meth:`process` before each collection, so that all of them see the same regions."""
        collection.register(metrics=self.metrics)
        labels = self._labels

        def per_path(field: str, gpu_only: bool) -> dict[str, float]:
            """``field`` summed per exported path (folded layers share one)."""
            totals: dict[str, float] = {}
            with self._lock:
                for node, stats in self.stats.items():
                    if not gpu_only or stats.gpu_count:
                        totals[node.export] = totals.get(node.export, 0.0) + getattr(stats, field)
            return totals

        attributes: dict[str, dict[str, str]] = {}  # per exported path, built once (read-only)

        def path_attributes(path: str) -> dict[str, str]:
            attrs = attributes.get(path)
            if attrs is None:
                attrs = attributes[path] = {**labels, semconv.LABEL_PATH: path}
            return attrs

        def self_seconds(_: CallbackOptions) -> Iterable[Observation]:
            items = per_path("self_total", False).items()
            return [Observation(v, path_attributes(p)) for p, v in items]

        def host_seconds(_: CallbackOptions) -> Iterable[Observation]:
            items = per_path("host_total", True).items()
            return [Observation(v, path_attributes(p)) for p, v in items]

        def traced(_: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                items = list(self.traced.items())
            return [Observation(n, {**labels, semconv.LABEL_REASON: r}) for r, n in items]

        for spec, callback in (
            (semconv.SPAN_SELF, self_seconds),
            (semconv.SPAN_HOST, host_seconds),
            (semconv.TRACED_STEPS, traced),
        ):
            meter.create_observable_counter(spec.name, [callback], spec.unit, spec.description)

    def close_last_window(self) -> None:
        """At shutdown: regions recorded after the last step boundary (an exception that left the
        loop, a final evaluation) become one last window, traced if sampling or an error says so."""
        self.process()
        with self._lock:
            if self._open or self.recorder.finished:
                self.recorder.boundaries.append((None, self.recorder.clock(), None))
        self.process()

    def summary_rows(self) -> list[SummaryRow]:
        with self._lock:
            return build_summary(dict(self.stats), self.step_time, self.steps)

    def self_totals(self) -> dict[str, float]:
        """Cumulative self time per path (seconds), for the live table."""
        with self._lock:
            return {n.path: s.self_total for n, s in self.stats.items()}
