"""Counters about the telemetry itself: failed exports and dropped items.

These feed ``otel_ml_export_errors_total{exporter}`` and ``otel_ml_export_dropped_total{signal}``,
which the TelemetryExportFailing alert watches. Increments are rare (a failure, a full queue), so
a lock is fine; reads happen at collection time.

Example::

    health = TelemetryHealth()
    health.error("otlp")
    health.dropped("spans", 10)
    health.register(meter, {"rank": "0", "run_id": "r1"})
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_ml import semconv

#: Series that always exist (at 0) so that alerts can use increase() from the first failure.
EXPORTERS = ("otlp", "files", "prometheus")
SIGNALS = ("spans", "metrics", "values")


class TelemetryHealth:
    """Thread-safe error and drop counts, exported as two OTel observable counters.

    Example::

        health = TelemetryHealth()
        health.error("otlp")
        health.errors["otlp"]  # 1
    """

    def __init__(self, exporters: Iterable[str] = EXPORTERS) -> None:
        """``exporters``: those in use, whose error series start at 0 (one that is not configured
        cannot fail, and would only add a series to every rank)."""
        self._lock = threading.RLock()  # a SIGTERM flush may interrupt a holder on this thread
        self.errors: dict[str, int] = dict.fromkeys(exporters, 0)
        self.drops: dict[str, int] = dict.fromkeys(SIGNALS, 0)

    def error(self, exporter: str, count: int = 1) -> None:
        with self._lock:
            self.errors[exporter] = self.errors.get(exporter, 0) + count

    def dropped(self, signal: str, count: int = 1) -> None:
        with self._lock:
            self.drops[signal] = self.drops.get(signal, 0) + count

    def register(self, meter: Meter, attributes: Mapping[str, str]) -> None:
        """Create the two observable counters on ``meter``, labelled with ``attributes``."""

        labelled: dict[tuple[str, str], dict[str, str]] = {}  # few keys (exporters, signals): kept

        def observe(counts: dict[str, int], label: str) -> Iterable[Observation]:
            with self._lock:
                items = list(counts.items())
            out = []
            for key, n in items:
                attrs = labelled.get((label, key))
                if attrs is None:
                    attrs = labelled[(label, key)] = {**attributes, label: key}
                out.append(Observation(n, attrs))
            return out

        def errors(_: CallbackOptions) -> Iterable[Observation]:
            return observe(self.errors, semconv.LABEL_EXPORTER)

        def drops(_: CallbackOptions) -> Iterable[Observation]:
            return observe(self.drops, semconv.LABEL_SIGNAL)

        for spec, callback in ((semconv.EXPORT_ERRORS, errors), (semconv.EXPORT_DROPPED, drops)):
            meter.create_observable_counter(
                spec.name, callbacks=[callback], unit=spec.unit, description=spec.description
            )
