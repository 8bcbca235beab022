"""The ``otel_ml_progress_*`` gauges: the board's snapshot rows as OTel observations.

:meth:`ProgressGauges.prepare` takes one snapshot of the board before each collection (the
runtime's prepare hook calls it); the six gauges all read that snapshot, so they agree with one
another whatever order the SDK calls them in.

Example::

    gauges = ProgressGauges(meter, {"rank": "0", "run_id": "r"}, board)
    gauges.prepare()      # before each collection
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.metrics import Meter, Observation

from otel_ml import semconv
from otel_ml.progress.board import BarSnapshot, ProgressBoard


class ProgressGauges:
    """The six progress gauges of one process, read from ``board`` (see module docstring).

    Example::

        gauges = ProgressGauges(provider.get_meter("t"), {"rank": "0", "run_id": "r"}, ProgressBoard())
        gauges.prepare()
    """

    def __init__(self, meter: Meter, attributes: Mapping[str, str], board: ProgressBoard) -> None:
        self._board = board
        self._attrs = dict(attributes)
        self._rows: list[BarSnapshot] = []
        for spec, field in (
            (semconv.PROGRESS_COMPLETED, "completed"),
            (semconv.PROGRESS_TOTAL, "total"),
            (semconv.PROGRESS_RATE, "rate"),
            (semconv.PROGRESS_ETA, "eta"),
            (semconv.PROGRESS_ELAPSED, "elapsed"),
        ):
            meter.create_observable_gauge(
                spec.name, [self._rows_callback(field)], spec.unit, spec.description
            )
        spec = semconv.PROGRESS_ACTIVE
        meter.create_observable_gauge(spec.name, [self._active], spec.unit, spec.description)

    def prepare(self) -> None:
        """Take the snapshot the gauges of the coming collection read."""
        self._rows = self._board.snapshot()

    def _rows_callback(self, field: str) -> Any:
        attrs = self._attrs

        def callback(_: Any) -> list[Observation]:
            out = []
            for row in self._rows:
                value = getattr(row, field)
                if value is not None:
                    labels = {**attrs, semconv.LABEL_TASK: row.task, semconv.LABEL_UNIT: row.unit}
                    labels[semconv.LABEL_PARENT] = row.parent
                    out.append(Observation(value, labels))
            return out

        return callback

    def _active(self, _: Any) -> list[Observation]:
        return [
            Observation(flag, {**self._attrs, semconv.LABEL_TASK: task})
            for task, flag in self._board.active_tasks()
        ]
