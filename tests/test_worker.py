"""Destination workers: bounded queues, one warning per outage, bounded stop."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from otel_ml.exporters._worker import MAX_SPAN_BATCH, SinkWorker, redact
from otel_ml.health import TelemetryHealth
from tests.support.net import wait_until


class ScriptedSink:
    """A destination whose behaviour the test switches: ok, fail, raise or hang."""

    name = "otlp"

    def __init__(self) -> None:
        self.mode = "ok"
        self.metrics: list[object] = []
        self.spans: list[object] = []
        self.release = threading.Event()
        self.closed = False

    def _act(self) -> bool:
        if self.mode == "hang":
            self.release.wait(30)
        if self.mode == "raise":
            raise ConnectionError("collector at http://user:pw@collector:4318 refused")
        return self.mode == "ok"

    def export_metrics(self, data: object) -> bool:
        ok = self._act()
        if ok:
            self.metrics.append(data)
        return ok

    def export_spans(self, spans) -> bool:
        ok = self._act()
        if ok:
            self.spans.extend(spans)
        return ok

    def close(self, timeout: float) -> None:
        self.closed = True


@pytest.fixture
def worker():
    sink, health = ScriptedSink(), TelemetryHealth()
    w = SinkWorker(sink, health, span_queue_size=100, span_delay=60.0)
    w.start()
    yield w, sink, health
    sink.release.set()
    w.stop(time.monotonic() + 2)


def test_metrics_are_exported_and_flush_waits_for_them(worker):
    w, sink, _ = worker
    w.submit_metrics("m1")
    assert w.flush(time.monotonic() + 2)
    assert sink.metrics == ["m1"]


def test_flush_exports_queued_spans_before_the_delay(worker):
    w, sink, _ = worker
    for i in range(3):
        w.submit_span(i)
    assert w.flush(time.monotonic() + 2)
    assert sink.spans == [0, 1, 2]


def test_span_queue_is_bounded_and_overflow_is_counted(worker):
    w, sink, health = worker
    sink.mode = "hang"
    w.submit_metrics("block")  # occupies the worker
    wait_until(lambda: w._busy, 5)
    for i in range(150):
        w.submit_span(i)
    assert health.drops["spans"] == 50
    sink.mode = "ok"
    sink.release.set()
    assert w.flush(time.monotonic() + 5)
    assert sink.spans == list(range(100))


@pytest.mark.parametrize("queue_size", [50, 4 * MAX_SPAN_BATCH])
def test_a_full_batch_is_sent_without_waiting_for_the_delay(queue_size):
    sink = ScriptedSink()
    w = SinkWorker(sink, TelemetryHealth(), span_queue_size=queue_size, span_delay=60.0)
    w.start()
    batch = min(queue_size, MAX_SPAN_BATCH)
    for i in range(batch):
        w.submit_span(i)
    try:
        wait_until(lambda: len(sink.spans) == batch, 5)
    finally:
        w.stop(time.monotonic() + 2)


def test_newer_metrics_supersede_unsent_ones(worker):
    w, sink, health = worker
    sink.mode = "hang"
    w.submit_metrics("first")
    wait_until(lambda: w._busy, 5)
    w.submit_metrics("second")
    w.submit_metrics("third")
    sink.mode = "ok"
    sink.release.set()
    assert w.flush(time.monotonic() + 5)
    assert sink.metrics == ["first", "third"]  # "first" was in flight; "second" was superseded
    assert health.drops["metrics"] == 1


def test_an_outage_is_logged_once_and_counted_then_recovery_is_logged(worker, caplog):
    caplog.set_level(logging.WARNING, logger="otel_ml")
    w, sink, health = worker
    sink.mode = "raise"
    for i in range(5):
        w.submit_metrics(i)
        w.flush(time.monotonic() + 2)
    assert health.errors["otlp"] == 5
    failing = [r for r in caplog.records if "failing" in r.getMessage()]
    assert len(failing) == 1
    assert "pw@" not in caplog.text, "credentials in URLs must be redacted"
    sink.mode = "ok"
    w.submit_metrics("back")
    w.flush(time.monotonic() + 2)
    assert "recovered after 5 failed attempt(s)" in caplog.text


def test_failed_span_exports_count_the_spans_as_dropped(worker):
    w, sink, health = worker
    sink.mode = "fail"
    for i in range(7):
        w.submit_span(i)
    w.flush(time.monotonic() + 2)
    assert health.drops["spans"] == 7
    assert health.errors["otlp"] == 1


def test_stop_is_bounded_when_the_destination_hangs(worker):
    w, sink, health = worker
    sink.mode = "hang"
    w.submit_metrics("stuck")
    for i in range(4):
        w.submit_span(i)
    wait_until(lambda: w._busy, 5)
    started = time.monotonic()
    assert w.stop(time.monotonic() + 0.5) is False
    assert time.monotonic() - started < 1.5
    assert health.drops["spans"] == 4


def test_redact_removes_userinfo_from_urls():
    assert (
        redact("POST https://bob:s3cret@collector:4318/v1/traces")
        == "POST https://***@collector:4318/v1/traces"
    )
