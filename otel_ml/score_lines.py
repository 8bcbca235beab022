"""The pure part of :mod:`otel_ml.scores`: running statistics of scored batches and the lines printed.

:class:`ScoreSummary` merges each batch's :class:`~otel_ml.distribution.Summary` (the calculator
the distribution series use, so the terminal and the series count the same numbers);
:func:`sample_line`, :func:`batch_line` and :func:`summary_line` are the terminal lines;
:func:`json_score` is how a score is written to the scores file. No I/O, no OTel.

Example::

    s = ScoreSummary("score").merged(distribution.summarize([6.0, 8.0, float("nan")]), 3)
    summary_line(s)   # '[Summary] score: count=2 nonfinite=1 mean=7.000 min=6.000 max=8.000 std=1.000'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from otel_ml.distribution import Summary


@dataclass(frozen=True)
class ScoreSummary:
    """Every batch so far: ``samples`` seen, ``count`` finite ones and their statistics.

    ``mean`` is ``total / count`` (the histogram's ``_sum / _count``); ``std`` is the population
    standard deviation; the statistics are None while no score was finite.

    Example::

        s = ScoreSummary("score").merged(distribution.summarize([6.0, 8.0]), 2)
        (s.count, s.mean, s.std)   # (2, 7.0, 1.0)
    """

    name: str
    samples: int = 0
    count: int = 0
    nonfinite: int = 0
    total: float = 0.0
    minimum: float | None = None
    maximum: float | None = None
    m2: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def std(self) -> float | None:
        return math.sqrt(self.m2 / self.count) if self.count else None

    def merged(self, batch: Summary, samples: int) -> ScoreSummary:
        """This summary with one batch's :class:`~otel_ml.distribution.Summary` added (Chan's merge)."""
        seen = replace(self, samples=self.samples + samples, nonfinite=self.nonfinite + batch.nonfinite)
        if batch.count == 0 or batch.mean is None or batch.std is None:
            return seen
        count = self.count + batch.count
        m2 = batch.std**2 * batch.count
        if self.count:
            delta = batch.mean - self.total / self.count
            m2 += self.m2 + delta * delta * self.count * batch.count / count
        return replace(
            seen,
            count=count,
            total=self.total + batch.total,  # added batch by batch, as the histogram's _sum is
            minimum=batch.minimum if self.minimum is None else min(self.minimum, batch.minimum),
            maximum=batch.maximum if self.maximum is None else max(self.maximum, batch.maximum),
            m2=m2,
        )


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def one_line(text: Any, width: int) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``width`` characters with ``...``.

    Example::

        one_line("a\\n  b", 10)        # 'a b'
        one_line("x" * 20, 8)          # 'xxxxx...'
    """
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: max(0, width - 3)] + "..."


def sample_line(
    index: int,
    score: float,
    sample_id: Any = None,
    text: Any = None,
    *,
    width: int = 60,
    digits: int = 3,
    label: str = "Response",
) -> str:
    """``[Sample 3] id=q-3 Score: 6.800 | Response: ...`` (id and text only when given)."""
    ident = "" if sample_id is None else f" id={one_line(sample_id, 40)}"
    line = f"[Sample {index}]{ident} Score: {score:.{digits}f}"
    return line if text is None else f"{line} | {label}: {one_line(text, width)}"


def batch_line(number: int, first: int, batch: Summary, samples: int, name: str, digits: int = 3) -> str:
    """``[Batch 1] samples 0-3 done, avg_score=7.900`` (``, nonfinite=N`` when some were)."""
    done = f"[Batch {number}] samples {first}-{first + samples - 1} done"
    line = f"{done}, avg_{name}={_number(batch.mean, digits)}"
    return f"{line}, nonfinite={batch.nonfinite}" if batch.nonfinite else line


def summary_line(summary: ScoreSummary, digits: int = 3, title: str | None = None) -> str:
    """``[Summary] score: count=8 nonfinite=1 mean=7.125 min=5.000 max=9.100 std=1.234``.

    ``title`` (a file or data set name) goes in parentheses after the name.
    """
    values = (
        ("mean", summary.mean),
        ("min", summary.minimum),
        ("max", summary.maximum),
        ("std", summary.std),
    )
    stats = " ".join(f"{key}={_number(value, digits)}" for key, value in values)
    name = summary.name if not title else f"{summary.name} ({one_line(title, 60)})"
    return f"[Summary] {name}: count={summary.count} nonfinite={summary.nonfinite} {stats}"


def json_score(score: float) -> float | str:
    """A score as strict JSON: a finite float, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
    if score - score == 0.0:
        return score
    return "NaN" if score != score else ("Infinity" if score > 0 else "-Infinity")
