"""Cost of ``otel_ml.span`` regions and ``trace_modules``, next to OTel SDK spans, in a real loop.

Run from the repository root (torch must be installed; a CPU build is enough)::

    python benchmarks/bench_span.py           # full run, about 70 s
    python benchmarks/bench_span.py --quick   # CI smoke run, about 10 s

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

Part 3: a one-thread CPU transformer LM (2 layers, d_model 128) at ~10 ms per step. Blocks of A
(plain loop), B (``trace_modules(model, depth=None, every=1)`` + 10 ``otel_ml.span`` regions +
``log()``), D (the same with trace_modules' default ``every=20``)
and C (naive: forward hooks calling ``tracer.start_span``/``span.end()`` per module; flat, forward
only: a lower bound) run in groups cycling through all 24 orders; hooks are added and removed
between blocks. Overhead: median over groups of ``(B - A) / A``, bootstrap 95% interval (PASS/FAIL
only if it is all on one side of the 1 % target). B timed directly: hook cost per step (8-token
forward + backward with and without hooks, interleaved) + 10 regions at the part 1 median + ``log()``
timed in the loop; plus the export thread's ``process()`` CPU time (``thread_time``), default sampling.

GC stays on: regions allocate, and collections they trigger are charged to them. Setup garbage is
collected and ``gc.freeze()`` moves the survivors (torch, the SDK) out of the collector's way.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
import timeit
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from torch import nn  # noqa: E402

import otel_ml  # noqa: E402
from otel_ml.regions import Aggregator  # noqa: E402
from otel_ml.sampling import TraceSampler  # noqa: E402

Case = Callable[[int], float]  # runs n iterations, returns elapsed seconds
TARGET_US, TARGET_RATIO, TARGET_PCT, VOCAB, MANUAL, BATCH, STEP_MS = 1.0, 20.0, 1.0, 1000, 10, 1000, 10.0
STEPS = itertools.count()  # every log() gets a new, higher step number
SPAN, FWD = '`with otel_ml.span("forward")` (name lookup)', "`with fwd` (region object fetched once)"
OTEL = 'OTel SDK `with tracer.start_as_current_span("x")`'
NESTED = '`otel_ml.span` nested pair ("forward" > "encoder"), per region'
RECORD = '`with torch.profiler.record_function("x")`, no profiler'
VERDICT = ("FAIL", "PASS")


class Discard(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


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
    names, finished = list(cases), agg.recorder.finished
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
            elif count := len(finished):
                otel_ml.log(next(STEPS))  # close the step window so the aggregator lets go of it
                start = time.perf_counter()
                agg.process()
                drained[traced].append((time.perf_counter() - start) / count * 1e6)
    agg.sampler = saved
    return samples, drained


# ---------------------------------------------------------------------------- part 3: end to end
def naive_otel_hooks(model: nn.Module, tracer: Any) -> list[Any]:
    """What teams write first: one OTel span per module call, from forward pre/post hooks."""
    handles = []
    for name, module in model.named_modules():
        stack: list[Any] = []

        def pre(_m: Any, _a: Any, label: str = name or "model", stack: list[Any] = stack) -> None:
            stack.append(tracer.start_span(label))

        def post(_m: Any, _a: Any, _o: Any, stack: list[Any] = stack) -> None:
            stack.pop().end()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


class Trainer:
    """Next-token LM training (AdamW, grad clipping) as A (plain), B (otel_ml) or C (naive OTel)."""

    def __init__(self, batch: int, seq: int, tracer: Any) -> None:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.1, batch_first=True)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.model = nn.Sequential(
            OrderedDict(embed=nn.Embedding(VOCAB, 128), encoder=encoder, head=nn.Linear(128, VOCAB))
        )
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=3e-4)
        self.tracer, self.handles, self.log_seconds = tracer, [], 0.0
        self.set_shape(batch, seq)

    def set_shape(self, batch: int, seq: int) -> None:
        self.batch, self.seq = batch, seq
        tokens = [torch.randint(0, VOCAB, (batch, seq + 1)) for _ in range(8)]
        self.data = [(t[:, :-1], t[:, 1:]) for t in tokens]

    def set_variant(self, variant: str) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if variant in "BD":
            otel_ml.log(next(STEPS))  # close the window that spans other blocks before B's steps
            every = 1 if variant == "B" else 20  # D: trace_modules' default sampling
            self.handles = [otel_ml.trace_modules(self.model, depth=None, every=every)]
        elif variant == "C":
            self.handles = naive_otel_hooks(self.model, self.tracer)

    def plain_step(self, i: int) -> torch.Tensor:
        x, y = self.data[i % len(self.data)]
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def spans_step(self, i: int) -> torch.Tensor:
        """``plain_step`` in 10 regions: step > (data > fetch), forward, ..., optimizer > (clip, ...)."""
        span = otel_ml.span
        with span("step"):
            with span("data"), span("fetch"):
                x, y = self.data[i % len(self.data)]
            with span("forward"):
                out = self.model(x)
            with span("loss"):
                loss = F.cross_entropy(out.flatten(0, 1), y.flatten())
            with span("backward"):
                loss.backward()
            with span("optimizer"):
                with span("clip"):
                    nn.utils.clip_grad_norm_(self.params, 1.0)
                with span("update"):
                    self.opt.step()
                with span("zero_grad"):
                    self.opt.zero_grad(set_to_none=True)
        return loss

    def block(self, steps: int, variant: str) -> list[float]:
        """Run ``steps`` steps of ``variant`` (its hooks on meanwhile); return each step's seconds."""
        self.set_variant(variant)
        clock, times, traced = time.perf_counter, [], variant in "BD"
        for _ in range(steps):
            start = clock()
            i = next(STEPS)
            if traced:
                loss = self.spans_step(i)
                t0 = clock()
                otel_ml.log(i, loss=loss.detach())
                self.log_seconds += clock() - t0
            else:
                self.plain_step(i)
            times.append(clock() - start)
        self.set_variant("A")
        return times


def calibrate(trainer: Trainer) -> float:
    """Scale the sequence length until a plain step takes about ``STEP_MS``; return the measured ms."""
    for _ in range(5):
        trainer.block(5, "A")
        ms = statistics.median(trainer.block(20, "A")) * 1e3
        if abs(ms - STEP_MS) < 0.08 * STEP_MS:
            break
        trainer.set_shape(trainer.batch, max(4, min(512, round(trainer.seq * STEP_MS / ms))))
    return ms


def end_to_end(trainer: Trainer, agg: Aggregator, groups: int, steps: int) -> dict[str, Any]:
    for variant in "ABCD":  # warm-up
        trainer.block(steps, variant)
    agg.process()
    regions, trainer.log_seconds = sum(s.count for s in agg.stats.values()), 0.0
    inner, pump_ns = agg.process, [0]

    def timed_process() -> None:  # the export thread's job, CPU time added up
        start = time.thread_time_ns()
        inner()
        pump_ns[0] += time.thread_time_ns() - start

    agg.process = timed_process  # type: ignore[method-assign]
    medians: dict[str, list[float]] = {v: [] for v in "ABCD"}
    every: dict[str, list[float]] = {v: [] for v in "ABCD"}
    orders = list(itertools.permutations("ABCD"))
    for g in range(groups):
        for variant in orders[g % len(orders)]:
            times = trainer.block(steps, variant)
            medians[variant].append(statistics.median(times))
            every[variant].extend(times)
    time.sleep(0.6)  # one more pump tick, then drain the rest
    agg.process()
    del agg.process
    b_steps, rng = groups * steps, random.Random(0)
    out: dict[str, Any] = {v: (statistics.median(t) * 1e3, p99(t) * 1e3) for v, t in every.items()}
    for v in "BCD":
        diffs = [(x - a) / a * 100 for a, x in zip(medians["A"], medians[v], strict=True)]
        boot = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
        out[v + "%"] = (statistics.median(diffs), boot[50], boot[1949])
    out["regions"] = (sum(s.count for s in agg.stats.values()) - regions) / b_steps
    out["pump_us"], out["log_us"] = pump_ns[0] / b_steps / 1e3, trainer.log_seconds / b_steps * 1e6
    return out


def hook_cost(trainer: Trainer, agg: Aggregator, rounds: int, iters: int = 20) -> float:
    """µs per step ``trace_modules`` adds to forward + backward (8 tokens) on the training thread."""
    model, x = trainer.model, torch.randint(0, VOCAB, (1, 8))
    samples: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds + 1):  # round 0 is a warm-up
        for hooked in (False, True) if r % 2 else (True, False):
            trainer.set_variant("B" if hooked else "A")
            agg.process()  # so that the export thread has little to do during the sample
            start = time.perf_counter()
            for _ in range(iters):
                model(x).sum().backward()
                otel_ml.log(next(STEPS))  # a step boundary, as in training (resets per-step hook state)
            if r:
                samples[hooked].append((time.perf_counter() - start) / iters * 1e6)
    trainer.set_variant("A")
    trainer.opt.zero_grad(set_to_none=True)
    return statistics.median(samples[True]) - statistics.median(samples[False])


# ---------------------------------------------------------------------------- main
def machine_facts() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":")[1].strip() for ln in info.splitlines() if "model name" in ln), "?")
    return (
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} thread), "
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
        f"otel_ml {otel_ml.__version__}, opentelemetry-sdk {version('opentelemetry-sdk')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short run for CI smoke tests")
    parser.add_argument("--rounds", type=int, help="part 1 samples per case (default 400, quick 40)")
    parser.add_argument("--groups", type=int, help="part 3 A/B/C block groups (default 30, quick 6)")
    parser.add_argument("--steps", type=int, help="steps per part 3 block (default 40, quick 12)")
    args = parser.parse_args()
    rounds = args.rounds or (40 if args.quick else 400)
    groups, steps = args.groups or (6 if args.quick else 30), args.steps or (12 if args.quick else 40)
    began = time.perf_counter()
    torch.set_num_threads(1)
    print(facts := machine_facts(), flush=True)
    run_dir = tempfile.mkdtemp(prefix="bench-span-")
    options: dict[str, Any] = {"prometheus_port": 0, "files": "off", "summary": False, "run_dir": run_dir}
    telemetry = otel_ml.init(service_name="bench-span", **options)
    assert telemetry.timekeeper is not None
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

    print(f"Part 3: calibrating a ~{STEP_MS:g} ms step ...", flush=True)
    trainer = Trainer(batch=4, seq=32, tracer=provider.get_tracer("bench"))
    ms = calibrate(trainer)
    shape = f"{trainer.batch} x {trainer.seq} tokens"
    print(f"  {shape}: {ms:.2f} ms/step; {groups} A/B/C groups of {steps} steps ...", flush=True)
    e2e = end_to_end(trainer, agg, groups, steps)
    hooks_us = hook_cost(trainer, agg, 6 if args.quick else 30)
    calls = (e2e["regions"] - MANUAL) / 2  # a module call opens a forward and a backward region
    step_us = e2e["A"][0] * 1e3
    direct_pct = (hooks_us + MANUAL * span_us + e2e["log_us"]) / step_us * 100
    ok = otel_ml.shutdown(timeout=5.0)
    provider.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)

    rows = [f"| {name} | {med:.3f} µs | {hi:.3f} µs |" for name, (med, hi) in stats.items()]
    labels = {
        "A": "A: plain loop",
        "B": "B: `trace_modules(every=1)` + 10 spans + `log()`",
        "C": "C: naive OTel",
        "D": "D: `trace_modules()` (default every=20) + 10 spans + `log()`",
    }
    rows += [f"| Step, LM {shape}, {labels[v]} | {e2e[v][0]:.3f} ms | {e2e[v][1]:.3f} ms |" for v in "ABCD"]
    rows += [
        f"| **Overhead {v} vs A** (median of {groups} groups) | **{e2e[v + '%'][0]:+.2f} %** "
        f"| 95% CI [{e2e[v + '%'][1]:+.2f}, {e2e[v + '%'][2]:+.2f}] % |"
        for v in "BCD"
    ]
    rows += [
        f"| B timed directly: hooks of {calls:.0f} module calls ({hooks_us / calls:.1f} µs each) "
        f"+ {MANUAL} regions + `log()` ({e2e['log_us']:.1f} µs) | {direct_pct * step_us / 100:.0f} µs "
        f"| = {direct_pct:.2f} % of a step |",
        f"| B export thread CPU per step ({e2e['regions']:.0f} regions, holds the GIL) "
        f"| {e2e['pump_us']:.0f} µs | = {e2e['pump_us'] / step_us * 100:.2f} % of a step |",
    ]
    pct, lo, hi = e2e["B%"]
    ab = "PASS" if hi <= TARGET_PCT else "FAIL" if lo > TARGET_PCT else "UNRESOLVED"
    d_pct, d_lo, d_hi = e2e["D%"]
    ad = "PASS" if d_hi <= TARGET_PCT else "FAIL" if d_lo > TARGET_PCT else "UNRESOLVED"
    pump_pct, mode = e2e["pump_us"] / step_us * 100, " (--quick)" if args.quick else ""
    print(f"\notel_ml shutdown ok: {ok}; runtime {time.perf_counter() - began:.1f} s{mode}")
    print("\n### Cost of `otel_ml.span` and `trace_modules` (`python benchmarks/bench_span.py`)\n")
    print(f"{facts}. Per-region rows: median and p99 of {rounds} batches of {BATCH} iterations.\n")
    print("| Measurement | Median | p99 |\n|---|---:|---:|\n" + "\n".join(rows))
    print(
        f"\nA raw OTel SDK span costs {ratio:.1f}x `otel_ml.span` ({stats[OTEL][0] / stats[FWD][0]:.1f}x "
        f"a fetched region). Targets: ≤ {TARGET_US:g} µs median: **{VERDICT[span_us <= TARGET_US]}**"
        f"; ≥ {TARGET_RATIO:g}x cheaper than an OTel span: **{VERDICT[ratio >= TARGET_RATIO]}**; "
        f"B ≤ {TARGET_PCT:g} % of step time: A/B **{ab}** ({pct:+.2f} %), timed directly "
        f"**{VERDICT[direct_pct + pump_pct <= TARGET_PCT]}** ({direct_pct:.2f} % on the training thread "
        f"+ {pump_pct:.2f} % export thread CPU, which holds the GIL). With the default sampling "
        f"(D, modules timed every 20th step): A/B **{ad}** ({d_pct:+.2f} %)."
    )


if __name__ == "__main__":
    main()
