"""Step spans built after the fact, off the training thread, with their original timestamps.

Creating an OTel span costs tens of microseconds, so the training thread only records the
bounds of steps chosen for tracing (:class:`otel_ml.training.StepRecord`); the export thread turns
them into real spans here. Each traced step is the root of its own trace.

Example::

    emitter = StepSpanEmitter(tracer, {"otel_ml.rank": 0, "otel_ml.run_id": "r1"})
    emitter.emit(training.step_records)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import Tracer

from otel_ml import semconv
from otel_ml.training import StepRecord


class StepSpanEmitter:
    """Turns queued :class:`StepRecord` objects into ``otel_ml.step`` spans.

    Example::

        StepSpanEmitter(tracer, {}).emit(deque([StepRecord(10, t0, t1, {"loss": 0.5})]))
    """

    def __init__(self, tracer: Tracer, attributes: Mapping[str, Any]) -> None:
        self._tracer = tracer
        self._attributes = dict(attributes)

    def emit(self, records: deque[StepRecord]) -> int:
        """Create and end a span for every queued record; returns how many were emitted."""
        emitted = 0
        while records:
            record = records.popleft()
            attributes = dict(self._attributes)
            attributes[semconv.ATTR_STEP] = record.step
            for key, value in record.values.items():
                if value.__class__ in (float, int) and value == value:
                    attributes[semconv.ATTR_VALUE_PREFIX + str(key)] = value
            span = self._tracer.start_span(
                semconv.SPAN_STEP, start_time=record.start_ns, attributes=attributes
            )
            span.end(end_time=record.end_ns)
            emitted += 1
        return emitted
