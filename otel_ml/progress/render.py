"""What a person sees of every rank's progress: the data model and its text rendering (pure).

Shared by rank 0's multi-rank terminal view (:mod:`otel_ml.progress.poller`) and ``otel-ml top``
(:mod:`otel_ml.cli.top`). A :class:`RankStatus` is one rank's bars plus a few training numbers;
:func:`render_lines` draws one line per rank (nested bars indented below it) and a global line.

Example::

    lines = render_lines([RankStatus(0, bars=[BarSnapshot("train", "step", "", 26, 30, 3.1, 1.3, 8.4)])])
    # ['[rank 0] train  87% ████████▋░ 26/30 step [3.10 step/s, ETA 00:01]', '[all]    train ...']
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm as _tqdm

from otel_ml.progress.board import BarSnapshot

_BLOCKS = " ▏▎▍▌▋▊▉█"


@dataclass
class RankStatus:
    """One rank as seen from outside: its bars and, when known, training numbers."""

    rank: int
    up: bool = True
    bars: list[BarSnapshot] = field(default_factory=list)
    error: str = ""
    step: float | None = None
    loss: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    gpu_memory_bytes: float | None = None
    gpu_reserved_bytes: float | None = None
    anomalies: list[str] = field(default_factory=list)
    #: Shown instead of "rank N" (a target whose rank is unknown because it is down).
    name: str = ""

    def main_bar(self, task: str | None = None) -> BarSnapshot | None:
        """The top-level bar (of ``task`` when given) in its own unit."""
        tops = [b for b in self.bars if not b.parent and (task is None or b.task == task)]
        own = [b for b in tops if b.total is not None] or tops
        return own[0] if own else None


def bar(fraction: float, width: int = 10) -> str:
    fraction = min(1.0, max(0.0, fraction))
    full, rest = divmod(fraction * width, 1)
    text = "█" * int(full)
    partial = int(rest * (len(_BLOCKS) - 1))
    if partial and len(text) < width:
        text += _BLOCKS[partial]
    return (text + "░" * width)[:width]


def number(value: float) -> str:
    """3 significant figures with k/M/G, as tqdm's unit_scale shows them."""
    return (
        _tqdm.format_sizeof(value)
        if value >= 1000
        else f"{value:g}"
        if value == int(value)
        else f"{value:.3g}"
    )


def interval(seconds: float | None) -> str:
    return "?" if seconds is None else _tqdm.format_interval(seconds)


def describe(row: BarSnapshot, width: int = 10) -> str:
    """``train  87% ████████▋░ 26/30 step [3.10 step/s, ETA 00:01]``."""
    parts = [row.task]
    if row.total:
        fraction = row.completed / row.total
        done = f"{number(row.completed)}/{number(row.total)}"
        parts.append(f"{100 * fraction:3.0f}% {bar(fraction, width)} {done} {row.unit}")
    else:
        parts.append(f"{number(row.completed)} {row.unit}")
    rate = f"{number(row.rate)} {row.unit}/s" if row.rate else f"? {row.unit}/s"
    eta = f", ETA {interval(row.eta)}" if row.total else f", {interval(row.elapsed)} elapsed"
    parts.append(f"[{rate}{eta}]")
    return " ".join(parts)


def _label(rank: int | str) -> str:
    return f"[rank {rank}]"


def rank_lines(status: RankStatus, width: int = 10) -> list[str]:
    label = f"[{status.name}]" if status.name else _label(status.rank)
    if not status.up:
        return [f"{label} down{': ' + status.error if status.error else ''}"]
    if not status.bars:
        return [f"{label} no open progress bar"]
    tasks = list(dict.fromkeys(b.task for b in status.bars if not b.parent)) or [status.bars[0].task]
    lines = []
    for task in tasks:
        top = status.main_bar(task) or status.bars[0]
        extra = [b for b in status.bars if b.task == top.task and b.unit != top.unit and not b.parent]
        text = f"{label} {describe(top, width)}"
        for agg in extra:
            text += f" | {number(agg.completed)} {agg.unit} [{number(agg.rate or 0)} {agg.unit}/s]"
        lines.append(text)
        for child in (b for b in status.bars if b.parent == top.task):
            lines.append(f"{' ' * len(label)} └ {describe(child, width)}")
    return lines


def global_line(statuses: list[RankStatus], width: int = 10) -> str | None:
    """Sum of done and total, combined rate and the slowest rank's ETA, for the common task."""
    up = [s for s in statuses if s.up]
    tasks = Counter(b.task for s in up for b in s.bars if not b.parent and b.total is not None)
    if not tasks:
        return None
    task = tasks.most_common(1)[0][0]
    mains = [(s, s.main_bar(task)) for s in up]
    mains = [(s, b) for s, b in mains if b is not None and b.total is not None]
    done = sum(b.completed for _, b in mains)
    total = sum(b.total or 0 for _, b in mains)
    rate = sum(b.rate or 0 for _, b in mains)
    etas = [(b.eta, s.rank) for s, b in mains if b.eta is not None]
    slowest = max(etas) if etas else None
    fraction = done / total if total else 0.0
    unit = mains[0][1].unit
    text = (
        f"[all {len(mains)}/{len(statuses)}] {task} {100 * fraction:3.0f}% {bar(fraction, width)} "
        f"{number(done)}/{number(total)} {unit} [{number(rate)} {unit}/s"
    )
    if slowest is not None:
        text += f", ETA {interval(slowest[0])} (slowest: rank {slowest[1]})"
    return text + "]"


def slowest_first(statuses: list[RankStatus], limit: int) -> list[RankStatus]:
    """At most ``limit`` ranks: down ones first, then the longest ETAs (all when they fit)."""
    if len(statuses) <= limit:
        return statuses

    def urgency(status: RankStatus) -> tuple[int, float]:
        main = status.main_bar()
        eta = main.eta if main is not None and main.eta is not None else -1.0
        return (0 if not status.up else 1, -eta)

    return sorted(statuses, key=urgency)[:limit]


def render_lines(
    statuses: list[RankStatus], width: int = 10, total: list[RankStatus] | None = None
) -> list[str]:
    """One line per rank (plus nested bars) and the global line over ``total`` (default: the same
    ranks); ranks left out are counted on a line of their own."""
    everyone = statuses if total is None else total
    lines = [ln for status in sorted(statuses, key=lambda s: s.rank) for ln in rank_lines(status, width)]
    hidden = len(everyone) - len(statuses)
    if hidden > 0:
        lines.append(f"... {hidden} more rank(s) on time (otel-ml top shows them all)")
    summary = global_line(everyone, width)
    if summary is not None:
        lines.append(summary)
    return lines


def compact_line(statuses: list[RankStatus], total: list[RankStatus] | None = None) -> str:
    """The ranks on one line, for logs: ``ranks: 0 train 87% 26/30 | 1 train 80% 24/30 | all ...``;
    the global part covers ``total`` (default: the same ranks)."""
    parts = []
    for status in sorted(statuses, key=lambda s: s.rank):
        main = status.main_bar()
        if not status.up:
            parts.append(f"{status.rank} down")
        elif main is None:
            parts.append(f"{status.rank} idle")
        elif main.total:
            parts.append(
                f"{status.rank} {main.task} {100 * main.completed / main.total:.0f}% "
                f"{number(main.completed)}/{number(main.total)} ETA {interval(main.eta)}"
            )
        else:
            parts.append(f"{status.rank} {main.task} {number(main.completed)} {main.unit}")
    everyone = statuses if total is None else total
    if len(everyone) > len(statuses):
        parts.append(f"+{len(everyone) - len(statuses)} more")
    summary = global_line(everyone, width=0)
    return "otel_ml ranks: " + " | ".join(parts) + (f" || {summary}" if summary else "")
