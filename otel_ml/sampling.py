"""Which steps get full traces: every Nth step, and every step that is slow for this rank.

Tail sampling compares a step's duration with the median of the previous ``window`` steps of
the same rank; a step longer than ``factor`` times that median is traced, once at least
``min_steps`` steps have been seen. Pure: durations in, decision out, so tests use exact numbers.

Example::

    sampler = TraceSampler(every=100, factor=2.0)
    sampler.decide(step=7, duration=0.012)   # None, "every" or "slow"
"""

from __future__ import annotations

import statistics
from collections import deque

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
        self._recent: deque[float] = deque(maxlen=window)

    def median(self) -> float | None:
        return statistics.median(self._recent) if self._recent else None

    def decide(self, step: int | None, duration: float) -> str | None:
        """The reason to trace this step (``every`` or ``slow``), or None."""
        reason = None
        if self.every and step is not None and step % self.every == 0:
            reason = EVERY
        if self.factor > 0 and len(self._recent) >= self.min_steps:
            median = statistics.median(self._recent)
            if duration > self.factor * median:
                reason = SLOW
        self._recent.append(duration)
        return reason
