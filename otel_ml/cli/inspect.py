"""``otel-ml inspect RUN_DIR [--json]``: how each rank of a run is doing or how it ended.

Per rank it reads ``status.json`` (:mod:`otel_ml.status`); for a rank without one (an older run,
or ``status_interval=0``) it falls back to the newest line of its metrics files
(:mod:`otel_ml.offline.runfiles`), which know step, loss, throughput and the anomaly counts, not
the state or the anomalies' steps. It prints, per rank, state, steps, last loss, throughput and
anomalies with their first and last steps (a ``running`` rank whose process is gone, or whose
file has not changed for a minute, is shown as ``running?``), then names the slowest rank: the
one whose top-level region takes the most time per step above the other ranks' median (at least
10% of a step, with three ranks or more), else the lowest throughput when it is at least 5%
below the median.
``--json`` prints the same report as one JSON document::

    {"run_dir": "...", "ranks": [{"rank": 0, "source": "status", "state": "completed",
      "step": 599, "completed": 600, "total": 600, "unit": "step", "loss": 0.02,
      "throughput": 9.8, "throughput_unit": "step/s", "anomalies": [...], ...}],
     "slowest": {"rank": 1, "reason": "backward +12.0 ms/step"}, "problems": []}

Example::

    otel-ml inspect otel-ml-runs/demo-1
    otel-ml inspect --json otel-ml-runs/demo-1 | jq '.ranks[] | select(.state == "failed")'
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from otel_ml import semconv
from otel_ml.offline.runfiles import Problem, last_points, newest_document
from otel_ml.rundir import rank_dirs, rank_of
from otel_ml.status import read_status

#: A region this much of a step above the median names the rank slowest.
STRAGGLER_SHARE = 0.10
#: Region comparison needs this many ranks (two cannot tell which one is slow).
STRAGGLER_MIN_RANKS = 3
#: A throughput this far below the median names the rank slowest.
RATE_SHORTFALL = 0.05
#: Seconds without a rewrite after which a ``running`` file is called stale (default interval: 5 s).
STALE_AFTER = 60.0


def _episode(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("type", "key", "first_step", "last_step", "count", "active", "message")
    return {k: row.get(k) for k in keys}


def from_status(rank: int, status: Mapping[str, Any]) -> dict[str, Any]:
    """One rank's report from its status document."""
    progress = status.get("progress") or {}
    timing = status.get("timing") or {}
    rate, unit = status.get("steps_per_second"), "step/s"
    if rate is None and progress.get("rate") is not None:
        rate, unit = progress["rate"], f"{progress.get('unit') or 'it'}/s"
    if rate is None and timing.get("step_ms"):
        rate = 1000.0 / float(timing["step_ms"])  # the mean over the run, when no recent rate
    return {
        "rank": rank,
        "source": "status",
        "state": status.get("state"),
        "error": status.get("error"),
        "signal": status.get("signal"),
        "step": status.get("step"),
        "completed": progress.get("completed"),
        "total": progress.get("total"),
        "unit": progress.get("unit"),
        "bar_open": progress.get("open"),
        "eta_seconds": progress.get("eta_seconds"),
        "loss": status.get("loss"),
        "throughput": rate,
        "throughput_unit": unit if rate is not None else None,
        "last_step_time": status.get("last_step_time"),
        "updated_time": status.get("updated_time"),
        "step_ms": timing.get("step_ms"),
        "regions_ms": timing.get("regions_ms") or {},
        "anomalies": [_episode(e) for e in status.get("anomalies") or [] if isinstance(e, Mapping)],
    }


def from_metrics(rank: int, document: Mapping[str, Any] | None) -> dict[str, Any]:
    """One rank's report from its newest metrics document (no state, no anomaly steps)."""
    values: dict[str, float] = {}
    counts: dict[str, int] = {}
    active: dict[str, bool] = {}
    for point in last_points(document or {}):
        kind = point.attributes.get(semconv.LABEL_TYPE, "")
        if point.name == semconv.ANOMALIES.name:
            counts[kind] = int(point.value)
        elif point.name == semconv.ANOMALY_ACTIVE.name:
            active[kind] = point.value > 0
        else:
            values[point.name] = point.value
    step = values.get(semconv.STEP.name)
    rate = values.get(semconv.SAMPLES_PER_SECOND.name)
    anomalies = [
        {"type": kind, "key": None, "first_step": None, "last_step": None, "count": n,
         "active": active.get(kind, False), "message": None}
        for kind, n in sorted(counts.items()) if n > 0 or active.get(kind)
    ]  # fmt: skip
    return {
        "rank": rank,
        "source": "metrics" if document is not None else "none",
        "state": None,
        "error": None,
        "signal": None,
        "step": None if step is None else int(step),
        "completed": None,
        "total": None,
        "unit": None,
        "bar_open": None,
        "eta_seconds": None,
        "loss": values.get(semconv.LOSS.name),
        "throughput": rate,
        "throughput_unit": "sample/s" if rate is not None else None,
        "last_step_time": values.get(semconv.LAST_STEP_TIMESTAMP.name),
        "updated_time": None,
        "step_ms": None,
        "regions_ms": {},
        "anomalies": anomalies,
    }


def slowest(ranks: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The slowest rank and why (see module docstring), or None when no rank stands out."""
    timed = [r for r in ranks if r.get("step_ms") and r.get("regions_ms")]
    if len(timed) >= STRAGGLER_MIN_RANKS:
        median_step = statistics.median(float(r["step_ms"]) for r in timed)
        best: tuple[float, int, str] | None = None
        for region in sorted({name for r in timed for name in r["regions_ms"]}):
            values = [float(r["regions_ms"].get(region, 0.0)) for r in timed]
            median = statistics.median(values)
            for report, value in zip(timed, values, strict=True):
                if best is None or value - median > best[0]:
                    best = (value - median, int(report["rank"]), region)
        if best is not None and best[0] >= max(STRAGGLER_SHARE * median_step, 1e-3):
            return {"rank": best[1], "reason": f"{best[2]} +{best[0]:.1f} ms/step"}
    units = {r.get("throughput_unit") for r in ranks if r.get("throughput") is not None}
    rated = [r for r in ranks if r.get("throughput") is not None]
    if len(rated) < 2 or len(units) != 1:
        return None
    median = statistics.median(float(r["throughput"]) for r in rated)
    low = min(rated, key=lambda r: (float(r["throughput"]), int(r["rank"])))
    if median <= 0 or float(low["throughput"]) > (1 - RATE_SHORTFALL) * median:
        return None
    reason = f"{float(low['throughput']):.3g} {low['throughput_unit']}, median {median:.3g}"
    return {"rank": int(low["rank"]), "reason": reason}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process has that pid now: it exists
    return True


def liveness(
    status: Mapping[str, Any], now: float, host: str, alive: Callable[[int], bool] = pid_alive
) -> tuple[float | None, bool | None]:
    """Seconds since a running rank last rewrote its file, and whether its process still exists
    (None when it ran on another host, or the document is not ``running``)."""
    if status.get("state") != "running" or not isinstance(status.get("updated_time"), (int, float)):
        return None, None
    age = max(0.0, now - float(status["updated_time"]))
    pid = status.get("pid")
    same_host = status.get("host") == host and isinstance(pid, int)
    return age, (alive(pid) if same_host else None)


def report(
    run_dir: Path, now: float | None = None, alive: Callable[[int], bool] = pid_alive
) -> dict[str, Any]:
    """The inspect report of a run dir (what ``--json`` prints)."""
    now = time.time() if now is None else now
    host = socket.gethostname()
    problems: list[Problem] = []
    ranks = []
    for directory in rank_dirs(run_dir):
        rank = rank_of(directory) or 0
        try:
            status = read_status(directory)
        except (OSError, ValueError) as exc:
            problems.append(Problem(directory, 0, f"status.json unreadable ({exc}); using the metrics files"))
            status = None
        if status is not None:
            age, process_alive = liveness(status, now, host, alive)
            ranks.append({**from_status(rank, status), "stale_seconds": age, "process_alive": process_alive})
        else:
            ranks.append(from_metrics(rank, newest_document(directory, "metrics", problems)))
    return {
        "run_dir": str(run_dir),
        "ranks": ranks,
        "slowest": slowest(ranks),
        "problems": [str(p) for p in problems],
    }


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _state(rank: Mapping[str, Any]) -> str:
    state = rank.get("state")
    if state is None:
        return "no status file" if rank.get("source") == "metrics" else "no files"
    error, signal = rank.get("error"), rank.get("signal")
    if state == "failed" and error:
        message = f": {error.get('message')}" if error.get("message") else ""
        return f"failed ({error.get('type')}{message})"
    if state == "running" and rank.get("process_alive") is False:
        return f"running? (its process is gone, last update {rank['stale_seconds']:.0f} s ago: SIGKILL, OOM?)"
    if state == "running" and (rank.get("stale_seconds") or 0) > STALE_AFTER:
        return f"running? (no update for {rank['stale_seconds']:.0f} s)"
    return f"terminated ({signal})" if state == "terminated" and signal else str(state)


def _steps(rank: Mapping[str, Any]) -> str:
    text = f"step {_number(rank.get('step'))}"
    completed, total = rank.get("completed"), rank.get("total")
    if completed is not None:
        of = _number(total) if total is not None else "?"
        counts = f"{_number(completed)}/{of} {rank.get('unit') or ''}".rstrip()
        # A closed bar's counts are its last sample (up to a pump tick before it closed).
        text += f" (bar closed, last seen at {counts})" if rank.get("bar_open") is False else f", {counts}"
    eta = rank.get("eta_seconds")
    return text + (f", ETA {eta:.0f} s" if eta is not None and rank.get("state") == "running" else "")


def _anomaly(episode: Mapping[str, Any]) -> str:
    first, last = episode.get("first_step"), episode.get("last_step")
    where = "" if first is None else f" step {first}"
    if first is not None and last not in (None, first):
        where = f" steps {first}-{last}"
    key = f" ({episode['key']})" if episode.get("key") else ""
    count = f", {episode['count']}x" if episode.get("count") is not None else ""
    return f"{episode.get('type')}{key}{where}{count}{', active' if episode.get('active') else ''}"


def render(document: Mapping[str, Any]) -> list[str]:
    """The text lines of a report."""
    lines = []
    for rank in document["ranks"]:
        rate = rank.get("throughput")
        throughput = f"{rate:.3g} {rank['throughput_unit']}" if rate is not None else "- /s"
        lines.append(
            f"rank {rank['rank']}: {_state(rank)}; {_steps(rank)}; loss {_number(rank.get('loss'))}; "
            f"{throughput}"
        )
        episodes = rank.get("anomalies") or []
        lines.append("  anomalies: " + ("; ".join(_anomaly(e) for e in episodes) if episodes else "none"))
    slow = document.get("slowest")
    if slow is not None:
        lines.append(f"slowest: rank {slow['rank']} ({slow['reason']})")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the report as JSON, for scripts")


def run(args: argparse.Namespace) -> int:
    if not rank_dirs(args.run_dir):
        print(f"otel-ml: no rank-* directories under {args.run_dir}", file=sys.stderr)
        return 1
    document = report(args.run_dir)
    for problem in document["problems"]:
        print(f"otel-ml: {problem}", file=sys.stderr)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n".join(render(document)))
    return 0
