"""otel_ml's text exposition matches the OTel Prometheus exporter's, sample by sample."""

from __future__ import annotations

import math

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from otel_ml.exporters.exposition import ExpositionReader, number
from tests.support.metrics import parse_exposition


@pytest.fixture
def both():
    registry = CollectorRegistry(auto_describe=False)
    reference = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
    ours = ExpositionReader()
    resource = Resource.create({"service.name": "svc", "otel_ml.rank": 3, "weird key/é": 'quo"te\\n'})
    provider = MeterProvider(resource=resource, metric_readers=[reference, ours], shutdown_on_exit=False)
    yield provider.get_meter("t"), lambda: generate_latest(registry).decode(), lambda: ours.render().decode()
    provider.shutdown()


def test_same_samples_as_the_otel_prometheus_exporter(both):
    meter, reference, ours = both
    labels = {"rank": "0", "run_id": "r", "path": 'forward/前向 "x"\\y\nz'}
    meter.create_counter("otel_ml_samples", unit="{sample}").add(5, labels)
    meter.create_counter("requests_total", unit="s").add(2, {"a": "b"})
    meter.create_counter("dotted.name.count", unit="By").add(7)
    meter.create_up_down_counter("queue.depth").add(-3, {"q": "1"})
    meter.create_histogram(
        "otel_ml_step_duration_seconds", unit="s", explicit_bucket_boundaries_advisory=[0.01, 0.1, 1]
    )
    hist = meter.create_histogram("lat", unit="ms", explicit_bucket_boundaries_advisory=[1.0, 10.0])
    for v in (0.5, 5.0, 50.0, 500.0):
        hist.record(v, {"k": "v"})
    meter.create_observable_gauge("otel_ml_loss", [lambda _: [Observation(0.25, labels)]], unit="1")
    meter.create_observable_gauge(
        "big", [lambda _: [Observation(1795335504.420036), Observation(1e-300, {"x": "y"})]]
    )
    meter.create_observable_counter("obs_count", [lambda _: [Observation(10, {"b": True})]], unit="{item}")
    expected, got = _semantic(reference()), _semantic(ours())
    assert set(got) == set(expected)
    for name, samples in expected.items():
        assert got[name] == samples, name


def _semantic(text):
    """Samples as Prometheus stores them: an empty label value is the same as no label (the OTel
    exporter backfills missing labels with "")."""
    return {
        name: sorted(
            (sorted((k, v) for k, v in labels.items() if v != ""), value) for labels, value in samples
        )
        for name, samples in parse_exposition(text).items()
    }


def test_help_and_type_lines_match(both):
    meter, reference, ours = both
    meter.create_counter("c", unit="s", description='multi\nline "help" \\ text').add(1)
    meter.create_observable_gauge("g", [lambda _: [Observation(1)]], description="gauge help")
    for line in (
        "# TYPE c_seconds_total counter",
        "# TYPE g gauge",
        '# HELP c_seconds_total multi\\nline "help" \\\\ text',
    ):
        assert line in reference() and line in ours()


def test_numbers_use_prometheus_spelling():
    assert [number(v) for v in (math.inf, -math.inf, math.nan, 0.5, 3.0)] == [
        "+Inf",
        "-Inf",
        "NaN",
        "0.5",
        "3.0",
    ]


def test_empty_collection_is_empty_text():
    reader = ExpositionReader()
    MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    assert reader.render() == b""


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_closing_the_metrics_server_wakes_its_accept_loop_and_releases_the_port(host):
    import socket
    import time

    from otel_ml.exporters.prometheus import POLL_INTERVAL, MetricsServer

    server = MetricsServer(lambda: b"up 1\n", host, 0)
    port = server.start()
    assert port is not None
    with socket.create_connection(("127.0.0.1", port)) as client:  # a kept-alive scrape connection
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        client.settimeout(5)
        reply = b""
        while not reply.endswith(b"up 1\n"):
            reply += client.recv(4096)
        started = time.monotonic()
        server.close()
        closed_in = time.monotonic() - started
    assert closed_in < POLL_INTERVAL / 2, closed_in  # gross bound: not a full poll interval
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not a listener
        again.bind((host, port))  # the port is free again


def test_a_histogram_series_is_re_encoded_when_it_moves_and_kept_when_it_does_not():
    from otel_ml.collection import Collection
    from otel_ml.histogram import LabeledHistograms

    histograms = LabeledHistograms((0.001, 0.01, 0.1))
    collection = Collection(Resource.create({}))
    collection.register(
        metrics=lambda: [histograms.to_metric("otel_ml_span_duration", "s", "d", ("path",), {"rank": "0"})]
    )
    reader = ExpositionReader(collection)
    MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    histograms.observe(("forward",), 0.005)
    histograms.observe(("layers.*",), 0.05)
    first = parse_exposition(reader.render().decode())
    histograms.observe(("forward",), 0.5)  # only "forward" moves
    second = parse_exposition(reader.render().decode())

    def series(samples, path):
        return {
            (name, labels.get("le")): v
            for name, points in samples.items()
            for labels, v in points
            if labels.get("path") == path
        }

    forward = series(second, "forward")
    assert forward[("otel_ml_span_duration_seconds_count", None)] == 2.0
    assert forward[("otel_ml_span_duration_seconds_bucket", "0.1")] == 1.0
    assert forward[("otel_ml_span_duration_seconds_bucket", "+Inf")] == 2.0
    assert forward[("otel_ml_span_duration_seconds_sum", None)] == pytest.approx(0.505)
    assert series(second, "layers.*") == series(first, "layers.*")
