"""Where otel_ml's background CPU goes, part by part (the breakdown behind ``bench_overhead``'s total).

    python benchmarks/bench_background.py             # 40 scrapes of 45 steps each, about a minute
    python benchmarks/bench_background.py --runs 3    # and 3 instrumented processes' thread CPU

The instrumented training of ``bench_overhead``'s worker (the same TinyLM, four regions,
``trace_modules(depth=3)``, ``otel_ml.tqdm`` and ``log()`` with six scalars) runs in this process
with the pump stopped, so that every collection is a scrape: after each ``--steps`` steps (45,
about one second of training) ``/metrics`` is fetched over a kept-alive HTTP connection with
gzip, as Prometheus does. Each part of that scrape is timed with ``time.thread_time`` around it
on the scrape thread (CPU time, far less sensitive than wall time to other load), and the whole
request from the scrape thread's ``/proc`` schedstat; the table gives the median per scrape.
Every part that runs per step (draining regions, closing steps, the anomaly detectors) is
also given per step. In-process, caches are warmer than on a core shared with the training
thread, so these are lower bounds of ``bench_overhead``'s per-thread numbers; ``--runs N``
measures those too (N instrumented processes of ``bench_overhead``'s worker, no pairs).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(parts: dict[str, float], label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            parts[label] += time.thread_time() - started

    return wrapper


def _thread_cpu(name: str) -> int:
    """Summed schedstat CPU (ns) of this process's threads called ``name``."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{tid}/comm") as handle:
                if handle.read().strip() != name:
                    continue
            with open(f"/proc/self/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
    return total


def breakdown(scrapes: int, steps: int) -> list[tuple[str, float, float | None]]:
    """(part, median ms per scrape, µs per step or None) for ``scrapes`` scrapes of ``steps`` steps."""
    import torch
    from torch import nn

    import otel_ml
    import otel_ml.exporters.prometheus as prometheus
    from benchmarks._models import TinyLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [torch.randint(0, 512, (4, 32)) for _ in range(8)]
    run_dir = tempfile.mkdtemp(prefix="bench-background-")
    telemetry = otel_ml.init(
        prometheus_port=0, prometheus_host="127.0.0.1", run_id="bench-background", run_dir=run_dir,
        summary=False, files="off",
    )  # fmt: skip
    otel_ml.trace_modules(model, depth=3)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - the bar writes here until the end
    progress = otel_ml.tqdm(total=10**9, desc="train", unit="step", mininterval=1.0, file=devnull)

    def step(i: int) -> None:
        with otel_ml.span("data"):
            x = batches[i % len(batches)]
        with otel_ml.span("forward"):
            loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 512), x[:, 1:].reshape(-1))
        with otel_ml.span("backward"):
            loss.backward()
        with otel_ml.span("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        otel_ml.log(i, loss=loss, lr=1e-3, grad_norm=norm, samples=4, tokens=4 * 31, kl=0.01)
        progress.update(1)

    telemetry.pump._stop.set()  # the pump's thread ends: every collection below is a scrape
    telemetry.pump._thread.join(5.0)
    parts: dict[str, float] = defaultdict(float)
    agg = telemetry.timekeeper.aggregator
    reader = telemetry.prometheus_reader
    collection = reader.collection
    training = telemetry._training_state
    # The parts, wrapped where the scrape calls them (instance attributes shadow the methods).
    training.refresh = _timed(parts, "deferred log() values", training.refresh)
    agg.recorder.collect = _timed(parts, "regions from the C queue", agg.recorder.collect)
    agg._before = tuple(_timed(parts, "anomaly detectors", hook) for hook in agg._before)
    agg._drain_finished = _timed(parts, "region statistics + histograms", agg._drain_finished)
    agg._drain_boundaries = _timed(parts, "closing steps (windows, sampling)", agg._drain_boundaries)
    for gauges in (telemetry.progress_gauges, telemetry.system_gauges):
        gauges.prepare = _timed(parts, "progress + system snapshots", gauges.prepare)
    collection._sources = tuple(
        _timed(parts, "metric sources (histogram snapshots)", s) for s in collection._sources
    )
    # /metrics encodes otel_ml's own metrics from their state (observables, histogram snapshots).
    encoder = reader._encoder
    encoder._observable = _timed(parts, "observable callbacks and their text", encoder._observable)
    encoder._snapshot = _timed(parts, "histogram text", encoder._snapshot)
    encoder.encode = _timed(parts, "(encode, own metrics included)", encoder.encode)
    prometheus.gzip_body = _timed(parts, "gzip", prometheus.gzip_body)
    render = reader.render

    def whole_render() -> bytes:
        return _timed(parts, "(render)", render)()

    telemetry.server._server.render = whole_render

    conn = http.client.HTTPConnection("127.0.0.1", telemetry.server.port, timeout=10)
    headers = {"Accept-Encoding": "gzip", "Accept": "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"}
    i = 0
    for i in range(300):  # warm: every module path seen, the encoder's caches filled
        step(i)
    conn.request("GET", "/metrics", headers=headers)
    conn.getresponse().read()
    per_scrape: dict[str, list[float]] = defaultdict(list)
    for _ in range(scrapes):
        for _ in range(steps):
            i += 1
            step(i)
        parts.clear()
        before = _thread_cpu("otel-ml-scrape")
        conn.request("GET", "/metrics", headers=headers)
        conn.getresponse().read()
        request = (_thread_cpu("otel-ml-scrape") - before) / 1e9
        snapshot = dict(parts)
        snapshot["(whole request, scrape thread)"] = request
        snapshot["HTTP (request minus render and gzip)"] = request - parts["(render)"] - parts["gzip"]
        snapshot["exposition encode (SDK metrics, families)"] = (
            parts["(encode, own metrics included)"]
            - parts["observable callbacks and their text"]
            - parts["metric sources (histogram snapshots)"]
            - parts["histogram text"]
        )
        for label, seconds in snapshot.items():
            per_scrape[label].append(seconds)
    progress.close()
    devnull.close()
    telemetry.shutdown(5)
    per_step = {
        "regions from the C queue", "anomaly detectors", "region statistics + histograms",
        "closing steps (windows, sampling)", "deferred log() values",
    }  # fmt: skip
    rows = []
    for label, values in sorted(per_scrape.items(), key=lambda kv: -statistics.median(kv[1])):
        ms = statistics.median(values) * 1e3
        rows.append((label, ms, ms * 1e3 / steps if label in per_step else None))
    return rows


def threads(runs: int, steps: int) -> dict[str, float]:
    """Median CPU ms per second of training of each otel_ml thread over ``runs`` instrumented
    processes of ``bench_overhead``'s worker (pinned to core 0, scraped every second)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_overhead

    tmp = Path(tempfile.mkdtemp(prefix="bench-background-"))
    got: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        result = bench_overhead._finish(bench_overhead._start("instrumented", steps, 150, 1.0, tmp, 0))
        for name, cpu in result["thread_cpu_s"].items():
            if name.startswith(("otel-ml", "(background")):
                got[name].append(cpu / result["seconds"] * 1e3)
    return {name: statistics.median(values) for name, values in got.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=45, help="training steps between scrapes")
    parser.add_argument("--runs", type=int, default=0, help="also N instrumented processes' thread CPU")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine_facts

    rows = breakdown(args.scrapes, args.steps)
    print(f"\n### One scrape after {args.steps} steps, part by part (`benchmarks/bench_background.py`)\n")
    print(machine_facts() + "\n")
    print("| part | CPU ms per scrape (median) | µs per step |\n|---|---:|---:|")
    for label, ms, us in rows:
        print(f"| {label} | {ms:.3f} | {'' if us is None else f'{us:.2f}'} |")
    if args.runs:
        print(f"\n| thread (median of {args.runs} instrumented runs) | CPU ms per second of training |")
        print("|---|---:|")
        for name, ms in sorted(threads(args.runs, 400).items(), key=lambda kv: -kv[1]):
            print(f"| `{name}` | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
