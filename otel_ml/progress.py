"""``otel_ml.tqdm``: a drop-in tqdm whose progress, rate and ETA every rank exports.

The subclass adds nothing to the iteration path: tqdm already keeps ``n``, its smoothed rate and
its start time on the instance at its own refresh cadence, and the collection reads them from
there (:meth:`ProgressBoard.snapshot`). Bars register on creation and leave on close.

Labels: ``task`` is the bar's ``desc`` (bounded length), ``unit`` its unit, ``parent`` the task of
the bar it is nested in (``""`` at top level). A parent bar also exports the units of its
nested bars summed over them (files done *and* rows done). Closed bars stop exporting, except
``otel_ml_progress_active{task}`` which drops to 0. Distinct tasks per process are capped; later
ones are exported as ``(overflow)`` with one warning.

On ranks other than 0 bars print nothing by default (rank 0's multi-rank view and ``otel-ml top``
show them); ``disable=True`` still means no bar and no export.

Example::

    for batch in otel_ml.tqdm(loader, desc="train", unit="batch"):
        ...
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm as _tqdm

from otel_ml import names, ranks
from otel_ml._logging import warn_once

OVERFLOW = "(overflow)"
#: Distinct task labels per process by default.
MAX_TASKS = 64


@dataclass
class BarSnapshot:
    """One exported row: a bar's own counts, or a parent's sum over a nested unit."""

    task: str
    unit: str
    parent: str
    completed: float
    total: float | None
    rate: float | None
    eta: float | None
    elapsed: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rate_and_eta(
    n: float, total: float | None, elapsed: float, ema_rate: float | None
) -> tuple[float | None, float | None]:
    """Rate (tqdm's smoothed rate, else the average) and seconds left (None when unknown)."""
    rate = ema_rate if ema_rate else (n / elapsed if elapsed > 0 and n else None)
    if rate is None or rate <= 0:
        return None, None
    eta = max(0.0, (total - n) / rate) if total is not None and total > 0 else None
    return rate, eta


class _Tracked:
    __slots__ = ("bar", "children_done", "parent", "task", "thread")

    def __init__(self, bar: Any, task: str, parent: _Tracked | None) -> None:
        self.bar = bar
        self.task = task
        self.parent = parent
        self.thread = threading.get_ident()
        self.children_done: dict[str, float] = {}  # unit -> units completed by closed children


class ProgressBoard:
    """The open bars of this process and what every task label last did.

    Example::

        board = ProgressBoard()
        board.snapshot()   # [] until a bar exists
    """

    def __init__(self, max_tasks: int = MAX_TASKS) -> None:
        self.max_tasks = max_tasks
        # Reentrant: a SIGTERM flush runs on the training thread and snapshots the board while
        # that thread may be creating or closing a bar.
        self._lock = threading.RLock()
        self._open: list[_Tracked] = []
        self.active: dict[str, int] = {}

    def _task(self, desc: Any) -> str:
        task = names.label_value(str(desc).strip().rstrip(":") or "progress")
        if task in self.active:
            return task
        if len(self.active) >= self.max_tasks:
            warn_once(
                "max-tasks",
                "otel_ml: more than %d distinct progress tasks (bar descriptions); %r and later new "
                "ones are exported as %r",
                self.max_tasks,
                task,
                OVERFLOW,
            )
            return OVERFLOW
        return task

    def forget_closed(self) -> None:
        """Drop the task labels of closed bars (a new ``init()`` starts a fresh label budget)."""
        with self._lock:
            open_tasks = {t.task for t in self._open}
            self.active = {task: flag for task, flag in self.active.items() if task in open_tasks}

    def register(self, bar: Any) -> _Tracked:
        with self._lock:
            thread = threading.get_ident()
            parent = next((t for t in reversed(self._open) if t.thread == thread), None)
            tracked = _Tracked(bar, self._task(bar.desc), parent)
            self._open.append(tracked)
            self.active[tracked.task] = 1
            return tracked

    def close(self, tracked: _Tracked) -> None:
        with self._lock:
            if tracked not in self._open:
                return
            self._open.remove(tracked)
            if not any(t.task == tracked.task for t in self._open):
                self.active[tracked.task] = 0
            parent = tracked.parent
            if parent is not None and parent in self._open:
                unit = str(tracked.bar.unit)
                parent.children_done[unit] = parent.children_done.get(unit, 0.0) + float(tracked.bar.n)

    def snapshot(self) -> list[BarSnapshot]:
        """Rows for every open bar (newest bar wins per task and unit)."""
        with self._lock:
            open_bars = list(self._open)
        rows: dict[tuple[str, str], BarSnapshot] = {}
        for tracked in open_bars:
            row = _own_row(tracked)
            if row is not None:
                rows[(row.task, row.unit)] = row
        for tracked in open_bars:
            for row in _nested_rows(tracked, open_bars):
                rows.setdefault((row.task, row.unit), row)
        return list(rows.values())


def _timing(bar: Any) -> tuple[float, float | None]:
    elapsed = max(0.0, bar._time() - bar.start_t)
    ema_dt = bar._ema_dt()
    return elapsed, (bar._ema_dn() / ema_dt if ema_dt else None)


def _own_row(tracked: _Tracked) -> BarSnapshot | None:
    bar = tracked.bar
    try:
        n = float(bar.n)
        total = float(bar.total) if bar.total is not None else None
        elapsed, ema = _timing(bar)
    except (AttributeError, TypeError, ValueError):
        return None  # a bar closed or half-built under our feet
    rate, eta = rate_and_eta(n, total, elapsed, ema)
    parent = tracked.parent.task if tracked.parent is not None else ""
    return BarSnapshot(tracked.task, str(bar.unit), parent, n, total, rate, eta, elapsed)


def _nested_rows(tracked: _Tracked, open_bars: list[_Tracked]) -> Iterable[BarSnapshot]:
    """A parent's sums over nested units: done by closed children plus what open ones did."""
    units = dict(tracked.children_done)
    for child in open_bars:
        if child.parent is tracked:
            unit = str(child.bar.unit)
            units[unit] = units.get(unit, 0.0) + float(child.bar.n)
    own_unit = str(tracked.bar.unit)
    parent = tracked.parent.task if tracked.parent is not None else ""
    try:
        elapsed, _ = _timing(tracked.bar)
    except (AttributeError, TypeError):
        return
    for unit, done in units.items():
        if unit == own_unit:
            continue
        rate = done / elapsed if elapsed > 0 and done else None
        yield BarSnapshot(tracked.task, unit, parent, done, None, rate, None, elapsed)


board = ProgressBoard()


class _NullWriter:
    """Where bars of ranks other than 0 print: nowhere."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


def _rank() -> int:
    from otel_ml import runtime

    telemetry = runtime.get_telemetry()
    return telemetry.rank if telemetry is not None else ranks.rank_from_env()


class tqdm(_tqdm):  # noqa: N801 - the drop-in keeps tqdm's name
    """tqdm that also exports its progress (see module docstring). Any tqdm argument works.

    Example::

        for f in otel_ml.tqdm(files, desc="inference", unit="file"):
            for rows in otel_ml.tqdm(read(f), desc=f.name, unit="row", leave=False, total=n): ...
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._otel_ml: _Tracked | None = None
        if "file" not in kwargs and not kwargs.get("disable") and _rank() != 0:
            kwargs["file"] = _NullWriter()
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._otel_ml = board.register(self)

    def close(self) -> None:
        try:
            super().close()
        finally:
            tracked, self._otel_ml = getattr(self, "_otel_ml", None), None
            if tracked is not None:
                board.close(tracked)


def trange(*args: Any, **kwargs: Any) -> tqdm:
    """``otel_ml.tqdm(range(*args), **kwargs)``, like ``tqdm.trange``."""
    return tqdm(range(*args), **kwargs)


def register_progress_metrics(
    meter: Any, attributes: dict[str, str], source: ProgressBoard | None = None
) -> None:
    """The six ``otel_ml_progress_*`` gauges, read from ``source`` (the process board) at collection."""
    from opentelemetry.metrics import Observation

    from otel_ml import semconv

    source = source or board
    attrs = dict(attributes)
    cache: dict[str, list[BarSnapshot]] = {}

    def rows_callback(field: str, first: bool = False) -> Any:
        def callback(_: Any) -> list[Observation]:
            if first:  # the first progress gauge takes the snapshot the others reuse
                cache["rows"] = source.snapshot()
            out = []
            for row in cache.get("rows", ()):
                value = getattr(row, field)
                if value is not None:
                    labels = {**attrs, semconv.LABEL_TASK: row.task, semconv.LABEL_UNIT: row.unit}
                    labels[semconv.LABEL_PARENT] = row.parent
                    out.append(Observation(value, labels))
            return out

        return callback

    def active(_: Any) -> list[Observation]:
        with source._lock:
            items = list(source.active.items())
        return [Observation(flag, {**attrs, semconv.LABEL_TASK: task}) for task, flag in items]

    for spec, field in (
        (semconv.PROGRESS_COMPLETED, "completed"),
        (semconv.PROGRESS_TOTAL, "total"),
        (semconv.PROGRESS_RATE, "rate"),
        (semconv.PROGRESS_ETA, "eta"),
        (semconv.PROGRESS_ELAPSED, "elapsed"),
    ):
        callback = rows_callback(field, first=spec is semconv.PROGRESS_COMPLETED)
        meter.create_observable_gauge(spec.name, [callback], spec.unit, spec.description)
    spec = semconv.PROGRESS_ACTIVE
    meter.create_observable_gauge(spec.name, [active], spec.unit, spec.description)
