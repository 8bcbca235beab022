"""What full instrumentation costs a user: separate processes, plain vs. instrumented, in pairs.

    python benchmarks/bench_overhead.py            # 10 pairs + 10 control pairs, about 10 minutes
    python benchmarks/bench_overhead.py --quick    # 3 + 2 pairs, a smoke run
    python benchmarks/bench_overhead.py --layout sequential   # a pair's runs one after the other

Each run is its own process training the same small CPU transformer (``torch.set_num_threads(1)``)
for a fixed number of steps after a warm-up; it reports the wall time of the measured steps, its
median step and its training thread's CPU time. The warm-up (150 steps, about 3 s) runs past the
first module-timing step (one step in 100) and the first scrapes, so the measured steps see the
steady state a long run pays; the one-time background CPU of the warm-up (the first connection,
the first encoding of every new path's label texts) is reported on its own row.
*Instrumented* adds what a user would:
``otel_ml.init()``, four regions per step (``data``, ``forward``, ``backward``, ``optimizer``),
``trace_modules(model, depth=3)``, ``otel_ml.tqdm`` over the steps and ``log()`` with six
scalars, while another process scrapes its ``/metrics`` every second as Prometheus does (one
kept-alive connection, gzip). Control pairs run plain against plain in the same session and
show the noise floor. The overhead is the median of the pairs' ratios, with their interquartile
range.

Pairs: on a shared VM a process's speed wanders by several percent from one process to the
next, which one-after-the-other pairs cannot cancel. With two or more cores (the default,
``--layout concurrent``) a pair's two runs start their measured steps together, each pinned to
its own core (its background threads with it, so they compete with its training thread as on a
node whose other cores are busy), and every pair runs twice with the cores swapped; its ratio is
the geometric mean of the two. ``--layout sequential`` alternates the order instead. The
scraper shares the instrumented run's core (its CPU counts against otel_ml: pessimistic), and
pairs and control pairs take turns, so a slow stretch of the VM falls on both alike.

Allocator: every run uses glibc's malloc with fixed thresholds (``MALLOC_MMAP_THRESHOLD_`` 32 MiB,
``MALLOC_TRIM_THRESHOLD_`` 256 MiB; ``--malloc default`` leaves glibc's own). With glibc's dynamic
threshold the plain runs took 200-270 minor page faults per step (tensors in fresh ``mmap`` chunks,
unmapped at each free) and the instrumented ones about one (the heap their imports left kept those
tensors in it): instrumented looked 2-6% *faster* than plain, from heap luck alone. The result
shows both runs' page faults per step, so that this cannot come back unseen.

Instrumented runs also report, from ``/proc/self/task/*/schedstat`` (nanoseconds), the CPU each
otel_ml thread used per second of training (threads carry native names: ``otel-ml-pump``,
``otel-ml-http``, ``otel-ml-scrape``, ...; threads that exited are counted from the process
total), the CPU they used while warming up, and one scrape's encode time and size. Their CPU time bounds
their GIL time: they run Python except inside system calls and zlib, which release it.

Targets: overhead <= 0.5% with the control within +-0.5%; otel_ml's threads <= 2 ms CPU per
second of training; a scrape of this rank <= 500 series and <= 10 ms to encode (the 500-series
target is for the 32-layer, depth=2 rank of ``bench_scale --budget``; this model's depth=3 paths
give more).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import start_scraper  # noqa: E402

from tests.support.net import free_port  # noqa: E402

WORKER = r"""
import json, os, resource, sys, time
import torch
from torch import nn

mode, steps, warmup, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(1)


from benchmarks._models import TinyLM

model = TinyLM()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
batches = [torch.randint(0, 512, (4, 32)) for _ in range(8)]
instrumented = mode == "instrumented"
if instrumented:
    import otel_ml
    telemetry = otel_ml.init(prometheus_port=port, prometheus_host="127.0.0.1", run_id="bench-overhead",
                             run_dir=os.environ["BENCH_RUN_DIR"], summary=False, files="off")
    otel_ml.trace_modules(model, depth=3)
    span, log = otel_ml.span, otel_ml.log
    progress = otel_ml.tqdm(total=warmup + steps, desc="train", unit="step", mininterval=1.0,
                            file=open(os.devnull, "w"))
else:
    import contextlib
    span = lambda name: contextlib.nullcontext()
    log = None
    progress = None


def cpu_by_thread():
    # CPU seconds per live thread (schedstat, in ns), of the main thread and of the whole process.
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[f"{name}:{tid}"] = int(f.read().split()[0]) / 1e9
        except OSError:
            continue
    out["(process)"] = time.process_time()  # every thread, those that have exited included
    out["(main)"] = time.thread_time()
    return out


def step(i):
    with span("data"):
        x = batches[i % len(batches)]
    with span("forward"):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 512), x[:, 1:].reshape(-1))
    with span("backward"):
        loss.backward()
    with span("optimizer"):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if log is not None:
        log(i, loss=loss, lr=1e-3, grad_norm=norm, samples=4, tokens=4 * 31, kl=0.01)
    if progress is not None:
        progress.update(1)


warm_process, warm_main = time.process_time(), time.thread_time()
for i in range(warmup):
    step(i)
# CPU of every thread but the training one during the warm-up: one-time costs land here.
warm_background = (time.process_time() - warm_process) - (time.thread_time() - warm_main)
print("ready", flush=True)  # the parent starts both runs of a pair together (--layout concurrent)
sys.stdin.readline()
before = cpu_by_thread()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
main_cpu = time.thread_time()
started = last = time.perf_counter()
step_times = []
for i in range(warmup, warmup + steps):
    step(i)
    now = time.perf_counter()
    step_times.append(now - last)
    last = now
elapsed = time.perf_counter() - started
main_cpu = time.thread_time() - main_cpu
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
after = cpu_by_thread()
step_times.sort()
result = {"mode": mode, "seconds": elapsed, "steps": steps, "main_cpu": main_cpu, "faults": faults,
          "median_step": step_times[len(step_times) // 2]}
if instrumented:
    threads = {}
    for key, cpu in after.items():
        name = key.split(":")[0]
        threads[name] = threads.get(name, 0.0) + cpu - before.get(key, 0.0)
    # Threads that exited while measuring (one per scrape connection) are in the process total only.
    live = sum(cpu for name, cpu in threads.items() if not name.startswith("("))
    threads["(exited threads)"] = max(0.0, threads.pop("(process)") - live)
    threads["(background, all)"] = threads["(exited threads)"] + live - threads.pop("(main)")
    result["thread_cpu_s"] = threads
    result["warmup_background_s"] = warm_background
    reader = telemetry.prometheus_reader
    body = reader.render()
    t0 = time.perf_counter()
    for _ in range(20):
        body = reader.render()
    result["encode_ms"] = (time.perf_counter() - t0) / 20 * 1e3
    result["series"] = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    result["bytes"] = len(body)
    progress.close()
    telemetry.shutdown(5)
print(json.dumps(result))
"""


#: glibc malloc thresholds for every run (see module docstring); ``--malloc default`` empties it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def _start(mode: str, steps: int, warmup: int, scrape: float, tmp: Path, core: int | None) -> tuple:
    port = free_port()
    env = {
        **os.environ,
        **MALLOC_ENV,
        "BENCH_RUN_DIR": str(tmp / f"run-{time.monotonic_ns()}"),
        "OTEL_ML_TIMING_TABLE": "0",
    }
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, str(steps), str(warmup), str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=pin,
    )  # fmt: skip
    # The scraper shares the instrumented run's core: its CPU, which Prometheus spends on another
    # machine in real life, counts against the instrumented run rather than landing by chance on
    # either run of the pair (pessimistic, and no noise that favours either).
    scraper = (
        start_scraper(f"http://127.0.0.1:{port}/metrics", scrape, core) if mode == "instrumented" else None
    )
    return mode, worker, scraper


def run_pair(modes: tuple[str, str], steps: int, warmup: int, scrape: float, tmp: Path, layout: str):
    """Both runs of a pair: one after the other (``sequential``), or at the same time, each pinned
    to its own core (``concurrent``: whatever slows this machine down slows both alike)."""
    results = []
    if layout == "sequential":
        for mode in modes:
            results.append(_finish(_start(mode, steps, warmup, scrape, tmp, None)))
        return results
    started = [_start(mode, steps, warmup, scrape, tmp, core) for core, mode in enumerate(modes)]
    for _, worker, _ in started:
        line = worker.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"worker failed before its measurement:\n{worker.stderr.read()[-2000:]}")
    for _, worker, _ in started:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    return [_finish(run) for run in started]


def _finish(run: tuple) -> dict:
    mode, worker, scraper = run
    try:
        if worker.stdin is not None and not worker.stdin.closed:
            try:
                worker.stdin.write("go\n")  # sequential runs: no need to wait
                worker.stdin.flush()
            except BrokenPipeError:
                pass
        out, err = worker.communicate(timeout=600)
    finally:
        if scraper is not None:
            scraper.kill()
            scraper.wait()
    if worker.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def paired_ratio(got: dict[str, list[dict]], field: str) -> float:
    """B over A for ``field``: the geometric mean over the rounds of a pair, minus one."""
    product = math.prod(b[field] / a[field] for a, b in zip(got["A"], got["B"], strict=True))
    return product ** (1 / len(got["A"])) - 1


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def pct(x: float) -> str:
    return f"{x * 100:+.2f} %"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 pairs + 2 control pairs, fewer steps")
    parser.add_argument("--pairs", type=int, help="plain/instrumented pairs (default 10, quick 3)")
    parser.add_argument("--control", type=int, help="plain/plain pairs (default 10, quick 2)")
    parser.add_argument("--steps", type=int, help="measured steps per run (default 300, quick 60)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=150,
        help="unmeasured steps first (default 150: past the first module-timing step and scrapes)",
    )
    parser.add_argument("--scrape", type=float, default=1.0, help="seconds between /metrics scrapes")
    parser.add_argument(
        "--layout",
        choices=("concurrent", "sequential"),
        default="concurrent" if len(os.sched_getaffinity(0)) >= 2 else "sequential",
        help="a pair's two runs together on two cores (default with 2+ cores), or one after the other",
    )
    parser.add_argument(
        "--malloc",
        choices=("fixed", "default"),
        default="fixed",
        help="glibc malloc thresholds: fixed for every run (default), or glibc's dynamic ones",
    )
    args = parser.parse_args()
    if args.malloc == "default":
        MALLOC_ENV.clear()
    pairs = args.pairs or (3 if args.quick else 10)
    control = args.control if args.control is not None else (2 if args.quick else 10)
    steps = args.steps or (60 if args.quick else 300)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-overhead-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ratios, controls, instrumented, plain = [], [], [], []
    by_field: dict[str, tuple[list[float], list[float]]] = {"median_step": ([], []), "main_cpu": ([], [])}
    # Pairs and control pairs take turns, so that a slow stretch of the machine falls on both alike.
    counts = (("pair", pairs), ("control", control))
    schedule = [(kind, i) for i in range(max(pairs, control)) for kind, n in counts if i < n]
    for kind, index in schedule:
        b_mode = "instrumented" if kind == "pair" else "plain"
        # Run A is plain, run B instrumented (or plain again, for a control pair). Sequential: one
        # round, the order flipped every pair. Concurrent: two rounds with the cores swapped, so
        # that a faster core favours neither run; each ratio is the geometric mean of the rounds.
        first = ("A", "B") if index % 2 == 0 else ("B", "A")
        rounds = [first] if args.layout == "sequential" else [first, first[::-1]]
        got: dict[str, list[dict]] = {"A": [], "B": []}
        for placement in rounds:
            modes = tuple("plain" if run == "A" else b_mode for run in placement)
            pair = run_pair(modes, steps, args.warmup, args.scrape, tmp, args.layout)
            for run, result in zip(placement, pair, strict=True):
                got[run].append(result)
        target = ratios if kind == "pair" else controls
        target.append(paired_ratio(got, "seconds"))
        for field, (pair_ratios, control_ratios) in by_field.items():
            (pair_ratios if kind == "pair" else control_ratios).append(paired_ratio(got, field))
        if kind == "pair":
            instrumented.extend(got["B"])
            plain.extend(got["A"])
        times = "; ".join(f"{run} " + ", ".join(f"{r['seconds']:.3f}" for r in got[run]) for run in "AB")
        print(f"  {kind} {index + 1} (A plain, B {b_mode}): {times}", file=sys.stderr, flush=True)

    step_ms = statistics.median(r["seconds"] for r in instrumented) / steps * 1e3
    low, mid, high = quartiles(ratios)
    c_low, c_mid, c_high = quartiles(controls) if controls else (0.0, 0.0, 0.0)
    per_thread: dict[str, list[float]] = {}
    for r in instrumented:
        for name, cpu in r["thread_cpu_s"].items():
            per_thread.setdefault(name, []).append(cpu / r["seconds"] * 1e3)
    background = [
        sum(cpu for name, cpu in r["thread_cpu_s"].items() if name.startswith(("otel-ml", "(exited")))
        / r["seconds"]
        * 1e3
        for r in instrumented
    ]
    series = statistics.median(r["series"] for r in instrumented)
    encode = statistics.median(r["encode_ms"] for r in instrumented)
    size = statistics.median(r["bytes"] for r in instrumented)
    warm_ms = statistics.median(r["warmup_background_s"] for r in instrumented) * 1e3

    print("\n### Overhead as a user pays it (`python benchmarks/bench_overhead.py`)\n")
    print(f"{pairs} plain/instrumented pairs, {control} plain/plain control pairs, {steps} steps of "
          f"{step_ms:.1f} ms each, `/metrics` scraped every {args.scrape:g} s\n")  # fmt: skip
    print("| measured | median | interquartile range |\n|---|---|---|")
    print(f"| **Overhead, instrumented vs. plain** | **{pct(mid)}** | {pct(low)} to {pct(high)} |")
    print(f"| Control, plain vs. plain | {pct(c_mid)} | {pct(c_low)} to {pct(c_high)} |")
    for field, label in (("median_step", "median step time"), ("main_cpu", "training thread CPU time")):
        pair_ratios, control_ratios = by_field[field]
        p_low, p_mid, p_high = quartiles(pair_ratios)
        k_low, k_mid, k_high = quartiles(control_ratios) if control_ratios else (0.0, 0.0, 0.0)
        print(f"| ... by {label}: instrumented / control | {pct(p_mid)} / {pct(k_mid)} | "
              f"{pct(p_low)} to {pct(p_high)} / {pct(k_low)} to {pct(k_high)} |")  # fmt: skip
    bg_low, bg_mid, bg_high = quartiles(background)
    print(
        f"| otel_ml threads, CPU per second of training | {bg_mid:.2f} ms | {bg_low:.2f}-{bg_high:.2f} ms |"
    )
    print(f"| One-time, not in the rows above: background CPU during the {args.warmup} warm-up steps "
          f"(first connection and scrapes, first module-timing step, new paths' label texts) | "
          f"{warm_ms:.1f} ms in all | |")  # fmt: skip
    print(f"| One scrape: series / bytes / encode | {series:.0f} / {size / 1024:.1f} KiB / {encode:.2f} ms | "
          f"{encode / max(series, 1) * 1000:.2f} ms per 1,000 series |")  # fmt: skip
    faults = [statistics.median(r["faults"] / r["steps"] for r in runs) for runs in (plain, instrumented)]
    print(f"| Minor page faults per measured step, plain / instrumented (malloc: {args.malloc}) | "
          f"{faults[0]:.1f} / {faults[1]:.1f} | |")  # fmt: skip
    print("\n| thread (native name) | CPU ms per second of training (median) |\n|---|---|")
    for name, values in sorted(per_thread.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"| `{name}` | {statistics.median(values):.2f} |")
    verdicts = [
        ("overhead <= 0.5 %", mid <= 0.005),
        ("control within +-0.5 %", abs(c_mid) <= 0.005),
        ("otel_ml threads <= 2 ms CPU/s", bg_mid <= 2.0),
        ("scrape <= 10 ms to encode (series: bench_scale --budget)", encode <= 10.0),
    ]
    print("\nTargets: " + "; ".join(f"{label}: **{'PASS' if ok else 'FAIL'}**" for label, ok in verdicts))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
