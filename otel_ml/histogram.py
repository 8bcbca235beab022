"""Explicit-bucket histograms aggregated by otel_ml itself, exported as OTel histogram metrics.

The OTel SDK's ``Histogram.record`` costs about 7 µs per observation here. Region timings
arrive by the thousand per second, so they are aggregated in plain Python on the export thread
(a bisect and two additions, well under a microsecond) and handed to the readers as a finished
cumulative OTel ``Metric`` at collection time (a metric source of :class:`otel_ml.collection.Collection`).
Prometheus and OTLP then see an ordinary histogram.

Example::

    hist = LabeledHistograms((0.001, 0.01, 0.1))
    hist.observe(("forward",), 0.004)
    metric = hist.to_metric("otel_ml_span_duration_seconds", "s", "...", ("path",), {"rank": "0"})
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
)


class _Series:
    __slots__ = ("counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class LabeledHistograms:
    """Cumulative explicit-bucket histograms keyed by a tuple of label values (thread-safe).

    Bucket ``i`` counts values ``v`` with ``bounds[i-1] < v <= bounds[i]``, as in OTel and
    Prometheus; the last bucket is ``+Inf``.

    Example::

        h = LabeledHistograms((1.0, 2.0))
        h.observe(("a",), 1.5)
        h.snapshot()[("a",)]  # ([0, 1, 0], 1.5, 1.5, 1.5)
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._series: dict[tuple[str, ...], _Series] = {}
        self._lock = threading.Lock()
        self.start_ns = time.time_ns()

    def observe(self, key: tuple[str, ...], value: float) -> None:
        self.observe_many(((key, value),))

    def observe_many(self, observations: Iterable[tuple[tuple[str, ...], float]]) -> None:
        """``observe`` for each ``(key, value)``, under one lock acquisition."""
        bounds, all_series = self.bounds, self._series
        with self._lock:
            for key, value in observations:
                series = all_series.get(key)
                if series is None:
                    series = all_series[key] = _Series(len(bounds) + 1)
                series.counts[bisect_left(bounds, value)] += 1
                series.sum += value
                if value < series.min:
                    series.min = value
                if value > series.max:
                    series.max = value

    @property
    def lock(self) -> threading.Lock:
        """The lock every update and snapshot holds (a caller updating series itself takes it)."""
        return self._lock

    def series_for(self, key: tuple[str, ...]) -> _Series:
        """The series of ``key``, made empty if missing; the caller holds :attr:`lock`.

        The C accounting of region durations (``otel_ml/regions/_cregion_account.c``) reads and
        writes the series it gets here: ``counts`` (a list), ``sum``, ``min`` and ``max``.
        """
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(len(self.bounds) + 1)
        return series

    def add(self, key: tuple[str, ...], counts: Sequence[int], total: float, low: float, high: float) -> None:
        """Merge pre-aggregated bucket ``counts`` (same bounds), their sum and extrema into ``key``."""
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self.bounds) + 1)
            series.counts = [a + b for a, b in zip(series.counts, counts, strict=True)]
            series.sum += total
            series.min = min(series.min, low)
            series.max = max(series.max, high)

    def snapshot(self) -> dict[tuple[str, ...], tuple[list[int], float, float, float]]:
        """{key: (bucket counts, sum, min, max)}, a consistent copy."""
        with self._lock:
            return {k: (list(s.counts), s.sum, s.min, s.max) for k, s in self._series.items()}

    def to_metric(
        self,
        name: str,
        unit: str,
        description: str,
        label_names: Sequence[str],
        attributes: Mapping[str, str],
    ) -> Metric | None:
        """The cumulative OTel histogram metric, or None when nothing was observed yet."""
        snapshot = self.snapshot()
        if not snapshot:
            return None
        data = HistogramSnapshot(
            snapshot, self.bounds, self.start_ns, time.time_ns(), attributes, label_names
        )
        return Metric(name=name, description=description, unit=unit, data=data)


class HistogramSnapshot(Histogram):
    """A cumulative OTel ``Histogram`` whose data points are built only when read.

    OTLP and files read :attr:`data_points` (built once, on first access); ``/metrics`` renders
    the snapshot straight to text (:mod:`otel_ml.exporters.exposition`) and never builds them.
    """

    def __init__(
        self,
        snapshot: dict[tuple[str, ...], tuple[list[int], float, float, float]],
        bounds: tuple[float, ...],
        start_ns: int,
        now_ns: int,
        attributes: Mapping[str, str],
        label_names: Sequence[str],
    ) -> None:
        # A frozen dataclass: fields are set as its own __init__ would.
        object.__setattr__(self, "snapshot", snapshot)
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "start_ns", start_ns)
        object.__setattr__(self, "now_ns", now_ns)
        object.__setattr__(self, "attributes", attributes)
        object.__setattr__(self, "label_names", tuple(label_names))
        object.__setattr__(self, "aggregation_temporality", AggregationTemporality.CUMULATIVE)
        object.__setattr__(self, "_points", None)

    @property
    def data_points(self) -> list[HistogramDataPoint]:  # type: ignore[override]
        points = self._points
        if points is None:
            attributes, label_names = self.attributes, self.label_names
            points = [
                HistogramDataPoint(
                    attributes={**attributes, **dict(zip(label_names, key, strict=True))},
                    start_time_unix_nano=self.start_ns,
                    time_unix_nano=self.now_ns,
                    count=sum(counts),
                    sum=total,
                    bucket_counts=counts,
                    explicit_bounds=self.bounds,
                    min=low,
                    max=high,
                )
                for key, (counts, total, low, high) in self.snapshot.items()
            ]
            object.__setattr__(self, "_points", points)
        return points
