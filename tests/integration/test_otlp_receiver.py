"""The in-test OTLP receiver itself, driven by the real OTel SDK exporters (gRPC and HTTP).

Later reliability tests rely on its fault modes, so these check that each mode does to a real
exporter what it claims: ``ok`` stores, ``unavailable`` refuses, ``hang`` never answers, and
``stop()`` stays bounded even with a request hanging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.support.otlp_receiver import GRPC, HTTP, METRICS, TRACES, OtlpReceiver, attributes

pytestmark = pytest.mark.integration

RESOURCE = Resource.create({"service.name": "receiver-test", "k": "v"})


def make_span(name: str = "op") -> Any:
    provider = TracerProvider(resource=RESOURCE)
    span = provider.get_tracer("test").start_span(name, attributes={"n": 3})
    span.end()
    return span


def span_exporter(receiver: OtlpReceiver, protocol: str, timeout: float = 0.5, **kw: Any) -> Any:
    if protocol == GRPC:
        return GrpcSpanExporter(endpoint=receiver.grpc_endpoint, insecure=True, timeout=timeout, **kw)
    return HttpSpanExporter(endpoint=f"{receiver.http_endpoint}/v1/traces", timeout=timeout, **kw)


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_ok_stores_spans_with_headers(protocol: str, otlp_receiver: OtlpReceiver) -> None:
    kw: dict[str, Any] = {"headers": {"authorization": "Bearer t0k"}}
    if protocol == HTTP:
        kw["compression"] = Compression.Gzip
    exporter = span_exporter(otlp_receiver, protocol, **kw)
    try:
        assert exporter.export([make_span("a"), make_span("b")]) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    spans = otlp_receiver.spans()
    assert sorted(span.name for _, span in spans) == ["a", "b"]
    resource, span = spans[0]
    assert attributes(span.attributes) == {"n": 3}
    assert resource["service.name"] == "receiver-test"
    assert resource["k"] == "v"
    assert otlp_receiver.received(TRACES)[0].transport == protocol
    assert otlp_receiver.headers(TRACES)[0]["authorization"] == "Bearer t0k"
    if protocol == HTTP:
        assert otlp_receiver.headers(TRACES)[0]["content-encoding"] == "gzip"
    assert otlp_receiver.errors == []


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_metrics_points_and_names(protocol: str, otlp_receiver: OtlpReceiver) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    meter = provider.get_meter("test")
    meter.create_counter("requests").add(5, {"route": "/x"})
    meter.create_histogram("latency").record(0.25, {"route": "/x"})
    data = reader.get_metrics_data()
    if protocol == GRPC:
        exporter: Any = GrpcMetricExporter(endpoint=otlp_receiver.grpc_endpoint, insecure=True, timeout=2)
    else:
        exporter = HttpMetricExporter(endpoint=f"{otlp_receiver.http_endpoint}/v1/metrics", timeout=2)
    try:
        exporter.export(data)
    finally:
        exporter.shutdown()
        provider.shutdown()
    assert otlp_receiver.metric_names() == {"requests", "latency"}
    [(resource, attrs, value)] = otlp_receiver.metric_points("requests")
    assert (resource["k"], attrs, value) == ("v", {"route": "/x"}, 5)
    [(_, _, histogram)] = otlp_receiver.metric_points("latency")
    assert (histogram.count, histogram.sum) == (1, 0.25)
    assert [r.signal for r in otlp_receiver.received()] == [METRICS]


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_unavailable_refuses_then_recovers_when_switched(protocol: str, otlp_receiver: OtlpReceiver) -> None:
    otlp_receiver.mode = "unavailable"
    exporter = span_exporter(otlp_receiver, protocol)
    try:
        assert exporter.export([make_span()]) == SpanExportResult.FAILURE
        assert otlp_receiver.received() == []
        assert [a.mode for a in otlp_receiver.attempts][:1] == ["unavailable"]
        otlp_receiver.mode = "ok"
        assert exporter.export([make_span()]) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert len(otlp_receiver.spans()) == 1


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_hang_never_answers_and_stop_is_bounded(
    protocol: str, otlp_receiver_factory: Callable[..., OtlpReceiver]
) -> None:
    receiver = otlp_receiver_factory(mode="hang")
    exporter = span_exporter(receiver, protocol, timeout=30)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(exporter.export([make_span()])), daemon=True)
    thread.start()
    try:
        receiver.wait_for(lambda: receiver.attempts, timeout=10, what="the request to arrive")
        thread.join(0.3)
        assert thread.is_alive() and results == [], "a hung request must not be answered"
        started = time.monotonic()
        receiver.stop()
        assert time.monotonic() - started < 1.5
        assert not receiver.running
    finally:
        exporter.shutdown()  # aborts the exporter's retries
        thread.join(10)
    assert results == [SpanExportResult.FAILURE]
    assert receiver.received() == []


def test_wait_for_times_out_with_a_summary(otlp_receiver: OtlpReceiver) -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match="waiting for spans; received 0 trace"):
        otlp_receiver.wait_for(otlp_receiver.spans, timeout=0.2, what="spans")
    assert 0.2 <= time.monotonic() - started < 2


def test_bad_mode_is_rejected(otlp_receiver: OtlpReceiver) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        otlp_receiver.mode = "flaky"
    assert otlp_receiver.mode == "ok"
