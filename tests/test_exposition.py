"""otel_ml's text exposition matches the OTel Prometheus exporter's, sample by sample."""

from __future__ import annotations

import math

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality
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


# ------------------------------------------------------------ the direct path, byte for byte
# ``render()`` encodes otel_ml's observables and histogram snapshots from their state; the OTel
# path (``Encoder().encode(reader.read())``: OTel points, then text) must give the same bytes.


def _old_and_new(reader, old_encoder):
    old = old_encoder.encode(reader.read()).encode("utf-8")
    return old, reader.render()


def _state(sdk_scopes):
    """A collection with every kind of own metric, and SDK instruments in ``sdk_scopes``."""
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Metric, NumberDataPoint

    from otel_ml import semconv
    from otel_ml.collection import Collection
    from otel_ml.histogram import LabeledHistograms
    from otel_ml.observables import ObservableMeter

    collection = Collection(Resource.create({"service.name": "svc", "otel_ml.rank": 1}))
    reader = ExpositionReader(collection)
    provider = MeterProvider(
        resource=Resource.create({"service.name": "svc", "otel_ml.run_id": "r"}),
        metric_readers=[reader],
        shutdown_on_exit=False,
    )
    for scope in sdk_scopes:
        sdk = provider.get_meter(scope)
        sdk.create_counter(f"{scope}.requests", unit="s").add(2, {"a": "b"})
        sdk.create_histogram("shared_lat", unit="ms", explicit_bucket_boundaries_advisory=[1.0]).record(3.0)
    meter = ObservableMeter(provider.get_meter(semconv.SCOPE), collection)
    labels = {"rank": "0", "run_id": "r"}
    values = {"loss": math.nan, "hi": math.inf, "lo": -math.inf, "zero": 0, "big": 1795335504.420036}

    def gauges(_):
        out = [Observation(v, {**labels, "metric": k}) for k, v in values.items()]
        out.append(Observation(7, {"metric": "zero", **labels}))  # same set, other order: last wins
        out.append(Observation(1.5))  # no attributes at all
        return out

    def failing(_):
        yield Observation(1, labels)
        raise RuntimeError("broken sensor")

    meter.create_observable_gauge("otel_ml_value", [gauges], unit="1", description='multi\nline "help" \\')
    meter.create_observable_counter("otel_ml_samples_total", [lambda _: [Observation(5, labels)]], "{sample}")
    meter.create_observable_counter(
        "otel_ml_bytes", [lambda _: [Observation(3, {"path": 'a"b\\c\nd'})]], "By"
    )
    meter.create_observable_gauge("otel_ml_nothing", [lambda _: []])  # no family at all
    meter.create_observable_gauge("otel_ml_partly", [failing, lambda _: [Observation(2, {"x": True})]])
    spans = LabeledHistograms((0.001, 0.01, 0.1))
    steps = LabeledHistograms((1.0,))
    never = LabeledHistograms((1.0,))  # nothing observed: no metric
    spans.observe(("forward",), 0.005)
    spans.observe(("layers.*",), math.inf)
    steps.observe((), math.nan)  # a NaN sum
    plain = Histogram(data_points=[], aggregation_temporality=AggregationTemporality.CUMULATIVE)
    collection.register(
        metrics=lambda: [
            spans.to_metric("otel_ml_span_duration", "s", "spans", ("path",), labels),
            steps.to_metric("otel_ml_step_duration_seconds", "s", "steps", (), labels),
            never.to_metric("otel_ml_never", "s", "", (), labels),
            Metric("otel_ml_empty", "an empty family", "s", plain),  # HELP/TYPE, no samples
            Metric("otel_ml_plain", "", "", Gauge([NumberDataPoint({"k": "v"}, 0, 0, math.nan)])),
        ]
    )
    collection.register(metrics=lambda: 1 / 0)  # a broken source is skipped by both paths
    return reader, spans


@pytest.mark.parametrize(
    "sdk_scopes", [(), ("otel_ml",), ("other",), ("other", "otel_ml", "third")], ids=repr
)
def test_render_gives_the_bytes_of_the_otel_point_path(sdk_scopes):
    from otel_ml.exporters.exposition import Encoder

    reader, spans = _state(sdk_scopes)
    old_encoder = Encoder()
    old, new = _old_and_new(reader, old_encoder)
    assert new == old
    text = new.decode()
    for expected in (
        'otel_ml_value{metric="loss",rank="0",run_id="r"} NaN',
        'otel_ml_value{metric="hi",rank="0",run_id="r"} +Inf',
        'otel_ml_value{metric="lo",rank="0",run_id="r"} -Inf',
        'otel_ml_value{metric="zero",rank="0",run_id="r"} 7.0',
        "otel_ml_value 1.5",
        '# HELP otel_ml_value multi\\nline "help" \\\\',
        "# TYPE otel_ml_samples_total counter",
        'otel_ml_bytes_total{path="a\\"b\\\\c\\nd"} 3.0',
        'otel_ml_partly{rank="0",run_id="r"} 1.0',
        "# HELP otel_ml_empty_seconds an empty family\n# TYPE otel_ml_empty_seconds histogram\n#",
        'otel_ml_span_duration_seconds_bucket{path="layers.*",rank="0",run_id="r",le="+Inf"} 1.0',
        'otel_ml_span_duration_seconds_sum{path="layers.*",rank="0",run_id="r"} +Inf',
        'otel_ml_step_duration_seconds_sum{rank="0",run_id="r"} NaN',
    ):
        assert expected in text, expected
    assert "otel_ml_nothing" not in text and "otel_ml_never" not in text
    assert text.count("# TYPE shared_lat_milliseconds histogram") == (1 if sdk_scopes else 0)
    assert "target_info{" in text.splitlines()[2]
    # Again with warm caches: one series moved, the others kept.
    spans.observe(("forward",), 0.05)
    old, new = _old_and_new(reader, old_encoder)
    assert new == old
    assert 'otel_ml_span_duration_seconds_count{path="forward",rank="0",run_id="r"} 2.0' in new.decode()


def test_render_of_a_running_instance_matches_the_point_path_with_and_without_a_user_reader(tmp_path):
    """The whole of otel_ml's state (regions, log() values and a NaN, anomalies, process) rendered
    both ways: every sample that did not change between two renders of the old path is the same
    byte for byte in the new one; the user's SDK reader still sees the observables."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import otel_ml
    from otel_ml import runtime
    from otel_ml._testing import reset
    from otel_ml.config import Config
    from otel_ml.exporters.exposition import Encoder

    for user_readers in ([], [InMemoryMetricReader()]):
        reset()
        opts = {"prometheus_port": 0, "run_dir": str(tmp_path / "{run_id}"), "run_id": "unit"}
        t = runtime.Telemetry(
            Config.resolve(env={}, set_global_providers=False, **opts), metric_readers=user_readers
        )
        try:
            for step in range(3):
                with otel_ml.span("forward"):
                    pass
                otel_ml.step_end()
                t.log(step, loss=math.nan if step == 2 else 0.5, reward=1.5)
            reader = t.prometheus_reader
            old_encoder = Encoder()
            first = old_encoder.encode(reader.read()).splitlines()
            new = reader.render().decode().splitlines()
            second = old_encoder.encode(reader.read()).splitlines()
            assert len(new) == len(first) == len(second)
            stable = 0
            for a, b, c in zip(first, new, second, strict=True):
                if a == c:
                    assert b == a
                    stable += 1
                else:  # a clock or a memory reading: same series, another value
                    assert b.rsplit(" ", 1)[0] == a.rsplit(" ", 1)[0]
            assert stable > 0.9 * len(first)
            assert 'otel_ml_nonfinite_total{metric="loss",rank="0",run_id="unit"} 1.0' in new  # the NaN
            assert any(line.startswith("otel_ml_span_duration_seconds_count{") for line in new)
            if user_readers:
                seen = {
                    m.name
                    for rm in user_readers[0].get_metrics_data().resource_metrics
                    for sm in rm.scope_metrics
                    for m in sm.metrics
                }
                assert {"otel_ml_loss", "otel_ml_reward"} <= seen
        finally:
            t.shutdown(5)
    reset()
