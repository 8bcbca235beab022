"""End to end: a training process exports real OTLP (gRPC and HTTP/protobuf) to a receiver.

Each test runs the product in a child Python process configured only through the environment,
as a user would, and inspects what the in-test OTLP receiver (official opentelemetry-proto
messages) got, what the child printed, and what it left in its run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.otlp_receiver import GRPC, HTTP, METRICS, TRACES, OtlpReceiver, attributes

pytestmark = pytest.mark.integration

PROTOCOLS = (GRPC, HTTP)
RUN_ID = "otlp-e2e-run"
SERVICE = "otlp-e2e-trainer"
STEPS = 20
SECRET = "secret-token"
#: Upper bound for a child process that exports to a healthy receiver.
CHILD_TIMEOUT = 30.0

# The child: init from the environment, log STEPS steps, time shutdown(), report as JSON.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import otel_ml

    telemetry = otel_ml.init()
    steps = int(os.environ["TEST_STEPS"])
    # Optionally keep "training" until this many OTLP exports have failed (a long outage).
    wait_errors = int(os.environ.get("TEST_WAIT_OTLP_ERRORS", "0"))
    deadline = time.monotonic() + 20
    step = 0
    while step < steps or telemetry.health.errors["otlp"] < wait_errors:
        assert time.monotonic() < deadline, f"only {telemetry.health.errors} export errors"
        step += 1
        time.sleep(0.002)  # a (very) small training step
        otel_ml.log(step, loss=1.0 / step, lr=3e-4, samples=8, tokens=1024, kl=0.01 * step)
    if os.environ.get("TEST_AT_EXIT"):
        ok = elapsed = None  # leave shutdown to the at-exit hook
    else:
        started = time.monotonic()
        ok = otel_ml.shutdown()
        elapsed = time.monotonic() - started
    print(json.dumps({
        "shutdown_seconds": elapsed,
        "shutdown_ok": ok,
        "shutdown_timeout": telemetry.config.shutdown_timeout,
        "run_dir": str(telemetry.run_dir),
        "rank": telemetry.rank,
        "pid": os.getpid(),
        "instance_id": telemetry.instance_id,
        "steps": step,
        "otlp_errors": telemetry.health.errors["otlp"],
        "done_unix": time.time(),  # the script ends here; the rest is interpreter exit
    }))
    sys.stdout.flush()
    """
)


def child_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The parent environment minus anything that configures otel_ml, OTel or the launcher."""
    prefixes = ("OTEL_", "TORCHELASTIC_", "SLURM_", "OMPI_", "MASTER_")
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONWARNINGS"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in launcher}
    env.update(
        {
            "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_ML_RUN_ID": RUN_ID,
            "OTEL_ML_RUN_DIR": str(tmp_path / "run"),
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_ML_TRACE_EVERY": "2",
            "OTEL_ML_TAIL_FACTOR": "0",  # no slow-step traces: a loaded machine must not add any
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",  # any free port: never clash with other tests
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "TEST_STEPS": str(STEPS),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


class Child:
    """The finished child process: exit code, output, wall time and its JSON report."""

    def __init__(self, completed: subprocess.CompletedProcess[str], wall: float, ended_unix: float) -> None:
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.wall = wall
        assert self.returncode == 0, f"child exited {self.returncode}\n{self.output}"
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, f"child printed no report\n{self.output}"
        self.report: dict[str, Any] = json.loads(lines[-1])
        #: Seconds from the end of the child's script to the end of the process (at-exit work).
        self.exit_seconds = ended_unix - self.report["done_unix"]

    @property
    def output(self) -> str:
        return f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"

    def stderr_lines(self, text: str) -> list[str]:
        return [line for line in self.stderr.splitlines() if text in line.lower()]

    def assert_quiet_stderr(self) -> None:
        """Only otel_ml's own (rate-limited) lines: no exporter, gRPC or Python tracebacks."""
        foreign = [
            line for line in self.stderr.splitlines() if line.strip() and not line.startswith("otel_ml: ")
        ]
        assert foreign == [], self.output


def run_child(tmp_path: Path, timeout: float = CHILD_TIMEOUT, **env: str) -> Child:
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=child_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Child(completed, time.monotonic() - started, time.time())


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def expected_resource(child: Child) -> dict[str, Any]:
    return {
        "service.name": SERVICE,
        "service.instance.id": child.report["instance_id"],
        "process.pid": child.report["pid"],
        "otel_ml.run_id": RUN_ID,
        "otel_ml.rank": 1,
        "otel_ml.local_rank": 1,
        "otel_ml.world_size": 2,
    }


def assert_resource(resource: dict[str, Any], child: Child) -> None:
    expected = expected_resource(child)
    assert {k: resource.get(k) for k in expected} == expected
    assert isinstance(resource.get("host.name"), str)
    assert resource["host.name"]


# ---------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_spans_and_metrics_arrive_with_resource_and_labels(
    protocol: str, otlp_receiver: OtlpReceiver, tmp_path: Path
) -> None:
    child = run_child(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
    )
    # shutdown() flushed everything before returning: nothing may be missing after the exit.
    assert child.report["shutdown_ok"] is True, child.output
    assert child.stderr == "", "a healthy run logs nothing"
    assert otlp_receiver.errors == []
    assert {a.transport for a in otlp_receiver.attempts} == {protocol}
    assert {r.signal for r in otlp_receiver.received()} == {TRACES, METRICS}

    # Spans: one per second step (OTEL_ML_TRACE_EVERY=2), each with its step attribute.
    spans = otlp_receiver.spans("otel_ml.step")
    assert sorted(attributes(span.attributes)["otel_ml.step"] for _, span in spans) == list(
        range(2, STEPS + 1, 2)
    )
    for resource, span in spans:
        assert_resource(resource, child)
        attrs = attributes(span.attributes)
        assert attrs["otel_ml.rank"] == 1
        assert attrs["otel_ml.run_id"] == RUN_ID
        assert attrs["otel_ml.value.loss"] == pytest.approx(1.0 / attrs["otel_ml.step"])
        assert 0 < span.start_time_unix_nano < span.end_time_unix_nano
    assert len({span.trace_id for _, span in spans}) == len(spans), "each step span is its own trace"

    # Metrics: the training metrics, with the resource and the rank/run_id labels on every point.
    names = otlp_receiver.metric_names()
    for name in (
        "otel_ml_loss",
        "otel_ml_learning_rate",
        "otel_ml_samples",
        "otel_ml_tokens",
        "otel_ml_kl",
        "otel_ml_step",
        "otel_ml_step_duration_seconds",
    ):
        assert name in names, f"{name} missing from {sorted(names)}"
    for resource, _ in otlp_receiver.metrics():
        assert_resource(resource, child)
    for name in names:
        assert name.startswith("otel_ml_"), name
        points = otlp_receiver.metric_points(name)
        assert points, name
        for _, point_attrs, _ in points:
            assert point_attrs.get("rank") == "1", (name, point_attrs)
            assert point_attrs.get("run_id") == RUN_ID, (name, point_attrs)

    last = otlp_receiver.metrics("otel_ml_samples")[-1][1]
    assert last.WhichOneof("data") == "sum"
    assert last.sum.is_monotonic
    assert last.sum.aggregation_temporality == 2  # cumulative
    assert _last_value(otlp_receiver, "otel_ml_samples") == 8 * STEPS
    assert _last_value(otlp_receiver, "otel_ml_tokens") == 1024 * STEPS
    assert _last_value(otlp_receiver, "otel_ml_loss") == pytest.approx(1.0 / STEPS)
    assert _last_value(otlp_receiver, "otel_ml_kl") == pytest.approx(0.01 * STEPS)
    assert _last_value(otlp_receiver, "otel_ml_step") == STEPS

    histogram = otlp_receiver.metrics("otel_ml_step_duration_seconds")[-1][1]
    assert histogram.WhichOneof("data") == "histogram"
    point = otlp_receiver.metric_points("otel_ml_step_duration_seconds")[-1][2]
    assert point.count == STEPS - 1  # one duration per step after the first
    assert point.sum > 0
    assert sum(point.bucket_counts) == point.count


def _last_value(receiver: OtlpReceiver, name: str) -> Any:
    points = receiver.metric_points(name)
    assert points, f"no data point for {name}"
    return points[-1][2]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_are_pushed_periodically_while_training_runs(
    protocol: str, otlp_receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """Metrics arrive during the run (every OTEL_METRIC_EXPORT_INTERVAL), not only at shutdown."""
    env = child_env(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
    )
    # The child logs one step, then blocks on stdin until the receiver has the metric.
    script = textwrap.dedent(
        """
        import sys
        import otel_ml
        otel_ml.init()
        otel_ml.log(1, loss=0.5)
        sys.stdin.readline()
        otel_ml.log(2, loss=0.25)
        otel_ml.shutdown()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        otlp_receiver.wait_for(
            lambda: any(v == 0.5 for _, _, v in otlp_receiver.metric_points("otel_ml_loss")),
            timeout=15,
            what="otel_ml_loss=0.5 pushed before shutdown",
        )
        # Periodic: more than one metric export while the child is still blocked.
        otlp_receiver.wait_for(lambda: len(otlp_receiver.received(METRICS)) >= 2, timeout=15)
        assert proc.poll() is None
        _, stderr = proc.communicate("\n", timeout=CHILD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert _last_value(otlp_receiver, "otel_ml_loss") == 0.25


# ---------------------------------------------------------------------------------------- headers


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_headers_reach_the_collector_and_never_the_logs_or_files(
    protocol: str, otlp_receiver: OtlpReceiver, tmp_path: Path
) -> None:
    child = run_child(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_EXPORTER_OTLP_HEADERS=f"authorization=Bearer%20{SECRET},x-tenant=team-a",
        OTEL_ML_FILES="on",  # files too, so that the secret has every chance to leak into one
    )
    headers = otlp_receiver.headers()
    assert {h.get("authorization") for h in headers} == {f"Bearer {SECRET}"}
    assert {h.get("x-tenant") for h in headers} == {"team-a"}
    assert {a.signal for a in otlp_receiver.attempts} == {TRACES, METRICS}

    assert SECRET not in child.stdout
    assert SECRET not in child.stderr
    written = files_under(Path(child.report["run_dir"]))
    assert any(p.name.endswith(".jsonl") for p in written), written
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("files", "expect_files"),
    [pytest.param("auto", False, id="auto"), pytest.param("on", True, id="on")],
)
def test_files_with_an_otlp_endpoint(
    files: str, expect_files: bool, otlp_receiver: OtlpReceiver, tmp_path: Path
) -> None:
    child = run_child(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint(GRPC),
        OTEL_EXPORTER_OTLP_PROTOCOL=GRPC,
        OTEL_ML_FILES=files,
    )
    run_dir = Path(child.report["run_dir"])
    assert run_dir == tmp_path / "run"
    jsonl = [p for p in files_under(tmp_path) if ".jsonl" in p.name]
    # OTLP export happens either way.
    assert otlp_receiver.spans("otel_ml.step")
    assert "otel_ml_loss" in otlp_receiver.metric_names()
    if not expect_files:
        assert jsonl == []
        return
    rank_dir = run_dir / "rank-1"
    assert {p.name for p in jsonl} == {"metrics.otlp.jsonl", "spans.otlp.jsonl"}
    assert all(p.parent == rank_dir for p in jsonl)
    spans = [json.loads(line) for line in (rank_dir / "spans.otlp.jsonl").read_text().splitlines()]
    names = {
        s["name"]
        for doc in spans
        for rs in doc["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
    }
    assert names == {"otel_ml.step"}
    metrics_text = (rank_dir / "metrics.otlp.jsonl").read_text()
    assert '"otel_ml_loss"' in metrics_text


# ---------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_down_for_the_whole_run(protocol: str, refused_port: int, tmp_path: Path) -> None:
    timeout = 2.0
    child = run_child(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{refused_port}",
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_ML_SHUTDOWN_TIMEOUT=str(timeout),
    )
    assert child.report["shutdown_timeout"] == timeout
    assert child.report["shutdown_seconds"] < timeout + 1.0, child.output
    assert child.wall < timeout + 10.0, child.output
    # Said once (not silently, not once per batch or retry), and nothing else is printed.
    assert len(child.stderr_lines("otlp export")) == 1, child.output
    child.assert_quiet_stderr()
    # Files stay off ("auto" with an endpoint set) even though OTLP fails: only the port file.
    assert files_under(tmp_path / "run") and not any(".jsonl" in p.name for p in files_under(tmp_path))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_long_outage_is_reported_once(protocol: str, refused_port: int, tmp_path: Path) -> None:
    """Many failed exports during the run (short OTLP timeout): still one warning line."""
    child = run_child(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{refused_port}",
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_EXPORTER_OTLP_TIMEOUT="300",
        OTEL_ML_SHUTDOWN_TIMEOUT="2",
        TEST_WAIT_OTLP_ERRORS="4",
    )
    assert child.report["otlp_errors"] >= 4
    assert child.report["shutdown_seconds"] < 3.0, child.output
    failures = child.stderr_lines("otlp export")
    assert len(failures) == 1, child.output
    assert "failing" in failures[0], child.output
    assert "otel_ml_export_errors_total" in failures[0], "the line says where failures are counted"
    child.assert_quiet_stderr()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hanging_collector_bounds_shutdown_and_exit(
    measure: Callable[[str, str], None],
    protocol: str,
    otlp_receiver_factory: Callable[..., OtlpReceiver],
    tmp_path: Path,
) -> None:
    receiver = otlp_receiver_factory(mode="hang")
    timeout = 2.0
    child = run_child(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_ML_SHUTDOWN_TIMEOUT=str(timeout),
    )
    # The collector really was reached and left the exports hanging.
    assert receiver.attempts, "the child never reached the receiver"
    assert {(a.mode, a.transport) for a in receiver.attempts} == {("hang", protocol)}
    assert receiver.received() == []
    measure(
        f"collector hangs ({protocol}): shutdown() / process exit after it",
        f"{child.report['shutdown_seconds']:.2f} s / {child.exit_seconds:.2f} s (timeout {timeout:g} s)",
    )
    assert child.report["shutdown_seconds"] < timeout + 1.0, child.output
    assert child.report["shutdown_ok"] is False, "a destination must have been abandoned at the deadline"
    # No exporter thread, at-exit hook or gRPC channel holds the process after shutdown().
    assert child.exit_seconds < 1.0, child.output
    assert child.wall < timeout + 8.0, child.output
    assert len(child.stderr_lines("otlp export")) <= 1, child.output
    child.assert_quiet_stderr()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hanging_collector_at_exit_is_bounded(
    protocol: str, otlp_receiver_factory: Callable[..., OtlpReceiver], tmp_path: Path
) -> None:
    """Without an explicit shutdown(), the at-exit flush is bounded by the shutdown timeout too."""
    receiver = otlp_receiver_factory(mode="hang")
    timeout = 1.0
    child = run_child(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint(protocol),
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_ML_SHUTDOWN_TIMEOUT=str(timeout),
        TEST_AT_EXIT="1",
    )
    assert receiver.attempts, "the child never reached the receiver"
    assert {(a.mode, a.transport) for a in receiver.attempts} == {("hang", protocol)}
    assert child.exit_seconds < timeout + 1.0, child.output
    assert len(child.stderr_lines("otlp export")) <= 1, child.output
    child.assert_quiet_stderr()
