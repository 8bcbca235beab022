"""Scrape load and soak: what continuous scraping and a flapping collector do to a training loop.

Run from the repository root (it imports the test suite's OTLP receiver)::

    python benchmarks/bench_soak.py            # about 3 minutes
    python benchmarks/bench_soak.py --quick    # about 40 s

Part A, scrape load. A realistic rank in this process: a ~10 ms CPU training step (one-thread MLP),
60 region paths per step (``forward/layers.N/...``), an ``otel_ml.tqdm`` bar and ``log()`` with six
values. A separate process scrapes ``/metrics`` (like Prometheus). Blocks without scraping, with a
1 s scrape and with a 0.2 s scrape (stress) alternate in one run; the table gives step-time p50
and p99 per mode and the size of one scrape.

Part B, soak. ``--steps`` fast synthetic steps (0.2 ms of busy work, 20 regions, progress and
``log()`` each), ``/metrics`` scraped every second by a separate process, OTLP/HTTP export every
second to a receiver (another process) that goes down and comes back every 5 s. Every 10% of
the run: resident memory, threads, open fds, exported series and the mean step time, so growth
and drift show. The receiver counts what arrived.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import start_scraper  # noqa: E402

import otel_ml  # noqa: E402
from tests.support.net import free_port  # noqa: E402

RECEIVER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from tests.support.otlp_receiver import OtlpReceiver
    receiver = OtlpReceiver(grpc=False, http=True)
    receiver.start()
    print(receiver.http_endpoint, flush=True)
    flap = float(sys.argv[1])
    while True:
        time.sleep(flap)
        receiver.mode = "unavailable" if receiver.mode == "ok" else "ok"
        print("requests", len(receiver.received()), flush=True)
    """
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _series(url: str) -> tuple[int, int]:
    body = urllib.request.urlopen(url, timeout=10).read()
    lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]
    return len(lines), len(body)


def part_a(url: str, rounds: int, steps: int) -> list[str]:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(40, 512)
    bar = otel_ml.tqdm(total=10**9, desc="train", file=io.StringIO())
    names = [f"layers.{i}/{part}" for i in range(12) for part in ("attn", "mlp", "norm", "drop")]
    times: dict[str, list[float]] = {"no scrape": [], "1 s scrape": [], "0.2 s scrape": []}
    step = 0
    for r in range(rounds):
        order = list(times)[r % 3 :] + list(times)[: r % 3]
        for mode in order:
            scraper = (
                None if mode == "no scrape" else start_scraper(url, 1.0 if mode.startswith("1") else 0.2)
            )
            time.sleep(0.3)
            for _ in range(steps):
                t0 = time.perf_counter()
                with otel_ml.span("forward"):
                    out = model(x)
                    for name in names:
                        with otel_ml.span(name):
                            pass
                with otel_ml.span("backward"):
                    out.pow(2).mean().backward()
                with otel_ml.span("optimizer"):
                    opt.step()
                    opt.zero_grad()
                otel_ml.log(
                    step, loss=1.0 / (step + 1), lr=0.01, grad_norm=1.0, samples=40, tokens=4096, kl=0.1
                )
                bar.update(1)
                step += 1
                times[mode].append(time.perf_counter() - t0)
            if scraper is not None:
                scraper.kill()
                scraper.wait()
    bar.close()
    series, size = _series(url)
    rows = [f"Part A: {series} series, {size / 1024:.0f} KiB per scrape (text format)\n"]
    rows += ["| Mode | step p50 | step p99 |", "|---|---:|---:|"]
    for mode, values in times.items():
        ordered = sorted(values)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        rows.append(f"| {mode} | {statistics.median(values) * 1e3:.2f} ms | {p99 * 1e3:.2f} ms |")
    return rows


def part_b(url: str, steps: int) -> list[str]:
    names = [f"block.{i}/{p}" for i in range(5) for p in ("a", "b", "c")] + ["data", "opt"]
    bar = otel_ml.tqdm(total=steps, desc="soak", file=io.StringIO())
    scraper = start_scraper(url, 1.0)
    checkpoints = []
    chunk = max(1, steps // 10)
    chunk_start = time.perf_counter()
    try:
        for step in range(steps):
            with otel_ml.span("step"):
                for name in names:
                    with otel_ml.span(name):
                        pass
                end = time.perf_counter() + 0.0002
                while time.perf_counter() < end:
                    pass
            otel_ml.log(step, loss=1.0, lr=0.01, grad_norm=1.0, samples=8, tokens=512, kl=0.1)
            bar.update(1)
            if (step + 1) % chunk == 0:
                now = time.perf_counter()
                series, _ = _series(url)
                rss = _status("VmRSS") / 1024
                fds = len(os.listdir("/proc/self/fd"))
                checkpoints.append(
                    (step + 1, rss, _status("Threads"), fds, series, (now - chunk_start) / chunk)
                )
                chunk_start = time.perf_counter()
    finally:
        scraper.kill()
        scraper.wait()
        bar.close()
    rows = ["| steps | RSS | threads | fds | series | mean step |", "|---:|---:|---:|---:|---:|---:|"]
    rows += [
        f"| {s} | {r:.1f} MiB | {t} | {f} | {n} | {m * 1e6:.0f} µs |" for s, r, t, f, n, m in checkpoints
    ]
    first, last = checkpoints[1], checkpoints[-1]  # the first chunk is warm-up
    drift = 100 * (last[5] / first[5] - 1)
    rows.append(
        f"\nAfter warm-up: RSS {last[1] - first[1]:+.1f} MiB, threads {last[2] - first[2]:+d}, fds "
        f"{last[3] - first[3]:+d}, series {last[4] - first[4]:+d}, mean step {drift:+.1f} %"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    rounds, block = (2, 100) if args.quick else (6, 300)
    steps = 20_000 if args.quick else args.steps
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, "5", str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    try:
        endpoint = receiver.stdout.readline().strip()
        telemetry = otel_ml.init(
            prometheus_port=free_port(),
            prometheus_host="127.0.0.1",
            otlp_endpoint=endpoint,
            metric_export_interval=1.0,
            span_export_delay=1.0,
            summary=False,
            set_global_providers=False,
            run_id="soak",
        )
        began = time.perf_counter()
        print("\n".join(part_a(telemetry.metrics_url, rounds, block)), flush=True)
        print("\nPart B: soak of", steps, "steps, collector flapping every 5 s\n", flush=True)
        print("\n".join(part_b(telemetry.metrics_url, steps)), flush=True)
        health = telemetry.health
        ok = telemetry.shutdown()
        print(
            f"\nexport errors {dict(health.errors)}, dropped {dict(health.drops)}; shutdown ok: {ok}; "
            f"runtime {time.perf_counter() - began:.0f} s"
        )
    finally:
        receiver.kill()
        receiver.wait()


if __name__ == "__main__":
    main()
