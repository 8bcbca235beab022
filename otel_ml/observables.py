"""Observable gauges and counters that otel_ml's own readers collect without the SDK's machinery.

Every otel_ml instrument is observable: a callback returns the current values at collection
time. Through the OTel SDK each collection turns every observation into a ``Measurement``,
cleans and hashes its attributes, feeds it to a per-series aggregation and copies it back out:
about 1 ms for otel_ml's ~30 instruments, two thirds of the cost of one ``/metrics`` scrape
(``benchmarks/bench_overhead.py``). :class:`ObservableMeter` is a meter whose observable
instruments are registered with the :class:`otel_ml.collection.Collection` instead: at each
collection the callbacks run once and their observations become OTel ``Metric`` data directly
(a gauge, or a cumulative monotonic sum for a counter), in the ``otel_ml`` scope of the same
collected data that OTLP and files read (``/metrics`` encodes the observations themselves, see
:mod:`otel_ml.exporters.exposition`). Everything else (synchronous
instruments, the ``Meter`` API) goes to the SDK meter it wraps.

Only otel_ml's readers run a :class:`~otel_ml.collection.Collection`; a plain SDK reader handed
to :class:`otel_ml.Telemetry` (``metric_readers=``) would not see these, so the runtime uses the
SDK meter itself whenever such a reader is present.

Example::

    meter = ObservableMeter(provider.get_meter("otel_ml"), collection)
    meter.create_observable_gauge("otel_ml_step", [lambda _: [Observation(3, {"rank": "0"})]])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Metric,
    NumberDataPoint,
    Sum,
)

from otel_ml._logging import warn_once

Callback = Callable[[CallbackOptions], Iterable[Observation]]

_OPTIONS = CallbackOptions()


class Observable:
    """One observable instrument: its callbacks become one ``Metric`` per collection."""

    __slots__ = ("callbacks", "description", "monotonic", "name", "start_ns", "unit")

    def __init__(
        self, name: str, callbacks: Sequence[Callback], unit: str, description: str, monotonic: bool
    ) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.callbacks = tuple(callbacks)
        self.monotonic = monotonic
        self.start_ns = time.time_ns()

    def observations(self) -> Iterable[Observation]:
        """Every observation of this collection's callbacks, in order; a failing callback is
        logged once and the observations it gave before failing are kept.

        A lone callback that returns a list or a tuple (otel_ml's own do) is handed back as it
        is: no generator per instrument and scrape, where each one costs more than the work
        of a short callback."""
        if len(self.callbacks) == 1:
            try:
                result = self.callbacks[0](_OPTIONS)
            except Exception as exc:  # noqa: BLE001 - one broken callback must not break collection
                self._failed(exc)
                return ()
            if type(result) in (list, tuple):
                return result
            return self._drain(result)
        return self._all()

    def _drain(self, result: Iterable[Observation]) -> Iterator[Observation]:
        try:
            yield from result
        except Exception as exc:  # noqa: BLE001 - one broken callback must not break collection
            self._failed(exc)

    def _all(self) -> Iterator[Observation]:
        for callback in self.callbacks:
            try:
                yield from callback(_OPTIONS)
            except Exception as exc:  # noqa: BLE001 - one broken callback must not break collection
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        warn_once(f"observable:{self.name}", "otel_ml: callback of %s failed: %r", self.name, exc)

    def collect(self, now_ns: int) -> Metric | None:
        """This collection's metric, or None when the callbacks observed nothing."""
        by_series: dict[Any, NumberDataPoint] = {}
        start = self.start_ns if self.monotonic else 0
        for obs in self.observations():
            attributes = obs.attributes or {}
            try:  # one point per attribute set, the last observation winning, as in the SDK
                key = frozenset(attributes.items())
            except TypeError as exc:  # an unhashable attribute value: the SDK refuses it too
                warn_once(f"observable:{self.name}", "otel_ml: callback of %s failed: %r", self.name, exc)
                continue
            by_series[key] = NumberDataPoint(attributes, start, now_ns, obs.value)
        if not by_series:
            return None
        points = list(by_series.values())
        if self.monotonic:
            data: Any = Sum(points, AggregationTemporality.CUMULATIVE, True)
        else:
            data = Gauge(points)
        return Metric(name=self.name, description=self.description, unit=self.unit, data=data)


class ObservableMeter:
    """A meter whose observable gauges and counters a :class:`~otel_ml.collection.Collection`
    collects directly (see module docstring); every other call goes to ``meter``.

    Example::

        meter = ObservableMeter(pipeline.meter, collection)
        meter.create_observable_counter("otel_ml_samples", [observe_samples], "{sample}", "Samples")
    """

    def __init__(self, meter: Meter, collection: Any) -> None:
        self._meter = meter
        self._collection = collection

    def create_observable_gauge(
        self, name: str, callbacks: Sequence[Callback] | None = None, unit: str = "", description: str = ""
    ) -> Observable:
        return self._register(name, callbacks, unit, description, monotonic=False)

    def create_observable_counter(
        self, name: str, callbacks: Sequence[Callback] | None = None, unit: str = "", description: str = ""
    ) -> Observable:
        return self._register(name, callbacks, unit, description, monotonic=True)

    def _register(
        self, name: str, callbacks: Sequence[Callback] | None, unit: str, description: str, monotonic: bool
    ) -> Observable:
        instrument = Observable(name, callbacks or (), unit, description, monotonic)
        self._collection.add_observable(instrument)
        return instrument

    def __getattr__(self, name: str) -> Any:
        return getattr(self._meter, name)
