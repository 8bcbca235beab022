"""How Prometheus scales with the number of otel_ml ranks: series, scrapes, rules, memory, CPU.

Run from the repository root (needs a ``prometheus`` binary, e.g. Debian's 2.42)::

    python benchmarks/bench_scale.py            # 8, 16, 32, 64 ranks; about 4 minutes
    python benchmarks/bench_scale.py --quick    # 4 ranks, 1 s interval; CI smoke run, about 20 s
    python benchmarks/bench_scale.py --ranks 8,128 --scrape-interval 15
    python benchmarks/bench_scale.py --budget   # the per-rank series budget table only, ~20 s

First the series budget of one rank (``_budget.py``): default settings, and with
``trace_modules(depth=2)`` on a 32-layer transformer, with what each makes at 1,000 and 10,000
ranks. Then:

Per N: N simulated ranks, each a real otel_ml process without torch (``otel_ml.init(
prometheus_port=0, files="off", ...)``), every ~300 ms run 14 nested ``otel_ml.span`` regions
(sleeps of 10-50 us) and ``otel_ml.log(step, loss, lr, grad_norm, samples, tokens, kl)`` with two
``otel_ml.tqdm`` bars open. A fresh Prometheus runs the shipped rules with scrape = evaluation
interval (5 s), a self-scrape job and file_sd targets from the ranks' endpoint files
(``honor_labels: true``); its baseline without ranks is read first. After all targets are up and
4 intervals of warm-up, 3 intervals are measured from Prometheus' own metrics (rules and CPU
over the last 6) and by scraping the last rank 20 times with Prometheus' headers (p99 = max).

Output: a table per N; the per-rank budget at the largest N; fits over N of rule time and CPU;
extrapolation to 1,000 and 10,000 ranks, planning limits, assumptions and topology. Everything
shares this machine's cores (load average row): latencies at large N include contention.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gzip
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _budget import table as budget_table

from otel_ml.cli.main import endpoint_files, file_sd_targets

ROOT = Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yaml"))
ACCEPT = (  # what Prometheus 2.42 asks for when it scrapes
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
MIB = 1024 * 1024
WARMUP, WINDOW, DIRECT = 4, 3, 20  # intervals after all targets are up; measured intervals; scrapes
LIMIT_RSS, LIMIT_RULES, LIMIT_CORES = 16 * 2**30, 0.5, 4.0  # planning limits for one Prometheus
FAMILIES = [("otel_ml_span_", "regions"), ("otel_ml_step_duration", "step histogram"),
            ("otel_ml_progress_", "progress"), ("otel_ml_anomal", "anomalies"), ("otel_ml_nonfinite",
            "anomalies"), ("otel_ml_export", "health"), ("otel_ml_traced", "health")]  # fmt: skip
# name -> microseconds slept, or the nested regions: 14 paths, forward/encoder/layers.N etc.
STEP = {"data": {"collate": 40}, "forward": {"embed": 20, "encoder": {f"layers.{i}": 30 for i in range(4)},
        "head": 20}, "loss": 10, "backward": {"all_reduce": 50}, "optimizer": 30}  # fmt: skip


def _regions(tree: dict[str, Any], span: Callable[[str], Any]) -> None:
    for name, inner in tree.items():
        with span(name):
            _regions(inner, span) if isinstance(inner, dict) else time.sleep(inner * 1e-6)


def run_rank(run_id: str, rank: int, world: int, run_dir: str, period: float) -> int:
    """One simulated rank: real otel_ml, realistic series, no training; exits when orphaned."""
    import otel_ml

    otel_ml.init(prometheus_port=0, files="off", summary=False, progress_view="off", run_id=run_id,
                 rank=rank, world_size=world, run_dir=run_dir, service_name="bench-scale")  # fmt: skip
    parent, rng = os.getppid(), random.Random(rank)
    with open(os.devnull, "w") as null:
        epochs = otel_ml.tqdm(total=100, desc="epochs", unit="epoch", file=null)
        bar = otel_ml.tqdm(total=100_000, desc="train", unit="step", file=null, leave=False)
        step = 0
        while os.getppid() == parent:  # the benchmark died: stop, never linger
            _regions(STEP, otel_ml.span)
            loss, kl = 2.0 * math.exp(-step / 5000) + rng.gauss(0, 0.01), 0.01 + 0.001 * rng.random()
            otel_ml.log(step, loss=loss, lr=3e-4, grad_norm=1 + rng.random() / 10, samples=32,
                        tokens=4096, kl=kl)  # fmt: skip
            bar.update(1)
            step += 1
            if step % 1000 == 0:
                epochs.update(1)
            time.sleep(period * rng.uniform(0.8, 1.2))
    return 0


def spawn(procs: list[subprocess.Popen], argv: list[str], log: Path) -> subprocess.Popen:
    """Start ``argv`` in its own process group (for :func:`stop_all`), output appended to ``log``.

    PR_SET_PDEATHSIG (Linux) also sends the child SIGTERM when the benchmark dies by SIGKILL.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    die_with_parent = lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # noqa: E731
    with open(log, "ab") as out:
        options: dict[str, Any] = {"stdout": out, "stderr": subprocess.STDOUT, "env": env}
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **options,
                                      preexec_fn=die_with_parent))  # fmt: skip
    return procs[-1]


def stop_all(procs: list[subprocess.Popen]) -> None:
    """TERM every process group that still runs, KILL what is left after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in [p for p in procs if p.poll() is None]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + 10
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.01, deadline - time.monotonic()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if result := probe():
                return result
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def prometheus_config(workdir: Path, port: int, interval: float) -> Path:
    every, targets = f"{interval:g}s", str(workdir / "targets.json")
    config = {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "rule_files": [str(p) for p in RULES],
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
            {"job_name": "otel_ml", "honor_labels": True, "file_sd_configs": [{"files": [targets]}]},
        ],
    }
    (workdir / "targets.json").write_text("[]")
    (workdir / "prometheus.yml").write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    return workdir / "prometheus.yml"


def query(url: str, expr: str) -> float:
    """Value of an instant query (sum over the vector; NaN when empty)."""
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}") as r:
        result = json.load(r)["data"]["result"]
    return sum(float(s["value"][1]) for s in result) if result else math.nan


def scrape(url: str) -> tuple[float, bytes, int]:
    """One /metrics the way Prometheus asks for it: (seconds, uncompressed body, wire bytes)."""
    request = urllib.request.Request(url, headers={"Accept": ACCEPT, "Accept-Encoding": "gzip"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        wire, gzipped = response.read(), response.headers.get("Content-Encoding") == "gzip"
    elapsed = time.perf_counter() - start
    return elapsed, gzip.decompress(wire) if gzipped else wire, len(wire)


def budget(body: str) -> str:
    """Exposed samples per family, e.g. 'regions 280 (14 paths x 20), other 41, ...'."""
    groups: Counter[str] = Counter()
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            groups[next((g for prefix, g in FAMILIES if name.startswith(prefix)), "scalars+other")] += 1
    paths = max(1, body.count("otel_ml_span_duration_seconds_count{"))
    per_path = f"regions {groups['regions']} ({paths} paths x {groups['regions'] / paths:.0f})"
    return ", ".join(per_path if g == "regions" else f"{g} {c}" for g, c in groups.most_common())


SELF = '{job="prometheus"}'
QUERIES = {  # [W]: the measured window; [R]: the last 6 intervals (rules and CPU, less noise)
    "up": 'count(up{job="otel_ml"} == 1)',
    "scraped": 'avg(avg_over_time(scrape_samples_scraped{job="otel_ml"}[W]))',
    "rank_series": 'count({rank!=""})',  # scraped + up/scrape_* + per-rank recording rules
    "run_series": 'count({run_id!="", rank=""})',  # per-run recording rules
    "head": f"prometheus_tsdb_head_series{SELF}",
    "appended": f"rate(prometheus_tsdb_head_samples_appended_total{SELF}[W])",
    "scrape_avg": 'avg(avg_over_time(scrape_duration_seconds{job="otel_ml"}[W]))',
    "scrape_max": 'max(max_over_time(scrape_duration_seconds{job="otel_ml"}[W]))',
    "rules": f"sum(avg_over_time(prometheus_rule_group_last_duration_seconds{SELF}[R]))",
    "rules_max": f"sum(max_over_time(prometheus_rule_group_last_duration_seconds{SELF}[R]))",
    "missed": f"sum(prometheus_rule_group_iterations_missed_total{SELF})",
    "prom_cpu": f"rate(process_cpu_seconds_total{SELF}[R])",
    "prom_rss": f"max_over_time(process_resident_memory_bytes{SELF}[W])",
    "prom_heap": f"max_over_time(go_memstats_heap_inuse_bytes{SELF}[W])",
}


def measure(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Start n ranks and a Prometheus, warm up, measure; always stops everything it started."""
    run_id, workdir, iv = f"scale-{n}", tmp / f"n{n}", args.scrape_interval
    run_dir, rank_log = workdir / "run", workdir / "ranks.log"
    run_dir.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.time()
        worker = [sys.executable, __file__, "--worker", run_id, str(n), str(run_dir), str(args.step_period)]
        ranks = [spawn(procs, [*worker, str(r)], rank_log) for r in range(n)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url, config = f"http://127.0.0.1:{port}", prometheus_config(workdir, port, iv)
        data, listen = f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"
        spawn(procs, [args.prometheus, f"--config.file={config}", data, listen], workdir / "prometheus.log")
        # Baseline: Prometheus with its rules and self-scrape only, while the ranks start.
        wait_for(lambda: query(url, f"count_over_time(up{SELF}[1h])") >= 2, 30 + 3 * iv, "self-scrape")
        base_rss, base_head = query(url, f"process_resident_memory_bytes{SELF}"), query(url, QUERIES["head"])

        def endpoints() -> list[dict[str, Any]]:
            if dead := [p.pid for p in ranks if p.poll() is not None]:
                raise RuntimeError(f"rank processes {dead} exited:\n{rank_log.read_text()[-3000:]}")
            records = endpoint_files(run_dir)
            return records if len(file_sd_targets(records)) == n else []

        records = wait_for(endpoints, 60 + 2 * n, f"{n} endpoint files")
        groups, startup = file_sd_targets(records), max(r["started_unix"] for r in records) - t0
        (workdir / "targets.tmp").write_text(json.dumps(groups))
        (workdir / "targets.tmp").replace(workdir / "targets.json")
        wait_for(lambda: query(url, QUERIES["up"]) == n, 30 + 4 * iv, f"{n} targets up")
        time.sleep(WARMUP * iv)
        pids = [p.pid for p in ranks]
        cpu0, w0 = [cpu_seconds(p) for p in pids], time.monotonic()
        direct = []
        for _ in range(DIRECT):  # the last rank (rank 0 may run extra views)
            direct.append(scrape(f"http://{groups[-1]['targets'][0]}/metrics"))
            time.sleep(0.05)
        time.sleep(max(0.0, WINDOW * iv - (time.monotonic() - w0)))
        window = time.monotonic() - w0
        cpu = [(cpu_seconds(p) - c) / window for p, c in zip(pids, cpu0, strict=True)]
        w, r = f"[{round(window)}s]", f"[{round(window + (WARMUP - 1) * iv)}s]"
        m: dict[str, Any] = {k: query(url, q.replace("[W]", w).replace("[R]", r)) for k, q in QUERIES.items()}
        with urllib.request.urlopen(f"{url}/api/v1/rules") as response:
            rules = [rule for g in json.load(response)["data"]["groups"] for rule in g["rules"]]
        slow = sorted(rules, key=lambda rule: -rule["evaluationTime"])[:3]
        rss = [int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0]) for p in pids]
        times, others, (_, body, wire) = sorted(d[0] for d in direct), cpu[:-1] or cpu, direct[-1]
        return m | {
            "n": n, "startup": startup, "base_rss": base_rss, "base_head": base_head, "wire": wire,
            "text": len(body), "budget": budget(body.decode()), "p50": statistics.median(times),
            "p99": times[math.ceil(0.99 * len(times)) - 1], "cpu_avg": statistics.mean(others),
            "cpu_scrape": (cpu[-1] - statistics.median(others)) * window / DIRECT, "load": os.getloadavg()[0],
            "rss_avg": statistics.mean(rss) / 1024, "log": rank_log.read_text().count("otel_ml:"),
            "slow": ", ".join(f"{r['name']} {r['evaluationTime'] * 1e3:.1f}" for r in slow) + " ms",
        }  # fmt: skip
    finally:
        stop_all(procs)


def table(m: dict[str, Any], iv: float) -> str:
    n, ms = m["n"], lambda a, b: f"{m[a] * 1e3:.1f} / {m[b] * 1e3:.1f} ms"
    rows = [
        ("targets up", f"{m['up']:.0f} / {n} (the last rank served {m['startup']:.1f} s after the spawn)"),
        ("samples scraped per rank", f"{m['scraped']:.0f}: {m['budget']}"),
        ("series per rank in Prometheus (+ up, scrape_*, rank rules)", f"{m['rank_series'] / n:.1f}"),
        ("head series", f"{m['head']:.0f} (no ranks {m['base_head']:.0f}, run rules {m['run_series']:.0f})"),
        ("samples appended / s", f"{m['appended']:.0f} (scrape = evaluation interval {iv:g} s)"),
        ("scrape duration per target avg / max", ms("scrape_avg", "scrape_max")),
        ("rule evaluation per cycle, all groups, avg / max", ms("rules", "rules_max")
         + f" ({m['missed']:.0f} iterations missed)"),
        ("slowest rules (last evaluation)", m["slow"]),
        ("Prometheus CPU; RSS / Go heap in use", f"{m['prom_cpu']:.1%} of a core; {m['prom_rss'] / MIB:.1f}"
         f" / {m['prom_heap'] / MIB:.1f} MiB (no ranks: {m['base_rss'] / MIB:.1f} MiB RSS)"),
        ("exposition per rank: text / gzip on the wire", f"{m['text']:,} / {m['wire']:,} bytes"),
        ("rank /metrics serve time p50 / p99 (direct); CPU per scrape",
         ms("p50", "p99") + f"; {m['cpu_scrape'] * 1e3:.1f} ms (scraped rank minus median rank)"),
        ("rank process CPU avg; RSS avg", f"{m['cpu_avg']:.2%} of a core; {m['rss_avg']:.0f} MiB"),
        ("otel_ml log lines from all ranks", f"{m['log']}"),
        ("machine load average (1 min, shared)", f"{m['load']:.1f} on {os.cpu_count()} cores"),
    ]  # fmt: skip
    lines = [f"### {n} ranks", "", "| metric | value |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept); through the last point (an upper bound) if that fails."""
    if len(xs) > 1:
        slope, intercept = statistics.linear_regression(xs, ys)
        if slope > 0 and intercept >= 0:
            return slope, intercept
    return ys[-1] / xs[-1], 0.0


def report(results: list[dict[str, Any]], iv: float) -> str:
    big, ns = results[-1], [r["n"] for r in results]
    per_rank, fixed = big["rank_series"] / big["n"], big["head"] - big["rank_series"]
    rule_slope, rule_fixed = fit(ns, [r["rules"] for r in results])
    cpu_slope, cpu_fixed = fit(ns, [r["prom_cpu"] for r in results])
    per_series = (big["prom_rss"] - big["base_rss"]) / (big["head"] - big["base_head"])
    out = [
        "## Per-rank series budget", "",
        f"* {big['scraped']:.0f} samples per scrape ({big['budget']}); {per_rank:.1f} head series per rank"
        f" (+ up, scrape_*, per-rank recording rules); fixed: {fixed:.0f} (self-scrape, per-run rules)",
        f"* {big['text']:,} bytes per scrape uncompressed ({big['text'] / big['scraped']:.0f} per sample), "
        f"{big['wire']:,} gzip; Prometheus RSS {per_series / 1024:.1f} KiB per added head series",
        f"* per rank: {rule_slope * 1e6:.0f} us of rule evaluation per cycle (+ {rule_fixed * 1e3:.1f} ms),"
        f" {cpu_slope:.3%} of a core in Prometheus (+ {cpu_fixed:.2%}); fits over N = {ns}"
        + (" (one N: through the origin, an upper bound)" if len(ns) == 1 else ""),
        "", "## Extrapolation", "",
        "| ranks | head series | samples/s | scrapes/s | ingress gzip | Prometheus RSS | CPU | rules/cycle |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for ranks in (1_000, 10_000):
        series, rules = fixed + per_rank * ranks, rule_fixed + rule_slope * ranks
        memory = (big["base_rss"] + per_series * (series - big["base_head"])) / 2**30
        cores = cpu_fixed + cpu_slope * ranks
        out.append(f"| {ranks:,} | {series / 1e6:.2f} M | {series / iv / 1e3:,.0f} k | {ranks / iv:,.0f} | "
                   f"{big['wire'] * ranks / iv / MIB:.1f} MiB/s | {memory:.1f} GiB | {cores:.1f} cores | "
                   f"{rules:.2f} s = {rules / iv:.0%} of {iv:g} s |")  # fmt: skip
    limits = {
        f"{LIMIT_RSS / 2**30:.0f} GiB RSS": (LIMIT_RSS - big["base_rss"]) / per_series / per_rank,
        f"rules {LIMIT_RULES:.0%} of the interval": (LIMIT_RULES * iv - rule_fixed) / rule_slope,
        f"{LIMIT_CORES:g} cores": (LIMIT_CORES - cpu_fixed) / cpu_slope,
    }
    out += [
        "", "Ranks per Prometheus at the planning limits: "
        + "; ".join(f"{k}: {v:,.0f}" for k, v in limits.items())
        + f" (first reached: {min(limits, key=limits.__getitem__)}).",
        "", f"Assumptions: {per_rank:.0f} series per rank as measured (14 region paths, 2 bars, no GPU;"
        " each more region path adds 20 series, each open bar 6, each GPU 4); one sample per head series per"
        f" {iv:g} s; RSS, CPU and rule time linear in ranks (Go GC headroom included; no churn, no queries,"
        " no remote write; the 5m/30m rule windows were not yet full here, so long-running rule time is"
        " higher); scrape cost per target independent of N on separate hosts (here every rank, Prometheus"
        " and other jobs share this machine's cores: see the load average).",
        "", "## Recommended topology", "",
        "* Per-rank scrape (file_sd from `otel-ml targets`, honor_labels: true) by one Prometheus (or an HA"
        f" pair on the same targets) up to a few thousand ranks (this run: ~{min(limits.values()) / 3:,.0f},"
        " the first limit above with 3x headroom for run churn: a restart is a new run_id, old series stay"
        " in the head up to ~3 h), dashboard and `otel-ml top` queries, full 30m rule windows, GPUs and"
        " more region paths: trace_modules, up to max_span_paths = 256 paths x 20 series per rank).",
        "* Beyond that, shard: one Prometheus per shard chosen by `hashmod` of `run_id` (not `rank`:"
        " TrainingRankDown and the straggler median aggregate `by (run_id)`), or push: an OTel Collector"
        " per node scrapes its ranks (or receives OTLP) and remote-writes to Mimir/Thanos, whose ruler"
        " evaluates the shipped rules over all ranks of a run.",
        "* Scrape every 15 s (the rate1m rules need <= 30 s): 3x fewer samples/s than 5 s, same memory.",
    ]  # fmt: skip
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="8,16,32,64", help="comma-separated rank counts")
    parser.add_argument("--quick", action="store_true", help="4 ranks, 1 s interval (CI smoke run)")
    parser.add_argument("--scrape-interval", type=float, default=5.0, help="= evaluation interval, s")
    parser.add_argument("--step-period", type=float, default=0.3, help="seconds between simulated steps")
    parser.add_argument("--prometheus", default=shutil.which("prometheus"), help="the binary")
    parser.add_argument("--budget", action="store_true", help="only the per-rank series budget table")
    if sys.argv[1:2] == ["--worker"]:  # run_id, world size, run dir, step period, rank
        return run_rank(sys.argv[2], int(sys.argv[6]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
    args = parser.parse_args()
    print("## Series budget of one rank (benchmarks/_budget.py)\n")
    print(budget_table(), end="\n\n", flush=True)
    if args.budget:
        return 0
    if args.quick:
        args.ranks, args.scrape_interval = "4", 1.0
    if not args.prometheus:
        parser.error("no prometheus binary: apt-get install prometheus, or --prometheus PATH")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks on TERM too
    tmp, started, results = Path(tempfile.mkdtemp(prefix="otel-ml-bench-scale-")), time.monotonic(), []
    try:
        for n in sorted(int(x) for x in args.ranks.split(",")):
            results.append(measure(n, args, tmp))
            print(table(results[-1], args.scrape_interval), end="\n\n", flush=True)
        print(report(results, args.scrape_interval))
        print(f"\n(total {time.monotonic() - started:.0f} s; rule files: {', '.join(p.name for p in RULES)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
