"""Anomaly detectors on a stream of values (pure: value in, "anomalous now?" out).

Each detector keeps O(window) state and does O(1) work per value. Anomalous values are not
added to the rolling statistics, so one spike does not widen the band that detects the next.

``RollingStats``, ``SpikeDetector``, ``PlateauDetector`` and ``ExplosionDetector`` are the C twins
of the ``Py*`` classes here (``otel_ml/_cdetectors.c``: the anomaly monitor runs them once per
logged loss, KL and grad norm, on the scrape thread), or those Python classes themselves without
the build or with ``OTEL_ML_PURE_PYTHON=1`` (:data:`DETECTORS_C` says which). Both give the same
verdicts from the same float operations; the Python classes are the reference.

Example::

    spike = SpikeDetector(window=100, zscore=6.0, min_rise=0.5)
    [spike.observe(v) for v in [1.0] * 50 + [9.0]][-1]  # True
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from otel_ml._cbuild import extension, stale_build


class PyRollingStats:
    """Mean and standard deviation of the last ``window`` values (running sums, O(1) per value).

    Example::

        s = PyRollingStats(3); [s.add(v) for v in (1, 2, 3, 4)]; s.mean  # 3.0
    """

    __slots__ = ("_sum", "_sumsq", "_values", "_window")

    def __init__(self, window: int) -> None:
        self._values: deque[float] = deque()
        self._window = max(1, window)
        self._sum = 0.0
        self._sumsq = 0.0

    def add(self, value: float) -> None:
        values = self._values
        if len(values) >= self._window:
            old = values.popleft()
            self._sum += value - old
            self._sumsq += value * value - old * old
        else:
            self._sum += value
            self._sumsq += value * value
        values.append(value)

    def add_and_mean(self, value: float) -> float:
        """:meth:`add`, then the new mean (one call: the plateau check's hot path)."""
        self.add(value)
        return self._sum / len(self._values)

    def check_and_add(self, value: float, zscore: float, warmup: int, min_rise: float) -> bool:
        """True when ``value`` is above ``mean + zscore * std`` of the window and ``min_rise``
        (relative) above its mean, once the window holds ``warmup`` values (``zscore`` 0: never);
        else ``value`` joins the window. One call per value: the spike checks' hot path."""
        values = self._values
        n = len(values)
        if zscore > 0 and n >= warmup and n:
            total = self._sum
            mean = total / n
            variance = (self._sumsq - total * total / n) / (n - 1) if n > 1 else 0.0
            limit = mean + zscore * math.sqrt(variance) if variance > 0.0 else mean
            if value > limit and value - mean > min_rise * abs(mean):
                return True
        self.add(value)
        return False

    def __len__(self) -> int:
        return len(self._values)

    @property
    def mean(self) -> float:
        n = len(self._values)
        return self._sum / n if n else math.nan

    @property
    def std(self) -> float:
        n = len(self._values)
        if n < 2:
            return 0.0
        variance = (self._sumsq - self._sum * self._sum / n) / (n - 1)
        return math.sqrt(variance) if variance > 0.0 else 0.0


class PySpikeDetector:
    """A value is a spike when above ``maximum`` (if set), or, after ``warmup`` values, above
    ``mean + zscore * std`` of the window and at least ``min_rise`` (relative) above the mean.

    Example::

        PySpikeDetector(zscore=4.0).observe(1.0)  # False
    """

    def __init__(
        self,
        window: int = 100,
        zscore: float = 6.0,
        min_rise: float = 0.5,
        warmup: int = 20,
        maximum: float = 0.0,
    ) -> None:
        self.stats = PyRollingStats(window)
        self.zscore = zscore
        self.min_rise = min_rise
        self.warmup = warmup
        self.maximum = maximum

    def observe(self, value: float) -> bool:
        if self.maximum > 0 and value > self.maximum:
            return True
        return self.stats.check_and_add(value, self.zscore, self.warmup, self.min_rise)


class PyPlateauDetector:
    """No improvement of the rolling mean by more than ``tolerance`` (relative) for ``patience`` values.

    The rolling mean (over ``smoothing`` values) keeps noise from resetting the clock.

    Example::

        p = PyPlateauDetector(patience=3, smoothing=1)
        [p.observe(v) for v in (5, 4, 4, 4, 4)]  # [False, False, False, False, True]
    """

    def __init__(self, patience: int = 1000, tolerance: float = 0.01, smoothing: int = 50) -> None:
        self.patience = patience
        self.tolerance = tolerance
        self.stats = PyRollingStats(smoothing)
        self.best = math.inf
        self.since = 0

    def observe(self, value: float) -> bool:
        if self.patience <= 0:
            return False
        level = self.stats.add_and_mean(value)
        if level < self.best - self.tolerance * abs(self.best) or math.isinf(self.best):
            self.best = level
            self.since = 0
            return False
        self.since += 1
        return self.since >= self.patience


class PyExplosionDetector:
    """Above ``maximum`` (if set), or above ``factor`` times the rolling mean after ``warmup`` values.

    Example::

        e = PyExplosionDetector(factor=10.0, warmup=3)
        [e.observe(v) for v in (1, 1, 1, 50)][-1]  # True
    """

    def __init__(
        self, factor: float = 10.0, maximum: float = 0.0, window: int = 100, warmup: int = 20
    ) -> None:
        self.factor = factor
        self.maximum = maximum
        self.warmup = warmup
        self.stats = PyRollingStats(window)

    def observe(self, value: float) -> bool:
        if self.maximum > 0 and value > self.maximum:
            return True
        if self.factor > 0 and len(self.stats) >= self.warmup and value > self.factor * self.stats.mean:
            return True
        self.stats.add(value)
        return False


#: The contract of ``otel_ml._cdetectors`` this module uses (``DETECTORS`` in ``_cdetectors.c``).
DETECTORS = 1


def _load_c() -> Any:
    """The C twins, unless disabled (``OTEL_ML_PURE_PYTHON=1``), not built or a stale build (see
    :mod:`otel_ml._cbuild`: a warning, or ImportError under ``OTEL_ML_REQUIRE_C=1``)."""
    _cdetectors = extension("otel_ml._cdetectors")
    if _cdetectors is None:
        return None
    version = getattr(_cdetectors, "DETECTORS", None)
    if version == DETECTORS:
        return _cdetectors
    message = f"otel_ml._cdetectors is a stale build (contract {version}, this otel_ml needs {DETECTORS})"
    return stale_build(message + "; rebuild it (pip install -e .)", "using the Python detectors")


#: ``otel_ml._cdetectors`` when the detectors run in C, None for the Python classes.
DETECTORS_C: Any = _load_c()
RollingStats: Any = DETECTORS_C.RollingStats if DETECTORS_C else PyRollingStats
SpikeDetector: Any = DETECTORS_C.SpikeDetector if DETECTORS_C else PySpikeDetector
PlateauDetector: Any = DETECTORS_C.PlateauDetector if DETECTORS_C else PyPlateauDetector
ExplosionDetector: Any = DETECTORS_C.ExplosionDetector if DETECTORS_C else PyExplosionDetector


class DriftDetector:
    """A distribution's per-step ``(mean, std)`` drifts when, after ``warmup`` steps, either

    * the **mean leaves its band**: farther than ``zscore`` standard deviations of the last
      ``window`` means from their average, and farther than ``min_shift`` times their median
      spread (so a run whose means barely vary is not flagged for noise), or
    * the **spread collapses**: ``std`` below ``spread_fraction`` of the median ``std`` of the
      last ``window`` steps (every sample scored alike: mode collapse, a constant reward).

    ``zscore=0`` or ``spread_fraction=0`` turns that half off. Drifted steps stay out of the
    history, so a collapse that persists stays flagged; :attr:`reason` says what was seen.

    Example::

        d = DriftDetector(window=50, warmup=10)
        [d.observe(1.0 + 0.1 * (i % 3), 1.0) for i in range(30)]
        d.observe(1.0, 0.01), d.reason   # (True, 'spread 0.01 below 0.1 x its median 1')
    """

    def __init__(
        self,
        window: int = 100,
        zscore: float = 6.0,
        spread_fraction: float = 0.1,
        warmup: int = 20,
        min_shift: float = 0.5,
    ) -> None:
        self.means = RollingStats(window)
        self.zscore = zscore
        self.spread_fraction = spread_fraction
        self.warmup = min(warmup, window)
        self.min_shift = min_shift
        self._stds: deque[float] = deque(maxlen=window)
        self.reason = ""

    def median_std(self) -> float:
        ordered = sorted(self._stds)
        n = len(ordered)
        if n == 0:
            return math.nan
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2

    def observe(self, mean: float, std: float) -> bool:
        self.reason = ""
        if not (math.isfinite(mean) and math.isfinite(std)):
            return False
        if len(self.means) >= self.warmup:
            spread = self.median_std()
            if self.spread_fraction > 0 and spread > 0 and std < self.spread_fraction * spread:
                self.reason = f"spread {std:.3g} below {self.spread_fraction:g} x its median {spread:.3g}"
                return True
            centre = self.means.mean
            band = max(self.zscore * self.means.std, self.min_shift * spread, 1e-12 * abs(centre))
            if self.zscore > 0 and abs(mean - centre) > band:
                self.reason = f"mean {mean:.6g} left its band {centre:.6g} +- {band:.3g}"
                return True
        self.means.add(mean)
        self._stds.append(std)
        return False
