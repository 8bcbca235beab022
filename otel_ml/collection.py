"""One collection, as every otel_ml reader runs it: prepare hooks, the SDK's callbacks, own metrics.

A collection happens on a scrape (``/metrics``) and on the pump's push interval (OTLP, files).
Each runs, in this order:

1. every **prepare hook**, once, before the SDK collects: work the observable callbacks rely on,
   such as resolving deferred device values of ``log()`` or taking the progress snapshot that
   all six progress gauges read. Nothing depends on the order in which the SDK calls callbacks;
2. the OTel SDK's own collection (observable callbacks and synchronous instruments);
3. every **metric source**: finished OTel ``Metric`` objects that otel_ml aggregates itself
   (region and step-duration histograms, see :mod:`otel_ml.histogram`), and every
   **observable** registered through :class:`otel_ml.observables.ObservableMeter` (otel_ml's
   gauges and counters, whose callbacks run once here), placed in the ``otel_ml`` scope of the
   collected data so that Prometheus, OTLP and files all see them.

Components register with the :class:`Collection` handed to their constructor, as OTel
instruments register with the meter they are given. A failing hook or source is logged once and
skipped: it never breaks the collection.

Example::

    collection = Collection()
    reader = PullReader(collection)
    provider = MeterProvider(metric_readers=[reader])
    collection.register(prepare=resolve_pending, metrics=lambda: [histogram_metric])
    data = reader.read()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics.export import Metric, MetricReader, MetricsData, ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_ml import semconv
from otel_ml._logging import warn_once
from otel_ml._version import __version__

if TYPE_CHECKING:
    from otel_ml.observables import Observable

MetricSource = Callable[[], Iterable[Metric]]
PrepareHook = Callable[[], None]


class Collection:
    """The prepare hooks and metric sources that every collection of otel_ml's readers runs.

    Example::

        collection = Collection()
        collection.register(prepare=board_gauges.prepare)
        collection.register(metrics=aggregator.metrics)
    """

    def __init__(self, resource: Resource | None = None) -> None:
        #: The resource of the collected data when the SDK itself has nothing to report.
        self.resource = resource or Resource.get_empty()
        self._prepare: tuple[PrepareHook, ...] = ()
        self._sources: tuple[MetricSource, ...] = ()
        self._observables: tuple[Observable, ...] = ()
        self._scope = InstrumentationScope(semconv.SCOPE, __version__)
        self._lock = threading.Lock()

    def register(self, *, prepare: PrepareHook | None = None, metrics: MetricSource | None = None) -> None:
        """Add a hook that runs before each SDK collection and/or a source of finished metrics."""
        with self._lock:  # tuples: a collection in flight keeps iterating the ones it read
            if prepare is not None:
                self._prepare = (*self._prepare, prepare)
            if metrics is not None:
                self._sources = (*self._sources, metrics)

    def add_observable(self, instrument: Observable) -> None:
        """Collect ``instrument`` at every collection (:class:`otel_ml.observables.ObservableMeter`
        calls this); a second instrument with the same name is refused with a warning."""
        with self._lock:
            if any(o.name == instrument.name for o in self._observables):
                warn_once(
                    f"duplicate:{instrument.name}", "otel_ml: instrument %s exists; ignored", instrument.name
                )
                return
            self._observables = (*self._observables, instrument)

    def prepare(self) -> None:
        """Run every prepare hook once (the reader calls this right before the SDK collects)."""
        for hook in self._prepare:
            try:
                hook()
            except Exception as exc:  # noqa: BLE001 - a broken hook must not break collection
                warn_once(
                    f"prepare:{_name(hook)}", "otel_ml: collection hook %s failed: %r", _name(hook), exc
                )

    @property
    def observables(self) -> tuple[Observable, ...]:
        """The instruments :meth:`add_observable` registered, in registration order."""
        return self._observables

    @property
    def has_own_metrics(self) -> bool:
        """Whether any source or observable is registered (else :meth:`augment` adds nothing)."""
        return bool(self._sources or self._observables)

    def source_metrics(self) -> Iterator[Metric]:
        """The metrics of every source, in registration order (a failing source is logged once)."""
        for source in self._sources:
            try:
                metrics = list(source())
            except Exception as exc:  # noqa: BLE001 - a broken source must not break collection
                warn_once(
                    f"source:{_name(source)}", "otel_ml: metric source %s failed: %r", _name(source), exc
                )
                continue
            yield from (m for m in metrics if m is not None)

    def augment(self, data: MetricsData | None) -> MetricsData | None:
        """``data`` with the metrics of every source and observable added to its ``otel_ml`` scope
        (``data`` None: the SDK had nothing, and these alone make the collection)."""
        if not self._sources and not self._observables:
            return data
        extra: list[Metric] = []
        now = time.time_ns()
        for instrument in self._observables:
            metric = instrument.collect(now)
            if metric is not None:
                extra.append(metric)
        extra.extend(self.source_metrics())
        if not extra:
            return data
        if data is None or not data.resource_metrics:
            return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(self._scope, extra, "")], "")])
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for index, scope_metrics in enumerate(scopes):
            if scope_metrics.scope.name == semconv.SCOPE:
                scopes[index] = ScopeMetrics(
                    scope_metrics.scope, [*scope_metrics.metrics, *extra], scope_metrics.schema_url
                )
                break
        else:
            scopes.append(ScopeMetrics(self._scope, extra, ""))
        return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


class PullReader(MetricReader):
    """A reader that collects when asked: :meth:`read` runs one whole collection and returns it.

    The base of ``/metrics`` (:class:`otel_ml.exporters.exposition.ExpositionReader`) and of the
    pump's pushes. Reads are serialised, so two threads never interleave one reader's collection.

    Example::

        reader = PullReader(Collection())
        MeterProvider(metric_readers=[reader])
        data = reader.read()
    """

    def __init__(self, collection: Collection | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.collection = collection or Collection()
        self._data: MetricsData | None = None
        self._read_lock = threading.Lock()

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self._data = metrics_data

    def read(self) -> MetricsData | None:
        with self._read_lock:
            return self.collection.augment(self._read_sdk())

    def _read_sdk(self) -> MetricsData | None:
        """Run the prepare hooks and the SDK's collection; the SDK's data alone, or None when it had
        none (the caller holds the read lock and adds otel_ml's own metrics)."""
        self._data = None
        self.collection.prepare()
        self.collect()
        data, self._data = self._data, None
        return data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None
