"""Per-path timing statistics and the rows of the end-of-run summary (pure calculators).

:class:`PathStats` accumulates one path's durations: count, total, self time, min, max exactly,
and a bounded reservoir for percentiles (exact while a path has at most ``RESERVOIR`` samples,
a uniform random sample after that). :func:`build_summary` turns the stats into
:class:`SummaryRow` objects, :func:`outside` finds the step time no top-level region covered
(so that the top-level rows and it add up to all step time), and :func:`summary_document` makes
the JSON summary; drawing them is :mod:`otel_ml.regions.render`'s job.

A path timed on some steps only (``trace_modules(every=N)``) is *sampled*: its milliseconds and
shares are per step it was timed in, not diluted over all steps.

Example::

    stats = PathStats()
    stats.add(0.004, self_time=0.001, host=0.004)
    rows = build_summary({node: stats}, step_time=0.01, steps=1)
    outside(rows, step_time=0.01, steps=1).share_pct  # 60.0
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Samples kept per path for percentiles.
RESERVOIR = 4096
#: The row of step time that no top-level region covered.
OUTSIDE = "(outside regions)"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (NumPy's default) of already sorted values; q in [0, 100]."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class PathStats:
    """Running statistics of one path (seconds).

    Example::

        s = PathStats(); s.add(1.0, 0.5, 1.0); s.count  # 1
    """

    __slots__ = (
        "_rng",
        "count",
        "gpu_count",
        "host_total",
        "max",
        "min",
        "sampled",
        "samples",
        "self_total",
        "total",
        "window_time",
        "windows",
    )

    def __init__(self, seed: int = 0) -> None:
        self.count = 0
        self.gpu_count = 0
        self.total = 0.0
        self.self_total = 0.0
        self.host_total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.samples: list[float] = []
        self.windows = 0  # closed steps in which the path ran
        self.window_time = 0.0  # their summed duration, seconds
        self.sampled = False  # timed on some steps only (trace_modules with every > 1)
        self._rng = random.Random(seed)

    def add(self, duration: float, self_time: float, host: float, gpu: bool = False) -> None:
        self.count += 1
        self.gpu_count += gpu
        self.total += duration
        self.self_total += self_time
        self.host_total += host
        if duration < self.min:
            self.min = duration
        if duration > self.max:
            self.max = duration
        if len(self.samples) < RESERVOIR:
            self.samples.append(duration)
        else:
            slot = int(self._rng.random() * self.count)  # randrange costs 5x more, per region
            if slot < RESERVOIR:
                self.samples[slot] = duration


@dataclass
class SummaryRow:
    """One path of the summary; times in milliseconds, shares in percent of step time.

    ``sampled`` paths (timed on ``timed_steps`` of the steps only) have ``ms_per_step`` and
    shares per step they were timed in; ``total_ms`` is always the time really measured.
    """

    path: str
    name: str
    depth: int
    count: int
    total_ms: float
    self_ms: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float
    share_pct: float
    self_share_pct: float
    gpu_timed: bool
    sampled: bool = False
    timed_steps: int = 0
    ms_per_step: float = 0.0


@dataclass
class Outside:
    """Step time outside every top-level region: ``total_ms`` is step time minus the time of the
    top-level rows (never below zero); ``covered_pct`` is the top-level rows' time in percent of
    step time, above 100 when they overlap (regions on several threads at once).

    ``first_step_ms`` is the part of ``total_ms`` in the first step, which counts from ``init()``:
    the setup before the loop (building the model, the process group) is outside any region.

    Example::

        outside(rows, step_time=0.04, steps=4)  # Outside(total_ms=4.0, ms_per_step=1.0, share_pct=10.0, ...)
    """

    total_ms: float
    ms_per_step: float
    share_pct: float
    covered_pct: float
    steps: int
    first_step_ms: float = 0.0


def _share(seconds: float, stats: PathStats, step_time: float, steps: int) -> float:
    """Percent of step time: of all closed steps, or for a sampled path (module timing every Nth
    step) of the steps it was timed in."""
    if step_time <= 0:
        return 0.0
    if is_sampled(stats, steps) and stats.window_time > 0:
        return 100.0 * seconds / stats.window_time
    return 100.0 * seconds / step_time


def tree_order(nodes: Iterable[Any], size: Callable[[Any], float]) -> list[tuple[Any, int, str, Any]]:
    """``(node, depth, name, shown parent)`` in tree order: parents first, siblings by ``size``,
    largest first. Depth 1 is the top level.

    ``nodes`` are path nodes (anything with ``path`` and ``parent``). A level that was never timed
    itself (``inference`` of ``inference/batch``) is not a row: the name then carries the missing
    levels, and the shown parent is the nearest ancestor among ``nodes`` (None at the top level).
    """
    known = dict.fromkeys(nodes)  # a dict, not a set: equal sizes keep the given order

    def shown_ancestor(node: Any) -> Any:
        parent = node.parent
        while parent is not None and parent not in known:
            parent = parent.parent
        return parent

    children: dict[Any, list[Any]] = {}
    for node in known:
        children.setdefault(shown_ancestor(node), []).append(node)
    out: list[tuple[Any, int, str, Any]] = []

    def visit(parent: Any, depth: int) -> None:
        for node in sorted(children.get(parent, []), key=lambda n: -size(n)):
            prefix = parent.path + "/" if parent is not None and parent.path else ""
            out.append((node, depth, node.path[len(prefix) :], parent))
            visit(node, depth + 1)

    visit(None, 1)
    return out


def is_sampled(stats: PathStats, steps: int) -> bool:
    """Timed on some of the closed steps only (module timing every Nth step)."""
    return stats.sampled and 0 < stats.windows < steps


def build_summary(stats: Mapping[Any, PathStats], step_time: float, steps: int) -> list[SummaryRow]:
    """Rows in tree order (parents first, siblings by total time, largest first).

    ``stats`` maps path nodes (anything with ``path``, ``name``, ``depth``, ``parent``) to stats;
    ``step_time`` is the summed duration of all closed steps, the denominator of the shares.
    """
    rows: list[SummaryRow] = []
    for node, depth, name, _ in tree_order(stats, lambda n: stats[n].total):
        s = stats[node]
        ordered = sorted(s.samples)
        sampled = is_sampled(s, steps)
        per = s.windows if sampled else steps
        rows.append(
            SummaryRow(
                path=node.path,
                name=name,
                depth=depth,
                count=s.count,
                total_ms=s.total * 1e3,
                self_ms=s.self_total * 1e3,
                mean_ms=s.total / s.count * 1e3 if s.count else 0.0,
                p50_ms=percentile(ordered, 50) * 1e3,
                p95_ms=percentile(ordered, 95) * 1e3,
                min_ms=s.min * 1e3,
                max_ms=s.max * 1e3,
                share_pct=_share(s.total, s, step_time, steps),
                self_share_pct=_share(s.self_total, s, step_time, steps),
                gpu_timed=s.gpu_count > 0,
                sampled=sampled,
                timed_steps=s.windows,
                ms_per_step=s.total / per * 1e3 if per else 0.0,
            )
        )
    return rows


def top_level_time(totals: Mapping[Any, float]) -> float:
    """The summed time of the top-level paths among ``totals`` (path node -> seconds)."""
    timed = [node for node, seconds in totals.items() if seconds > 0]
    return sum(totals[node] for node, depth, _, _ in tree_order(timed, totals.__getitem__) if depth == 1)


def outside(
    rows: Sequence[SummaryRow], step_time: float, steps: int, first_step_outside: float = 0.0
) -> Outside:
    """The step time no top-level row covered (``step_time`` in seconds, summed over ``steps``;
    ``first_step_outside``: seconds of it in the first step).

    Top-level rows count with all the time they measured, sampled or not, so that the top-level
    rows' time and this add up to ``step_time`` (unless the top-level rows overlap).
    """
    step_ms = step_time * 1e3
    covered = sum(r.total_ms for r in rows if r.depth == 1)
    total = max(0.0, step_ms - covered)
    return Outside(
        total_ms=total,
        ms_per_step=total / steps if steps > 0 else 0.0,
        share_pct=100.0 * total / step_ms if step_ms > 0 else 0.0,
        covered_pct=100.0 * covered / step_ms if step_ms > 0 else 0.0,
        steps=steps,
        first_step_ms=min(total, max(0.0, first_step_outside * 1e3)),
    )


def summary_document(
    rows: list[SummaryRow], header: Mapping[str, Any], outside_time: Outside | None = None
) -> dict[str, Any]:
    """The JSON summary: run facts, the time outside every region and one object per path."""
    document: dict[str, Any] = dict(header)
    if outside_time is not None:
        document["outside_regions"] = asdict(outside_time)
    document["paths"] = [asdict(r) for r in rows]
    return document
