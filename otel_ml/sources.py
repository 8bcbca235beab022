"""What the per-rank views read, as protocols: the run status file (:mod:`otel_ml.status`) and the
``/progress`` document (:mod:`otel_ml.progress.payload`) take these through their constructors,
and the runtime hands them the real parts (training metrics, anomaly monitor, aggregator).

Example::

    def describe(training: TrainingState, anomalies: EpisodeSource) -> str:
        return f"step {training.step}, {len(anomalies.episodes())} episode(s)"
"""

from __future__ import annotations

from typing import Any, Protocol


class TrainingState(Protocol):
    """What ``log()`` last received (:class:`otel_ml.training.TrainingMetrics`)."""

    @property
    def step(self) -> int | None: ...

    def latest(self, key: str) -> float | None: ...


class EpisodeSource(Protocol):
    """Anomaly episodes, oldest first, as dicts (:meth:`otel_ml.anomaly.AnomalyMonitor.episodes`)."""

    def episodes(self) -> list[dict[str, Any]]: ...


class RegionTotals(Protocol):
    """Step timing (:class:`otel_ml.regions.aggregator.Aggregator`)."""

    steps: int
    step_time: float

    def self_totals(self) -> dict[str, float]: ...
