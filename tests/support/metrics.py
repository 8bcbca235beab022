"""Helpers to read metrics from an InMemoryMetricReader or from Prometheus text exposition."""

from __future__ import annotations

import re
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from otel_ml.collection import PullReader


def points(reader: InMemoryMetricReader | PullReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """{metric name: [(attributes, data point), ...]} from one collection (a
    :class:`~otel_ml.collection.PullReader` runs its prepare hooks first, as otel_ml's readers do)."""
    data = reader.read() if isinstance(reader, PullReader) else reader.get_metrics_data()
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    out.setdefault(metric.name, []).append((dict(point.attributes), point))
    return out


def value(collected: dict[str, list[tuple[dict[str, Any], Any]]], name: str, **labels: str) -> Any:
    """The single point of ``name`` whose attributes include ``labels`` (value or the point)."""
    matches = [p for attrs, p in collected.get(name, []) if all(attrs.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} points in {sorted(collected)}"
    point = matches[0]
    return getattr(point, "value", point)


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value), ...]} from Prometheus text format (validates it too)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


#: Metric and label names Prometheus accepts (text format 0.0.4, without UTF-8 names).
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def strict_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """:func:`parse_exposition` plus the checks a Prometheus server applies to a scrape.

    Fails (AssertionError) on names Prometheus rejects, a family declared twice, or two samples
    with the same name and labels (Prometheus drops those as duplicates, so one of two series
    silently loses its data).
    """
    samples = parse_exposition(text)
    declared = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(declared) == len(set(declared)), f"families declared twice: {sorted(declared)}"
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for name, points in samples.items():
        assert _METRIC_NAME.match(name), f"invalid metric name {name!r}"
        for labels, _ in points:
            for label in labels:
                assert _LABEL_NAME.match(label), f"invalid label name {label!r} on {name}"
            key = (name, tuple(sorted(labels.items())))
            assert key not in seen, f"duplicate sample {name}{labels}"
            seen.add(key)
    return samples
