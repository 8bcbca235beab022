"""Names live in one module, are valid, and the README documents exactly them."""

from __future__ import annotations

import re

from otel_ml import semconv
from otel_ml.exporters.prometheus import make_reader

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_every_metric_has_a_valid_prefixed_name_unit_and_description():
    for spec in semconv.METRICS:
        assert spec.name.startswith(semconv.PREFIX)
        assert PROMETHEUS_NAME.match(spec.prometheus_name)
        assert spec.unit and spec.description
        assert spec.kind in ("gauge", "counter", "histogram")


def test_units_match_name_suffixes_so_the_exporter_adds_nothing():
    for spec in semconv.METRICS:
        if spec.unit == "s":
            assert spec.name.endswith("_seconds")
        if spec.unit == "By":
            assert spec.name.endswith("_bytes")
        if spec.unit.endswith("/s"):
            assert spec.name.endswith("_per_second")


def test_exposed_names_are_the_documented_ones():
    """Feed every instrument once through the real Prometheus reader and compare names."""
    from opentelemetry.metrics import Observation
    from opentelemetry.sdk.metrics import MeterProvider

    reader = make_reader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    meter = provider.get_meter("t")
    for spec in semconv.METRICS:
        if spec.kind == "histogram":
            meter.create_histogram(spec.name, unit=spec.unit, description=spec.description).record(1.0)
        elif spec.kind == "counter":
            meter.create_observable_counter(
                spec.name, [lambda _: [Observation(1)]], spec.unit, spec.description
            )
        else:
            meter.create_observable_gauge(
                spec.name, [lambda _: [Observation(1)]], spec.unit, spec.description
            )
    text = reader.render().decode()
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    expected = {s.prometheus_name for s in semconv.METRICS}
    assert expected <= exposed
    for spec in semconv.METRICS:
        assert re.search(rf"^{spec.prometheus_name}(_bucket)?[{{ ]", text, re.M), spec.prometheus_name


def test_readme_metric_table_is_generated_from_semconv(readme_text):
    assert semconv.markdown_table() in readme_text
