"""init()/log()/shutdown() lifecycle: no-ops before init, one instance, bounded shutdown, fork."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

import otel_ml
from otel_ml import runtime
from otel_ml._testing import reset
from otel_ml.collection import Collection
from otel_ml.config import Config
from otel_ml.health import TelemetryHealth
from otel_ml.pipeline import Pipeline, Pump
from tests.support.metrics import parse_exposition, points, value
from tests.support.net import wait_until


@pytest.fixture
def fresh_runtime():
    """Each test gets no running instance and leaves none behind."""
    reset()
    yield
    reset()


def _opts(tmp_path, **extra):
    return {
        "prometheus_port": 0,
        "run_dir": str(tmp_path / "{run_id}"),
        "run_id": "unit",
        "set_global_providers": False,
        **extra,
    }


def test_module_functions_before_init_are_no_ops(fresh_runtime):
    otel_ml.log(1, loss=1.0)
    assert otel_ml.flush() is True
    assert otel_ml.shutdown() is True
    assert otel_ml.get_telemetry() is None


def test_init_twice_returns_the_same_handle_with_a_warning(fresh_runtime, tmp_path, caplog):
    first = otel_ml.init(**_opts(tmp_path))
    second = otel_ml.init(**_opts(tmp_path))
    assert first is second
    assert "init() called again" in caplog.text


def test_init_after_shutdown_starts_a_new_instance(fresh_runtime, tmp_path):
    first = otel_ml.init(**_opts(tmp_path))
    first.shutdown()
    second = otel_ml.init(**_opts(tmp_path))
    assert second is not first and not second.closed


def test_log_feeds_the_scrape_with_rank_and_run_id_labels(fresh_runtime, tmp_path):
    t = otel_ml.init(**_opts(tmp_path, rank=2, world_size=4))
    otel_ml.log(3, loss=0.5, reward=1.5)
    body = urllib.request.urlopen(t.metrics_url, timeout=5).read().decode()
    samples = parse_exposition(body)
    assert samples["otel_ml_loss"] == [({"rank": "2", "run_id": "unit"}, 0.5)]
    assert samples["otel_ml_reward"] == [({"rank": "2", "run_id": "unit"}, 1.5)]


def test_shutdown_is_idempotent_and_later_logs_are_ignored(fresh_runtime, tmp_path):
    reader = InMemoryMetricReader()
    t = runtime.Telemetry(
        Config.resolve(env={}, **_opts(tmp_path, prometheus=False)), metric_readers=[reader]
    )
    t.log(1, loss=1.0)
    assert t.shutdown() is True
    assert t.shutdown() is True
    t.log(2, loss=2.0)  # no error, no effect


def test_disabled_sdk_is_a_no_op_without_server_or_files(fresh_runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    t = otel_ml.init(**_opts(tmp_path))
    otel_ml.log(1, loss=1.0)
    assert t.metrics_url is None and t.pipeline is None
    assert not any(tmp_path.iterdir())


def test_endpoint_file_names_the_served_port(fresh_runtime, tmp_path):
    t = otel_ml.init(**_opts(tmp_path))
    wait_until(t.endpoint_file.exists, 5)
    info = json.loads(t.endpoint_file.read_text())
    assert info["port"] == t.port and info["url"] == t.metrics_url
    assert (info["rank"], info["run_id"]) == (0, "unit")
    assert t.endpoint_file == tmp_path / "unit" / "rank-0" / "endpoint.json"


def test_files_are_written_on_shutdown(fresh_runtime, tmp_path):
    t = otel_ml.init(**_opts(tmp_path, trace_every=1))
    for step in range(5):
        otel_ml.log(step, loss=1.0 / (step + 1))
    t.shutdown()
    rank_dir = tmp_path / "unit" / "rank-0"
    metrics = [json.loads(line) for line in (rank_dir / "metrics.otlp.jsonl").read_text().splitlines()]
    names = {
        m["name"]
        for d in metrics
        for rm in d["resourceMetrics"]
        for s in rm["scopeMetrics"]
        for m in s["metrics"]
    }
    assert {"otel_ml_loss", "otel_ml_step", "otel_ml_step_duration_seconds"} <= names
    spans = [json.loads(line) for line in (rank_dir / "spans.otlp.jsonl").read_text().splitlines()]
    steps = [s for d in spans for rs in d["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    traced = sorted(
        int(a["value"]["intValue"]) for s in steps for a in s["attributes"] if a["key"] == "otel_ml.step"
    )
    assert traced == [0, 1, 2, 3, 4]


def test_port_in_use_moves_to_the_next_free_port_with_one_warning(fresh_runtime, tmp_path, caplog):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        t = otel_ml.init(**_opts(tmp_path, prometheus_port=taken, prometheus_host="127.0.0.1"))
        assert t.port is not None and t.port > taken
        warnings = [r.getMessage() for r in caplog.records if "in use" in r.getMessage()]
        assert len(warnings) == 1 and str(taken) in warnings[0] and str(t.port) in warnings[0]
        assert urllib.request.urlopen(t.metrics_url, timeout=5).status == 200


def test_local_rank_offsets_the_base_port(fresh_runtime, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    t = otel_ml.init(**_opts(tmp_path, prometheus_port=base, prometheus_host="127.0.0.1", local_rank=3))
    assert t.port is not None and t.port >= base + 3


def test_forked_child_exports_nothing_and_releases_the_port(fresh_runtime, tmp_path):
    t = otel_ml.init(**_opts(tmp_path, prometheus_host="127.0.0.1"))
    otel_ml.log(1, loss=1.0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what it sees, then leave without running atexit handlers
        child = otel_ml.get_telemetry()
        otel_ml.log(2, loss=9.0)
        report = {
            "closed": child.closed,
            "training": child.training is not None,
            "threads": sorted(th.name for th in threading.enumerate()),
            "socket_closed": child.server is None or child.server._server is None,
            "init_again_same": otel_ml.init() is child,
        }
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    report = json.loads(os.read(read_end, 65536))
    os.close(read_end)
    assert status == 0
    assert report == {
        "closed": True,
        "training": False,
        "threads": ["MainThread"],
        "socket_closed": True,
        "init_again_same": True,
    }
    body = urllib.request.urlopen(t.metrics_url, timeout=5).read().decode()
    assert parse_exposition(body)["otel_ml_loss"][0][1] == 1.0  # the parent still serves


def test_global_providers_are_installed_for_other_instrumentation(tmp_path):
    script = textwrap.dedent(
        f"""
        import otel_ml
        from opentelemetry import metrics, trace
        t = otel_ml.init(prometheus_port=0, run_dir={str(tmp_path)!r}, files="off")
        assert metrics.get_meter_provider() is t.meter_provider
        assert trace.get_tracer_provider() is t.tracer_provider
        metrics.get_meter("user").create_counter("user_requests").add(3, {{"rank": "0"}})
        import urllib.request
        body = urllib.request.urlopen(t.metrics_url).read().decode()
        assert 'user_requests_total{{rank="0"}} 3.0' in body, body
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_shutdown_waits_for_the_final_export(fresh_runtime, tmp_path):
    reader = InMemoryMetricReader()
    t = runtime.Telemetry(
        Config.resolve(env={}, **_opts(tmp_path, prometheus=False)), metric_readers=[reader]
    )
    t.log(1, loss=4.0)
    assert value(points(reader), "otel_ml_loss") == 4.0
    started = time.monotonic()
    t.shutdown(timeout=2)
    assert time.monotonic() - started < 2.5
    assert (tmp_path / "unit" / "rank-0" / "metrics.otlp.jsonl").exists()


def test_a_failing_background_job_is_counted_each_time_and_logged_once(caplog):
    health = TelemetryHealth()
    pipeline = Pipeline(Resource.create({}), Collection(), health=health)

    def broken_job() -> None:
        raise RuntimeError("boom")

    pump = Pump(pipeline, jobs=[broken_job], interval=3600)
    pump.start()
    try:
        wait_until(lambda: health.errors.get("jobs", 0) >= 3, timeout=10, what="three failed ticks")
    finally:
        pump.shutdown(timeout=2)
    assert caplog.text.count("background job broken_job failed") == 1


def test_error_series_start_at_zero_for_the_exporters_in_use_only(tmp_path):
    t = runtime.Telemetry(Config.resolve(env={}, **_opts(tmp_path, files="off")))
    try:
        samples = parse_exposition(t.prometheus_reader.render().decode())
    finally:
        t.shutdown()
    errors = {labels["exporter"]: v for labels, v in samples["otel_ml_export_errors_total"]}
    assert errors == {"prometheus": 0.0}  # no OTLP endpoint, files off: those cannot fail
    t.health.error("otlp")  # one that fails anyway is still counted
    assert t.health.errors["otlp"] == 1


def test_pump_skips_its_drains_on_ticks_after_a_collection_drained_and_runs_them_at_flush(monkeypatch):
    monkeypatch.setattr("otel_ml.pipeline.TICK", 0.02)
    monkeypatch.setattr("otel_ml.pipeline.IDLE_TICK", 0.1)
    pipeline = Pipeline(Resource.create({}), Collection(), health=TelemetryHealth())
    ran: list[str] = []
    scraping = threading.Event()
    scraping.set()
    seen_since: list[float] = []
    status_times: list[float] = []

    def drain() -> None:
        ran.append("drain")

    def status() -> None:
        ran.append("status")
        status_times.append(time.monotonic())

    def drained(since: float) -> bool:
        seen_since.append(since)
        return scraping.is_set()

    pump = Pump(pipeline, jobs=[drain, status], drains=[drain], drained=drained, interval=3600)
    pump.start()
    try:
        wait_until(lambda: ran.count("status") >= 5, timeout=10, what="five ticks")
        assert "drain" not in ran and pump.skipped >= 5  # a collection drained since every tick
        gaps = [b - a for a, b in itertools.pairwise(status_times)]
        assert min(gaps[:4]) >= 0.09  # while collections drain, the pump ticks at IDLE_TICK
        scraping.clear()  # no more scrapes: the pump drains again, before the status job
        wait_until(lambda: "drain" in ran, timeout=10, what="a drain")
        assert ran[ran.index("drain") + 1] == "status"
        scraping.set()
        ran.clear()
        pump.flush(timeout=2)  # flush drains whatever the last collection did
        assert ran[:2] == ["drain", "status"]
    finally:
        pump.shutdown(timeout=2)
    assert ran[-2:] == ["drain", "status"]  # and so does shutdown
    assert seen_since == sorted(seen_since)  # each tick asks about the time since the previous


def test_pump_drains_when_the_drained_check_fails(monkeypatch):
    monkeypatch.setattr("otel_ml.pipeline.TICK", 0.02)
    pipeline = Pipeline(Resource.create({}), Collection(), health=TelemetryHealth())
    ran: list[str] = []

    def broken(since: float) -> bool:
        raise RuntimeError("no clock")

    pump = Pump(pipeline, jobs=[lambda: ran.append("drain")], drains=[], interval=3600, drained=broken)
    pump._undrained = ()  # every job is a drain
    pump.start()
    try:
        wait_until(lambda: len(ran) >= 3, timeout=10, what="three drains")
    finally:
        pump.shutdown(timeout=2)
    assert pump.skipped == 0


def test_scrapes_do_the_draining_and_without_them_the_pump_does(fresh_runtime, tmp_path):
    t = runtime.Telemetry(Config.resolve(env={}, **_opts(tmp_path, files="off")))
    try:
        aggregator = t.timekeeper.aggregator
        for step in range(3):
            with otel_ml.span("forward"):
                pass
            t.log(step, loss=1.0)
        # No scrape: the pump's own tick drains the regions and closes the steps.
        wait_until(lambda: aggregator.steps >= 2, timeout=10, what="the pump draining")
        skipped = t.pump.skipped
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # scraped more often than the pump ticks
            t.prometheus_reader.render()
            time.sleep(0.2)
        assert t.pump.skipped >= skipped + 2
        t.log(10, loss=7.0)
        samples = parse_exposition(t.prometheus_reader.render().decode())
        assert [v for _, v in samples["otel_ml_loss"]] == [7.0]
    finally:
        t.shutdown()
