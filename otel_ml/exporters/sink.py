"""The push-destination interface: what ``Telemetry(sinks=[...])`` accepts besides OTLP and files.

Example::

    class Printer:
        name = "printer"

        def export_metrics(self, data) -> bool:
            print(data.to_json()); return True

        def export_spans(self, spans) -> bool:
            return True

        def close(self, timeout: float) -> None:
            pass

    otel_ml.Telemetry(otel_ml.Config.resolve(), sinks=[Printer()])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Sink(Protocol):
    """A push destination, exported to from its own thread (:class:`otel_ml.exporters._worker.SinkWorker`).

    ``export_metrics`` gets an OTel ``MetricsData`` every export interval, ``export_spans`` a
    batch of ``ReadableSpan``; each returns True when the export succeeded (a False or an
    exception is counted in ``otel_ml_export_errors_total{exporter=name}`` and logged once per
    outage). ``close`` is called once at shutdown with the seconds left.

    Example::

        sink: Sink = FileSink(run_dir, rank=0)
    """

    name: str

    def export_metrics(self, data: Any) -> bool: ...

    def export_spans(self, spans: Sequence[Any]) -> bool: ...

    def close(self, timeout: float) -> None: ...
