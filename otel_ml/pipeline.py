"""One MeterProvider and one TracerProvider per process, feeding every destination.

* Prometheus pulls through a :class:`PrometheusMetricReader` on each scrape.
* Push destinations (OTLP, files) get metrics from an on-demand reader that the pump thread
  collects every ``metric_export_interval``, and spans from :class:`_FanOutSpanProcessor`, which
  only appends finished spans to each destination's bounded queue.
* The pump thread also runs periodic jobs (step spans, port files) so that no file or network
  I/O ever happens on the training thread.

``shutdown(timeout)`` is bounded: the final collection and flush get what is left of the
timeout, and a destination that hangs is abandoned (its thread is a daemon).

Example::

    pipeline = Pipeline(resource, sinks=[FileSink(run_dir, 0)], interval=15.0)
    pipeline.meter.create_observable_gauge(...)
    pipeline.start()
    pipeline.shutdown(timeout=5.0)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Metric, MetricReader, MetricsData, ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_ml import __version__, semconv
from otel_ml._logging import logger, warn_once
from otel_ml.exporters._worker import Sink, SinkWorker
from otel_ml.health import TelemetryHealth

#: How often the pump thread runs its periodic jobs, in seconds.
TICK = 0.5


MetricSource = Callable[[], Iterable[Metric]]


class MetricSources:
    """Metrics otel_ml aggregates itself, added to every collection of its readers.

    Region timings are aggregated outside the OTel SDK (see :mod:`otel_ml.histogram`); each
    source returns finished OTel ``Metric`` objects, which :meth:`augment` places in the
    ``otel_ml`` scope of the collected data, so Prometheus, OTLP and files all see them.

    Example::

        sources = MetricSources()
        sources.add(lambda: [histograms.to_metric(...)])
        data = sources.augment(data)
    """

    def __init__(self) -> None:
        self._sources: list[MetricSource] = []
        self._scope = InstrumentationScope(semconv.SCOPE, __version__)

    def add(self, source: MetricSource) -> None:
        self._sources.append(source)

    def augment(self, data: MetricsData | None) -> MetricsData | None:
        if data is None or not self._sources or not data.resource_metrics:
            return data
        extra: list[Metric] = []
        for source in self._sources:
            try:
                extra.extend(m for m in source() if m is not None)
            except Exception as exc:  # noqa: BLE001 - a broken source must not break collection
                logger.warning("otel_ml: metric source %s failed: %s", source, exc)
        if not extra:
            return data
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for index, scope_metrics in enumerate(scopes):
            if scope_metrics.scope.name == semconv.SCOPE:
                scopes[index] = ScopeMetrics(
                    scope_metrics.scope, [*scope_metrics.metrics, *extra], scope_metrics.schema_url
                )
                break
        else:
            scopes.append(ScopeMetrics(self._scope, extra, ""))
        return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


class OnDemandReader(MetricReader):
    """A pull reader: :meth:`read` collects now and returns the data (used by the pump thread)."""

    def __init__(self, sources: MetricSources | None = None) -> None:
        super().__init__()
        self._data: MetricsData | None = None
        self._sources = sources or MetricSources()

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self._data = self._sources.augment(metrics_data)

    def read(self) -> MetricsData | None:
        self._data = None
        self.collect()
        return self._data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


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
    """Providers, readers, destination workers and the pump thread of one process.

    Example::

        pipeline = Pipeline(Resource.create({}), sinks=[], interval=15.0)
    """

    def __init__(
        self,
        resource: Resource,
        *,
        sinks: Sequence[Sink] = (),
        extra_readers: Sequence[MetricReader] = (),
        interval: float = 15.0,
        span_queue_size: int = 2048,
        span_delay: float = 5.0,
        health: TelemetryHealth | None = None,
        sources: MetricSources | None = None,
    ) -> None:
        self.health = health or TelemetryHealth()
        self.sources = sources or MetricSources()
        self.interval = interval
        self.workers = [
            SinkWorker(s, self.health, span_queue_size=span_queue_size, span_delay=span_delay) for s in sinks
        ]
        self._push_reader = OnDemandReader(self.sources) if self.workers else None
        readers = [*extra_readers, *([self._push_reader] if self._push_reader else [])]
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if self.workers:
            self.tracer_provider.add_span_processor(_FanOutSpanProcessor(self.workers))
        self.meter = self.meter_provider.get_meter(semconv.SCOPE, __version__)
        self.tracer = self.tracer_provider.get_tracer(semconv.SCOPE, __version__)
        self._jobs: list[Callable[[], None]] = []
        self._once: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="otel-ml-pump", daemon=True)
        self._started = False

    def add_job(self, job: Callable[[], None], *, once: bool = False) -> None:
        """Run ``job`` on the pump thread: once at start, or on every tick and at shutdown."""
        (self._once if once else self._jobs).append(job)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._thread.start()
        self._started = True

    def _run_jobs(self, jobs: Sequence[Callable[[], None]]) -> None:
        for job in jobs:
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - a failing job must not stop the pump
                name = getattr(job, "__name__", repr(job))
                self.health.error("jobs")  # counted every time, logged once per job
                warn_once(f"job:{name}", "otel_ml: background job %s failed: %r (logged once)", name, exc)

    def _push_metrics(self) -> None:
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

    def _pump(self) -> None:
        self._run_jobs(self._once)
        next_push = time.monotonic() + self.interval
        # Wake for the next push when it comes before the next tick (intervals below TICK).
        while not self._stop.wait(max(0.0, min(TICK, next_push - time.monotonic()))):
            self._run_jobs(self._jobs)
            if time.monotonic() >= next_push:
                self._push_metrics()
                next_push = time.monotonic() + self.interval

    def flush(self, timeout: float = 5.0) -> bool:
        """Run the jobs, push metrics now and wait for the destinations (bounded)."""
        deadline = time.monotonic() + timeout
        self._run_jobs(self._jobs)
        self._push_metrics()
        return all(worker.flush(deadline) for worker in self.workers)

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Stop the pump, flush once more and stop the workers, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._started:
            self._thread.join(max(0.0, min(1.0, deadline - time.monotonic())))
            self._run_jobs(self._jobs)
            self._push_metrics()
        for worker in self.workers:
            worker.request_stop()
        ok = all([worker.join(deadline) for worker in self.workers])
        try:
            self.meter_provider.shutdown(timeout_millis=max(1.0, (deadline - time.monotonic()) * 1000))
            self.tracer_provider.shutdown()
        except Exception as exc:  # noqa: BLE001
            logger.debug("otel_ml: provider shutdown: %s", exc)
        return ok
