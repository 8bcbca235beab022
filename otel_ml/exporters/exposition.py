"""Prometheus text exposition (format 0.0.4) straight from OTel ``MetricsData``, cheaply.

OTel's own Prometheus reader (which otel_ml does not use) builds prometheus_client families on
every scrape, and prometheus_client then validates and escapes every label of every sample: about
10 µs per series here, all of it holding the GIL while the training thread waits. This encoder
produces the same names and labels the OTel exporter would (same sanitizing and unit-suffix rules,
no ``otel_scope_*`` labels, ``target_info`` from the resource) but caches each series' label text,
so a scrape costs a few microseconds per series. Tests compare its output with the OTel
exporter's, sample by sample.

``/metrics`` (:meth:`ExpositionReader.render`) goes further for otel_ml's own metrics: the
observables of :mod:`otel_ml.observables` and the histogram snapshots of :mod:`otel_ml.histogram`
are written straight from their state, without OTel data-point objects and attribute dicts, each
series' label text cached by its attribute items. The bytes are those of encoding
``reader.read()`` (the OTel path that OTLP and files keep; tests compare them).

Example::

    reader = ExpositionReader(Collection())
    provider = MeterProvider(metric_readers=[reader])
    body = reader.render()   # bytes for GET /metrics
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_attribute, sanitize_full_name
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData

from otel_ml import semconv
from otel_ml._logging import warn_once
from otel_ml.collection import Collection, PullReader
from otel_ml.histogram import HistogramSnapshot
from otel_ml.observables import Observable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_CUMULATIVE = {
    kind: AggregationTemporality.CUMULATIVE
    for kind in (
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    )
}


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_value(value: Any) -> str:
    if isinstance(value, str):
        return _escape_value(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return _escape_value(str(value))


def number(value: float) -> str:
    """A sample value as Prometheus writes it (``+Inf``, ``-Inf``, ``NaN``)."""
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Encoder:
    """Caches family names and label texts across scrapes (one instance per reader)."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._labels: dict[frozenset, str] = {}
        self._bounds: dict[tuple[float, ...], tuple[str, ...]] = {}
        self._series: dict[tuple[str, str], tuple[int, float, list[str]]] = {}
        self._snapshots: dict[tuple[Any, tuple[str, ...]], tuple[int, float, list[str], str]] = {}
        self._observed: dict[tuple, tuple[frozenset, str]] = {}

    def _family(self, name: str, unit: str, kind: str) -> tuple[str, str]:
        """(family name, sample name) as the OTel Prometheus exporter derives them."""
        key = (name, unit, kind)
        known = self._names.get(key)
        if known is None:
            family = sanitize_full_name(name)
            if kind == "counter" and family.endswith("_total"):
                family = family[: -len("_total")]  # as prometheus_client: "_total" is re-added below
            suffix = map_unit(unit or "")
            if suffix and not family.endswith("_" + suffix):
                family += "_" + suffix
            known = (family, family + "_total" if kind == "counter" else family)
            self._names[key] = known
        return known

    def _label_text(self, attributes: Mapping[str, Any]) -> str:
        key = frozenset(attributes.items())
        text = self._labels.get(key)
        if text is None:
            if len(self._labels) > 100_000:
                self._labels.clear()
            pairs = sorted((sanitize_attribute(k), _label_value(v)) for k, v in attributes.items())
            text = ",".join(f'{k}="{v}"' for k, v in pairs)
            self._labels[key] = text
        return text

    def _le(self, bounds: Any) -> tuple[str, ...]:
        """The ``le`` texts of a histogram's bounds and +Inf (the same few bounds every scrape)."""
        key = tuple(bounds)
        texts = self._bounds.get(key)
        if texts is None:
            if len(self._bounds) > 1000:
                self._bounds.clear()
            texts = self._bounds[key] = (*(repr(float(b)) for b in key), "+Inf")
        return texts

    def encode(self, data: MetricsData | None, collection: Collection | None = None) -> str:
        """The text of ``data``; with ``collection``, the text of ``collection.augment(data)``,
        rendered from otel_ml's own state (observables, histogram snapshots) without building
        their OTel points: the same bytes, families in the same order."""
        own = collection is not None and collection.has_own_metrics
        if data is None and not own:
            return ""
        out: list[str] = []
        families: dict[str, list[str]] = {}
        headers: dict[str, tuple[str, str]] = {}
        resources = data.resource_metrics if data is not None else ()
        made = not resources and own and self._own(collection, families, headers)
        if made and collection.resource.attributes:  # as augment(None): the collection's resource
            out += self._target_info(collection.resource.attributes)
        for index, resource_metrics in enumerate(resources):
            if not out and resource_metrics.resource.attributes:
                out += self._target_info(resource_metrics.resource.attributes)
            pending = own and index == 0  # as augment: into the first resource's otel_ml scope
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self._metric(metric, families, headers)
                if pending and scope_metrics.scope.name == semconv.SCOPE:
                    self._own(collection, families, headers)
                    pending = False
            if pending:
                self._own(collection, families, headers)
        for family, lines in families.items():
            kind, description = headers[family]
            shown = family + "_total" if kind == "counter" else family  # as prometheus_client writes it
            out.append(f"# HELP {shown} {_escape_help(description)}")
            out.append(f"# TYPE {shown} {kind}")
            out.extend(lines)
        return "\n".join(out) + "\n" if out else ""

    def _target_info(self, attributes: Mapping[str, Any]) -> list[str]:
        labels = self._label_text(attributes)
        return [
            "# HELP target_info Target metadata",
            "# TYPE target_info gauge",
            f"target_info{{{labels}}} 1.0",
        ]

    def _own(
        self, collection: Any, families: dict[str, list[str]], headers: dict[str, tuple[str, str]]
    ) -> int:
        """Encode the collection's observables and sources in :meth:`Collection.augment`'s order;
        the number of metrics they made (0: augment would have added nothing)."""
        made = 0
        for instrument in collection.observables:
            made += self._observable(instrument, families, headers)
        for metric in collection.source_metrics():
            made += 1
            if type(metric.data) is HistogramSnapshot:
                self._snapshot(metric, families, headers)
            else:
                self._metric(metric, families, headers)
        return made

    def _observable(
        self, instrument: Observable, families: dict[str, list[str]], headers: dict[str, tuple[str, str]]
    ) -> bool:
        """Run ``instrument``'s callbacks and encode them as its ``collect()`` metric would be."""
        seen: dict[frozenset, tuple[str, Any]] = {}
        known = self._observed
        for obs in instrument.observations():
            attributes = obs.attributes
            try:
                key = tuple(attributes.items()) if attributes else ()
                entry = known.get(key)
            except TypeError as exc:  # an unhashable attribute value, skipped as collect() does
                warn_once(
                    f"observable:{instrument.name}",
                    "otel_ml: callback of %s failed: %r",
                    instrument.name,
                    exc,
                )
                continue
            if entry is None:
                if len(known) > 100_000:
                    known.clear()
                # One series per attribute set whatever the order of its items (as collect()).
                entry = known[key] = (frozenset(key), self._label_text(attributes or {}))
            seen[entry[0]] = (entry[1], obs.value)
        if not seen:
            return False
        kind = "counter" if instrument.monotonic else "gauge"
        family, sample = self._family(instrument.name, instrument.unit or "", kind)
        headers.setdefault(family, (kind, instrument.description or ""))
        lines = families.setdefault(family, [])
        for labels, value in seen.values():
            lines.append(f"{sample}{{{labels}}} {number(value)}" if labels else f"{sample} {number(value)}")
        return True

    def _snapshot(
        self, metric: Any, families: dict[str, list[str]], headers: dict[str, tuple[str, str]]
    ) -> None:
        """A :class:`~otel_ml.histogram.HistogramSnapshot` encoded as its data points would be."""
        data = metric.data
        family, _ = self._family(metric.name, metric.unit or "", "histogram")
        headers.setdefault(family, ("histogram", metric.description or ""))
        lines = families.setdefault(family, [])
        base, names = data.attributes, data.label_names
        metric_key = (family, frozenset(base.items()), names)
        le = self._le(data.bounds)
        cache = self._snapshots
        for key, (counts, total, _, _) in data.snapshot.items():
            count = sum(counts)
            series_key = (metric_key, key)
            cached = cache.get(series_key)
            if cached is not None:
                if cached[0] == count and cached[1] == total:
                    lines.extend(cached[2])
                    continue
                labels = cached[3]
            else:
                labels = self._label_text({**base, **dict(zip(names, key, strict=True))})
                if len(cache) > 100_000:
                    cache.clear()
            series = _histogram_lines(family, labels, le, counts, count, total)
            cache[series_key] = (count, total, series, labels)
            lines.extend(series)

    def _metric(
        self, metric: Any, families: dict[str, list[str]], headers: dict[str, tuple[str, str]]
    ) -> None:
        data = metric.data
        if isinstance(data, Sum):
            kind = "counter" if data.is_monotonic else "gauge"
        elif isinstance(data, Gauge):
            kind = "gauge"
        elif isinstance(data, HistogramData):
            kind = "histogram"
        else:
            warn_once(
                f"exposition:{metric.name}", "otel_ml: /metrics skips %s (unsupported kind)", metric.name
            )
            return
        family, sample = self._family(metric.name, metric.unit or "", kind)
        headers.setdefault(family, (kind, metric.description or ""))
        lines = families.setdefault(family, [])
        for point in data.data_points:
            labels = self._label_text(point.attributes)
            if kind != "histogram":
                lines.append(
                    f"{sample}{{{labels}}} {number(point.value)}"
                    if labels
                    else f"{sample} {number(point.value)}"
                )
                continue
            # A cumulative series whose count and sum did not move since the last scrape has the
            # same buckets: reuse its lines (most module paths are timed one step in 100).
            key = (family, labels)
            cached = self._series.get(key)
            if cached is not None and cached[0] == point.count and cached[1] == point.sum:
                lines.extend(cached[2])
                continue
            le = self._le(point.explicit_bounds)
            series = _histogram_lines(family, labels, le, point.bucket_counts, point.count, point.sum)
            if len(self._series) > 100_000:
                self._series.clear()
            self._series[key] = (point.count, point.sum, series)
            lines.extend(series)


def _histogram_lines(
    family: str, labels: str, le: tuple[str, ...], counts: Any, count: int, total: float
) -> list[str]:
    """The ``_bucket`` (cumulative), ``_count`` and ``_sum`` lines of one histogram series."""
    prefix = f'{family}_bucket{{{labels}{"," if labels else ""}le="'
    running = 0
    series = []
    for text, bucket in zip(le, counts, strict=False):
        running += bucket
        series.append(f'{prefix}{text}"}} {running}.0')
    suffix = f"{{{labels}}}" if labels else ""
    series.append(f"{family}_count{suffix} {float(count)!r}")
    series.append(f"{family}_sum{suffix} {number(total)}")
    return series


class ExpositionReader(PullReader):
    """A pull reader whose :meth:`render` runs one collection and returns the text exposition.

    The :class:`otel_ml.collection.Collection` it is given adds the prepare hooks and the metrics
    otel_ml aggregates itself. Scrapes are serialised: the encoder's caches are not shared
    between threads.

    Example::

        reader = ExpositionReader(Collection())
        MeterProvider(metric_readers=[reader])
        reader.render()   # b'# HELP ...'
    """

    def __init__(self, collection: Collection | None = None) -> None:
        super().__init__(collection, preferred_temporality=_CUMULATIVE)
        self._encoder = Encoder()
        self._encode_lock = threading.Lock()

    def render(self) -> bytes:
        """One scrape's body: the SDK's collection and otel_ml's own metrics, the latter encoded
        from their state directly (``Encoder.encode(self.read())`` gives the same bytes)."""
        with self._encode_lock, self._read_lock:
            return self._encoder.encode(self._read_sdk(), self.collection).encode("utf-8")
