"""``log(step, loss=..., ...)``: the training metrics, cheap on the training thread.

The hot path only stores numbers in plain Python containers (a few hundred nanoseconds per
value). OTel instruments are observable: their callbacks read those containers when a reader
collects (a Prometheus scrape or the push thread). Step durations are queued and aggregated
off the training thread into a histogram otel_ml keeps itself (:meth:`TrainingMetrics.metrics`,
a source of the :class:`otel_ml.collection.Collection`); :meth:`TrainingMetrics.refresh`, a pump
job and part of the runtime's one prepare hook, drains that queue and resolves deferred GPU
values before the SDK calls any callback.

Non-finite values never reach an instrument (the OTel SDK would drop them and log on every
collection); they are counted per key in ``otel_ml_nonfinite_total{metric=...}`` and the gauge
keeps its last finite value.

Over 400 lines: log()'s coercion, rates, deferred values and the observable callbacks that
read them share one lock and one set of counters.

Example::

    metrics = TrainingMetrics(meter, attributes={"rank": "0", "run_id": "r1"}, collection=Collection())
    metrics.log(1, {"loss": 2.3, "lr": 3e-4, "samples": 32})
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import Metric

from otel_ml import names, semconv
from otel_ml._logging import logger, warn_once
from otel_ml.collection import Collection
from otel_ml.distribution import is_distribution
from otel_ml.distribution_metrics import DistributionMetrics
from otel_ml.health import TelemetryHealth
from otel_ml.histogram import LabeledHistograms
from otel_ml.values import Deferred, DeferredReads, UnusableValueError, coerce

_GAUGE, _SAMPLES, _TOKENS = 0, 1, 2
_BUILTIN_GAUGES = {
    "loss": semconv.LOSS,
    "lr": semconv.LEARNING_RATE,
    "learning_rate": semconv.LEARNING_RATE,
    "grad_norm": semconv.GRAD_NORM,
}
#: Python ints below this magnitude convert to float exactly (2**53); larger ones take the slow path.
_EXACT_INT = 1 << 53
#: Deferred device reads kept waiting at most; older ones are dropped and counted.
MAX_PENDING = 4096  # a pump tick (1 s) of 6 device values per step at 600 steps/s
#: Step durations queued for the histogram at most (the pump drains them every second).
MAX_QUEUED_DURATIONS = 65536


def window_rate(entries: tuple[tuple[float, float, float], ...], index: int) -> float | None:
    """Rate of the cumulative column ``index`` over a window of ``(time, cum1, cum2)`` entries."""
    if len(entries) < 2:
        return None
    elapsed = entries[-1][0] - entries[0][0]
    if elapsed <= 0:
        return None
    return (entries[-1][index] - entries[0][index]) / elapsed


class TrainingMetrics:
    """Stores what ``log()`` receives and exposes it through observable OTel instruments.

        ``wall`` and ``mono`` are injectable clocks (seconds) so tests control time exactly.
        ``on_step(step, monotonic_s, values)`` runs on every step change (it closes timing windows);
        ``watch=(keys, queue)`` appends ``(step, key, value)`` of those keys to ``queue`` (the anomaly
        detectors' input). ``collection`` gets the step-duration histogram; whoever owns the collection
    calls :meth:`refresh` before each collection.

        Example::

            tm = TrainingMetrics(
                meter, attributes={"rank": "0", "run_id": "r1"}, collection=Collection(), window=10
            )
            tm.log(0, {"loss": 1.0, "samples": 8})
    """

    def __init__(
        self,
        meter: Meter,
        attributes: Mapping[str, str],
        *,
        collection: Collection | None = None,
        watch: tuple[frozenset[str], deque] | None = None,
        window: int = 20,
        max_keys: int = 256,
        on_step: Callable[[int, float, Mapping[str, Any]], None] | None = None,
        health: TelemetryHealth | None = None,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.perf_counter,
        cuda: Any | None = None,
        cudart: Any | None = None,
        distribution_buckets: Mapping[str, tuple[float, ...]] | None = None,
        watch_distributions: deque | None = None,
    ) -> None:
        self._meter = meter
        self._attrs = dict(attributes)
        self._max_keys = max_keys
        self._on_step = on_step
        self._health = health or TelemetryHealth()
        self._wall = wall
        self._mono = mono
        #: ``torch.cuda`` (or a stand-in) for CUDA tensors; torch's own when None.
        self._cuda = cuda
        # Slow paths only: key registration, non-finite counts. Reentrant: a SIGTERM flush runs
        # on this thread and collects (reads the counts) while log() may hold it.
        self._lock = threading.RLock()

        self._kinds: dict[str, int | None] = {"samples": _SAMPLES, "tokens": _TOKENS}
        self._latest: dict[str, float] = {}
        self._nonfinite: dict[str, int] = {}
        self._samples = 0.0
        self._tokens = 0.0
        self._saw_samples = False
        self._saw_tokens = False
        self._window: deque[tuple[float, float, float]] = deque(maxlen=window + 1)
        # Drained every pump tick and at collection; the bound only matters if the pump is gone.
        self._durations: deque[float] = deque(maxlen=MAX_QUEUED_DURATIONS)
        self._pending = DeferredReads(MAX_PENDING, self._health, cudart)
        self._watch, self.observations = watch if watch is not None else (frozenset(), deque(maxlen=1))

        self._step: int | None = None
        self._step_mono: float | None = None
        self._last_wall: float | None = None
        self._user_names: dict[str, str] = {}
        self._create_instruments()
        #: Distributions (``log(reward=[...])``): histogram, last-step gauges, CUDA reductions.
        self.distributions = DistributionMetrics(
            meter,
            self._attrs,
            buckets=distribution_buckets,
            count_nonfinite=self._count_nonfinite,
            observations=watch_distributions,
            health=self._health,
            cuda=cuda,
            cudart=cudart,
        )
        if collection is not None:
            collection.register(metrics=self.metrics)

    # ------------------------------------------------------------------ hot path
    def log(self, step: Any, values: Mapping[str, Any]) -> None:
        """Record one call of ``otel_ml.log(step, **values)``. Never raises on bad values."""
        wall = self._wall()
        mono = self._mono()
        if step.__class__ is not int:
            step = self._normalize_step(step)
        self._last_wall = wall
        if step != self._step:
            self._close_step(step, mono, values)
        kinds = self._kinds
        latest = self._latest
        watch = self._watch
        for key, value in values.items():
            kind = kinds.get(key, -1)
            if kind == -1:
                kind = self._register(key)
            if kind is None:
                continue
            cls = value.__class__
            if cls is int and -_EXACT_INT < value < _EXACT_INT:
                value = float(value)
                cls = float
            if cls is float:
                if value - value == 0.0:  # finite: NaN - NaN and Inf - Inf are NaN
                    if kind == _GAUGE:
                        latest[key] = value
                    else:
                        self._add_count(kind, value, key)
                else:
                    self._count_nonfinite(key)
                if key in watch:
                    self.observations.append((step, key, value))
            else:
                self._ingest_slow(step, key, kind, value)
        if self._saw_samples or self._saw_tokens:
            self._window.append((mono, self._samples, self._tokens))

    def _close_step(self, step: int, mono: float, values: Mapping[str, Any]) -> None:
        prev_step, prev_mono = self._step, self._step_mono
        if prev_step is not None and prev_mono is not None and step > prev_step:
            per_step = (mono - prev_mono) / (step - prev_step)
            if len(self._durations) == MAX_QUEUED_DURATIONS:
                self._health.dropped("values")
            self._durations.append(per_step)
        self._step, self._step_mono = step, mono
        on_step = self._on_step
        if on_step is not None:
            on_step(step, mono, values)

    # ------------------------------------------------------------------ slow paths
    def _normalize_step(self, step: Any) -> int:
        if step is None:
            return 0 if self._step is None else self._step + 1
        try:
            number = coerce(step)
            if isinstance(number, Deferred):
                raise UnusableValueError("step must not be a device tensor")
            if number != number or number in (float("inf"), float("-inf")):
                raise UnusableValueError("step is not finite")
            return int(number)
        except UnusableValueError as exc:
            warn_once("step", "otel_ml: log() step %r unusable (%s); counting steps instead", step, exc)
            return 0 if self._step is None else self._step + 1

    def _ingest_slow(self, step: int, key: str, kind: int, value: Any) -> None:
        if is_distribution(value):
            self.distributions.ingest(step, key, value)
            return
        try:
            number = coerce(value, self._cuda)
        except Exception as exc:  # noqa: BLE001 - UnusableValueError, a CUDA error, exotic objects
            warn_once(f"value:{key}", "otel_ml: log() dropped %r: %s", key, exc)
            self._health.dropped("values")
            return
        if isinstance(number, Deferred):
            self._pending.push(step, key, number)
            return
        self._ingest(step, key, kind, number)

    def ingest_distribution(self, step: int, key: str, value: Any) -> None:
        """A distribution under ``key`` (``otel_ml.scores`` and ``log()``); never raises.

        Its ``otel_ml_nonfinite_total{metric=key}`` starts at 0, as a ``log()`` key's does, so
        ``increase()`` sees the first NaN (``log()`` keys are bounded by ``max_metric_keys``;
        scorers' keys are the names their code gives).
        """
        self._count_nonfinite(key, 0)
        self.distributions.ingest(step, key, value)

    def _ingest(self, step: int, key: str, kind: int, number: float) -> None:
        if number - number == 0.0:
            if kind == _GAUGE:
                self._latest[key] = number
            else:
                self._add_count(kind, number, key)
        else:
            self._count_nonfinite(key)
        if key in self._watch:
            self.observations.append((step, key, number))

    def _add_count(self, kind: int, value: float, key: str) -> None:
        if value < 0:
            warn_once(f"negative:{key}", "otel_ml: log() ignored negative %s=%r", key, value)
            return
        if kind == _SAMPLES:
            self._samples += value
            self._saw_samples = True
        else:
            self._tokens += value
            self._saw_tokens = True

    def _count_nonfinite(self, key: str, count: int = 1) -> None:
        with self._lock:
            self._nonfinite[key] = self._nonfinite.get(key, 0) + count

    def _register(self, key: str) -> int | None:
        """First sight of ``key``: create its instrument (once per process and key)."""
        with self._lock:
            if key in self._kinds:
                return self._kinds[key]
            kind: int | None = _GAUGE
            if not isinstance(key, str) or not key:
                warn_once(f"key:{key!r}", "otel_ml: log() ignored an empty or non-string key")
                kind = None
            elif len(self._kinds) >= self._max_keys:
                warn_once(
                    "max-keys",
                    "otel_ml: more than %d distinct log() keys; %r and later new keys are dropped "
                    "(raise OTEL_ML_MAX_METRIC_KEYS if this is intended)",
                    self._max_keys,
                    key,
                )
                self._health.dropped("values")
                kind = None
            elif key not in _BUILTIN_GAUGES:
                self._create_user_gauge(key)
            if kind is not None:
                self._nonfinite.setdefault(key, 0)
            self._kinds[key] = kind
            return kind

    def _create_user_gauge(self, key: str) -> None:
        name = names.metric_name(key)
        taken = set(self._user_names.values())
        suffix = len(self._user_names)
        while name in taken:  # two keys sanitized alike ("a b", "a-b"): never share a series
            name = names.metric_name(f"{key}_{suffix}")
            suffix += 1
        if name != names.PREFIX + key:
            logger.info("otel_ml: log() key %r is exported as %s", key, name)
        self._user_names[key] = name
        self._meter.create_observable_gauge(
            name,
            callbacks=[self._gauge_callback(key)],
            unit=semconv.USER_GAUGE_UNIT,
            description=f"Last finite value of {names.valid_text(key)}= passed to otel_ml.log().",
        )

    # ------------------------------------------------------------------ collection
    def refresh(self) -> None:
        """Resolve deferred device values and record queued durations (pump or collection thread)."""
        self._pending.drain(self._deliver)
        self.distributions.refresh()
        self.drain_durations()

    def _deliver(self, step: int, key: str, deferred: Deferred, _: Any) -> None:
        self._ingest(step, key, self._kinds.get(key) or _GAUGE, deferred.value())

    def drain_durations(self) -> None:
        """Move queued step durations into the histogram (export thread or collection).

        Only the entries present on entry are taken, so a fast training loop cannot keep the
        caller busy; the pump calls this every tick so the queue stays short. The histogram is
        aggregated by otel_ml (a bisect per step) rather than by the OTel SDK (about 7 µs per
        ``record()``), and handed to the readers by :meth:`metrics`.
        """
        durations, taken = self._durations, []
        popleft, take = durations.popleft, taken.append
        for _ in range(len(durations)):
            try:
                take(((), popleft()))
            except IndexError:  # another collector (scrape or pump) drained it meanwhile
                break
        if taken:
            self.step_durations.observe_many(taken)  # one lock for all of them

    def metrics(self) -> list[Metric]:
        """The step-duration histogram, a source of :class:`otel_ml.collection.Collection`."""
        self.drain_durations()
        spec = semconv.STEP_DURATION
        metric = self.step_durations.to_metric(spec.name, spec.unit, spec.description, (), self._attrs)
        out = [] if metric is None else [metric]
        return out + self.distributions.metrics()

    def _gauge_callback(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            value = self._latest.get(key)
            return () if value is None else (Observation(value, self._attrs),)

        return callback

    def _observe_step(self, _: CallbackOptions) -> Iterable[Observation]:
        return () if self._step is None else (Observation(self._step, self._attrs),)

    def _observe_timestamp(self, _: CallbackOptions) -> Iterable[Observation]:
        wall = self._last_wall
        return () if wall is None else (Observation(wall, self._attrs),)

    def _observe_heartbeat(self, _: CallbackOptions) -> Iterable[Observation]:
        return (Observation(time.time(), self._attrs),)

    def _observe_rate(self, index: int, seen: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            if not getattr(self, seen):
                return ()
            rate = window_rate(tuple(self._window), index)
            return () if rate is None else (Observation(rate, self._attrs),)

        return callback

    def _observe_total(self, attr: str, seen: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            if not getattr(self, seen):
                return ()
            return (Observation(getattr(self, attr), self._attrs),)

        return callback

    def _observe_nonfinite(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._nonfinite.items())
        label = semconv.LABEL_METRIC
        return [Observation(n, {**self._attrs, label: names.label_value(str(k))}) for k, n in items]

    def _create_instruments(self) -> None:
        m = self._meter
        m.create_observable_gauge(
            semconv.STEP.name, [self._observe_step], semconv.STEP.unit, semconv.STEP.description
        )
        spec = semconv.LAST_STEP_TIMESTAMP
        m.create_observable_gauge(spec.name, [self._observe_timestamp], spec.unit, spec.description)
        spec = semconv.HEARTBEAT_TIMESTAMP
        m.create_observable_gauge(spec.name, [self._observe_heartbeat], spec.unit, spec.description)
        created: set[str] = set()
        for spec in _BUILTIN_GAUGES.values():
            if spec.name in created:
                # lr= and learning_rate= feed one gauge
                continue
            created.add(spec.name)
            keys = [k for k, s in _BUILTIN_GAUGES.items() if s is spec]
            m.create_observable_gauge(spec.name, [self._builtin_callback(keys)], spec.unit, spec.description)
        for spec, index, seen in (
            (semconv.SAMPLES_PER_SECOND, 1, "_saw_samples"),
            (semconv.TOKENS_PER_SECOND, 2, "_saw_tokens"),
        ):
            m.create_observable_gauge(
                spec.name, [self._observe_rate(index, seen)], spec.unit, spec.description
            )
        for spec, attr, seen in (
            (semconv.SAMPLES, "_samples", "_saw_samples"),
            (semconv.TOKENS, "_tokens", "_saw_tokens"),
        ):
            m.create_observable_counter(
                spec.name, [self._observe_total(attr, seen)], spec.unit, spec.description
            )
        spec = semconv.NONFINITE
        m.create_observable_counter(spec.name, [self._observe_nonfinite], spec.unit, spec.description)
        self.step_durations = LabeledHistograms(semconv.STEP_DURATION_BUCKETS)

    def _builtin_callback(self, keys: list[str]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for key in keys:
                value = self._latest.get(key)
                if value is not None:
                    return (Observation(value, self._attrs),)
            return ()

        return callback

    @property
    def last_log_time(self) -> float | None:
        """Wall-clock time of the last ``log()`` call."""
        return self._last_wall

    @property
    def step(self) -> int | None:
        """The last step passed to ``log()``."""
        return self._step

    def latest(self, key: str) -> float | None:
        """The last finite value logged for ``key`` (None if never)."""
        return self._latest.get(key)

    def exported_name(self, key: str) -> str | None:
        """The metric name a ``log()`` key is exported under (None if not logged or dropped)."""
        if key in _BUILTIN_GAUGES:
            return _BUILTIN_GAUGES[key].name
        return self._user_names.get(key)
