"""In-process anomaly detection: NaN/Inf, KL and loss spikes, loss plateaus, exploding gradients, stalls.

``log()`` only appends the values of watched keys (``loss``, ``grad_norm``, ``kl``) to a queue,
and each logged distribution's mean and standard deviation to another (``drift_keys``, off by
default: the ``distribution_drift`` check of :class:`otel_ml.detectors.DriftDetector`);
:class:`AnomalyMonitor` runs the detectors on the export thread (every pump tick and before
each collection), on values already read for export, so nothing forces a GPU sync. Each
anomaly *episode* (from the first anomalous value to the first normal one) increments
``otel_ml_anomalies_total{type}``, holds ``otel_ml_anomaly_active{type}`` at 1, forces a trace of
that step with an ``otel_ml.anomaly`` event on its root span, logs one warning, and calls the
callbacks registered with :func:`otel_ml.on_anomaly` (on the export thread). With
``stop_on=["nonfinite"]`` the next ``log()`` raises :class:`AnomalyError`.

Example::

    otel_ml.init(stop_on=["nonfinite"], kl_max=5.0)
    try:
        for step, batch in enumerate(loader):
            ...
            otel_ml.log(step, loss=loss, kl=kl)
    except otel_ml.AnomalyError as err:
        save_checkpoint(); print(err.anomaly)
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_ml import semconv
from otel_ml._logging import logger, warn_once
from otel_ml.anomaly_config import (
    ALL_KEYS,
    DISTRIBUTION_DRIFT,
    GRAD_EXPLOSION,
    KL_SPIKE,
    LOSS_PLATEAU,
    LOSS_SPIKE,
    NONFINITE,
    STALL,
    TYPES,
    AnomalyConfig,
)
from otel_ml.detectors import DriftDetector, ExplosionDetector, PlateauDetector, SpikeDetector

#: Keys whose values the detectors read.
WATCHED = frozenset({"loss", "grad_norm", "kl"})
#: Distribution keys the drift check follows at most (each keeps its own history).
MAX_DRIFT_KEYS = 64


@dataclass(frozen=True)
class Anomaly:
    """One anomaly episode as it started."""

    type: str
    step: int | None
    key: str
    value: float
    rank: int
    run_id: str
    message: str


@dataclass
class Episode:
    """One anomaly episode as it went: started, grew, maybe ended (what status files and views show).

    ``count`` is the number of anomalous values seen in it (for a stall: the checks that found it);
    ``first_step``/``last_step`` are the logged steps of the first and latest of them (None for a
    stall, which has no step); ``end_time`` is None while the episode is active.

    Example::

        monitor.episodes()[0]  # {"type": "nonfinite", "key": "loss", "first_step": 300, ...}
    """

    type: str
    key: str
    first_step: int | None
    last_step: int | None
    count: int
    start_time: float
    end_time: float | None
    message: str

    @property
    def active(self) -> bool:
        return self.end_time is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active": self.active}


#: Episodes kept per rank (the oldest ended ones are dropped first; the counters keep the total).
MAX_EPISODES = 100


class AnomalyError(RuntimeError):
    """Raised by ``log()`` after an anomaly whose type is in ``stop_on``.

    Example::

        except otel_ml.AnomalyError as err:
            print(err.anomaly.type, err.anomaly.step)
    """

    def __init__(self, anomaly: Anomaly) -> None:
        super().__init__(f"otel_ml stopped training: {anomaly.message}")
        self.anomaly = anomaly


_callbacks: list[Callable[[Anomaly], None]] = []


def on_anomaly(callback: Callable[[Anomaly], None]) -> Callable[[Anomaly], None]:
    """Call ``callback(anomaly)`` when an episode starts (on the export thread; keep it quick).

    Usable as a decorator::

        @otel_ml.on_anomaly
        def page_me(anomaly): ...
    """
    _callbacks.append(callback)
    return callback


class AnomalyMonitor:
    """Runs the detectors on logged values and tracks episodes (see module docstring).

    Example::

        monitor = AnomalyMonitor(AnomalyConfig(), rank=0, run_id="r")
        monitor.observations.append((3, "loss", float("nan")))
        monitor.process()
        monitor.active["nonfinite"]  # 1
    """

    def __init__(
        self,
        config: AnomalyConfig,
        rank: int,
        run_id: str,
        *,
        clock: Callable[[], float] = time.time,
        flag_step: Callable[[int | None, str, Mapping[str, Any]], None] | None = None,
        last_step_time: Callable[[], float | None] | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.run_id = run_id
        self._clock = clock
        self._flag_step = flag_step
        self._last_step_time = last_step_time or (lambda: None)
        self.observations: deque[tuple[int | None, str, float]] = deque(maxlen=100_000)
        #: ``(step, key, mean, std)`` of every logged distribution (the drift check's input).
        self.distributions: deque[tuple[int, str, float, float]] = deque(maxlen=10_000)
        self.active = dict.fromkeys(TYPES, 0)
        self.counts = dict.fromkeys(TYPES, 0)
        self.stop_requested: Anomaly | None = None
        #: The first ``stop_on`` anomaly of this rank, never cleared (the stop agreement reads it).
        self.stop_seen: Anomaly | None = None
        self._lock = threading.Lock()
        self._episodes: deque[Episode] = deque(maxlen=MAX_EPISODES)
        self._open: dict[str, Episode] = {}
        self._nonfinite_keys: set[str] = set()
        c = config
        self._detectors: dict[str, tuple[str, Any]] = {
            "loss": (LOSS_SPIKE, SpikeDetector(c.spike_window, c.loss_spike_zscore)),
            "kl": (KL_SPIKE, SpikeDetector(c.spike_window, c.kl_zscore, maximum=c.kl_max)),
            "grad_norm": (
                GRAD_EXPLOSION,
                ExplosionDetector(c.grad_explosion_factor, c.grad_norm_max, c.spike_window),
            ),
        }
        self._plateau = PlateauDetector(c.plateau_patience, c.plateau_tolerance)
        self._drift: dict[str, DriftDetector] = {}
        self._drifting: set[str] = set()

    def process(self) -> None:
        """Drain queued values through the detectors, then check for a stall."""
        if not self.config.anomaly_detection:
            self.observations.clear()
            self.distributions.clear()
            return
        with self._lock:
            observations = self.observations
            for _ in range(len(observations)):
                step, key, value = observations.popleft()
                self._observe(step, key, value)
            distributions = self.distributions
            for _ in range(len(distributions)):
                self._observe_distribution(*distributions.popleft())
            self._check_stall()

    def _observe_distribution(self, step: int, key: str, mean: float, std: float) -> None:
        keys = self.config.drift_keys
        if key not in keys and ALL_KEYS not in keys:
            return
        detector = self._drift.get(key)
        if detector is None:
            if len(self._drift) >= MAX_DRIFT_KEYS:
                return
            c = self.config
            detector = self._drift[key] = DriftDetector(
                c.drift_window, c.drift_zscore, c.drift_spread_fraction
            )
        if detector.observe(mean, std):
            self._drifting.add(key)
            message = (
                f"{key} at step {step}: {detector.reason}" if not self.active[DISTRIBUTION_DRIFT] else ""
            )
            self._set(DISTRIBUTION_DRIFT, True, step, key, mean, message)
        elif key in self._drifting:
            self._drifting.discard(key)
            if not self._drifting:
                self._set(DISTRIBUTION_DRIFT, False, step, key, mean, "")

    def _observe(self, step: int | None, key: str, value: float) -> None:
        if not math.isfinite(value):
            if key in ("loss", "grad_norm"):
                self._nonfinite_keys.add(key)
                self._set(NONFINITE, True, step, key, value, f"{key} is {value} at step {step}")
            return
        if key in self._nonfinite_keys:
            self._nonfinite_keys.discard(key)
            if not self._nonfinite_keys:
                self._set(NONFINITE, False, step, key, value, "")
        active = self.active
        detector = self._detectors.get(key)
        if detector is not None:
            kind, instance = detector
            anomalous = instance.observe(value)
            if anomalous != bool(active[kind]):  # messages are formatted on changes only
                self._set(kind, anomalous, step, key, value, f"{key} {value:.6g} at step {step} is a {kind}")
            elif anomalous:
                self._set(kind, True, step, key, value, "")
        if key == "loss":
            plateau = self._plateau.observe(value)
            if plateau != bool(active[LOSS_PLATEAU]):
                message = f"loss has not improved for {self._plateau.since} logged steps (now {value:.6g})"
                self._set(LOSS_PLATEAU, plateau, step, key, value, message)
            elif plateau:
                self._set(LOSS_PLATEAU, True, step, key, value, "")

    def _check_stall(self) -> None:
        limit = self.config.stall_seconds
        last = self._last_step_time()
        if limit <= 0 or last is None:
            return
        idle = self._clock() - last
        self._set(STALL, idle > limit, None, "step", idle, f"no step for {idle:.0f} s (limit {limit:.0f} s)")

    def episodes(self) -> list[dict[str, Any]]:
        """This rank's anomaly episodes, oldest first, as plain dicts (any thread)."""
        with self._lock:
            return [episode.as_dict() for episode in self._episodes]

    def _set(
        self, kind: str, anomalous: bool, step: int | None, key: str, value: float, message: str
    ) -> None:
        if anomalous == bool(self.active[kind]):
            episode = self._open.get(kind) if anomalous else None
            if episode is not None:  # the episode goes on: one more anomalous value
                episode.count += 1
                if step is not None:
                    episode.last_step = step
            return
        self.active[kind] = int(anomalous)
        if not anomalous:
            ended = self._open.pop(kind, None)
            if ended is not None:
                ended.end_time = self._clock()
            logger.info("otel_ml: %s on rank %d ended", kind, self.rank)
            return
        self.counts[kind] += 1
        episode = Episode(kind, key, step, step, 1, self._clock(), None, message)
        self._open[kind] = episode
        self._episodes.append(episode)
        anomaly = Anomaly(
            kind, step, key, value, self.rank, self.run_id, f"{kind} on rank {self.rank}: {message}"
        )
        logger.warning("otel_ml: anomaly %s", anomaly.message)
        if self._flag_step is not None:
            attributes = {
                semconv.ATTR_ANOMALY_TYPE: kind,
                semconv.ATTR_ANOMALY_KEY: key,
                semconv.ATTR_ANOMALY_VALUE: value,
            }
            self._flag_step(step, semconv.EVENT_ANOMALY, attributes)
        if kind in self.config.stop_on and self.stop_requested is None:
            self.stop_requested = anomaly
        if kind in self.config.stop_on and self.stop_seen is None:
            self.stop_seen = anomaly  # kept: what otel_ml.should_stop()/agree_stop() read
        for callback in list(_callbacks):
            try:
                callback(anomaly)
            except Exception as exc:  # noqa: BLE001 - a user callback must not stop detection
                warn_once(
                    f"anomaly-callback:{id(callback)}",
                    "otel_ml: anomaly callback %r failed: %s",
                    callback,
                    exc,
                )

    def take_stop(self) -> Anomaly | None:
        """The anomaly that should stop training, once (the training thread raises it)."""
        anomaly, self.stop_requested = self.stop_requested, None
        return anomaly

    def register(self, meter: Meter, attributes: Mapping[str, str]) -> None:
        attrs = dict(attributes)
        checked = self.config.checked_types()  # a type whose check is off has no series
        typed = [(t, {**attrs, semconv.LABEL_TYPE: t}) for t in checked]  # built once, read-only

        def series(values: dict[str, int]) -> Iterable[Observation]:
            return [Observation(values[t], labels) for t, labels in typed]

        for spec, values in ((semconv.ANOMALY_ACTIVE, self.active), (semconv.ANOMALIES, self.counts)):
            create = (
                meter.create_observable_gauge if spec.kind == "gauge" else meter.create_observable_counter
            )

            def callback(_: CallbackOptions, values: dict[str, int] = values) -> Iterable[Observation]:
                return series(values)

            create(spec.name, [callback], spec.unit, spec.description)
