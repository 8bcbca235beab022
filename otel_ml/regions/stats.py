"""Per-path timing statistics and the rows of the end-of-run summary (pure calculators).

:class:`PathStats` accumulates one path's durations: count, total, self time, min, max exactly,
and a bounded reservoir for percentiles (exact while a path has at most ``RESERVOIR`` samples,
a uniform random sample after that). :func:`build_summary` turns the stats into
:class:`SummaryRow` objects and :func:`summary_document` into the JSON summary; drawing them is
:mod:`otel_ml.regions.render`'s job.

Example::

    stats = PathStats()
    stats.add(0.004, self_time=0.001, host=0.004)
    rows = build_summary({node: stats}, step_time=0.01, steps=1)
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Samples kept per path for percentiles.
RESERVOIR = 4096


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
    """One path of the summary; times in milliseconds, shares in percent of step time."""

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


def _share(seconds: float, stats: PathStats, step_time: float, steps: int) -> float:
    """Percent of step time: of all closed steps, or for a sampled path (module timing every Nth
    step) of the steps it was timed in."""
    if step_time <= 0:
        return 0.0
    if stats.sampled and 0 < stats.windows < steps and stats.window_time > 0:
        return 100.0 * seconds / stats.window_time
    return 100.0 * seconds / step_time


def build_summary(stats: Mapping[Any, PathStats], step_time: float, steps: int) -> list[SummaryRow]:
    """Rows in tree order (parents first, siblings by total time, largest first).

    ``stats`` maps path nodes (anything with ``path``, ``name``, ``depth``, ``parent``) to stats;
    ``step_time`` is the summed duration of all closed steps, the denominator of the shares.
    """
    known = set(stats)
    rows: list[SummaryRow] = []

    def shown_ancestor(node: Any) -> Any:
        parent = node.parent
        while parent is not None and parent not in known:
            parent = parent.parent
        return parent

    def visit(nodes: list[Any], depth: int) -> None:
        for node in sorted(nodes, key=lambda n: -stats[n].total):
            s = stats[node]
            ordered = sorted(s.samples)
            ancestor = shown_ancestor(node)
            # A level that was never timed itself (``inference`` of ``inference/batch``) is not a
            # row: the name then carries the missing levels.
            prefix = ancestor.path + "/" if ancestor is not None and ancestor.path else ""
            rows.append(
                SummaryRow(
                    path=node.path,
                    name=node.path[len(prefix) :],
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
                )
            )
            visit(children.get(node, []), depth + 1)

    children: dict[Any, list[Any]] = {}
    roots = []
    for node in stats:
        ancestor = shown_ancestor(node)
        (children.setdefault(ancestor, []) if ancestor is not None else roots).append(node)
    visit(roots, 1)
    return rows


def summary_document(rows: list[SummaryRow], header: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON summary: run facts plus one object per path."""
    return {**header, "paths": [asdict(r) for r in rows]}
