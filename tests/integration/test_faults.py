"""Faults around a real training process: the collector flaps or is gone, DataLoader workers fork,
signals arrive, the training code raises, the disk is full.

Every test runs the product in a child Python process configured through the environment (as a
user would) and talks to it line by line (:class:`tests.support.child.LiveChild`): the child
trains a phase, prints where it is, and waits for the test to change the world before the next
phase. The OTLP side is the in-test receiver (official opentelemetry-proto messages) whose mode
the test switches at run time.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otel_ml.exporters.files import METRICS_FILE, SPANS_FILE, read_jsonl
from tests.integration.conftest import Processes
from tests.support.child import LiveChild, clean_env
from tests.support.metrics import strict_exposition
from tests.support.net import wait_until
from tests.support.otlp_receiver import GRPC, HTTP, METRICS, TRACES, OtlpReceiver, attributes

pytestmark = pytest.mark.integration

#: OTEL_METRIC_EXPORT_INTERVAL of the children, seconds.
INTERVAL = 0.3
#: Upper bound for a child to import torch and reach its first phase on this 2-core machine.
START_TIMEOUT = 60.0


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return strict_exposition(response.read().decode())


def sample(samples: dict[str, Any], name: str, **labels: str) -> float:
    """The value of the one sample ``name`` whose labels include ``labels``."""
    found = [v for lbl, v in samples.get(name, []) if all(lbl.get(k) == v2 for k, v2 in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found} in {sorted(samples)}"
    return found[0]


def otel_lines(lines: list[str], *needles: str) -> list[str]:
    """stderr lines of otel_ml that contain every one of ``needles`` (case-insensitive)."""
    return [
        line
        for line in lines
        if line.startswith("otel_ml: ") and all(n.lower() in line.lower() for n in needles)
    ]


def foreign_lines(lines: list[str]) -> list[str]:
    """stderr lines that are not otel_ml's own (exporter logs, gRPC noise, tracebacks)."""
    return [line for line in lines if line.strip() and not line.startswith("otel_ml: ")]


# ------------------------------------------------------------------------------ collector flapping

# A deterministic training run (fixed seed, one thread) in phases: after each phase it prints
# "phase N done" and waits for a line on stdin, so the test can change the collector in between.
PHASED_TRAINER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import otel_ml

    torch.manual_seed(0)
    torch.set_num_threads(1)
    telemetry = otel_ml.init()
    print(json.dumps({"url": telemetry.metrics_url, "pid": os.getpid()}), flush=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(64, 1)
    step = 0
    for phase in range(int(os.environ["TEST_PHASES"])):
        for _ in range(int(os.environ["TEST_STEPS_PER_PHASE"])):
            step += 1
            with otel_ml.span("forward"):
                loss = torch.nn.functional.mse_loss(model(x), y)
            with otel_ml.span("backward"):
                opt.zero_grad()
                loss.backward()
            opt.step()
            otel_ml.log(step, loss=loss.detach(), lr=0.05, samples=64)
            print(f"loss {step} {loss.item()!r}", flush=True)
            time.sleep(0.003)
        print(f"phase {phase} done {step}", flush=True)
        sys.stdin.readline()
    ok = otel_ml.shutdown()
    print(json.dumps({"shutdown_ok": ok, "errors": telemetry.health.errors}), flush=True)
    """
)
PHASES = 3
STEPS_PER_PHASE = 40


def phased_env(tmp_path: Path, receiver: OtlpReceiver, protocol: str) -> dict[str, str]:
    return clean_env(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        # Shorter than the exporter's first retry back-off (about 1 s): a refused export fails at
        # once instead of retrying into the next interval.
        OTEL_EXPORTER_OTLP_TIMEOUT="500",
        OTEL_METRIC_EXPORT_INTERVAL=str(int(INTERVAL * 1000)),
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_ML_TRACE_EVERY="5",
        TEST_PHASES=str(PHASES),
        TEST_STEPS_PER_PHASE=str(STEPS_PER_PHASE),
    )


def losses(stdout_lines: list[str]) -> list[tuple[int, str]]:
    """The (step, repr(loss)) lines a phased trainer printed."""
    out = []
    for line in stdout_lines:
        if line.startswith("loss "):
            _, step, value = line.split()
            out.append((int(step), value))
    return out


@pytest.fixture(scope="module")
def healthy_losses(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str]]:
    """The loss trajectory of the phased trainer with a collector that never fails."""
    tmp_path = tmp_path_factory.mktemp("healthy")
    with OtlpReceiver() as receiver:
        completed = subprocess.run(
            [sys.executable, "-c", PHASED_TRAINER],
            env=phased_env(tmp_path, receiver, HTTP),
            cwd=tmp_path,
            input="\n" * PHASES,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert receiver.received(METRICS), "the reference run must have exported to its collector"
    trajectory = losses(completed.stdout.splitlines())
    assert [step for step, _ in trajectory] == list(range(1, PHASES * STEPS_PER_PHASE + 1))
    return trajectory


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_collector_flapping_exports_resume_and_training_is_unchanged(
    measure: Callable[[str, str], None],
    protocol: str,
    otlp_receiver: OtlpReceiver,
    processes: Processes,
    tmp_path: Path,
    healthy_losses: list[tuple[int, str]],
) -> None:
    child = LiveChild.start(
        processes, PHASED_TRAINER, env=phased_env(tmp_path, otlp_receiver, protocol), cwd=tmp_path
    )
    info = json.loads(child.wait_prefix("{", START_TIMEOUT))

    # Phase 0 with a healthy collector.
    child.wait_prefix("phase 0 done", START_TIMEOUT)
    otlp_receiver.wait_for(lambda: otlp_receiver.received(METRICS), timeout=10, what="a first export")

    # Phase 1 trains while the collector answers UNAVAILABLE / 503 to everything.
    otlp_receiver.mode = "unavailable"
    child.send()
    child.wait_prefix("phase 1 done", 30)
    otlp_receiver.wait_for(
        lambda: sum(a.mode == "unavailable" and a.signal == METRICS for a in otlp_receiver.attempts) >= 3,
        timeout=10,
        what="three refused metric exports",
    )
    during = scrape(info["url"])
    assert sample(during, "otel_ml_export_errors_total", exporter="otlp") > 0
    assert sample(during, "otel_ml_step") == 2 * STEPS_PER_PHASE, "the pull side is unaffected"

    # The collector comes back: the next metrics request must arrive within two intervals.
    before = len(otlp_receiver.received(METRICS))
    back = time.monotonic()
    otlp_receiver.mode = "ok"
    otlp_receiver.wait_for(lambda: len(otlp_receiver.received(METRICS)) > before, timeout=10)
    resumed_after = otlp_receiver.received(METRICS)[before].at - back
    assert resumed_after <= 2 * INTERVAL, f"exports resumed {resumed_after:.3f}s after recovery"
    measure(
        f"collector back ({protocol}, {INTERVAL} s interval): first metrics export after",
        f"{resumed_after:.2f} s",
    )
    # ...and keep the configured cadence.
    otlp_receiver.wait_for(lambda: len(otlp_receiver.received(METRICS)) >= before + 5, timeout=10)
    arrivals = [r.at for r in otlp_receiver.received(METRICS)[before : before + 5]]
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    assert gaps[len(gaps) // 2] <= 1.5 * INTERVAL, f"metrics every {gaps}s, configured {INTERVAL}s"
    # What was recorded during the outage is there (metrics are cumulative: nothing to replay).
    first_back = otlp_receiver.received(METRICS)[before].message
    steps = [
        point.as_double or point.as_int
        for rm in first_back.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "otel_ml_step"
        for point in m.gauge.data_points
    ]
    assert steps == [2 * STEPS_PER_PHASE], steps

    # Phase 2 with the collector back, then shutdown.
    child.send()
    child.wait_prefix("phase 2 done", 30)
    after = scrape(info["url"])
    assert sample(after, "otel_ml_export_errors_total", exporter="otlp") > 0, "a counter never goes down"
    child.send()
    assert child.wait_exit(30) == 0, child.output
    report = json.loads(child.stdout_lines[-1])
    assert report["shutdown_ok"] is True, child.output
    assert otlp_receiver.spans("otel_ml.step"), "spans resumed too"
    assert {resource["process.pid"] for resource, _ in otlp_receiver.spans()} == {info["pid"]}

    # One line for the outage, one for the recovery, nothing else (no exporter retry logs).
    stderr = child.stderr_lines
    assert len(otel_lines(stderr, "otlp export", "failing")) == 1, child.output
    assert len(otel_lines(stderr, "otlp export recovered")) == 1, child.output
    assert len([line for line in stderr if line.strip()]) == 2, child.output

    # Telemetry never touched the numbers: the same losses as with a healthy collector.
    assert losses(child.stdout_lines) == healthy_losses


# ------------------------------------------------------------------------------ collector absent

# Trains in two segments (warm-up, then a longer stretch), pausing after each so the test can
# read the process's resident memory from /proc; every step is traced (4 spans). Before each
# pause it lets the export side catch up (flush, bounded), so both readings are taken in the
# same state: whatever is still held then is held for good.
SEGMENTED_TRAINER = textwrap.dedent(
    """
    import json, os, sys, time
    import otel_ml

    telemetry = otel_ml.init()
    print(json.dumps({"url": telemetry.metrics_url}), flush=True)

    def train(first, last):
        for step in range(first, last):
            with otel_ml.span("forward"):
                with otel_ml.span("attention"):
                    time.sleep(0.0002)  # the device works; the CPU is free for the export side
            with otel_ml.span("backward"):
                sum(range(100))
            otel_ml.log(step, loss=1.0 / step, lr=1e-3, grad_norm=0.5, samples=32, tokens=4096)

    warm, total = int(os.environ["TEST_WARMUP"]), int(os.environ["TEST_STEPS"])
    train(1, warm)
    otel_ml.flush(1.0)
    print("warm", flush=True)
    sys.stdin.readline()
    train(warm, total)
    otel_ml.flush(1.0)
    print("end", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    ok = otel_ml.shutdown()
    print(json.dumps({
        "shutdown_ok": ok,
        "shutdown_seconds": time.monotonic() - started,
        "errors": telemetry.health.errors,
        "drops": telemetry.health.drops,
    }), flush=True)
    """
)
WARMUP_STEPS = 1_500
TOTAL_STEPS = 7_500
#: Growth of resident memory allowed between the end of the warm-up and the end of the run:
#: a few MiB here; an unbounded span queue behind a hanging collector grows by 60+ MiB.
RSS_GROWTH_BOUND = 12 * 1024 * 1024


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("collector", ["refused", "hang"])
def test_collector_absent_for_a_long_run_keeps_memory_bounded(
    measure: Callable[[str, str], None],
    collector: str,
    refused_port: int,
    otlp_receiver_factory: Callable[..., OtlpReceiver],
    processes: Processes,
    tmp_path: Path,
) -> None:
    if collector == "refused":
        endpoint = f"http://127.0.0.1:{refused_port}"
    else:  # accepts the connection, never answers: every export waits for its timeout
        endpoint = otlp_receiver_factory(grpc=False, mode="hang").http_endpoint
    env = clean_env(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL=HTTP,
        OTEL_EXPORTER_OTLP_TIMEOUT="500",
        OTEL_BSP_MAX_QUEUE_SIZE="256",
        OTEL_ML_TRACE_EVERY="1",
        OTEL_ML_TAIL_FACTOR="0",
        OTEL_ML_SHUTDOWN_TIMEOUT="2",
        TEST_WARMUP=str(WARMUP_STEPS),
        TEST_STEPS=str(TOTAL_STEPS),
    )
    child = LiveChild.start(processes, SEGMENTED_TRAINER, env=env, cwd=tmp_path)
    info = json.loads(child.wait_prefix("{", START_TIMEOUT))
    child.wait_prefix("warm", 60)
    warm_rss = resident_bytes(child.pid)
    child.send()
    child.wait_prefix("end", 120)
    end_rss = resident_bytes(child.pid)
    samples = scrape(info["url"])
    dropped = sample(samples, "otel_ml_export_dropped_total", signal="spans")
    errors = sample(samples, "otel_ml_export_errors_total", exporter="otlp")
    child.send()
    assert child.wait_exit(30) == 0, child.output
    report = json.loads(child.stdout_lines[-1])

    growth = end_rss - warm_rss
    measure(
        f"collector {collector}: RSS growth over {TOTAL_STEPS - WARMUP_STEPS} traced steps after warm-up",
        f"{growth / 2**20:+.1f} MiB (bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB)",
    )
    measure(f"collector {collector}: shutdown() took", f"{report['shutdown_seconds']:.2f} s (timeout 2 s)")
    assert growth < RSS_GROWTH_BOUND, (
        f"RSS grew {growth / 2**20:.1f} MiB over {TOTAL_STEPS - WARMUP_STEPS} traced steps "
        f"({warm_rss / 2**20:.1f} -> {end_rss / 2**20:.1f} MiB)"
    )
    # Spans that could not go anywhere are counted, not kept.
    assert dropped > 0 or errors > 0, samples.get("otel_ml_export_dropped_total")
    assert report["drops"]["spans"] > 0, report
    assert report["shutdown_seconds"] < 2 + 1.0, report
    assert len(otel_lines(child.stderr_lines, "otlp export", "failing")) == 1, child.output
    assert foreign_lines(child.stderr_lines) == [], child.output


# ------------------------------------------------------------------------------ DataLoader workers

# DataLoader workers forked from a process that exports OTLP and serves /metrics. Each item
# reports, from inside the worker: its pid, its Python threads, and whether it holds the
# parent's /metrics listening socket (an fd whose /proc link is that socket's inode).
FORKING_TRAINER = textwrap.dedent(
    """
    import json, os, sys, threading
    import torch
    from torch.utils.data import DataLoader, Dataset
    import otel_ml

    torch.set_num_threads(1)
    telemetry = otel_ml.init()
    listening = os.readlink(f"/proc/self/fd/{telemetry.server._server.socket.fileno()}")
    assert listening.startswith("socket:["), listening

    class Items(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, index):
            otel_ml.log(1000 + index, loss=123.0)         # no-ops in a forked worker
            with otel_ml.span("worker/getitem"):
                pass
            links = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    links.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
            return {
                "x": torch.full((4,), float(index)),
                "pid": os.getpid(),
                "holds_socket": listening in links,
                "threads": ",".join(sorted(t.name for t in threading.enumerate())),
            }

    loader = DataLoader(
        Items(), batch_size=4, num_workers=2, multiprocessing_context="fork",
        persistent_workers=os.environ["TEST_PERSISTENT"] == "1",
    )
    print(json.dumps({"url": telemetry.metrics_url, "pid": os.getpid(), "socket": listening}), flush=True)
    step = 0
    workers, held, threads = set(), [], set()
    for epoch in range(2):
        for batch in loader:
            step += 1
            with otel_ml.span("forward"):
                loss = batch["x"].mean()
            otel_ml.log(step, loss=loss, samples=4)
            workers.update(int(p) for p in batch["pid"])
            held.extend(bool(h) for h in batch["holds_socket"])
            threads.update(name for names in batch["threads"] for name in names.split(","))
        print(json.dumps({"epoch": epoch, "step": step}), flush=True)
        sys.stdin.readline()
    ok = otel_ml.shutdown()
    print(json.dumps({
        "workers": sorted(workers), "held": any(held), "threads": sorted(threads), "shutdown_ok": ok,
    }), flush=True)
    """
)


@pytest.mark.parametrize(
    ("protocol", "persistent"),
    [pytest.param(HTTP, False, id="http-per-epoch-workers"), pytest.param(GRPC, True, id="grpc-persistent")],
)
def test_forked_dataloader_workers_export_nothing_and_hold_nothing(
    protocol: str, persistent: bool, otlp_receiver: OtlpReceiver, processes: Processes, tmp_path: Path
) -> None:
    env = clean_env(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_ML_TRACE_EVERY="1",
        TEST_PERSISTENT="1" if persistent else "0",
    )
    child = LiveChild.start(processes, FORKING_TRAINER, env=env, cwd=tmp_path)
    info = json.loads(child.wait_prefix('{"url"', START_TIMEOUT))

    # After each epoch the parent's own series show its step: workers did not stop or fake them.
    seen_steps = []
    for epoch in range(2):
        line = child.wait_line(lambda s, e=epoch: s.startswith(f'{{"epoch": {e},'), 60, f"epoch {epoch}")
        step = json.loads(line)["step"]
        samples = scrape(info["url"])
        assert sample(samples, "otel_ml_step") == step
        assert sample(samples, "otel_ml_loss") != 123.0, "a worker's log() reached the parent"
        seen_steps.append(step)
        child.send()
    assert seen_steps == [8, 16]
    assert child.wait_exit(60) == 0, child.output  # no deadlock on fork, on exit or in shutdown
    report = json.loads(child.stdout_lines[-1])

    workers = set(report["workers"])
    assert len(workers) >= 2 and info["pid"] not in workers, report
    assert report["held"] is False, "a worker kept the parent's /metrics listening socket"
    assert not [t for t in report["threads"] if t.startswith("otel-ml")], report["threads"]
    assert report["shutdown_ok"] is True

    # Only the parent exported, and its spans and metrics advanced to the last step.
    pids = {r["process.pid"] for r, _ in otlp_receiver.resource_spans()}
    pids |= {
        attributes(rm.resource.attributes)["process.pid"]
        for item in otlp_receiver.received(METRICS)
        for rm in item.message.resource_metrics
    }
    assert pids == {info["pid"]}, f"exports from {pids - {info['pid']}} (workers {sorted(workers)})"
    assert {r.signal for r in otlp_receiver.received()} == {TRACES, METRICS}
    paths = {attributes(span.attributes).get("otel_ml.path") for _, span in otlp_receiver.spans()}
    assert "worker/getitem" not in paths
    traced = sorted(
        attributes(span.attributes)["otel_ml.step"] for _, span in otlp_receiver.spans("otel_ml.step")
    )
    assert traced == list(range(1, 17))
    assert otlp_receiver.metric_points("otel_ml_step")[-1][2] == 16
    assert otlp_receiver.errors == []
    assert foreign_lines(child.stderr_lines) == [], child.output


# ------------------------------------------------------------------------------ signals

# Trains until stopped, printing each finished step. Files on, every step traced. With
# TEST_USER_HANDLER the process installs its own SIGTERM handler *before* otel_ml.init(): it
# writes a marker file and asks the loop to stop, as checkpointing code does.
SIGNALLED_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    stop = []
    if os.environ.get("TEST_USER_HANDLER"):
        def on_term(signum, frame):
            with open(os.environ["TEST_MARKER"], "w") as handle:
                handle.write(f"handled {signum} at step {step}")
            stop.append(signum)
        signal.signal(signal.SIGTERM, on_term)
    import otel_ml

    telemetry = otel_ml.init()
    print(json.dumps({"url": telemetry.metrics_url, "run_dir": str(telemetry.run_dir)}), flush=True)
    step = 0
    while not stop and step < 100_000:
        step += 1
        with otel_ml.span("forward"):
            time.sleep(0.002)
        otel_ml.log(step, loss=1.0 / step)
        print(f"step {step}", flush=True)
    print(f"stopped {step}", flush=True)
    """
)
SIGNAL_ENV = {
    "OTEL_ML_FILES": "on",
    "OTEL_ML_TRACE_EVERY": "1",
    "OTEL_ML_TAIL_FACTOR": "0",
    "OTEL_METRIC_EXPORT_INTERVAL": "200",
}
#: How long a signalled child may take to flush and exit (shutdown_timeout is 5 s by default).
EXIT_BOUND = 6.0


def last_step(lines: list[str]) -> int:
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    assert steps, "the child printed no step"
    return steps[-1]


def step_spans(rank_dir: Path) -> list[int]:
    """The otel_ml.step attribute of every root span in the rank's spans file."""
    found = []
    for document in read_jsonl(rank_dir / SPANS_FILE):
        for rs in document["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    for attribute in span.get("attributes", []):
                        if span["name"] == "otel_ml.step" and attribute["key"] == "otel_ml.step":
                            found.append(int(attribute["value"]["intValue"]))
    return found


def file_gauge(rank_dir: Path, name: str) -> list[float]:
    """Every value of gauge ``name`` in the rank's metrics file, in file order."""
    values = []
    for document in read_jsonl(rank_dir / METRICS_FILE):
        for rm in document["resourceMetrics"]:
            for sm in rm["scopeMetrics"]:
                for metric in sm["metrics"]:
                    if metric["name"] == name:
                        for point in metric["gauge"]["dataPoints"]:
                            values.append(float(point.get("asDouble", point.get("asInt", 0))))
    return values


def start_signalled(processes: Processes, tmp_path: Path, **env: str) -> tuple[LiveChild, Path]:
    child = LiveChild.start(
        processes, SIGNALLED_TRAINER, env=clean_env(tmp_path, **SIGNAL_ENV, **env), cwd=tmp_path
    )
    info = json.loads(child.wait_prefix("{", START_TIMEOUT))
    child.wait_prefix("step 30", 30)
    return child, Path(info["run_dir"]) / "rank-0"


def assert_flushed_up_to_the_last_step(child: LiveChild, rank_dir: Path) -> None:
    last = last_step(child.stdout_lines)
    traced = step_spans(rank_dir)
    assert traced and max(traced) >= last, (
        f"last printed step {last}, last traced {max(traced, default=None)}"
    )
    assert max(file_gauge(rank_dir, "otel_ml_step")) >= last


def test_sigterm_flushes_and_exits_as_killed_by_the_signal(
    measure: Callable[[str, str], None], processes: Processes, tmp_path: Path
) -> None:
    child, rank_dir = start_signalled(processes, tmp_path)
    sent = time.monotonic()
    os.kill(child.pid, signal.SIGTERM)
    code = child.wait_exit(EXIT_BOUND + 4)
    measure("SIGTERM: flushed and exited after", f"{time.monotonic() - sent:.2f} s (exit status {code})")
    assert time.monotonic() - sent < EXIT_BOUND, child.output
    assert code == -signal.SIGTERM, child.output
    assert_flushed_up_to_the_last_step(child, rank_dir)
    assert not any(line.startswith("stopped") for line in child.stdout_lines), "the loop must not go on"
    assert foreign_lines(child.stderr_lines) == [], child.output


def test_sigterm_chains_the_handler_installed_before_init(processes: Processes, tmp_path: Path) -> None:
    marker = tmp_path / "handled"
    child, rank_dir = start_signalled(processes, tmp_path, TEST_USER_HANDLER="1", TEST_MARKER=str(marker))
    sent = time.monotonic()
    os.kill(child.pid, signal.SIGTERM)
    code = child.wait_exit(EXIT_BOUND + 4)
    assert time.monotonic() - sent < EXIT_BOUND, child.output
    handled = marker.read_text().split()
    assert handled[:2] == ["handled", str(int(signal.SIGTERM))], handled
    # The user's handler decided: stop the loop and leave normally. Our flush ran first, so the
    # files hold everything up to the step the signal interrupted (which may not be logged yet).
    assert code == 0, child.output
    assert child.stdout_lines[-1].startswith("stopped "), child.output
    at_signal = int(handled[-1])
    assert max(step_spans(rank_dir)) >= at_signal - 1
    assert max(file_gauge(rank_dir, "otel_ml_step")) >= at_signal - 1
    assert foreign_lines(child.stderr_lines) == [], child.output


# A SIGTERM arriving while the training thread holds one of otel_ml's locks (log() registering a
# new key or counting a NaN; a tqdm bar being created or closed): the flush runs on that same
# thread and collects, which takes the lock again.
LOCKED_SIGTERM = textwrap.dedent(
    """
    import os, signal
    import otel_ml
    from otel_ml.progress import board as progress

    telemetry = otel_ml.init()
    otel_ml.log(1, loss=1.0)
    lock = {"log": telemetry.training._lock, "tqdm": progress.board._lock}[os.environ["TEST_LOCK"]]
    with lock:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between these bytecodes, with the lock held
            pass
    print("signal ignored", flush=True)
    """
)


@pytest.mark.parametrize("held", ["log", "tqdm"])
def test_sigterm_while_the_training_thread_holds_a_telemetry_lock(
    held: str, processes: Processes, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, **SIGNAL_ENV, TEST_LOCK=held)
    child = LiveChild.start(processes, LOCKED_SIGTERM, env=env, cwd=tmp_path)
    code = child.wait_exit(START_TIMEOUT)  # deadlocked before the fix: never exited
    assert code == -signal.SIGTERM, child.output
    assert file_gauge(tmp_path / "run" / "rank-0", "otel_ml_loss") == [1.0], "the final flush happened"


def test_sigint_raises_keyboard_interrupt_and_flushes(processes: Processes, tmp_path: Path) -> None:
    child, rank_dir = start_signalled(processes, tmp_path)
    sent = time.monotonic()
    os.kill(child.pid, signal.SIGINT)
    code = child.wait_exit(EXIT_BOUND + 4)
    assert time.monotonic() - sent < EXIT_BOUND, child.output
    # Python re-raises an uncaught KeyboardInterrupt as death by SIGINT (a shell shows 130).
    assert code in (-signal.SIGINT, 130), child.output
    assert child.stderr_lines[-1] == "KeyboardInterrupt", child.output
    assert_flushed_up_to_the_last_step(child, rank_dir)


def test_sigkill_leaves_files_that_still_parse(processes: Processes, tmp_path: Path) -> None:
    child, rank_dir = start_signalled(processes, tmp_path)
    wait_until(
        lambda: (
            (rank_dir / SPANS_FILE).exists() and step_spans(rank_dir) and file_gauge(rank_dir, "otel_ml_step")
        ),
        10,
        what="span and metric lines on disk",
    )
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait_exit(10) == -signal.SIGKILL
    for name in (METRICS_FILE, SPANS_FILE):
        raw = (rank_dir / name).read_bytes().split(b"\n")
        complete, tail = raw[:-1], raw[-1]  # a kill mid-write can only tear the last line
        for line in complete:
            json.loads(line)
        documents = list(read_jsonl(rank_dir / name))
        assert len(documents) == len(complete) >= 1, name
        if tail:
            with pytest.raises(ValueError):
                json.loads(tail)
    assert child.stderr_lines == [], child.output  # no traceback, nothing


# ------------------------------------------------------------------------------ exceptions

RAISING_TRAINER = textwrap.dedent(
    """
    import otel_ml

    otel_ml.init()

    def train():
        for step in range(1, 10):
            with otel_ml.span("step"):
                with otel_ml.span("forward"):
                    if step == 6:
                        raise ValueError(f"bad batch at step {step}")
            otel_ml.log(step, loss=1.0 / step)

    train()
    """
)


def test_an_exception_in_a_region_propagates_unchanged_and_is_traced(tmp_path: Path) -> None:
    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", RAISING_TRAINER],
            env=clean_env(tmp_path, OTEL_ML_FILES="on", OTEL_ML_TRACE_EVERY="1000", **env),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    without = run(OTEL_SDK_DISABLED="true", OTEL_ML_RUN_DIR=str(tmp_path / "off"))
    traced = run()
    assert without.returncode == traced.returncode == 1
    # Byte for byte the traceback the same code prints without telemetry.
    assert traced.stderr == without.stderr
    assert traced.stderr.startswith("Traceback (most recent call last):")
    assert traced.stderr.rstrip().endswith("ValueError: bad batch at step 6")
    assert "otel_ml" not in traced.stderr

    # The final window (the failing step, never closed by a log()) is traced with the error.
    spans = [
        span
        for document in read_jsonl(tmp_path / "run" / "rank-0" / SPANS_FILE)
        for rs in document["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
    ]
    by_name = {span["name"]: span for span in spans}
    assert set(by_name) == {"otel_ml.step", "step", "forward"}, sorted(by_name)
    root = by_name["otel_ml.step"]
    root_attrs = {a["key"]: a["value"] for a in root["attributes"]}
    assert root_attrs["otel_ml.sampled_by"] == {"stringValue": "error"}
    for name in ("step", "forward"):
        span = by_name[name]
        assert span["status"]["code"] == 2, span  # STATUS_CODE_ERROR
        attrs = {a["key"]: a["value"] for a in span["attributes"]}
        assert attrs["exception.type"] == {"stringValue": "ValueError"}
    assert by_name["forward"]["parentSpanId"] == by_name["step"]["spanId"]
    assert by_name["step"]["parentSpanId"] == root["spanId"]


# ------------------------------------------------------------------------------ disk full

# Trains, then waits for the test to scrape /metrics before shutting down.
PAUSING_TRAINER = textwrap.dedent(
    """
    import json, sys, time
    import otel_ml

    telemetry = otel_ml.init()
    for step in range(1, 81):
        with otel_ml.span("forward"):
            time.sleep(0.001)
        otel_ml.log(step, loss=1.0 / step)
        time.sleep(0.004)
    print(json.dumps({"url": telemetry.metrics_url, "steps": step}), flush=True)
    sys.stdin.readline()
    otel_ml.shutdown()
    print("done", flush=True)
    """
)


def run_with_broken_files(processes: Processes, tmp_path: Path, **env: str) -> tuple[LiveChild, dict]:
    child = LiveChild.start(
        processes,
        PAUSING_TRAINER,
        env=clean_env(tmp_path, OTEL_ML_FILES="on", OTEL_ML_TRACE_EVERY="1", **env),
        cwd=tmp_path,
    )
    info = json.loads(child.wait_prefix("{", START_TIMEOUT))
    samples = wait_until(
        lambda: (lambda s: s if sample(s, "otel_ml_export_errors_total", exporter="files") >= 1 else None)(
            scrape(info["url"])
        ),
        10,
        what="a counted file export error",
    )
    assert sample(samples, "otel_ml_step") == info["steps"], "training went on"
    child.send()
    assert child.wait_exit(30) == 0, child.output
    assert child.stdout_lines[-1] == "done"
    return child, samples


def test_disk_full_turns_file_export_off_with_one_warning(processes: Processes, tmp_path: Path) -> None:
    rank_dir = tmp_path / "run" / "rank-0"
    rank_dir.mkdir(parents=True, mode=0o700)
    (rank_dir / METRICS_FILE).symlink_to("/dev/full")  # every write: ENOSPC
    child, _ = run_with_broken_files(processes, tmp_path)
    off = otel_lines(child.stderr_lines, "file export is off")
    assert len(off) == 1 and "No space left on device" in off[0], child.output
    # That line is the whole story: no "failing ... retrying" and no false "recovered".
    assert [line for line in child.stderr_lines if line.strip()] == off, child.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory anyway")
def test_read_only_run_dir_turns_file_export_off(processes: Processes, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o500)
    try:
        child, _ = run_with_broken_files(processes, tmp_path)
    finally:
        run_dir.chmod(0o700)
    assert len(otel_lines(child.stderr_lines, "file export is off")) == 1, child.output
    assert not otel_lines(child.stderr_lines, "recovered"), child.output
