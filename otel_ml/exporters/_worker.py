"""One background thread per push destination, with bounded queues and quiet failure handling.

A :class:`SinkWorker` owns a destination (OTLP, files) and exports to it from its own thread, so
a hanging collector can never delay the training thread or the other destinations. Queues are
bounded: metrics keep only the newest collection (metrics are cumulative, the newest one
supersedes the rest) and spans keep at most ``span_queue_size`` items; overflow is dropped and
counted. A failing destination is logged once per outage, not once per batch.

Example::

    worker = SinkWorker(FileSink(...), health, span_queue_size=2048, span_delay=5.0)
    worker.start()
    worker.submit_metrics(metrics_data)
    worker.stop(deadline=time.monotonic() + 5)
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from typing import Any

from otel_ml._logging import logger
from otel_ml.exporters.sink import Sink
from otel_ml.health import TelemetryHealth
from otel_ml.threads import name_native

THREAD_PREFIX = "otel-ml-export"
#: Spans exported per request at most.
MAX_SPAN_BATCH = 512

# Loggers of the OTLP exporters: they log every retry and failure. Inside our worker threads
# the worker reports outages itself (once), so their records are dropped there.
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
)
_CREDENTIALS_IN_URL = re.compile(r"//[^/@\s]+@")


class _OutsideWorkers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not threading.current_thread().name.startswith(THREAD_PREFIX)


_filter = _OutsideWorkers()
for _name in _EXPORTER_LOGGERS:
    logging.getLogger(_name).addFilter(_filter)


def redact(text: str) -> str:
    """Remove ``user:password@`` from URLs in an error message."""
    return _CREDENTIALS_IN_URL.sub("//***@", text)


class SinkWorker:
    """Exports to one :class:`Sink` from a daemon thread (see module docstring).

    Example::

        worker = SinkWorker(sink, TelemetryHealth())
        worker.start()
    """

    def __init__(
        self,
        sink: Sink,
        health: TelemetryHealth,
        *,
        span_queue_size: int = 2048,
        span_delay: float = 5.0,
    ) -> None:
        self.sink = sink
        self._health = health
        self._span_delay = span_delay
        self._spans: deque[Any] = deque()
        self._span_limit = span_queue_size
        self._batch = min(MAX_SPAN_BATCH, span_queue_size)
        self._metrics: Any = None
        self._cond = threading.Condition()
        self._stopping = False
        self._flush_requested = False
        self._busy = False
        self._failing = False
        self._failures = 0
        self._abandoned = False  # set when shutdown gave up on this worker: it must stay silent
        self._thread = threading.Thread(target=self._run, name=f"{THREAD_PREFIX}-{sink.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---------------------------------------------------------------- producers (any thread)
    def submit_metrics(self, data: Any) -> None:
        with self._cond:
            if self._metrics is not None:
                self._health.dropped("metrics")
            self._metrics = data
            self._cond.notify()

    def submit_span(self, span: Any) -> None:
        spans = self._spans
        if len(spans) >= self._span_limit:
            self._health.dropped("spans")
            return
        spans.append(span)
        if len(spans) == self._batch:
            with self._cond:
                self._cond.notify()

    # ---------------------------------------------------------------- worker thread
    def _due(self, next_spans: float) -> bool:
        return (
            self._stopping
            or self._flush_requested
            or self._metrics is not None
            or len(self._spans) >= self._batch
            or time.monotonic() >= next_spans
        )

    def _run(self) -> None:
        name_native(self._thread.name)
        next_spans = time.monotonic() + self._span_delay
        while True:
            with self._cond:
                while not self._due(next_spans):
                    self._cond.wait(max(0.0, next_spans - time.monotonic()))
                metrics, self._metrics = self._metrics, None
                stopping = self._stopping
                force = stopping or self._flush_requested
                self._flush_requested = False
                self._busy = True
            try:
                if metrics is not None:
                    self._export("metrics", self.sink.export_metrics, metrics)
                now = time.monotonic()
                if self._spans and (force or now >= next_spans or len(self._spans) >= self._batch):
                    self._drain_spans()
                if now >= next_spans:
                    next_spans = now + self._span_delay
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            if stopping and self._metrics is None and not self._spans:
                return

    def _drain_spans(self) -> None:
        spans = self._spans
        while spans:
            batch = []
            while spans and len(batch) < self._batch:
                batch.append(spans.popleft())
            if not self._export("spans", self.sink.export_spans, batch):
                self._health.dropped("spans", len(batch))

    def _export(self, signal: str, export: Any, payload: Any) -> bool:
        try:
            ok = bool(export(payload))
            reason = "export returned failure"
        except Exception as exc:  # noqa: BLE001 - a destination must never kill the worker
            ok = False
            reason = redact(f"{type(exc).__name__}: {exc}")
        with self._cond:
            # Once shutdown abandoned this worker, the outcome is reported by join() (once).
            abandoned = self._abandoned
            recovered, first_failure = ok and self._failing, not ok and not self._failing
            self._failing = not ok
            if ok:
                failures, self._failures = self._failures, 0
            else:
                self._failures += 1
        if ok:
            if recovered and not abandoned:
                logger.warning(
                    "otel_ml: %s export recovered after %d failed attempt(s)", self.sink.name, failures
                )
            return True
        self._health.error(self.sink.name)
        # A sink that turned itself off (files after a write error) already said so, once.
        if first_failure and not abandoned and not getattr(self.sink, "disabled", False):
            logger.warning(
                "otel_ml: %s export of %s failing (%s); training continues, retrying quietly; "
                "failures are counted in otel_ml_export_errors_total",
                self.sink.name,
                signal,
                reason,
            )
        return False

    # ---------------------------------------------------------------- control
    def flush(self, deadline: float) -> bool:
        """Wake the worker and wait until its queues are empty or ``deadline`` (monotonic) passes."""
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()
            while self._flush_requested or self._metrics is not None or self._spans or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def request_stop(self) -> None:
        """Ask the worker to export what is queued and end; returns at once."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, deadline: float) -> bool:
        """Wait for the worker to end, then close the destination; give up at ``deadline``.

        Returns False if the destination did not finish in time; the daemon thread is then
        abandoned so that the process can exit.
        """
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        finished = not self._thread.is_alive()
        if not finished:
            with self._cond:
                self._abandoned = True
                already_reported = self._failing
            pending = len(self._spans)
            self._health.dropped("spans", pending)
            # One line per outage: if the failure was already reported, this is not news.
            logger.log(
                logging.DEBUG if already_reported else logging.WARNING,
                "otel_ml: %s export did not finish within the shutdown timeout (destination slow or "
                "unreachable); the final metrics and %d queued span(s) were dropped",
                self.sink.name,
                pending,
            )
        closer = threading.Thread(
            target=self.sink.close,
            args=(max(0.0, deadline - time.monotonic()),),
            name=f"{THREAD_PREFIX}-{self.sink.name}-close",
            daemon=True,
        )
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))
        return finished

    def stop(self, deadline: float) -> bool:
        """:meth:`request_stop` then :meth:`join`."""
        self.request_stop()
        return self.join(deadline)
