"""Iteration overhead of ``otel_ml.tqdm`` next to plain tqdm, in one run.

Run from the repository root::

    python benchmarks/bench_progress.py           # about 20 s
    python benchmarks/bench_progress.py --quick   # a few seconds

Each case iterates a ``range`` of ``--items`` through the bar (output to a null stream, the
default ``mininterval``), and the per-item time is the wall time divided by the items. Cases
alternate in a rotating order for ``--rounds`` rounds; the table gives the median and p99 per
item. ``update(1)`` loops are measured the same way. otel_ml runs for real
(``otel_ml.init(prometheus_port=0, files="off")``) and a thread scrapes ``/metrics`` every
second during the whole run, so collection reads the bars while they move.
Target: ``otel_ml.tqdm`` at most 1.5x plain tqdm per iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable

from tqdm import tqdm as plain_tqdm

import otel_ml


class _Null(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def _iterate(cls: type, items: int) -> Callable[[], float]:
    def run() -> float:
        sink = _Null()
        start = time.perf_counter()
        for _ in cls(range(items), file=sink, desc="bench"):
            pass
        return (time.perf_counter() - start) / items

    return run


def _update(cls: type, items: int) -> Callable[[], float]:
    def run() -> float:
        bar = cls(total=items, file=_Null(), desc="bench")
        update = bar.update
        start = time.perf_counter()
        for _ in range(items):
            update(1)
        elapsed = time.perf_counter() - start
        bar.close()
        return elapsed / items

    return run


def _scraper(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.quick:
        args.items, args.rounds = 50_000, 6
    telemetry = otel_ml.init(prometheus_port=0, files="off", summary=False, set_global_providers=False)
    stop = threading.Event()
    scraper = threading.Thread(target=_scraper, args=(telemetry.metrics_url, stop), daemon=True)
    scraper.start()
    cases = {
        "plain tqdm, iterate": _iterate(plain_tqdm, args.items),
        "otel_ml.tqdm, iterate": _iterate(otel_ml.tqdm, args.items),
        "plain tqdm, update(1)": _update(plain_tqdm, args.items),
        "otel_ml.tqdm, update(1)": _update(otel_ml.tqdm, args.items),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            samples[name].append(cases[name]())
    stop.set()
    telemetry.shutdown()

    def row(name: str) -> tuple[float, float]:
        values = sorted(samples[name])
        return statistics.median(values) * 1e6, values[min(len(values) - 1, int(0.99 * len(values)))] * 1e6

    from importlib.metadata import version

    print(f"Python {platform.python_version()}, {platform.machine()}, tqdm {version('tqdm')}")
    print(f"{args.rounds} rounds of {args.items} items per case, /metrics scraped every second\n")
    print("| Measurement | Median per item | p99 per item |")
    print("|---|---:|---:|")
    for name in names:
        median, p99 = row(name)
        print(f"| {name} | {median:.3f} µs | {p99:.3f} µs |")
    for kind in ("iterate", "update(1)"):
        ours, theirs = row(f"otel_ml.tqdm, {kind}")[0], row(f"plain tqdm, {kind}")[0]
        verdict = "PASS" if ours <= 1.5 * theirs else "FAIL"
        print(f"\n{kind}: otel_ml.tqdm / plain tqdm = {ours / theirs:.2f}x (target <= 1.5x): **{verdict}**")


if __name__ == "__main__":
    main()
