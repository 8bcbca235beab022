"""Distributions passed to ``log()`` as OTel data: a histogram per key and the last one's gauges.

``log(step, reward=values)`` with a list, numpy array or tensor of other than one element lands
in :meth:`DistributionMetrics.ingest`. Lists, arrays and CPU tensors are summarised at once (the
pure :mod:`otel_ml.distribution`, or torch ops for a tensor); a CUDA tensor is reduced on its
own device and its few summary numbers copied to pinned memory behind an event
(:mod:`otel_ml.tensor_summary`), read by :meth:`DistributionMetrics.refresh` on the export thread
once the GPU got there, so the training thread never waits. NaN/Inf elements are excluded and
handed to ``count_nonfinite(key, n)`` (``otel_ml_nonfinite_total{metric=key}``).

Each summary is added to ``otel_ml_distribution{metric=key}`` (a histogram otel_ml aggregates
itself, :meth:`DistributionMetrics.metrics`), kept for the ``otel_ml_distribution_last_*``
gauges, and appended as ``(step, key, mean, std)`` to ``observations`` (the drift detector's
input, :class:`otel_ml.anomaly.AnomalyMonitor`).

Example::

    dist = DistributionMetrics(meter, {"rank": "0", "run_id": "r"}, count_nonfinite=print)
    dist.ingest(3, "reward", [0.5, 1.0, float("nan")])   # prints: reward 1
    dist.refresh()                                       # CUDA summaries, on the export thread
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import Histogram, Metric

from otel_ml import names, semconv
from otel_ml._logging import warn_once
from otel_ml.distribution import (
    DEFAULT_BUCKETS,
    Summary,
    from_reduction,
    host_values,
    numpy_array,
    summarize,
    summarize_array,
)
from otel_ml.health import TelemetryHealth
from otel_ml.histogram import LabeledHistograms
from otel_ml.tensor_summary import bounds_on, check_tensor, defer_cuda, summarize_cpu, working_dtype
from otel_ml.values import DeferredReads, UnusableValueError, tensor_type

#: CUDA distributions waiting for their GPU at most; older ones are dropped and counted.
MAX_PENDING = 1024
#: Bucket-bound tensors kept per (key, device, dtype): one per key on each device it was logged from.
MAX_BOUNDS = 1024
#: CPU tensors and numpy arrays up to this size are summarised in Python (about 15 µs for 8 elements against
#: about 85 µs of torch ops); larger ones by torch or numpy ops (6 ms for 100,000 elements with
#: torch, against 70 ms in Python).
SMALL = 128


class DistributionMetrics:
    """Summaries of logged distributions and their instruments (see module docstring).

    ``buckets`` maps a key to its histogram bounds (:data:`DEFAULT_BUCKETS` for the others);
    ``cuda``/``cudart`` are ``torch.cuda`` (or the tests' stand-in) and the CUDA runtime for
    :class:`otel_ml.gpu.DeviceCalls`.

    Example::

        dist = DistributionMetrics(meter, attrs, buckets={"score": (1.0, 5.0, 10.0)})
        dist.ingest(0, "score", torch.tensor([6.8, 7.9]))
        dist.last("score").mean   # 7.35
    """

    def __init__(
        self,
        meter: Meter,
        attributes: Mapping[str, str],
        *,
        buckets: Mapping[str, tuple[float, ...]] | None = None,
        count_nonfinite: Callable[[str, int], None] | None = None,
        observations: deque | None = None,
        health: TelemetryHealth | None = None,
        cuda: Any | None = None,
        cudart: Any | None = None,
    ) -> None:
        self._attrs = dict(attributes)
        self._buckets = dict(buckets or {})
        self._count_nonfinite = count_nonfinite or (lambda key, n: None)
        self.observations: deque = observations if observations is not None else deque(maxlen=1)
        self._health = health or TelemetryHealth()
        self._cuda = cuda
        self._lock = threading.Lock()
        self._last: dict[str, Summary] = {}
        self._hists: dict[str, LabeledHistograms] = {}
        self._bounds: dict[tuple[str, str, Any], Any] = {}  # (key, device, dtype) -> bounds tensor
        self._pending = DeferredReads(MAX_PENDING, self._health, cudart)
        fields = ("count", "mean", "minimum", "maximum", "std")
        for spec, field in zip(semconv.DISTRIBUTION_GAUGES, fields, strict=True):
            meter.create_observable_gauge(spec.name, [self._observe(field)], spec.unit, spec.description)

    # ------------------------------------------------------------------ training thread
    def ingest(self, step: int, key: str, value: Any) -> None:
        """One logged distribution; never raises (an unusable one is warned once and counted)."""
        try:
            tensor_cls = tensor_type()
            if tensor_cls is not None and isinstance(value, tensor_cls):
                self._ingest_tensor(step, key, value)
                return
            array = numpy_array(value)
            if array is not None and array.size > SMALL:
                summary = summarize_array(array, self.bounds(key))
            else:
                summary = summarize(host_values(value), self.bounds(key))
        except Exception as exc:  # noqa: BLE001 - UnusableValueError, a CUDA error, exotic objects
            warn_once(f"value:{key}", "otel_ml: log() dropped distribution %r: %s", key, exc)
            self._health.dropped("values")
            return
        self._add(step, key, summary)

    def _ingest_tensor(self, step: int, key: str, tensor: Any) -> None:
        check_tensor(tensor)
        elements = tensor.numel()  # metadata: no sync
        if elements == 0:
            self._add(step, key, summarize([], self.bounds(key)))
            return
        if tensor.is_cpu:
            if elements <= SMALL:
                summary = summarize(host_values(tensor), self.bounds(key))
            else:
                summary = summarize_cpu(tensor, self._bounds_for(key, tensor))
            self._add(step, key, summary)
            return
        if not tensor.is_cuda:
            raise UnusableValueError(f"{tensor.device} tensor: distributions are read on CPU or CUDA")
        cuda = self._cuda if self._cuda is not None else sys.modules["torch"].cuda
        deferred = defer_cuda(tensor, lambda t: self._bounds_for(key, t), cuda)
        self._pending.push(step, key, deferred, elements)

    def _bounds_for(self, key: str, like: Any) -> Any:
        dtype = working_dtype(like)
        slot = (key, str(like.device), dtype)
        bounds = self._bounds.get(slot)
        if bounds is None:
            bounds = bounds_on(like, self.bounds(key), dtype)
            if len(self._bounds) < MAX_BOUNDS:
                self._bounds[slot] = bounds
        return bounds

    def bounds(self, key: str) -> tuple[float, ...]:
        """The histogram bounds of ``key``."""
        return self._buckets.get(key, DEFAULT_BUCKETS)

    # ------------------------------------------------------------------ any thread
    def _add(self, step: int, key: str, summary: Summary) -> None:
        if summary.nonfinite:
            self._count_nonfinite(key, summary.nonfinite)
        if summary.count == 0:
            if not summary.nonfinite:  # nothing to keep: dropped and counted like a bad value
                warn_once(f"value:{key}", "otel_ml: log() dropped %r: empty at step %s", key, step)
                self._health.dropped("values")
            return
        with self._lock:
            hist = self._hists.get(key)
            if hist is None:
                hist = self._hists[key] = LabeledHistograms(self.bounds(key))
            self._last[key] = summary
        hist.add(
            (names.label_value(key),), summary.bucket_counts, summary.total, summary.minimum, summary.maximum
        )
        self.observations.append((step, key, summary.mean, summary.std))

    def last(self, key: str) -> Summary | None:
        """The last summary of ``key`` that had a finite element (None if none yet)."""
        return self._last.get(key)

    # ------------------------------------------------------------------ export thread
    def refresh(self) -> None:
        """Read the CUDA summaries whose GPU work is done, oldest first (export thread)."""
        self._pending.drain(self._deliver)

    def _deliver(self, step: int, key: str, deferred: Any, elements: int) -> None:
        self._add(step, key, from_reduction(deferred.values(), elements))

    def metrics(self) -> list[Metric]:
        """``otel_ml_distribution`` with one point per key (a source of the collection)."""
        spec, points, merged = semconv.DISTRIBUTION, [], None
        with self._lock:
            hists = list(self._hists.values())
        for hist in hists:
            one = hist.to_metric(spec.name, spec.unit, spec.description, spec.labels, self._attrs)
            if one is not None:
                points.extend(one.data.data_points)
                merged = one
        if merged is None:
            return []
        data = Histogram(data_points=points, aggregation_temporality=merged.data.aggregation_temporality)
        return [Metric(name=spec.name, description=spec.description, unit=spec.unit, data=data)]

    def _observe(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            label = semconv.LABEL_METRIC
            with self._lock:
                items = list(self._last.items())
            return [
                Observation(getattr(s, field), {**self._attrs, label: names.label_value(k)}) for k, s in items
            ]

        return callback
