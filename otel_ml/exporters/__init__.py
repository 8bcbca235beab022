"""Destinations: Prometheus ``/metrics`` (pull), OTLP (push) and OTLP-JSON files (push).

:class:`Sink` is the interface of a push destination, for ``Telemetry(sinks=[...])``.

Example::

    from otel_ml.exporters import Sink
"""

from otel_ml.exporters.sink import Sink

__all__ = ["Sink"]
