"""One MeterProvider and one TracerProvider per process, and the pump thread that feeds destinations.

* Prometheus pulls through :class:`otel_ml.exporters.exposition.ExpositionReader` on each scrape
  (given to :class:`Pipeline` as one of its readers).
* Push destinations (OTLP, files) get metrics from a :class:`otel_ml.collection.PullReader` that
  the :class:`Pump` thread reads every ``metric_export_interval``, and spans from
  :class:`_FanOutSpanProcessor`, which only appends finished spans to each destination's
  bounded queue.
* The pump also runs the periodic jobs it is built with (region aggregation, deferred values,
  the endpoint file), so that no file or network I/O ever happens on the training thread.

``Pump.shutdown(timeout)`` is bounded: the final collection and flush get what is left of the
timeout, and a destination that hangs is abandoned (its thread is a daemon).

Example::

    pipeline = Pipeline(resource, collection, sinks=[FileSink(run_dir, 0)])
    pipeline.meter.create_observable_gauge(...)
    pump = Pump(pipeline, jobs=[aggregate], interval=15.0)
    pump.start()
    pump.shutdown(timeout=5.0)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from otel_ml import semconv
from otel_ml._logging import logger, warn_once
from otel_ml._version import __version__
from otel_ml.collection import Collection, PullReader
from otel_ml.exporters._worker import SinkWorker
from otel_ml.exporters.sink import Sink
from otel_ml.health import TelemetryHealth
from otel_ml.threads import name_native

#: How often the pump thread runs its periodic jobs, in seconds. Every wake-up costs ~0.1 ms of CPU
#: on a VM (benchmarks/bench_overhead.py); a scrape drains the regions itself, so /metrics is
#: current whatever the tick, and a second of regions (at most MAX_FINISHED) queues well.
TICK = 1.0
#: The tick while collections (scrapes) do the draining: the jobs left are small and can wait.
IDLE_TICK = 2.0

Job = Callable[[], None]


class _FanOutSpanProcessor(SpanProcessor):
    def __init__(self, workers: Sequence[SinkWorker]) -> None:
        self._workers = tuple(workers)

    def on_end(self, span: ReadableSpan) -> None:
        for worker in self._workers:
            worker.submit_span(span)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class Pipeline:
    """Providers, readers and destination workers of one process.

    ``collection`` is what every otel_ml reader runs around the SDK's own collection (prepare
    hooks, own metrics): the push reader made here and the readers passed in share it.

    Example::

        pipeline = Pipeline(Resource.create({}), Collection(), sinks=[])
    """

    def __init__(
        self,
        resource: Resource,
        collection: Collection,
        *,
        sinks: Sequence[Sink] = (),
        readers: Sequence[MetricReader] = (),
        span_queue_size: int = 2048,
        span_delay: float = 5.0,
        health: TelemetryHealth | None = None,
    ) -> None:
        self.health = health or TelemetryHealth()
        self.collection = collection
        collection.resource = resource  # for collections where only otel_ml's own metrics report
        self.workers = [
            SinkWorker(s, self.health, span_queue_size=span_queue_size, span_delay=span_delay) for s in sinks
        ]
        self._push_reader = PullReader(collection) if self.workers else None
        all_readers = [*readers, *([self._push_reader] if self._push_reader else [])]
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=all_readers,
            shutdown_on_exit=False,
            # otel_ml's instruments are observable: exemplars would only cost time per collection.
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if self.workers:
            self.tracer_provider.add_span_processor(_FanOutSpanProcessor(self.workers))
        self.meter = self.meter_provider.get_meter(semconv.SCOPE, __version__)
        self.tracer = self.tracer_provider.get_tracer(semconv.SCOPE, __version__)

    def push_metrics(self) -> None:
        """Collect once and hand the data to every push destination (pump thread)."""
        if self._push_reader is None:
            return
        try:
            data = self._push_reader.read()
        except Exception as exc:  # noqa: BLE001
            logger.warning("otel_ml: metric collection failed: %s", exc)
            self.health.error("collect")
            return
        if data is not None:
            for worker in self.workers:
                worker.submit_metrics(data)

    def start_workers(self) -> None:
        for worker in self.workers:
            worker.start()

    def flush_workers(self, deadline: float) -> bool:
        return all(worker.flush(deadline) for worker in self.workers)

    def shutdown(self, deadline: float) -> bool:
        """Stop the workers and the providers by ``deadline`` (a ``time.monotonic()`` value)."""
        for worker in self.workers:
            worker.request_stop()
        ok = all([worker.join(deadline) for worker in self.workers])
        try:
            self.meter_provider.shutdown(timeout_millis=max(1.0, (deadline - time.monotonic()) * 1000))
            self.tracer_provider.shutdown()
        except Exception as exc:  # noqa: BLE001
            logger.debug("otel_ml: provider shutdown: %s", exc)
        return ok


class Pump:
    """The background thread of one process: periodic jobs every tick, metric pushes on interval.

    ``jobs`` run on every tick (``TICK`` seconds), at :meth:`flush` and at :meth:`shutdown`;
    ``once`` jobs run when the thread starts. A failing job is counted every time in
    ``otel_ml_export_errors_total{exporter="jobs"}`` and logged once.

    The jobs in ``drains`` (also in ``jobs``, where their order is kept) are what a collection
    does too (drain the regions and the deferred values): a tick skips them when ``drained(since)``
    says a collection did them since the previous tick (``since``: its monotonic time). With
    Prometheus scraping every second the scrape then drains alone, in one pass over that code a
    second instead of two (each pass on cold caches costs more than the work it does), and the
    next tick comes after ``IDLE_TICK``; without scrapes the pump drains every ``TICK``.
    :meth:`flush` and :meth:`shutdown` always run them.

    Example::

        pump = Pump(pipeline, jobs=[aggregator.process], interval=15.0)
        pump.start()
        pump.shutdown(5.0)
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        jobs: Sequence[Job] = (),
        once: Sequence[Job] = (),
        interval: float = 15.0,
        drains: Sequence[Job] = (),
        drained: Callable[[float], bool] = lambda since: False,
    ) -> None:
        self.pipeline = pipeline
        self.health = pipeline.health
        self.interval = interval
        self._jobs = tuple(jobs)
        self._undrained = tuple(job for job in self._jobs if job not in drains)
        self._drained = drained
        #: Ticks whose drains were skipped because a collection had done them.
        self.skipped = 0
        self._once = tuple(once)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otel-ml-pump", daemon=True)
        self._started = False

    def start(self) -> None:
        self.pipeline.start_workers()
        self._thread.start()
        self._started = True

    def _run_jobs(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - a failing job must not stop the pump
                name = getattr(job, "__name__", repr(job))
                self.health.error("jobs")  # counted every time, logged once per job
                warn_once(f"job:{name}", "otel_ml: background job %s failed: %r (logged once)", name, exc)

    def _run(self) -> None:
        name_native(self._thread.name)
        self._run_jobs(self._once)
        last_tick = time.monotonic()
        next_push = last_tick + self.interval
        tick = TICK
        # Wake for the next push when it comes before the next tick (intervals below TICK).
        while not self._stop.wait(max(0.0, min(tick, next_push - time.monotonic()))):
            since, last_tick = last_tick, time.monotonic()
            try:
                skip = len(self._undrained) < len(self._jobs) and self._drained(since)
            except Exception:  # noqa: BLE001 - when in doubt, drain
                skip = False
            self.skipped += skip
            self._run_jobs(self._undrained if skip else self._jobs)
            # While collections keep draining, what is left (status, housekeeping) waits longer.
            tick = IDLE_TICK if skip else TICK
            if time.monotonic() >= next_push:
                self.pipeline.push_metrics()
                next_push = time.monotonic() + self.interval

    def flush(self, timeout: float = 5.0) -> bool:
        """Run the jobs, push metrics now and wait for the destinations (bounded)."""
        deadline = time.monotonic() + timeout
        self._run_jobs(self._jobs)
        self.pipeline.push_metrics()
        return self.pipeline.flush_workers(deadline)

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Stop the thread, run the jobs and push once more, then stop the pipeline, within ``timeout``."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._started:
            self._thread.join(max(0.0, min(1.0, deadline - time.monotonic())))
            self._run_jobs(self._jobs)
            self.pipeline.push_metrics()
        return self.pipeline.shutdown(deadline)
