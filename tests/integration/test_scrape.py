"""A real process calls init() + log(); /metrics is scraped over HTTP and checked series by series."""

from __future__ import annotations

import json
import subprocess
import textwrap
import urllib.request

import pytest

from otel_ml import semconv
from tests.integration.conftest import Processes
from tests.support.metrics import parse_exposition
from tests.support.net import wait_until

pytestmark = pytest.mark.integration

TRAINER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import otel_ml
    t = otel_ml.init(service_name="scrape-test")
    bar = otel_ml.tqdm(total=60, desc="train", unit="step", file=sys.stderr, mininterval=0)
    for step in range(30):
        bar.update(1)
        with otel_ml.span("forward"):
            with otel_ml.span("encoder"):
                time.sleep(0.003)
        with otel_ml.span("前向传播总耗时"):
            pass
        otel_ml.log(step, loss=torch.tensor(2.0 / (step + 1)), lr=1e-3, grad_norm=0.5,
                    samples=8, tokens=512, kl=0.01, scores=[0.1, 0.5, 0.9], **{"reward/mean": 0.25})
        time.sleep(0.002)
    otel_ml.log(30, loss=float("nan"))
    print(json.dumps({"url": t.metrics_url, "port": t.port}), flush=True)
    sys.stdin.readline()  # stay up until the test is done scraping
    bar.close()
    otel_ml.shutdown()
    """
)

#: Series every CPU run must expose (GPU memory, CUDA host time and the integrations' series are absent).
EXPECTED = [
    s
    for s in semconv.METRICS
    if not s.name.startswith("otel_ml_gpu_")
    and s is not semconv.SPAN_HOST
    and s not in semconv.INTEGRATION_METRICS
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("scrape")


@pytest.fixture(scope="module")
def trainer(run_dir):
    processes = Processes()
    proc = processes.python(
        TRAINER,
        env={
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
            "OTEL_ML_RUN_ID": "scrape-run",
            "OTEL_ML_RUN_DIR": str(run_dir / "{run_id}"),
            "RANK": "3",
            "WORLD_SIZE": "4",
        },
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        yield proc, info
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(15) == 0
    finally:
        processes.stop_all()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def test_every_documented_series_is_exposed_with_rank_and_run_id(trainer):
    _, info = trainer
    samples = parse_exposition(_scrape(info["url"]))
    for spec in EXPECTED:
        name = spec.prometheus_name + ("_count" if spec.kind == "histogram" else "")
        assert name in samples, f"{name} missing from /metrics"
        for labels, _ in samples[name]:
            assert labels["rank"] == "3" and labels["run_id"] == "scrape-run", (name, labels)
            for label in spec.labels:
                assert label in labels, (name, label)
    assert "otel_ml_gpu_memory_allocated_bytes" not in samples  # no CUDA here
    assert "otel_ml_span_host_seconds_total" not in samples


def test_values_match_what_was_logged(trainer):
    _, info = trainer
    samples = parse_exposition(_scrape(info["url"]))

    def one(name, **labels):
        found = [v for lab, v in samples[name] if all(lab.get(k) == v2 for k, v2 in labels.items())]
        assert len(found) == 1, (name, labels, samples.get(name))
        return found[0]

    assert one("otel_ml_step") == 30
    assert one("otel_ml_loss") == pytest.approx(2.0 / 30)  # NaN at step 30 keeps the last finite value
    assert one("otel_ml_nonfinite_total", metric="loss") == 1
    assert one("otel_ml_nonfinite_total", metric="kl") == 0
    assert one("otel_ml_samples_total") == 240
    assert one("otel_ml_tokens_total") == 30 * 512
    assert one("otel_ml_kl") == 0.01
    assert one("otel_ml_reward_mean") == 0.25
    assert one("otel_ml_step_duration_seconds_count") == 30
    assert one("otel_ml_samples_per_second") > 0
    assert one("otel_ml_span_duration_seconds_count", path="forward/encoder") == 30
    assert one("otel_ml_span_duration_seconds_count", path="前向传播总耗时") == 30
    assert one("otel_ml_span_duration_seconds_bucket", path="forward/encoder", le="0.0025") == 0  # slept 3 ms
    assert one("otel_ml_span_duration_seconds_sum", path="forward/encoder") >= 30 * 0.003
    assert one("otel_ml_span_self_seconds_total", path="forward") < one(
        "otel_ml_span_self_seconds_total", path="forward/encoder"
    )
    assert one("otel_ml_traced_steps_total", reason="every") == 1  # step 0 (trace_every 100)
    progress = {"task": "train", "unit": "step", "parent": ""}
    assert one("otel_ml_progress_completed", **progress) == 30
    assert one("otel_ml_progress_total", **progress) == 60
    assert one("otel_ml_progress_active", task="train") == 1
    assert one("otel_ml_progress_rate_per_second", **progress) > 0
    assert 0 < one("otel_ml_progress_eta_seconds", **progress) < 60
    assert 'run_id="scrape-run"' in _scrape(info["url"])


def test_exposition_passes_promtool_lint(trainer, promtool_binary):
    _, info = trainer
    text = _scrape(info["url"])
    lint = subprocess.run([promtool_binary, "check", "metrics"], input=text, capture_output=True, text=True)
    otel_ml_problems = [
        line for line in (lint.stdout + lint.stderr).splitlines() if line.startswith("otel_ml")
    ]
    # The progress issue names this gauge as a contract; promtool's lint wants "_total" for
    # counters only. It is the one accepted exception (documented in README).
    assert otel_ml_problems == ['otel_ml_progress_total non-counter metrics should not have "_total" suffix']


def test_gzip_is_served_and_every_client_gets_the_text_format(trainer):
    _, info = trainer
    request = urllib.request.Request(
        info["url"],
        headers={"Accept-Encoding": "gzip", "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        # Prometheus accepts text 0.0.4 whatever it prefers; otel_ml writes no exemplars, so
        # OpenMetrics would add nothing.
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        import gzip

        body = gzip.decompress(response.read()).decode()
    assert "otel_ml_loss{" in body and parse_exposition(body)


def test_endpoint_file_points_at_the_served_url(trainer, run_dir):
    _, info = trainer
    path = run_dir / "scrape-run" / "rank-3" / "endpoint.json"
    recorded = wait_until(lambda: path.exists() and json.loads(path.read_text()), 10, what=str(path))
    assert recorded["url"] == info["url"] and recorded["rank"] == 3 and recorded["world_size"] == 4
