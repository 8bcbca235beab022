"""What every integration does the same way: start otel_ml, log without raising, progress, timers.

Example::

    ensure_started()
    anomaly = log_values(step, {"loss": 0.3})     # an Anomaly when stop_on asked to stop, else None
    progress = StepProgress(total=1000); progress.update(10)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import otel_ml
from otel_ml._logging import logger
from otel_ml.anomaly import Anomaly, AnomalyError
from otel_ml.runtime import Telemetry


def missing(framework: str, extra: str) -> ImportError:
    """The ImportError an integration raises when its framework is not installed."""
    return ImportError(
        f"otel_ml.integrations.{extra} needs {framework}: pip install 'otel-ml[{extra}]' (or {framework})"
    )


def ensure_started(options: Mapping[str, Any] | None = None) -> Telemetry | None:
    """The running telemetry; ``otel_ml.init(**options)`` first when the user has not called it."""
    telemetry = otel_ml.get_telemetry()
    if telemetry is None or telemetry.closed:
        telemetry = otel_ml.init(**dict(options or {}))
    return telemetry


def log_values(step: Any, values: Mapping[str, Any]) -> Anomaly | None:
    """``otel_ml.log(step, **values)``; with ``stop_on``, the anomaly that asks to stop is returned
    instead of raised (the values are still logged), so a framework can stop its own loop."""
    try:
        otel_ml.log(step, **values)
    except AnomalyError as err:
        otel_ml.log(step, **values)  # log() raised before storing them
        logger.warning("otel_ml: stopping training (stop_on): %s", err.anomaly.message)
        return err.anomaly
    return None


def multi_rank() -> bool:
    """True inside an initialised ``torch.distributed`` job of more than one rank."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size() > 1


def stop_together(every: int) -> bool:
    """In a multi-rank job, :func:`otel_ml.agree_stop` every ``every`` calls, so that all ranks stop
    at the same step (one tiny all-reduce each time); on one process False: there ``stop_on``'s
    local flag (:func:`log_values`) stops the loop at once."""
    return every > 0 and multi_rank() and otel_ml.agree_stop(every=every)


class _NullWriter:
    """Where the integrations' bars print: nowhere (the framework shows its own bar)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


class StepProgress:
    """An exported, silent ``otel_ml.tqdm`` that follows a framework's step counter.

    Example::

        progress = StepProgress(total=state.max_steps, initial=state.global_step)
        progress.update(state.global_step)
        progress.close()
    """

    def __init__(
        self, total: float | None, initial: int = 0, desc: str = "train", unit: str = "step"
    ) -> None:
        self.bar = otel_ml.tqdm(
            total=total if total and total > 0 else None,
            initial=initial,
            desc=desc,
            unit=unit,
            file=_NullWriter(),
            mininterval=0.5,
            dynamic_ncols=False,
        )

    def update(self, n: float, total: float | None = None) -> None:
        """Move the bar to ``n`` done (and ``total`` when it became known)."""
        bar = self.bar
        if total is not None and total > 0 and total != bar.total:
            bar.total = total
        if n > bar.n:
            bar.update(n - bar.n)

    def close(self) -> None:
        self.bar.close()


class TrackerProgress:
    """The step bar of a tracker backend: opened on the first logged step, closed by ``finish``.

    Example::

        progress = TrackerProgress(total=100); progress.advance(step=1); progress.finish()
    """

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self._bar: StepProgress | None = None

    def advance(self, step: int) -> None:
        if self._bar is None:
            self._bar = StepProgress(self.total)
        self._bar.update(step, self.total)

    def finish(self) -> None:
        """Close the bar (a later step opens a new one) and flush otel_ml's exporters."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        otel_ml.flush()


class Mark:
    """The time of the last hook, so that the gap to the next one can be recorded as a region.

    Example::

        mark = Mark(); ...; otel_ml.regions.record("data", mark.take())
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.at: float | None = None

    def set(self) -> None:
        self.at = self._clock()

    def take(self) -> float | None:
        """Seconds since the mark (None without one), and a new mark now."""
        now = self._clock()
        since, self.at = (None if self.at is None else now - self.at), now
        return since
