"""otel_ml's observable instruments, collected by its own readers without the SDK's aggregation."""

from __future__ import annotations

import logging

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, Sum
from opentelemetry.sdk.resources import Resource

from otel_ml.collection import Collection, PullReader
from otel_ml.exporters.exposition import ExpositionReader
from otel_ml.observables import ObservableMeter
from tests.support.metrics import strict_exposition


def _setup(reader_cls=PullReader):
    collection = Collection(Resource.create({"service.name": "obs"}))
    reader = reader_cls(collection)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    return ObservableMeter(provider.get_meter("t"), collection), reader, provider


def _metrics(data):
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def test_gauges_and_counters_become_metrics_of_the_collection_each_callback_called_once():
    meter, reader, _ = _setup()
    calls = []

    def step(_):
        calls.append(1)
        return [Observation(7, {"rank": "0"})]

    meter.create_observable_gauge("otel_ml_step", [step], "{step}", "Step")
    meter.create_observable_counter(
        "otel_ml_samples", callbacks=[lambda _: [Observation(32.0, {"rank": "0"})]], unit="{sample}"
    )
    metrics = _metrics(reader.read())
    assert calls == [1]
    gauge, counter = metrics["otel_ml_step"], metrics["otel_ml_samples"]
    assert isinstance(gauge.data, Gauge) and gauge.unit == "{step}" and gauge.description == "Step"
    assert [(dict(p.attributes), p.value) for p in gauge.data.data_points] == [({"rank": "0"}, 7)]
    assert isinstance(counter.data, Sum) and counter.data.is_monotonic
    assert counter.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    point = counter.data.data_points[0]
    assert 0 < point.start_time_unix_nano <= point.time_unix_nano and point.value == 32.0


def test_with_no_sdk_instrument_the_collection_still_carries_the_resource():
    meter, reader, _ = _setup()
    meter.create_observable_gauge("otel_ml_step", [lambda _: [Observation(1)]])
    data = reader.read()
    assert data is not None
    assert data.resource_metrics[0].resource.attributes["service.name"] == "obs"
    empty = PullReader(Collection())
    MeterProvider(metric_readers=[empty], shutdown_on_exit=False)
    assert empty.read() is None  # nothing registered anywhere: nothing to report


def test_sdk_instruments_and_observables_share_one_collection_and_one_exposition():
    meter, reader, _ = _setup(ExpositionReader)
    meter.create_counter("user_requests").add(3, {"rank": "0"})  # a synchronous SDK instrument
    meter.create_observable_gauge("otel_ml_loss", [lambda _: [Observation(float("nan"), {"rank": "0"})]])
    samples = strict_exposition(reader.render().decode())
    assert samples["user_requests_total"] == [({"rank": "0"}, 3.0)]
    [(labels, loss)] = samples["otel_ml_loss"]
    assert labels == {"rank": "0"} and loss != loss  # NaN is data


def test_the_last_observation_of_a_series_wins_as_in_the_sdk():
    meter, reader, _ = _setup()
    meter.create_observable_gauge(
        "otel_ml_kl", [lambda _: [Observation(1.0, {"k": "a"}), Observation(2.0, {"k": "a"})]]
    )
    points = _metrics(reader.read())["otel_ml_kl"].data.data_points
    assert [(dict(p.attributes), p.value) for p in points] == [({"k": "a"}, 2.0)]


def test_a_failing_callback_is_logged_once_and_the_others_are_collected(caplog):
    meter, reader, _ = _setup()

    def broken(_):
        raise RuntimeError("boom")

    meter.create_observable_gauge("otel_ml_broken", [broken])
    meter.create_observable_gauge("otel_ml_step", [lambda _: [Observation(5)]])
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        first = _metrics(reader.read())
        second = _metrics(reader.read())
    assert "otel_ml_broken" not in first and first["otel_ml_step"].data.data_points[0].value == 5
    assert "otel_ml_step" in second
    assert sum("otel_ml_broken" in r.getMessage() for r in caplog.records) == 1


def test_a_callback_that_fails_midway_keeps_what_it_observed_and_the_instruments_other_callbacks_run():
    meter, reader, _ = _setup(ExpositionReader)

    def halfway(_):
        yield Observation(1, {"rank": "0"})
        raise RuntimeError("boom")

    def broken(_):
        raise RuntimeError("boom")

    meter.create_observable_gauge("otel_ml_halfway", [halfway])
    meter.create_observable_gauge(
        "otel_ml_several", [broken, halfway, lambda _: (Observation(3, {"rank": "1"}),), broken]
    )
    metrics = _metrics(reader.read())
    assert [p.value for p in metrics["otel_ml_halfway"].data.data_points] == [1]
    assert sorted(p.value for p in metrics["otel_ml_several"].data.data_points) == [1, 3]
    samples = strict_exposition(reader.render().decode())  # /metrics encodes the observations itself
    assert samples["otel_ml_halfway"] == [({"rank": "0"}, 1.0)]
    assert sorted(samples["otel_ml_several"], key=lambda s: s[1]) == [
        ({"rank": "0"}, 1.0),
        ({"rank": "1"}, 3.0),
    ]


def test_a_second_instrument_with_the_same_name_is_refused():
    meter, reader, _ = _setup()
    meter.create_observable_gauge("otel_ml_step", [lambda _: [Observation(1)]])
    meter.create_observable_gauge("otel_ml_step", [lambda _: [Observation(2)]])
    points = _metrics(reader.read())["otel_ml_step"].data.data_points
    assert [p.value for p in points] == [1]


def test_a_histogram_snapshot_gives_otlp_the_points_a_plain_histogram_would():
    from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics.export import Histogram, Metric, MetricsData, ResourceMetrics, ScopeMetrics
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from otel_ml.histogram import HistogramSnapshot, LabeledHistograms

    hist = LabeledHistograms((0.1, 1.0))
    hist.observe(("forward",), 0.5)
    hist.observe(("backward",), 5.0)
    metric = hist.to_metric("otel_ml_span_duration", "s", "d", ("path",), {"rank": "0"})
    assert type(metric.data) is HistogramSnapshot
    points = metric.data.data_points
    assert points is metric.data.data_points  # built once
    assert [(p.attributes, p.count, list(p.bucket_counts), p.sum) for p in points] == [
        ({"rank": "0", "path": "forward"}, 1, [0, 1, 0], 0.5),
        ({"rank": "0", "path": "backward"}, 1, [0, 0, 1], 5.0),
    ]
    plain = Metric(
        metric.name, metric.description, metric.unit, Histogram(points, AggregationTemporality.CUMULATIVE)
    )

    def otlp(m):
        scope = ScopeMetrics(InstrumentationScope("otel_ml"), [m], "")
        return encode_metrics(
            MetricsData([ResourceMetrics(Resource.create({}), [scope], "")])
        ).SerializeToString()

    assert otlp(metric) == otlp(plain)
    assert metric.to_json() == plain.to_json()
