"""OTLP metrics requests (as the run dir stores them) -> OpenMetrics text with timestamps.

The series are exactly those a scrape of the rank's ``/metrics`` gives (the names, unit suffixes,
``_total`` and label sanitising of :class:`otel_ml.exporters.exposition.Encoder`, no
``otel_scope_*`` labels), each sample at the time the rank recorded it, so that
``promtool tsdb create-blocks-from openmetrics`` builds blocks that the dashboards and alert rules
query as if the run had been scraped. What promtool needs, and this module guarantees:

* one ``# TYPE`` per family, every family's samples together, ``# EOF`` at the end;
* timestamps in seconds (millisecond resolution, as the TSDB stores them), strictly increasing
  within each series: points are sorted, and of two points of one series in the same
  millisecond the later one is kept (a duplicate timestamp would make promtool fail);
* counters typed ``counter`` with ``_total`` samples, histograms with cumulative ``_bucket``
  (``le`` up to ``+Inf``), ``_count`` and ``_sum`` per point; NaN and infinities as written;
* ``target_info`` (the resource, as ``/metrics`` shows it): one series per rank, with a sample
  at each of that rank's export times so that joins on it work over the whole run;
* ``up`` (what Prometheus itself adds for a scraped target) as ``1`` with the rank's ``run_id``
  and ``rank`` labels at each export: a rank that exported was up, and the dashboards' "ranks
  up" panels count it. Not written for a resource without ``otel_ml.rank`` and ``otel_ml.run_id``.

Delta sums and histograms (not what otel_ml writes, but valid OTLP) are accumulated into the
cumulative series a scrape would show. Pure: no I/O, a converter fed documents one by one.

Example::

    converter = OpenMetricsConverter()
    for document in read_jsonl(Path("run/rank-0/metrics.otlp.jsonl")):
        converter.add(document)
    text = converter.text()   # '# HELP otel_ml_loss ...\\n...# EOF\\n'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from otel_ml import semconv
from otel_ml.exporters.exposition import Encoder, _escape_help, number
from otel_ml.exporters.files import from_otlp_json

TARGET_INFO = "target_info"
UP = "up"
_DELTA = 1  # AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA in the OTLP proto

#: A point of a histogram series: the ``le`` texts, cumulative bucket counts, count and sum.
HistogramPoint = tuple[tuple[str, ...], tuple[float, ...], float, float]


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (what the SDK's attributes held)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    if kind in ("array_value", "kvlist_value"):
        return str(getattr(value, kind))
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    """An OTLP ``KeyValue`` list as a dict."""
    return {pair.key: any_value(pair.value) for pair in pairs}


def milliseconds(time_unix_nano: int) -> int:
    """A point's time at the TSDB's resolution."""
    return time_unix_nano // 1_000_000


def timestamp(ms: int) -> str:
    """Milliseconds as OpenMetrics seconds (``1796309548.831``)."""
    return f"{ms // 1000}.{ms % 1000:03d}"


@dataclass
class _Family:
    kind: str  # counter, gauge or histogram
    description: str
    sample: str  # the sample name: family, or family + "_total" for a counter
    # label text -> millisecond -> (nanosecond time, value: a float or a HistogramPoint)
    series: dict[str, dict[int, Any]] = field(default_factory=dict)
    # running totals of delta series: label text -> accumulated value
    totals: dict[str, Any] = field(default_factory=dict)


class OpenMetricsConverter:
    """Collects metrics requests of any number of ranks and writes them as one OpenMetrics text.

    ``add`` takes one OTLP/JSON ``ExportMetricsServiceRequest`` document (a line of a
    ``metrics.otlp.jsonl`` file) or the protobuf request itself; ``text`` can be called at any
    time. Raises ``ValueError`` for a document that is not a metrics request.

    Example::

        converter = OpenMetricsConverter()
        converter.add(json.loads(line))
        Path("run.om").write_text(converter.text())
    """

    def __init__(self) -> None:
        self._encoder = Encoder()
        self._families: dict[str, _Family] = {}
        self._targets: dict[str, set[int]] = {}
        self._up: dict[str, set[int]] = {}

    @property
    def series_count(self) -> int:
        """How many series (a histogram counts once) have been seen, target_info included."""
        return len(self._targets) + len(self._up) + sum(len(f.series) for f in self._families.values())

    @property
    def sample_count(self) -> int:
        """How many distinct (series, millisecond) points have been kept."""
        return sum(len(t) for t in (*self._targets.values(), *self._up.values())) + sum(
            len(points) for f in self._families.values() for points in f.series.values()
        )

    @property
    def time_range(self) -> tuple[float, float] | None:
        """(first, last) point time in Unix seconds, None before any point."""
        times = [ms for points in self._targets.values() for ms in points] or [
            ms for f in self._families.values() for points in f.series.values() for ms in points
        ]
        return (min(times) / 1000, max(times) / 1000) if times else None

    def add(self, document: dict[str, Any] | Any) -> None:
        try:
            request = from_otlp_json(document, "metrics") if isinstance(document, dict) else document
        except json_format.ParseError as exc:
            raise ValueError(f"not an OTLP/JSON metrics request: {exc}") from None
        if not hasattr(request, "resource_metrics"):
            raise ValueError("not an ExportMetricsServiceRequest")
        for resource_metrics in request.resource_metrics:
            times: set[int] = set()
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    times.update(self._metric(metric))
            resource = attributes(resource_metrics.resource.attributes)
            if resource and times:
                # The scrape's target_info: one series per resource (a rank), one sample per
                # export (at its latest point), as a scraped target_info would have been.
                self._targets.setdefault(self._encoder._label_text(resource), set()).add(max(times))
            rank, run_id = resource.get(semconv.RESOURCE_RANK), resource.get(semconv.RESOURCE_RUN_ID)
            if rank is not None and run_id is not None and times:
                labels = {semconv.LABEL_RANK: rank, semconv.LABEL_RUN_ID: run_id}
                self._up.setdefault(self._encoder._label_text(labels), set()).add(max(times))

    def _metric(self, metric: Any) -> set[int]:
        kind_name = metric.WhichOneof("data")
        if kind_name == "sum":
            data = metric.sum
            kind = "counter" if data.is_monotonic else "gauge"
        elif kind_name == "gauge":
            data, kind = metric.gauge, "gauge"
        elif kind_name == "histogram":
            data, kind = metric.histogram, "histogram"
        else:
            return set()  # /metrics skips these too (exponential histograms, summaries)
        family_name, sample = self._encoder._family(metric.name, metric.unit, kind)
        family = self._families.get(family_name)
        if family is None:
            family = self._families[family_name] = _Family(kind, metric.description, sample)
        delta = getattr(data, "aggregation_temporality", 0) == _DELTA
        times = set()
        for point in data.data_points:
            labels = self._encoder._label_text(attributes(point.attributes))
            ms = milliseconds(point.time_unix_nano)
            value = _histogram_point(self._encoder, point) if kind == "histogram" else _scalar(point)
            if delta:
                value = _accumulate(family.totals.get(labels), value)
                family.totals[labels] = value
            points = family.series.setdefault(labels, {})
            kept = points.get(ms)
            if kept is None or kept[0] <= point.time_unix_nano:
                points[ms] = (point.time_unix_nano, value)
            times.add(ms)
        return times

    def text(self) -> str:
        """The OpenMetrics text of everything added so far, ending in ``# EOF``."""
        out: list[str] = []
        if self._targets:
            out += [f"# HELP {TARGET_INFO} Target metadata", f"# TYPE {TARGET_INFO} gauge"]
            for labels, times in sorted(self._targets.items()):
                out.extend(f"{TARGET_INFO}{{{labels}}} 1.0 {timestamp(ms)}" for ms in sorted(times))
        if self._up:
            out += [f"# HELP {UP} The rank exported (a scrape would have succeeded)", f"# TYPE {UP} gauge"]
            for labels, times in sorted(self._up.items()):
                out.extend(f"{UP}{{{labels}}} 1.0 {timestamp(ms)}" for ms in sorted(times))
        for name, family in sorted(self._families.items()):
            out.append(f"# HELP {name} {_escape_help(family.description)}")
            out.append(f"# TYPE {name} {family.kind}")
            for labels, points in sorted(family.series.items()):
                for ms in sorted(points):
                    _lines(out, name, family, labels, points[ms][1], timestamp(ms))
        out.append("# EOF")
        return "\n".join(out) + "\n"


def _scalar(point: Any) -> float:
    return float(point.as_double if point.WhichOneof("value") == "as_double" else point.as_int)


def _histogram_point(encoder: Encoder, point: Any) -> HistogramPoint:
    running, cumulative = 0.0, []
    for count in point.bucket_counts:
        running += count
        cumulative.append(running)
    bounds = encoder._le(point.explicit_bounds)
    return bounds[: len(cumulative)], tuple(cumulative), float(point.count), float(point.sum)


def _accumulate(total: Any, value: Any) -> Any:
    if total is None:
        return value
    if isinstance(value, tuple):
        if total[0] != value[0]:  # bounds changed: a scrape would show a new histogram, so restart
            return value
        counts = tuple(a + b for a, b in zip(total[1], value[1], strict=True))
        return value[0], counts, total[2] + value[2], total[3] + value[3]
    return total + value


def _lines(out: list[str], name: str, family: _Family, labels: str, value: Any, at: str) -> None:
    if family.kind != "histogram":
        out.append(f"{family.sample}{{{labels}}} {number(value)} {at}" if labels else
                   f"{family.sample} {number(value)} {at}")  # fmt: skip
        return
    bounds, counts, count, total = value
    prefix = f'{name}_bucket{{{labels}{"," if labels else ""}le="'
    out.extend(f'{prefix}{le}"}} {number(c)} {at}' for le, c in zip(bounds, counts, strict=True))
    suffix = f"{{{labels}}}" if labels else ""
    out.append(f"{name}_count{suffix} {number(count)} {at}")
    out.append(f"{name}_sum{suffix} {number(total)} {at}")
