"""Cost of an ``otel_ml.span`` region on the training thread and the export thread, next to OTel spans.

Run from the repository root (torch must be installed; a CPU build is enough)::

    python benchmarks/bench_span.py           # full run, about 30 s
    python benchmarks/bench_span.py --quick   # smoke run, about 5 s

It prints the machine facts and a markdown table with verdicts. otel_ml runs with
``prometheus_port=0, files="off", summary=False`` in a temporary run dir: nothing collides.

Part 1, training thread, µs per region (enter + exit of an empty ``with``): a sample is the mean of
1000 iterations in a ``timeit`` loop; cases run round-robin in a rotating order, so drift hits all
alike. Peers: a ``perf_counter()`` pair (floor), an OTel SDK span (``BatchSpanProcessor``, exporter
discards), ``record_function`` without a profiler. After each sample, untimed, the OTel processor is
flushed and otel_ml's step window is closed (``log()``) and drained (``aggregator.process()``, which
the export thread runs every 0.5 s), so no queue grows. Part 2: that ``process()`` call per region:
the export thread's cost (off the training thread, but holding the GIL); every 4th round traces
every window, so each region also becomes an OTel span. Targets: ≤ 1 µs, ≥ 20x cheaper than OTel.

The end-to-end cost in a training loop (``trace_modules`` + regions, A/B) is measured by
``benchmarks/bench_modules.py``.

GC stays on: regions allocate, and collections they trigger are charged to them. Setup garbage is
collected and ``gc.freeze()`` moves the survivors (torch, the SDK) out of the collector's way.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import shutil
import statistics
import tempfile
import time
import timeit
import warnings
from collections.abc import Callable
from typing import Any

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from _common import Discard, machine_facts  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

import otel_ml  # noqa: E402
from otel_ml.regions.aggregator import Aggregator  # noqa: E402
from otel_ml.regions.sampling import TraceSampler  # noqa: E402

Case = Callable[[int], float]  # runs n iterations, returns elapsed seconds
TARGET_US, TARGET_RATIO, BATCH = 1.0, 20.0, 1000
STEPS = itertools.count()  # every log() gets a new, higher step number
SPAN, FWD = '`with otel_ml.span("forward")` (name lookup)', "`with fwd` (region object fetched once)"
OTEL = 'OTel SDK `with tracer.start_as_current_span("x")`'
NESTED = '`otel_ml.span` nested pair ("forward" > "encoder"), per region'
RECORD = '`with torch.profiler.record_function("x")`, no profiler'
VERDICT = ("FAIL", "PASS")


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else samples[0]


# ---------------------------------------------------------------------------- parts 1 and 2
def part1_cases(tracer: Any) -> dict[str, tuple[Case, int]]:
    """Name: (``timeit`` loop of the statement with automatic GC left on, regions per iteration)."""
    specs = [
        ("`perf_counter()` pair (floor)", "clock(); clock()", 1),
        (SPAN, 'with span("forward"):\n    pass', 1),
        (FWD, "with fwd:\n    pass", 1),
        (NESTED, 'with span("forward"):\n    with span("encoder"):\n        pass', 2),
        (OTEL, 'with tracer.start_as_current_span("x"):\n    pass', 1),
        (RECORD, 'with record_function("x"):\n    pass', 1),
    ]
    names = {"gc": gc, "clock": time.perf_counter, "span": otel_ml.span, "fwd": otel_ml.span("forward")}
    names.update(tracer=tracer, record_function=torch.profiler.record_function)
    return {
        name: (timeit.Timer(stmt, "gc.enable()", time.perf_counter, names).timeit, n)
        for name, stmt, n in specs
    }


def microbench(
    cases: dict[str, tuple[Case, int]], rounds: int, agg: Aggregator, provider: TracerProvider
) -> tuple[dict[str, list[float]], dict[bool, list[float]]]:
    """Per-region µs samples per case; the export thread's µs per region drained, by traced or not."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    drained: dict[bool, list[float]] = {False: [], True: []}
    saved = agg.sampler
    for r in range(-1, rounds):  # round -1 is a warm-up
        traced = r % 4 == 3  # every 4th round, every window becomes spans; else statistics only
        agg.sampler = TraceSampler(every=1 if traced else 0, factor=0)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            case, regions = cases[name]
            seconds = case(BATCH)
            if r >= 0:
                samples[name].append(seconds / (BATCH * regions) * 1e6)
            if name == OTEL:
                provider.force_flush()
            elif name in (SPAN, FWD, NESTED):
                otel_ml.log(next(STEPS))  # close the step window so the aggregator lets go of it
                start = time.perf_counter()
                agg.process()  # with the C regions, this also turns their records into entries
                drained[traced].append((time.perf_counter() - start) / (BATCH * regions) * 1e6)
    agg.sampler = saved
    return samples, drained


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short run for CI smoke tests")
    parser.add_argument("--rounds", type=int, help="part 1 samples per case (default 400, quick 40)")
    args = parser.parse_args()
    rounds = args.rounds or (40 if args.quick else 400)
    began = time.perf_counter()
    torch.set_num_threads(1)
    print(facts := machine_facts(), flush=True)
    run_dir = tempfile.mkdtemp(prefix="bench-span-")
    options: dict[str, Any] = {"prometheus_port": 0, "files": "off", "summary": False, "run_dir": run_dir}
    telemetry = otel_ml.init(service_name="bench-span", **options)
    assert telemetry.timekeeper is not None
    # A span destination, as OTLP would be: without one, traced steps are only counted, not built.
    telemetry.tracer_provider.add_span_processor(BatchSpanProcessor(Discard()))
    agg = telemetry.timekeeper.aggregator
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    cases = part1_cases(provider.get_tracer("bench"))
    gc.collect()
    gc.freeze()
    print(f"\nParts 1-2: {rounds} samples of {BATCH} iterations per case ...", flush=True)
    samples, drained = microbench(cases, rounds, agg, provider)
    samples["Export thread per region drained, statistics only"] = drained[False]
    samples["Export thread per region drained, traced window (spans built; every 4th round)"] = drained[True]
    stats = {name: (statistics.median(s), p99(s)) for name, s in samples.items()}
    span_us, ratio = stats[SPAN][0], stats[OTEL][0] / stats[SPAN][0]

    ok = otel_ml.shutdown(timeout=5.0)
    provider.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)

    rows = [f"| {name} | {med:.3f} µs | {hi:.3f} µs |" for name, (med, hi) in stats.items()]
    mode = " (--quick)" if args.quick else ""
    print(f"\notel_ml shutdown ok: {ok}; runtime {time.perf_counter() - began:.1f} s{mode}")
    print("\n### Cost of an `otel_ml.span` region (`python benchmarks/bench_span.py`)\n")
    print(f"{facts}. Median and p99 of {rounds} batches of {BATCH} iterations.\n")
    print("| Measurement | Median | p99 |\n|---|---:|---:|\n" + "\n".join(rows))
    print(
        f"\nA raw OTel SDK span costs {ratio:.1f}x `otel_ml.span` ({stats[OTEL][0] / stats[FWD][0]:.1f}x "
        f"a fetched region). Targets: ≤ {TARGET_US:g} µs median: **{VERDICT[span_us <= TARGET_US]}**"
        f"; ≥ {TARGET_RATIO:g}x cheaper than an OTel span: **{VERDICT[ratio >= TARGET_RATIO]}**."
    )


if __name__ == "__main__":
    main()
