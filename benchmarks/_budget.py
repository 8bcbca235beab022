"""The series budget of one rank, and what it makes at 1,000 and 10,000 ranks (``bench_scale``).

Each configuration runs in its own process: ``otel_ml.init()`` with the default settings (the
embedded default: ``/metrics``, here on a free port, and local files), four regions per step
(data, forward, backward, optimizer), ``log()`` with six scalars and one ``otel_ml.tqdm`` bar,
for 150 steps (module timing samples one step in 100, so every module path has appeared).
``32-layer, depth=2`` adds ``trace_modules(model, depth=2)`` on a 32-block transformer (narrow,
so that it runs in seconds: the series do not depend on the width). Then one scrape is rendered:
samples, bytes as text and gzip (Prometheus asks for gzip), and the median encode time of 20
renders.

    python benchmarks/bench_scale.py --budget     # this table only, about 20 s, no Prometheus
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import gzip, json, os, statistics, sys, tempfile, time
import torch
from torch import nn
import otel_ml

layers = int(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(1)


from benchmarks._models import TinyLM

model = TinyLM(vocab=64, d=16, layers=max(layers, 1), heads=2, mlp_ratio=2)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
telemetry = otel_ml.init(prometheus_port=0, run_id="budget", summary=False,
                         run_dir=tempfile.mkdtemp(prefix="otel-ml-budget-"))
if layers:
    otel_ml.trace_modules(model, depth=2)
x = torch.randint(0, 64, (2, 9))
for step in otel_ml.tqdm(range(150), desc="train", file=open(os.devnull, "w")):
    with otel_ml.span("data"):
        batch = x
    with otel_ml.span("forward"):
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, 64), batch[:, 1:].reshape(-1))
    with otel_ml.span("backward"):
        loss.backward()
    with otel_ml.span("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    otel_ml.log(step, loss=loss, lr=1e-3, grad_norm=1.0, samples=2, tokens=16, kl=0.01)
reader = telemetry.prometheus_reader
body = reader.render()
times = []
for _ in range(20):
    t0 = time.perf_counter()
    body = reader.render()
    times.append(time.perf_counter() - t0)
series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
print(json.dumps({
    "series": series, "bytes": len(body), "gzip": len(gzip.compress(body, 1)),
    "encode_ms": statistics.median(times) * 1e3,
}))
telemetry.shutdown(5)
"""

CONFIGS = (("default settings (4 regions, log, 1 bar)", 0), ("+ trace_modules(depth=2), 32-layer model", 32))


def measure(layers: int) -> dict:
    env = {**os.environ, "OTEL_ML_TIMING_TABLE": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(layers)], capture_output=True, text=True, env=env, timeout=300
    )
    if done.returncode != 0:
        raise SystemExit(f"budget worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} B"


def table(interval: float = 15.0) -> str:
    """The budget table, measured now (markdown)."""
    rows = [
        "| one rank | series | per scrape: text / gzip | encode | 1,000 ranks | 10,000 ranks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, layers in CONFIGS:
        m = measure(layers)
        n, raw, packed = m["series"], m["bytes"], m["gzip"]
        at = [f"{n * k / 1e6:,.2f} M series, {_size(packed * k / interval)}/s" for k in (1_000, 10_000)]
        scrape = f"{_size(raw)} / {_size(packed)}"
        rows.append(f"| {label} | {n:,} | {scrape} | {m['encode_ms']:.2f} ms | {at[0]} | {at[1]} |")
    rows.append(
        f"\nSeries are the samples of one scrape (each a head series in Prometheus); bandwidth is gzip at a "
        f"{interval:g} s scrape interval. Targets: <= 500 series and <= 10 ms to encode per rank."
    )
    return "\n".join(rows)
