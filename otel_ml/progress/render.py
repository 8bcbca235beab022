"""What a person sees of every rank's progress: the data model and its text rendering (pure).

Shared by rank 0's multi-rank terminal view (:mod:`otel_ml.progress.poller`) and ``otel-ml top``
(:mod:`otel_ml.cli.top`). A :class:`RankStatus` is one rank's bars plus a few training numbers,
its anomalies and its time per step in each top-level region; :func:`render_lines` draws one line
per rank (nested bars indented below it, active anomalies and the slowest rank flagged on it) and
a global line that counts the ranks with anomalies and names the slowest rank.

The slowest rank: in a synchronous job every rank runs at the straggler's pace (the others wait
in the collective), so rates and ETAs agree and cannot tell it. With region timings from three
or more ranks, it is the rank whose time in one region (or outside any) exceeds that region's
median over the ranks by the most, when that is at least 10% of the median step time (the waiting
ranks share their extra wait, the straggler alone has its extra work); else the longest ETA.

Example::

    lines = render_lines([RankStatus(0, bars=[BarSnapshot("train", "step", "", 26, 30, 3.1, 1.3, 8.4)])])
    # ['[rank 0] train  87% ████████▋░ 26/30 step [3.10 step/s, ETA 00:01]', '[all]    train ...']
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm as _tqdm

from otel_ml.progress.board import BarSnapshot

_BLOCKS = " ▏▎▍▌▋▊▉█"
#: Ranks named on the global line's anomaly count (the rest are counted).
MAX_NAMED_RANKS = 8
#: A region excess over the ranks' median that names a straggler, as a share of the median step time.
STRAGGLER_SHARE = 0.10
#: Region timings from this many ranks are needed to tell the straggler from the ranks waiting for it.
STRAGGLER_MIN_RANKS = 3
OUTSIDE = "(outside regions)"


@dataclass(frozen=True)
class Flag:
    """One anomaly episode of a rank (from its ``/progress`` episodes, or a type from ``/metrics``).

    Example::

        Flag("nonfinite", "loss", first_step=300).text()   # 'NaN/Inf loss since step 300'
        Flag("nonfinite", "loss", 300, message="loss is nan at step 300").text()   # 'NaN loss ...'
    """

    type: str
    key: str = ""
    first_step: int | None = None
    last_step: int | None = None
    count: int = 0
    active: bool = True
    start_time: float | None = None
    end_time: float | None = None
    #: The episode's message as the rank logged it (``loss is nan at step 300``).
    message: str = ""

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Flag:
        """From an episode dict (:meth:`otel_ml.anomaly.Episode.as_dict`); unknown fields are ignored."""

        def known(value: Any, kind: type) -> Any:
            return kind(value) if isinstance(value, (int, float)) else None

        return cls(
            type=str(row.get("type", "?")),
            key=str(row.get("key") or ""),
            first_step=known(row.get("first_step"), int),
            last_step=known(row.get("last_step"), int),
            count=int(row.get("count") or 0),
            active=bool(row.get("active", row.get("end_time") is None)),
            start_time=known(row.get("start_time"), float),
            end_time=known(row.get("end_time"), float),
            message=str(row.get("message") or ""),
        )

    def text(self) -> str:
        """What happened, for a person: ``NaN loss since step 300``, ``stalled (no step)``.

        Whether a non-finite value was NaN or Inf comes from the rank's message; without one
        (``otel-ml top`` reads only the type) it says NaN/Inf."""
        if self.type == "nonfinite":
            value = self.message.rpartition(" at step")[0].rpartition(" is ")[2]
            word = {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}.get(value, "NaN/Inf")
            what = f"{word} {self.key}" if self.key else f"{word} values"
        elif self.type == "stall":
            return "stalled (no step)"
        elif self.type == "loss_plateau":
            what = "loss plateau"
        else:
            what = self.type.replace("_", " ")
        return what if self.first_step is None else f"{what} since step {self.first_step}"


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
    #: The rank's anomaly episodes, active and recently ended.
    anomalies: list[Flag] = field(default_factory=list)
    #: Mean step time (ms) and mean ms per step in each top-level region (and ``OUTSIDE``).
    step_ms: float | None = None
    region_ms: dict[str, float] = field(default_factory=dict)
    #: Shown instead of "rank N" (a target whose rank is unknown because it is down).
    name: str = ""

    def main_bar(self, task: str | None = None) -> BarSnapshot | None:
        """The top-level bar (of ``task`` when given) in its own unit."""
        tops = [b for b in self.bars if not b.parent and (task is None or b.task == task)]
        own = [b for b in tops if b.total is not None] or tops
        return own[0] if own else None

    def active_anomalies(self) -> list[Flag]:
        """Active episodes, one per type (the latest)."""
        latest = {flag.type: flag for flag in self.anomalies if flag.active}
        return list(latest.values())


@dataclass(frozen=True)
class Slowest:
    """The slowest rank and why (``forward +20.1 ms/step``; empty when named by ETA)."""

    rank: int
    reason: str = ""


def top_level_totals(self_totals: Mapping[str, float], separator: str = "/") -> dict[str, float]:
    """Seconds per top-level region from cumulative self seconds per path (a region's self times
    summed over its subtree are its whole time)."""
    totals: dict[str, float] = {}
    for path, seconds in self_totals.items():
        top = path.split(separator, 1)[0]
        totals[top] = totals.get(top, 0.0) + seconds
    return totals


def region_times(
    totals: Mapping[str, float], steps: int, step_time: float
) -> tuple[float | None, dict[str, float]]:
    """Mean step ms and mean ms per step of each top-level region (seconds in ``totals``), plus
    the step time outside them as ``OUTSIDE``."""
    if steps <= 0:
        return None, {}
    step_ms = 1000 * step_time / steps
    regions = {name: 1000 * seconds / steps for name, seconds in totals.items()}
    regions[OUTSIDE] = max(0.0, step_ms - sum(regions.values()))
    return step_ms, regions


def slowest(statuses: list[RankStatus]) -> Slowest | None:
    """The slowest up rank (see module docstring), or None when fewer than two ranks tell."""
    up = [s for s in statuses if s.up]
    timed = [s for s in up if s.region_ms and s.step_ms]
    if len(timed) >= STRAGGLER_MIN_RANKS:
        median_step = statistics.median(s.step_ms or 0.0 for s in timed)
        best: tuple[float, int, str] | None = None
        for region in sorted({r for s in timed for r in s.region_ms}):
            values = [s.region_ms.get(region, 0.0) for s in timed]
            median = statistics.median(values)
            for status, value in zip(timed, values, strict=True):
                excess = value - median
                if best is None or excess > best[0]:
                    best = (excess, status.rank, region)
        if best is not None and best[0] >= max(STRAGGLER_SHARE * median_step, 1e-3):
            return Slowest(best[1], f"{best[2]} +{best[0]:.1f} ms/step")
    mains = [(s, s.main_bar()) for s in up]
    etas = [(b.eta, s.rank) for s, b in mains if b is not None and b.eta is not None]
    if etas:
        return Slowest(max(etas)[1])
    rated = [(b.rate, s.rank) for s, b in mains if b is not None and b.rate]
    return Slowest(min(rated)[1]) if len(rated) > 1 else None


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


def flags_text(status: RankStatus) -> str:
    """``⚠ NaN/Inf loss since step 300; loss spike since step 310`` (empty when none is active)."""
    active = status.active_anomalies()
    return "⚠ " + "; ".join(flag.text() for flag in active) if active else ""


def _slow_text(slow: Slowest | None, rank: int) -> str:
    if slow is None or slow.rank != rank:
        return ""
    return "◀ slowest" + (f": {slow.reason}" if slow.reason else "")


def rank_lines(status: RankStatus, width: int = 10, slow: Slowest | None = None) -> list[str]:
    """The rank's lines; its first one ends with its active anomalies and, when it is ``slow``'s
    rank, the slowest mark."""
    label = f"[{status.name}]" if status.name else _label(status.rank)
    if not status.up:
        return [f"{label} down{': ' + status.error if status.error else ''}"]
    marks = " ".join(m for m in (flags_text(status), _slow_text(slow, status.rank)) if m)
    marks = f"  {marks}" if marks else ""
    if not status.bars:
        return [f"{label} no open progress bar{marks}"]
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
    lines[0] += marks
    return lines


def anomaly_summary(statuses: list[RankStatus]) -> str | None:
    """``1 rank with anomalies: 2 (nonfinite)``, or None when no rank has an active one."""
    flagged = [(s.rank, s.active_anomalies()) for s in statuses if s.up]
    flagged = sorted((rank, flags) for rank, flags in flagged if flags)
    if not flagged:
        return None
    named = ", ".join(
        f"{rank} ({', '.join(f.type for f in flags)})" for rank, flags in flagged[:MAX_NAMED_RANKS]
    )
    if len(flagged) > MAX_NAMED_RANKS:
        named += f", +{len(flagged) - MAX_NAMED_RANKS} more"
    noun = "rank" if len(flagged) == 1 else "ranks"
    return f"{len(flagged)} {noun} with anomalies: {named}"


def global_line(statuses: list[RankStatus], width: int = 10) -> str | None:
    """Sum of done and total, combined rate and the slowest rank, for the common task; then the
    ranks with anomalies. None when there is neither a common task nor an anomaly."""
    up = [s for s in statuses if s.up]
    alarms = anomaly_summary(statuses)
    tasks = Counter(b.task for s in up for b in s.bars if not b.parent and b.total is not None)
    if not tasks:
        return None if alarms is None else f"[all {len(up)}/{len(statuses)}] {alarms}"
    task = tasks.most_common(1)[0][0]
    mains = [(s, s.main_bar(task)) for s in up]
    mains = [(s, b) for s, b in mains if b is not None and b.total is not None]
    done = sum(b.completed for _, b in mains)
    total = sum(b.total or 0 for _, b in mains)
    rate = sum(b.rate or 0 for _, b in mains)
    etas = [b.eta for _, b in mains if b.eta is not None]
    slow = slowest(statuses) if len(up) > 1 else None
    fraction = done / total if total else 0.0
    unit = mains[0][1].unit
    text = (
        f"[all {len(mains)}/{len(statuses)}] {task} {100 * fraction:3.0f}% {bar(fraction, width)} "
        f"{number(done)}/{number(total)} {unit} [{number(rate)} {unit}/s"
    )
    if etas:
        text += f", ETA {interval(max(etas))}"
    if slow is not None:
        text += f" (slowest: rank {slow.rank}{', ' + slow.reason if slow.reason else ''})"
    return text + "]" + (f" | {alarms}" if alarms else "")


def slowest_first(statuses: list[RankStatus], limit: int) -> list[RankStatus]:
    """At most ``limit`` ranks: down ones first, then ranks with anomalies, then the longest ETAs
    (all when they fit)."""
    if len(statuses) <= limit:
        return statuses

    def urgency(status: RankStatus) -> tuple[int, int, float]:
        main = status.main_bar()
        eta = main.eta if main is not None and main.eta is not None else -1.0
        return (0 if not status.up else 1, 0 if status.active_anomalies() else 1, -eta)

    return sorted(statuses, key=urgency)[:limit]


def render_lines(
    statuses: list[RankStatus], width: int = 10, total: list[RankStatus] | None = None
) -> list[str]:
    """One line per rank (plus nested bars) and the global line over ``total`` (default: the same
    ranks); ranks left out are counted on a line of their own."""
    everyone = statuses if total is None else total
    slow = slowest(everyone) if sum(s.up for s in everyone) > 1 else None
    lines = [
        ln for status in sorted(statuses, key=lambda s: s.rank) for ln in rank_lines(status, width, slow)
    ]
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
            continue
        if main is None:
            text = f"{status.rank} idle"
        elif main.total:
            text = (
                f"{status.rank} {main.task} {100 * main.completed / main.total:.0f}% "
                f"{number(main.completed)}/{number(main.total)} ETA {interval(main.eta)}"
            )
        else:
            text = f"{status.rank} {main.task} {number(main.completed)} {main.unit}"
        flags = flags_text(status)
        parts.append(f"{text} {flags}" if flags else text)
    everyone = statuses if total is None else total
    if len(everyone) > len(statuses):
        parts.append(f"+{len(everyone) - len(statuses)} more")
    summary = global_line(everyone, width=0)
    return "otel_ml ranks: " + " | ".join(parts) + (f" || {summary}" if summary else "")


def episode_changes(
    seen: dict[int, dict[tuple[str, float | None], bool]], statuses: list[RankStatus]
) -> list[str]:
    """Log lines for anomaly episodes that started or ended since the last call (``seen`` is the
    caller's memory: rank -> episode -> active, updated in place). An episode that started and
    ended between two calls gets both lines; one the payload no longer lists is forgotten."""
    lines = []
    for status in statuses:
        if not status.up:
            continue
        before = seen.get(status.rank, {})
        now: dict[tuple[str, float | None], bool] = {}
        for flag in status.anomalies:
            key = (flag.type, flag.start_time)
            now[key] = flag.active
            was = before.get(key)
            if was is None:
                lines.append(f"otel_ml: rank {status.rank} anomaly: {flag.text()} ({flag.type})")
            if not flag.active and was is not False:
                steps = "no step" if flag.first_step is None else f"steps {flag.first_step}-{flag.last_step}"
                lines.append(
                    f"otel_ml: rank {status.rank} anomaly ended: {flag.type}"
                    f"{' on ' + flag.key if flag.key else ''}, {steps}, {flag.count} value(s)"
                )
        seen[status.rank] = now
    return lines
