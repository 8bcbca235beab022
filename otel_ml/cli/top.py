"""``otel-ml top``: every rank of a run at a glance, from Prometheus or straight from the ranks.

Sources: ``--prometheus URL [--run RUN_ID]`` asks Prometheus' HTTP API (the newest run when no
run is given); ``--targets host:port,...`` scrapes the ranks' ``/metrics`` directly. Each frame
shows one line per rank (progress bar, rate, ETA) with its loss, throughput, GPU memory and
active anomalies (flagged on the rank's line, counted on the global line), marks the slowest
rank (the straggler by region time when three or more ranks report it, else the longest ETA:
:func:`otel_ml.progress.render.slowest`), and ends with the global line. Unreachable targets are
shown as down. ``q`` quits; ``--once`` prints one frame (for scripts).

Example::

    otel-ml top --prometheus http://localhost:9090 --run demo-20261122-101500
    otel-ml top --targets localhost:9464,localhost:9465 --once
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from otel_ml import semconv
from otel_ml.progress.board import BarSnapshot
from otel_ml.progress.render import (
    Flag,
    RankStatus,
    global_line,
    number,
    rank_lines,
    region_times,
    slowest,
    top_level_totals,
)

#: Exposed sample name -> BarSnapshot field.
_PROGRESS = {
    semconv.PROGRESS_COMPLETED.prometheus_name: "completed",
    semconv.PROGRESS_TOTAL.prometheus_name: "total",
    semconv.PROGRESS_RATE.prometheus_name: "rate",
    semconv.PROGRESS_ETA.prometheus_name: "eta",
    semconv.PROGRESS_ELAPSED.prometheus_name: "elapsed",
}
#: Exposed sample name -> RankStatus field.
_SCALARS = {
    semconv.STEP.prometheus_name: "step",
    semconv.LOSS.prometheus_name: "loss",
    semconv.SAMPLES_PER_SECOND.prometheus_name: "samples_per_second",
    semconv.TOKENS_PER_SECOND.prometheus_name: "tokens_per_second",
}
_GPU_ALLOCATED = semconv.GPU_MEMORY_ALLOCATED.prometheus_name
_GPU_RESERVED = semconv.GPU_MEMORY_RESERVED.prometheus_name
_ANOMALY_ACTIVE = semconv.ANOMALY_ACTIVE.prometheus_name
_LAST_STEP_TIME = semconv.LAST_STEP_TIMESTAMP.prometheus_name
_SPAN_SELF = semconv.SPAN_SELF.prometheus_name
_STEPS = semconv.STEP_DURATION.name + "_count"
_STEP_TIME = semconv.STEP_DURATION.name + "_sum"


def _statuses(samples: Iterator[tuple[str, dict[str, str], float]]) -> dict[int, RankStatus]:
    """Group (name, labels, value) samples by rank into statuses."""
    statuses: dict[int, RankStatus] = {}
    bars: dict[tuple[int, str, str, str], dict[str, float]] = {}
    timing: dict[int, tuple[dict[str, float], dict[str, float]]] = {}  # rank -> (paths, step count/sum)
    for name, labels, value in samples:
        try:
            rank = int(labels.get(semconv.LABEL_RANK, ""))
        except ValueError:
            continue
        status = statuses.setdefault(rank, RankStatus(rank))
        if name in _PROGRESS:
            task, unit = labels.get(semconv.LABEL_TASK, ""), labels.get(semconv.LABEL_UNIT, "")
            key = (rank, task, unit, labels.get(semconv.LABEL_PARENT, ""))
            bars.setdefault(key, {})[_PROGRESS[name]] = value
        elif name in _SCALARS:
            setattr(status, _SCALARS[name], value)
        elif name == _GPU_ALLOCATED:
            status.gpu_memory_bytes = (status.gpu_memory_bytes or 0) + value
        elif name == _GPU_RESERVED:
            status.gpu_reserved_bytes = (status.gpu_reserved_bytes or 0) + value
        elif name == _ANOMALY_ACTIVE and value >= 1:
            status.anomalies.append(Flag(labels.get(semconv.LABEL_TYPE, "?")))
        elif name == _SPAN_SELF:
            paths = timing.setdefault(rank, ({}, {}))[0]
            path = labels.get(semconv.LABEL_PATH, "")
            paths[path] = paths.get(path, 0.0) + value
        elif name in (_STEPS, _STEP_TIME):
            steps = timing.setdefault(rank, ({}, {}))[1]
            steps[name] = steps.get(name, 0.0) + value
    for rank, (paths, steps) in timing.items():
        step_ms, region_ms = region_times(
            top_level_totals(paths), int(steps.get(_STEPS, 0)), steps.get(_STEP_TIME, 0.0)
        )
        statuses[rank].step_ms, statuses[rank].region_ms = step_ms, region_ms if paths else {}
    for (rank, task, unit, parent), fields in bars.items():
        statuses[rank].bars.append(
            BarSnapshot(
                task,
                unit,
                parent,
                fields.get("completed", 0.0),
                fields.get("total"),
                fields.get("rate"),
                fields.get("eta"),
                fields.get("elapsed", 0.0),
            )
        )
    return statuses


def from_exposition(text: str) -> dict[int, RankStatus]:
    def samples() -> Iterator[tuple[str, dict[str, str], float]]:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                yield sample.name, sample.labels, sample.value

    return _statuses(samples())


def from_targets(targets: list[str], timeout: float = 2.0) -> list[RankStatus]:
    """Scrape each ``host:port`` (or URL); a target that fails is a down row named after it."""
    found: dict[int, RankStatus] = {}
    down: list[RankStatus] = []
    for target in targets:
        url = target if "://" in target else f"http://{target}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                found.update(from_exposition(response.read().decode("utf-8", "replace")))
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            down.append(RankStatus(rank=1_000_000 + len(down), up=False, name=target, error=str(reason)))
    return sorted(found.values(), key=lambda s: s.rank) + down


def _query(base: str, expr: str, timeout: float) -> list[dict[str, Any]]:
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=timeout) as response:
        payload = json.load(response)
    return payload["data"]["result"]


def latest_run(base: str, timeout: float = 5.0) -> str | None:
    run_id = semconv.LABEL_RUN_ID
    result = _query(base, f"max by ({run_id}) ({_LAST_STEP_TIME})", timeout)
    return max(result, key=lambda r: float(r["value"][1]))["metric"][run_id] if result else None


def from_prometheus(base: str, run: str, timeout: float = 5.0) -> list[RankStatus]:
    """Statuses of ``run`` from Prometheus; ranks whose target is down come from ``up``. Region
    times are rates over the last 2 minutes (a straight scrape has only the run's totals)."""
    selector = f'{semconv.LABEL_RUN_ID}="{run}"'
    names = "|".join([*_PROGRESS, *_SCALARS, _GPU_ALLOCATED, _GPU_RESERVED])

    def samples() -> Iterator[tuple[str, dict[str, str], float]]:
        for row in _query(base, f'{{__name__=~"{names}",{selector}}}', timeout):
            yield row["metric"]["__name__"], row["metric"], float(row["value"][1])
        for name in (_SPAN_SELF, _STEPS, _STEP_TIME):
            for row in _query(base, f"rate({name}{{{selector}}}[2m])", timeout):
                yield name, row["metric"], float(row["value"][1])
        for row in _query(base, f"{_ANOMALY_ACTIVE}{{{selector}}} == 1", timeout):
            yield _ANOMALY_ACTIVE, row["metric"], 1.0

    statuses = _statuses(samples())
    for row in _query(base, f"up{{{selector}}}", timeout):
        try:
            rank = int(row["metric"].get(semconv.LABEL_RANK, ""))
        except ValueError:
            continue
        if float(row["value"][1]) < 1:
            statuses[rank] = RankStatus(
                rank, up=False, error=f"target {row['metric'].get('instance', '?')} down"
            )
    return sorted(statuses.values(), key=lambda s: s.rank)


def _details(status: RankStatus) -> str:
    parts = []
    if status.step is not None:
        parts.append(f"step {int(status.step)}")
    if status.loss is not None:
        parts.append(f"loss {status.loss:.4g}")
    if status.samples_per_second is not None:
        parts.append(f"{number(status.samples_per_second)} samples/s")
    if status.tokens_per_second is not None:
        parts.append(f"{number(status.tokens_per_second)} tok/s")
    if status.gpu_memory_bytes is not None:
        parts.append(
            f"GPU {status.gpu_memory_bytes / 2**30:.1f}/{(status.gpu_reserved_bytes or 0) / 2**30:.1f} GiB"
        )
    active = sorted({flag.type for flag in status.active_anomalies()})
    parts.append("anomalies: " + (",".join(active) if active else "-"))
    return "  ".join(parts)


def slowest_rank(statuses: list[RankStatus]) -> int | None:
    """The slowest rank (:func:`otel_ml.progress.render.slowest`), or None."""
    slow = slowest(statuses)
    return None if slow is None else slow.rank


def render_frame(statuses: list[RankStatus], title: str, width: int = 20) -> list[str]:
    up = sum(s.up for s in statuses)
    lines = [f"{title}  |  {up}/{len(statuses)} ranks up  |  {time.strftime('%H:%M:%S')}", ""]
    slow = slowest(statuses) if up > 1 else None
    for status in statuses:
        lines.extend(rank_lines(status, width, slow))
        if status.up:
            lines.append(" " * 9 + _details(status))
    total = global_line(statuses, width)
    if total:
        lines += ["", total]
    return lines


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """cbreak mode on a terminal so a single ``q`` is read; yields whether keys can be read."""
    if not sys.stdin.isatty():
        yield False
        return
    import termios
    import tty

    saved = termios.tcgetattr(sys.stdin)
    try:
        tty.setcbreak(sys.stdin.fileno())
        yield True
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-ml top", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", metavar="URL", help="Prometheus base URL, e.g. http://localhost:9090")
    source.add_argument("--targets", metavar="HOST:PORT,...", help="rank /metrics endpoints to scrape")
    parser.add_argument("--run", help="run id (with --prometheus; default: the newest run)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    args = parser.parse_args(argv)

    def frame() -> list[str]:
        if args.targets:
            targets = [t.strip() for t in args.targets.split(",") if t.strip()]
            return render_frame(from_targets(targets), f"otel-ml top: {len(targets)} target(s)")
        try:
            run = args.run or latest_run(args.prometheus)
            if run is None:
                return [f"otel-ml top: no otel_ml series in {args.prometheus}"]
            return render_frame(from_prometheus(args.prometheus, run), f"otel-ml top: run {run}")
        except (OSError, ValueError, KeyError) as exc:
            return [
                f"otel-ml top: Prometheus at {args.prometheus} unreachable: {getattr(exc, 'reason', exc)}"
            ]

    if args.once:
        print("\n".join(frame()))
        return 0
    with _keys() as keys:
        while True:
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(frame()) + "\n(q quits)\n")
            sys.stdout.flush()
            deadline = time.monotonic() + args.interval
            while (remaining := deadline - time.monotonic()) > 0:
                if keys:
                    ready, _, _ = select.select([sys.stdin], [], [], remaining)
                    if ready and sys.stdin.read(1).lower() == "q":
                        return 0
                else:
                    time.sleep(remaining)
    return 0
