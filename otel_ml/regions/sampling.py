"""Which steps get full traces: every Nth step, and every step that is slow for this rank.

Tail sampling compares a step's duration with the median of the previous ``window`` steps of
the same rank; a step longer than ``factor`` times that median is traced, once at least
``min_steps`` steps have been seen. Pure: durations in, decision out, so tests use exact numbers.

Example::

    sampler = TraceSampler(every=100, factor=2.0)
    sampler.decide(step=7, duration=0.012)   # None, "every" or "slow"
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

EVERY = "every"
SLOW = "slow"
#: Not decided here: a step the anomaly detectors flagged is traced whatever the sampler says.
ANOMALY = "anomaly"
#: Not decided here either: a step in which a region raised is always traced.
ERROR_REASON = "error"


class TraceSampler:
    """Decides per finished step whether to build its spans (see module docstring).

    Example::

        s = TraceSampler(every=10, factor=2.0, window=50, min_steps=5)
        [s.decide(i, 1.0) for i in range(5)] + [s.decide(5, 3.0)]  # [..., 'slow']
    """

    def __init__(self, every: int = 100, factor: float = 2.0, window: int = 100, min_steps: int = 10) -> None:
        self.every = every
        self.factor = factor
        self.min_steps = min_steps
        self._window = max(1, window)
        self._recent: deque[float] = deque()  # arrival order, to know which value leaves
        self._sorted: list[float] = []  # the same values, sorted: the median is an index away

    def median(self) -> float | None:
        """The median of the recent steps' durations (None before the first step)."""
        ordered, n = self._sorted, len(self._sorted)
        if not n:
            return None
        mid = n // 2
        return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def decide(self, step: int | None, duration: float) -> str | None:
        """The reason to trace this step (``every`` or ``slow``), or None."""
        reason = None
        if self.every and step is not None and step % self.every == 0:
            reason = EVERY
        if self.factor > 0 and len(self._recent) >= self.min_steps:
            median = self.median()
            if median is not None and duration > self.factor * median:
                reason = SLOW
        self._recent.append(duration)
        bisect.insort(self._sorted, duration)
        if len(self._recent) > self._window:
            del self._sorted[bisect.bisect_left(self._sorted, self._recent.popleft())]
        return reason


#: Flagged steps kept at most (the oldest go first): a flag only matters until its step closes.
MAX_FLAGGED_STEPS = 1000


class StepFlags:
    """Steps that must be traced whatever the sampler says, each with the events for its root span.

    The anomaly detectors flag a step (:meth:`flag`); the aggregator takes the flags of each step
    it closes (:meth:`pop`). Both sides are handed the same object, so neither holds the other.

    Example::

        flags = StepFlags()
        flags.flag(37, semconv.EVENT_ANOMALY, {semconv.ATTR_ANOMALY_TYPE: "nonfinite"})
        flags.pop(37)   # [('otel_ml.anomaly', {...})]
    """

    def __init__(self, limit: int = MAX_FLAGGED_STEPS) -> None:
        self._limit = limit
        self._flags: dict[int | None, list[tuple[str, dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def flag(self, step: int | None, name: str, attributes: Mapping[str, Any]) -> None:
        """Trace ``step`` with an event ``name`` carrying ``attributes`` on its root span."""
        with self._lock:
            if len(self._flags) > self._limit:
                self._flags.pop(next(iter(self._flags)))
            self._flags.setdefault(step, []).append((name, dict(attributes)))

    def pop(self, step: int | None) -> list[tuple[str, dict[str, Any]]] | None:
        """The events flagged for ``step`` (None when it was not flagged), forgetting them."""
        if not self._flags:  # almost every step: no lock (flags of a step come before it closes)
            return None
        with self._lock:
            return self._flags.pop(step, None)
