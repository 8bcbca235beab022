"""The open progress bars of this process and their snapshot rows: the data model of progress.

Everything that shows progress reads :class:`BarSnapshot` rows from here: the gauges
(:mod:`otel_ml.progress.metrics`), the ``/progress`` payload, rank 0's view and ``otel-ml top``.
The tqdm subclass (:mod:`otel_ml.progress.bar`) registers its bars on :data:`board`, the one
board of the process; ``init()`` configures it (rank, task budget) through
:meth:`ProgressBoard.configure`.

Labels: ``task`` is the bar's ``desc`` (bounded length), ``unit`` its unit, ``parent`` the task of
the bar it is nested in (``""`` at top level). A parent bar also exports the units of its
nested bars summed over them (files done *and* rows done). Distinct tasks per process are
capped; later ones are exported as ``(overflow)`` with one warning.

Example::

    board = ProgressBoard()
    board.snapshot()   # [] until a bar registers
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

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


class Tracked:
    """One open bar: its task label, the bar it is nested in and its thread."""

    __slots__ = ("bar", "children_done", "parent", "task", "thread")

    def __init__(self, bar: Any, task: str, parent: Tracked | None) -> None:
        self.bar = bar
        self.task = task
        self.parent = parent
        self.thread = threading.get_ident()
        self.children_done: dict[str, float] = {}  # unit -> units completed by closed children


class ProgressBoard:
    """The open bars of this process and what every task label last did.

    Example::

        board = ProgressBoard()
        board.snapshot()   # [] until a bar registers
    """

    def __init__(self, max_tasks: int = MAX_TASKS) -> None:
        self.max_tasks = max_tasks
        self._rank: int | None = None
        # Reentrant: a SIGTERM flush runs on the training thread and snapshots the board while
        # that thread may be creating or closing a bar.
        self._lock = threading.RLock()
        self._open: list[Tracked] = []
        self.active: dict[str, int] = {}
        #: The last top-level bar closed, as it was when it closed (what ``status.json`` reports
        #: after the loop's bar is gone), or None.
        self.last_closed: BarSnapshot | None = None

    def configure(self, *, rank: int, max_tasks: int) -> None:
        """Set this process's rank and task budget (``init()`` does); drop closed bars' labels.

        A new ``init()`` starts a fresh label budget: tasks of bars still open keep theirs.
        """
        with self._lock:
            self._rank = rank
            self.max_tasks = max_tasks
            open_tasks = {t.task for t in self._open}
            self.active = {task: flag for task, flag in self.active.items() if task in open_tasks}

    def reset(self) -> None:
        """Forget every bar, label and the configured rank (for tests: a fresh process)."""
        with self._lock:
            self._rank = None
            self.max_tasks = MAX_TASKS
            self._open.clear()
            self.active.clear()
            self.last_closed = None

    def rank(self) -> int:
        """The rank bars print for: the configured one, else the launcher's environment."""
        return self._rank if self._rank is not None else ranks.rank_from_env()

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

    def register(self, bar: Any) -> Tracked:
        with self._lock:
            thread = threading.get_ident()
            parent = next((t for t in reversed(self._open) if t.thread == thread), None)
            tracked = Tracked(bar, self._task(bar.desc), parent)
            self._open.append(tracked)
            self.active[tracked.task] = 1
            return tracked

    def close(self, tracked: Tracked) -> None:
        with self._lock:
            if tracked not in self._open:
                return
            self._open.remove(tracked)
            if not any(t.task == tracked.task for t in self._open):
                self.active[tracked.task] = 0
            parent = tracked.parent
            if parent is None:  # once per bar: what status.json shows once the loop's bar is gone
                self.last_closed = _own_row(tracked) or self.last_closed
            if parent is not None and parent in self._open:
                unit = str(tracked.bar.unit)
                parent.children_done[unit] = parent.children_done.get(unit, 0.0) + float(tracked.bar.n)

    def active_tasks(self) -> list[tuple[str, int]]:
        """``(task, 1 if a bar with that task is open else 0)`` for every task seen."""
        with self._lock:
            return list(self.active.items())

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


def _own_row(tracked: Tracked) -> BarSnapshot | None:
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


def _nested_rows(tracked: Tracked, open_bars: list[Tracked]) -> Iterable[BarSnapshot]:
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


#: The process's board: every ``otel_ml.tqdm`` registers here.
board = ProgressBoard()
