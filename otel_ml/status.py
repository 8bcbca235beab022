"""A run status file per rank: ``<run_dir>/rank-<N>/status.json``, for people and scripts.

The document says how the rank is doing or how it ended, without a server::

    {"schema": 1, "rank": 2, "run_id": "r", "pid": 4242, "host": "node-1", "state": "failed",
     "error": {"type": "ValueError", "message": "bad batch"}, "signal": null, "start_time": ...,
     "last_step_time": ..., "updated_time": ..., "end_time": ..., "step": 300, "loss": 0.61,
     "steps_per_second": 9.7, "progress": {"task": "train", "unit": "step", "completed": 301,
     "total": 600, "rate": 9.8, "eta_seconds": 30.5, "open": true}, "timing": {"steps": 300,
     "step_ms": 103.1, "regions_ms": {"forward": 20.4}}, "anomalies": [{"type": "nonfinite", ...}]}

``state`` is ``running`` while the process lives, then ``completed`` (otel_ml shut down without
an uncaught exception or signal), ``failed`` (an uncaught exception: ``error`` has its type and
message) or ``terminated`` (SIGTERM, or SIGINT's uncaught ``KeyboardInterrupt``: ``signal``
names it). ``progress`` is the top-level progress bar (the last one seen, ``open`` false once
closed); ``steps_per_second`` is the rate of logged steps over the last minute.

:class:`StatusBuilder` is the pure part (documents from samples, with an injected clock);
:class:`StatusWriter` reads the sources and writes the file atomically (a temporary file, then a
rename, user-only), from the pump thread every ``status_interval`` seconds
(:meth:`StatusWriter.tick` is a pump job) and once at shutdown, never from the training thread.
A failed write is logged once and counted in ``otel_ml_export_errors_total{exporter="status"}``.
:meth:`StatusWriter.failed` is what ``sys.excepthook`` calls (:func:`otel_ml.signals.watch_uncaught`)
and :meth:`StatusWriter.terminated` what the SIGTERM handler calls.

Example::

    writer = StatusWriter(rank_dir(run_dir, 0), StatusBuilder(0, "r1"), board=board,
                          training=training, anomalies=monitor, interval=5.0)
    writer.tick()        # on the pump thread: writes when the interval has passed
    writer.finish()      # at shutdown: "completed" unless it failed or was terminated
    read_status(rank_dir(run_dir, 0))["state"]   # "completed"
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from otel_ml._logging import warn_once
from otel_ml.health import TelemetryHealth
from otel_ml.rundir import STATUS_FILE, write_private
from otel_ml.signals import exception_name, signal_name
from otel_ml.sources import EpisodeSource, RegionTotals, TrainingState

SCHEMA = 1
RUNNING, COMPLETED, FAILED, TERMINATED = "running", "completed", "failed", "terminated"
STATES = (RUNNING, COMPLETED, FAILED, TERMINATED)
#: Seconds of logged steps the ``steps_per_second`` rate is taken over.
RATE_WINDOW = 60.0
#: Longest error or episode message written.
MAX_MESSAGE = 500
#: The exporter label of failed status writes in ``otel_ml_export_errors_total``.
HEALTH_KEY = "status"
#: Seconds a write waits for another one before giving up (counted as a failure).
LOCK_TIMEOUT = 2.0


class BoardSource(Protocol):
    """The progress bars (:class:`otel_ml.progress.board.ProgressBoard`: rows with ``as_dict()``)
    and the last top-level bar closed (a row, or None)."""

    def snapshot(self) -> Sequence[Any]: ...

    @property
    def last_closed(self) -> Any | None: ...


class TrainingSource(TrainingState, Protocol):
    """What ``log()`` last received, and when (:class:`otel_ml.training.TrainingMetrics`)."""

    @property
    def last_log_time(self) -> float | None: ...


@dataclass
class Sample:
    """What the sources said at one moment (the input of :meth:`StatusBuilder.document`)."""

    bars: list[dict[str, Any]] = field(default_factory=list)
    #: The last top-level bar closed, as it was then (reported when no top-level bar is open).
    closed_bar: dict[str, Any] | None = None
    step: int | None = None
    last_step_time: float | None = None
    loss: float | None = None
    episodes: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, Any] | None = None


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/Inf replaced by None, so the file is strict JSON (NaN is data in the
    metrics; here it would make the file unreadable to strict parsers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def top_bar(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The top-level bar among snapshot rows: the first with no parent (a bar's own row comes
    before the rows that sum its nested bars' units, which have no total)."""
    top = [row for row in rows if not row.get("parent")]
    with_total = [row for row in top if row.get("total") is not None]
    return (with_total or top or [None])[0]


def timing_of(regions: RegionTotals) -> dict[str, Any] | None:
    """Mean step ms and ms per step of each top-level region, or None before the first step."""
    steps = int(regions.steps)
    if steps <= 0:
        return None
    totals: dict[str, float] = {}
    for path, seconds in regions.self_totals().items():
        top = path.split("/", 1)[0]
        totals[top] = totals.get(top, 0.0) + seconds
    return {
        "steps": steps,
        "step_ms": 1000.0 * regions.step_time / steps,
        "regions_ms": {name: 1000.0 * seconds / steps for name, seconds in totals.items()},
    }


class StatusBuilder:
    """Status documents of one rank from :class:`Sample` values (pure: no I/O, injected clock).

    The first abnormal ending (failed or terminated) wins; ``completed`` only applies when none
    came before, and an abnormal ending after it replaces it (``try: ... finally: shutdown()``
    shuts down before the uncaught exception reaches ``sys.excepthook``).

    Example::

        builder = StatusBuilder(0, "r1", clock=lambda: 100.0)
        builder.document(Sample(step=3))["state"]      # "running"
        builder.end(FAILED, error_type="ValueError", message="bad batch")
        builder.document(Sample(step=3))["error"]      # {"type": "ValueError", "message": "bad batch"}
    """

    def __init__(
        self,
        rank: int,
        run_id: str,
        *,
        pid: int | None = None,
        host: str | None = None,
        clock: Callable[[], float] = time.time,
        rate_window: float = RATE_WINDOW,
    ) -> None:
        self.rank = rank
        self.run_id = run_id
        self.pid = os.getpid() if pid is None else pid
        self.host = socket.gethostname() if host is None else host
        self._clock = clock
        self.start_time = clock()
        self._rate_window = rate_window
        self._steps: deque[tuple[float, int]] = deque()
        self._bar: dict[str, Any] | None = None
        self.state = RUNNING
        self.error: dict[str, str] | None = None
        self.signal: str | None = None
        self.end_time: float | None = None

    def end(
        self,
        state: str,
        *,
        error_type: str | None = None,
        message: str | None = None,
        signal: str | None = None,
    ) -> bool:
        """Record how the rank ended; returns False when an earlier ending stands."""
        if state not in STATES or state == RUNNING:
            raise ValueError(f"state must be one of {STATES[1:]}, not {state!r}")
        if self.state in (FAILED, TERMINATED) or (state == COMPLETED and self.state == COMPLETED):
            return False
        self.state = state
        self.error = (
            {"type": error_type or "", "message": (message or "")[:MAX_MESSAGE]} if state == FAILED else None
        )
        self.signal = signal if state == TERMINATED else None
        self.end_time = self._clock()
        return True

    def _rate(self, step: int | None, at: float | None) -> float | None:
        steps = self._steps
        if step is not None and at is not None and (not steps or steps[-1] != (at, step)):
            if steps and (step < steps[-1][1] or at < steps[-1][0]):
                steps.clear()  # a restarted step counter or clock: start the window again
            steps.append((at, step))
        while len(steps) > 2 and steps[-1][0] - steps[1][0] >= self._rate_window:
            steps.popleft()
        if len(steps) < 2 or steps[-1][0] <= steps[0][0]:
            return None
        return (steps[-1][1] - steps[0][1]) / (steps[-1][0] - steps[0][0])

    def observe(self, step: int | None, at: float | None) -> None:
        """Remember the step between documents (every pump tick): the rate's window."""
        self._rate(step, at)

    def _progress(
        self, bars: Sequence[Mapping[str, Any]], closed: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The top-level bar; when none is open, the last one closed as it was then (``closed``),
        else the last one seen by an earlier document, both marked closed."""
        open_row = top_bar(bars)
        row = open_row if open_row is not None else closed
        if row is not None:
            self._bar = {
                "task": str(row.get("task", "")),
                "unit": str(row.get("unit", "")),
                "completed": row.get("completed"),
                "total": row.get("total"),
                "rate": row.get("rate"),
                "eta_seconds": row.get("eta"),
                "open": True,
            }
            if open_row is not None:
                return dict(self._bar)
        if self._bar is None:
            return None
        return {**self._bar, "eta_seconds": None, "open": False}  # closed: its last state

    def document(self, sample: Sample) -> dict[str, Any]:
        """The status document now; ``sample`` is what the sources said."""
        now = self._clock()
        return _json_safe(
            {
                "schema": SCHEMA,
                "rank": self.rank,
                "run_id": self.run_id,
                "pid": self.pid,
                "host": self.host,
                "state": self.state,
                "error": self.error,
                "signal": self.signal,
                "start_time": self.start_time,
                "last_step_time": sample.last_step_time,
                "updated_time": now,
                "end_time": self.end_time,
                "step": sample.step,
                "loss": sample.loss,
                "steps_per_second": self._rate(sample.step, sample.last_step_time),
                "progress": self._progress(sample.bars, sample.closed_bar),
                "timing": sample.timing,
                "anomalies": [
                    {**episode, "message": str(episode.get("message", ""))[:MAX_MESSAGE]}
                    for episode in sample.episodes
                ],
            }
        )


class StatusWriter:
    """Reads the sources and writes ``status.json`` (see module docstring); any thread but the
    training one. Never raises: a failure is logged once and counted.

    Example::

        writer = StatusWriter(directory, StatusBuilder(0, "r1"), interval=5.0)
        writer.tick()       # pump job
        writer.finish()     # at shutdown
    """

    def __init__(
        self,
        directory: Path,
        builder: StatusBuilder,
        *,
        board: BoardSource | None = None,
        training: TrainingSource | None = None,
        anomalies: EpisodeSource | None = None,
        regions: RegionTotals | None = None,
        interval: float = 10.0,
        health: TelemetryHealth | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(directory) / STATUS_FILE
        self.builder = builder
        self.interval = interval
        self.writes = 0
        self.failures = 0
        self.finished = False
        self._board = board
        self._training = training
        self._anomalies = anomalies
        self._regions = regions
        self._health = health
        self._mono = mono
        self._pid = os.getpid()
        self._next = -math.inf
        self._lock = threading.RLock()  # a signal handler may write while this thread writes

    def sample(self) -> Sample:
        """What the sources say now."""
        training, anomalies, regions, board = self._training, self._anomalies, self._regions, self._board
        closed = getattr(board, "last_closed", None)
        return Sample(
            bars=[r.as_dict() for r in board.snapshot()] if board is not None else [],
            closed_bar=None if closed is None else closed.as_dict(),
            step=None if training is None else training.step,
            last_step_time=None if training is None else training.last_log_time,
            loss=None if training is None else training.latest("loss"),
            episodes=[] if anomalies is None else anomalies.episodes(),
            timing=None if regions is None else timing_of(regions),
        )

    def tick(self) -> None:
        """Write when ``interval`` seconds have passed since the last write, else only read the
        step (a pump job: every second; the board keeps the last closed bar for the next write)."""
        if self.finished or os.getpid() != self._pid:
            return
        if self._mono() >= self._next:
            self.write()
            return
        try:
            with self._lock:
                training = self._training
                if training is not None:
                    self.builder.observe(training.step, training.last_log_time)
        except Exception as exc:  # noqa: BLE001 - the next write reports the source's failure
            warn_once("status-observe", "otel_ml: status.json could not read its sources: %r", exc)

    def write(self) -> bool:
        """Write the document now; False when it could not be (logged once, counted)."""
        if os.getpid() != self._pid:
            return False  # a forked child (a DataLoader worker) is not this rank
        # Bounded: shutdown must not wait forever on a pump write stuck on a hung file system.
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            return self._failed(TimeoutError("another write is stuck"))
        try:
            self._next = self._mono() + self.interval
            text = json.dumps(self.builder.document(self.sample()), indent=1, allow_nan=False)
            write_private(self.path, text + "\n")
        except Exception as exc:  # noqa: BLE001 - a status file must never break training
            return self._failed(exc)
        finally:
            self._lock.release()
        self.writes += 1
        return True

    def _failed(self, exc: Exception) -> bool:
        self.failures += 1
        if self._health is not None:
            self._health.error(HEALTH_KEY)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        warn_once("status-file", "otel_ml: could not write %s: %s (logged once)", self.path, reason)
        return False

    def _end(self, state: str, **details: str | None) -> None:
        if self.builder.end(state, **details) and self.finished:
            self.write()  # shut down already: this ending comes after the final write

    def failed(self, exc_type: type[BaseException], exc: BaseException | None) -> None:
        """An uncaught exception ends the rank: ``failed``, or ``terminated`` for SIGINT's
        ``KeyboardInterrupt``."""
        if issubclass(exc_type, KeyboardInterrupt):
            self._end(TERMINATED, signal="SIGINT")
        else:
            self._end(FAILED, error_type=exception_name(exc_type), message=str(exc) if exc else "")

    def terminated(self, signum: int) -> None:
        """A signal ends the rank (called from the signal handler, before the flush)."""
        self._end(TERMINATED, signal=signal_name(signum))

    def finish(self) -> None:
        """The final write at shutdown: ``completed`` unless an ending was recorded before."""
        self.builder.end(COMPLETED)
        self.write()
        self.finished = True


def read_status(directory: Path) -> dict[str, Any] | None:
    """A rank folder's status document, or None when it has none. Raises ``ValueError`` for a
    file that is not a status document, ``OSError`` for one that cannot be read."""
    path = Path(directory) / STATUS_FILE
    if not path.exists():
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("state") not in STATES:
        raise ValueError(f"{path}: not a status document")
    return document
