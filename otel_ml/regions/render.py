"""What a person reads of region timing: the end-of-run summary text and the live timing table.

Both show the paths as a tree with a last row, ``(outside regions)``, for the step time no
top-level region covered, so that the top-level rows and it add up to all step time. A sampled
path (``trace_modules(every=N)``: timed on some steps only) shows milliseconds per step it was
timed in and its share of those steps, marked ``(sampled 6/50)``: diluted over all steps, a
6 ms layer would read 0.2 ms.

:func:`render_text` draws the summary rows (:mod:`otel_ml.regions.stats`);
:class:`TimingTable`, an ``on_window`` callback of the aggregator, redraws the last ``every``
steps through the :class:`otel_ml.console.Console` (:func:`render_table` on a terminal,
:func:`render_line` elsewhere) from :func:`window_shares`.

Example::

    rows = aggregator.summary_rows()
    print(render_text(rows, "otel_ml timing summary", outside(rows, agg.step_time, agg.steps)))
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from otel_ml.regions.stats import OUTSIDE, Outside, SummaryRow, top_level_time, tree_order

if TYPE_CHECKING:  # annotations only: the aggregator calls the table, the table never builds one
    from otel_ml.regions.aggregator import Aggregator

#: The row that merges top-level paths past the table's ``top``, so the shares still add up.
OTHER = "(other regions)"
#: The note on the outside row: its part in the first step, which counts from ``init()`` (the setup).
FIRST_STEP = "in the first step, which counts from init()"
#: Top-level rows covering more than this percent of step time overlap (several threads).
OVERLAP_PCT = 100.5


def _sampled_note(timed_steps: int, steps: int | None) -> str:
    return f"sampled {timed_steps}/{steps}" if steps else f"sampled, {timed_steps} steps"


def render_text(rows: list[SummaryRow], title: str, outside_time: Outside | None = None) -> str:
    """A readable table, indented by hierarchy (two spaces per level), with the outside row last.

    ``ms/step`` is the total per step (per timed step for sampled rows, which say so at the end).
    """
    steps = outside_time.steps if outside_time is not None else None
    names = [2 * (r.depth - 1) + len(r.name) for r in rows] + ([len(OUTSIDE)] if outside_time else [])
    width = max([len("path"), *names]) + 2
    head = (
        f"{'path':<{width}}{'count':>8}{'ms/step':>10}{'mean ms':>11}{'p50 ms':>11}{'p95 ms':>11}"
        f"{'min ms':>11}{'max ms':>11}{'share':>8}{'self':>8}"
    )
    lines = [title, head, "-" * len(head)]
    for r in rows:
        label = "  " * (r.depth - 1) + r.name
        note = f"  {_sampled_note(r.timed_steps, steps)}" if r.sampled else ""
        lines.append(
            f"{label:<{width}}{r.count:>8}{r.ms_per_step:>10.3f}{r.mean_ms:>11.3f}{r.p50_ms:>11.3f}"
            f"{r.p95_ms:>11.3f}{r.min_ms:>11.3f}{r.max_ms:>11.3f}{r.share_pct:>7.1f}%{r.self_share_pct:>7.1f}%"
            f"{note}"
        )
    if outside_time is not None:
        o = outside_time
        note = ""
        if o.first_step_ms > 0 and o.total_ms > 0:
            note = f"  {o.share_pct * o.first_step_ms / o.total_ms:.1f}% {FIRST_STEP}"
        lines.append(f"{OUTSIDE:<{width}}{'':>8}{o.ms_per_step:>10.3f}{'':>55}{o.share_pct:>7.1f}%{note}")
    if any(r.sampled for r in rows):
        lines.append("sampled: timed on some steps only; ms/step and shares are per step it was timed in")
    if outside_time is not None and outside_time.covered_pct > OVERLAP_PCT:
        lines.append(
            f"top-level regions overlap (several threads): they cover {outside_time.covered_pct:.1f}% "
            "of step time"
        )
    return "\n".join(lines)


@dataclass
class WindowShare:
    """One row of the live table: ``ms`` per step (per timed step when ``sampled``) and ``pct`` of
    step time (of the timed steps' time when ``sampled``) over the table's last ``steps``.

    Example::

        WindowShare("forward/layers.1", "layers.1", 2, 6.02, 30.1, sampled=True, timed_steps=6, steps=50)
    """

    path: str
    name: str
    depth: int
    ms: float
    pct: float
    sampled: bool = False
    timed_steps: int = 0
    steps: int = 0


def window_shares(
    deltas: Mapping[Any, tuple[float, int, float, bool]], steps: int, elapsed: float, top: int = 10
) -> tuple[list[WindowShare], float]:
    """The rows of the live table and the top-level rows' percent of step time.

    ``deltas`` maps path nodes to (seconds, timed steps, their seconds, sampled) over the last
    ``steps`` closed steps of ``elapsed`` seconds. Every top-level path is a row (past ``top``,
    the smallest merge into ``(other regions)``), then the nested paths with the largest shares
    whose parent is shown, ``top`` rows in all, in tree order; ``(outside regions)`` comes last.
    """
    if steps <= 0 or elapsed <= 0:
        return [], 0.0
    order = tree_order([n for n, d in deltas.items() if d[0] > 0], lambda n: deltas[n][0])
    rows: dict[Any, WindowShare] = {}
    for node, depth, name, _ in order:
        seconds, timed, timed_time, flag = deltas[node]
        sampled = flag and 0 < timed < steps and timed_time > 0
        per, of = (timed, timed_time) if sampled else (steps, elapsed)
        rows[node] = WindowShare(
            node.path, name, depth, 1e3 * seconds / per, 100.0 * seconds / of, sampled, timed, steps
        )
    tops = [node for node, depth, _, _ in order if depth == 1]
    covered = sum(deltas[n][0] for n in tops)
    shown = set(tops[:top])
    merged = sum(deltas[n][0] for n in tops[top:])
    children: dict[Any, list[Any]] = {}
    for node, depth, _, parent in order:
        if depth > 1:
            children.setdefault(parent, []).append(node)
    # Largest share first among the rows whose parent is shown: a sampled child may show a larger
    # share (of its timed steps) than its parent does of all steps.
    first = (c for p in tops[:top] for c in children.get(p, []))
    candidates = [(-rows[c].pct, i, c) for i, c in enumerate(first)]
    heapq.heapify(candidates)
    tie = len(candidates)
    while candidates and len(shown) < top:
        _, _, node = heapq.heappop(candidates)
        shown.add(node)
        for child in children.get(node, []):
            tie += 1
            heapq.heappush(candidates, (-rows[child].pct, tie, child))
    out = [rows[node] for node, *_ in order if node in shown]
    if merged > 0:
        out.append(WindowShare(OTHER, OTHER, 1, 1e3 * merged / steps, 100.0 * merged / elapsed, steps=steps))
    rest = max(0.0, elapsed - covered)
    out.append(WindowShare(OUTSIDE, OUTSIDE, 1, 1e3 * rest / steps, 100.0 * rest / elapsed, steps=steps))
    return out, 100.0 * covered / elapsed


def _unit(share: WindowShare) -> str:
    return "ms/timed step" if share.sampled else "ms/step"


def _note(share: WindowShare) -> str:
    return f" ({_sampled_note(share.timed_steps, share.steps)})" if share.sampled else ""


def render_table(shares: Sequence[WindowShare], title: str, bar_width: int = 24) -> list[str]:
    """Live view: the rows of :func:`window_shares`, indented, with bar, milliseconds and percent."""
    labels = ["  " * (s.depth - 1) + s.name for s in shares]
    width = max([len("path"), *(len(label) for label in labels)])
    lines = [title]
    for label, s in zip(labels, shares, strict=True):
        filled = max(0, min(bar_width, round(bar_width * s.pct / 100.0)))
        bar = "█" * filled + "·" * (bar_width - filled)
        lines.append(f"{label:<{width}} {bar} {s.ms:9.2f} {_unit(s):<13} {s.pct:5.1f}%{_note(s)}")
    return lines


def render_line(shares: Sequence[WindowShare], title: str) -> str:
    """The same view on one line (full paths), for logs and non-terminal output."""
    items = (f"{s.path} {s.ms:.2f}{_unit(s)} {s.pct:.1f}%{_note(s)}" for s in shares)
    return title + " " + " | ".join(items)


def closed_totals(aggregator: Aggregator) -> dict[Any, tuple[float, int, float, bool]]:
    """Per path node: (seconds, steps it ran in, their seconds, sampled) of the closed steps.

    The aggregator drains all finished regions before it closes the steps they belong to, so when
    a step closes its statistics already hold regions of later steps (up to a pump tick's worth);
    :meth:`Aggregator.pending_seconds` gives them, and they are taken out here. Called from an
    ``on_window`` callback, which runs under the aggregator's lock.
    """
    pending = aggregator.pending_seconds()
    return {
        node: (s.total - pending.get(node, 0.0), s.windows, s.window_time, s.sampled)
        for node, s in aggregator.stats.items()
    }


class FirstStep:
    """``on_window`` callback: the time of the first closed step outside every top-level region.

    The first step counts from ``init()``, so this is mostly the setup before the loop; the
    summary shows it apart (:attr:`otel_ml.regions.stats.Outside.first_step_ms`).

    Example::

        first = FirstStep()
        agg = Aggregator(recorder, tracer, labels, on_window=[first])
        ...
        outside(agg.summary_rows(), agg.step_time, agg.steps, first.outside)
    """

    def __init__(self) -> None:
        self.outside = 0.0
        self._seen = False

    def __call__(self, aggregator: Aggregator, step: int | None, duration: float) -> None:
        if not self._seen:
            self._seen = True
            covered = top_level_time({node: t[0] for node, t in closed_totals(aggregator).items()})
            self.outside = max(0.0, duration - covered)


class TimingTable:
    """Every ``every`` closed steps, show where the time of those steps went (see module docstring).

    Example::

        agg = Aggregator(recorder, tracer, labels, on_window=[TimingTable(Console(), every=50, top=10)])
    """

    def __init__(self, console: Any, every: int = 50, top: int = 10) -> None:
        self._console = console
        self._every = every
        self._top = top
        self._steps = 0
        self._elapsed = 0.0
        self._last: dict[Any, tuple[float, int, float, bool]] = {}
        self._first = True

    def __call__(self, aggregator: Aggregator, step: int | None, duration: float) -> None:
        self._steps += 1
        self._elapsed += duration
        if self._steps < self._every or self._elapsed <= 0:
            return
        totals = closed_totals(aggregator)
        deltas = {}
        for node, (seconds, windows, window_time, sampled) in totals.items():
            before = self._last.get(node, (0.0, 0, 0.0, sampled))
            deltas[node] = (seconds - before[0], windows - before[1], window_time - before[2], sampled)
        shares, covered = window_shares(deltas, self._steps, self._elapsed, self._top)
        per_step = 1e3 * self._elapsed / self._steps
        title = f"otel_ml timing: last {self._steps} steps (to step {step}), {per_step:.2f} ms/step"
        if self._first:
            title += "; the first step counts from init()"
        if covered > OVERLAP_PCT:
            title += f"; top-level regions cover {covered:.0f}% of it (several threads, or begun earlier)"
        self._console.show(render_table(shares, title), render_line(shares, title), section="timing")
        self._last, self._steps, self._elapsed, self._first = totals, 0, 0.0, False
