"""What a person reads of region timing: the end-of-run summary text and the live top-N table.

:func:`render_text` indents the summary rows (:mod:`otel_ml.regions.stats`) by hierarchy;
:class:`TimingTable`, an ``on_window`` callback of the aggregator, redraws the paths with the most
self time every ``every`` steps through the :class:`otel_ml.console.Console` (:func:`render_table`
on a terminal, :func:`render_line` elsewhere).

Example::

    print(render_text(aggregator.summary_rows(), "otel_ml timing summary"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from otel_ml.regions.stats import SummaryRow

if TYPE_CHECKING:  # annotations only: the aggregator calls the table, the table never builds one
    from otel_ml.regions.aggregator import Aggregator


def render_text(rows: list[SummaryRow], title: str) -> str:
    """A readable table, indented by hierarchy (two spaces per level)."""
    width = max([len("path"), *(2 * (r.depth - 1) + len(r.name) for r in rows)]) + 2
    head = (
        f"{'path':<{width}}{'count':>8}{'mean ms':>11}{'p50 ms':>11}{'p95 ms':>11}"
        f"{'min ms':>11}{'max ms':>11}{'share':>8}{'self':>8}"
    )
    lines = [title, head, "-" * len(head)]
    for r in rows:
        label = "  " * (r.depth - 1) + r.name
        lines.append(
            f"{label:<{width}}{r.count:>8}{r.mean_ms:>11.3f}{r.p50_ms:>11.3f}{r.p95_ms:>11.3f}"
            f"{r.min_ms:>11.3f}{r.max_ms:>11.3f}{r.share_pct:>7.1f}%{r.self_share_pct:>7.1f}%"
        )
    return "\n".join(lines)


def render_table(
    shares: Sequence[tuple[str, float, float]], title: str, top: int = 10, bar_width: int = 24
) -> list[str]:
    """Live top-N view: ``shares`` holds (path, ms per step, percent of step time)."""
    ranked = sorted(shares, key=lambda item: -item[2])[:top]
    width = max([len("path"), *(len(p) for p, _, _ in ranked)])
    lines = [title]
    for path, ms, pct in ranked:
        filled = max(0, min(bar_width, round(bar_width * pct / 100.0)))
        lines.append(f"{path:<{width}} {'█' * filled}{'·' * (bar_width - filled)} {ms:9.2f} ms {pct:5.1f}%")
    return lines


def render_line(shares: Sequence[tuple[str, float, float]], title: str, top: int = 5) -> str:
    """The same view on one line, for logs and non-terminal output."""
    ranked = sorted(shares, key=lambda item: -item[2])[:top]
    return title + " " + " | ".join(f"{p} {ms:.2f}ms {pct:.1f}%" for p, ms, pct in ranked)


class TimingTable:
    """Every ``every`` closed steps, show the top paths by self time since the last refresh.

    Example::

        agg = Aggregator(recorder, tracer, labels, on_window=[TimingTable(Console(), every=50, top=10)])
    """

    def __init__(self, console: Any, every: int = 50, top: int = 10) -> None:
        self._console = console
        self._every = every
        self._top = top
        self._steps = 0
        self._elapsed = 0.0
        self._last: dict[str, float] = {}

    def __call__(self, aggregator: Aggregator, step: int | None, duration: float) -> None:
        self._steps += 1
        self._elapsed += duration
        if self._steps < self._every or self._elapsed <= 0:
            return
        totals = aggregator.self_totals()
        shares = []
        for path, total in totals.items():
            delta = total - self._last.get(path, 0.0)
            if delta > 0:
                shares.append((path, 1e3 * delta / self._steps, 100.0 * delta / self._elapsed))
        per_step = 1e3 * self._elapsed / self._steps
        title = f"otel_ml timing: last {self._steps} steps (to step {step}), {per_step:.2f} ms/step"
        self._console.show(
            render_table(shares, title, self._top), render_line(shares, title, self._top), section="timing"
        )
        self._last, self._steps, self._elapsed = totals, 0, 0.0
