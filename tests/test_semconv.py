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


#: ``otel_ml_*`` words in the shipped configs that are not metric names, and what they are.
NOT_METRICS = {
    "otel_ml_collector": "the Prometheus scrape job of the collector (deploy/prometheus/prometheus.yml)",
    "otel_ml_units": "a collector processor (transform/otel_ml_units)",
    "otel_ml_loss_ratio": "what a collector without the unit fix would expose (a config comment)",
    # Resource attributes as the collector's Prometheus exporter turns them into labels.
    **{
        attribute.replace(".", "_"): "a resource attribute label"
        for attribute in (semconv.RESOURCE_RUN_ID, semconv.RESOURCE_RANK, semconv.RESOURCE_WORLD_SIZE)
    },
}


def _unknown_names(text: str) -> set[str]:
    """``otel_ml_*`` words of ``text`` that name no semconv metric (or sample of one)."""
    known = set(semconv.RESERVED_NAMES) | {semconv.PREFIX + key for key in semconv.WELL_KNOWN_KEYS}
    return {n for n in re.findall(r"\botel_ml_\w+", text) if n not in known and n not in NOT_METRICS}


def _config_files() -> list:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return sorted(
        [*root.glob("grafana/**/*.json"), *root.glob("deploy/**/*.yml"), *root.glob("deploy/**/*.yaml")]
    )


def test_every_otel_ml_name_in_dashboards_and_deploy_configs_comes_from_semconv():
    files = _config_files()
    assert any(p.suffix == ".json" for p in files) and any(p.suffix == ".yaml" for p in files)
    unknown = sorted(
        f"{path.name}: {name}" for path in files for name in _unknown_names(path.read_text(encoding="utf-8"))
    )
    assert unknown == []


def test_the_name_check_catches_a_misspelt_metric():
    # Recording rules are "otel_ml:..." (a colon), so they never match; a typo does not pass.
    text = (
        "expr: rate(otel_ml_samples_total[1m]) + otel_ml_sample_total + otel_ml:steps:rate1m"
        " + otel_ml_span_duration_seconds_bucket + otel_ml_kl + otel_ml_klx"
    )
    assert _unknown_names(text) == {"otel_ml_sample_total", "otel_ml_klx"}
