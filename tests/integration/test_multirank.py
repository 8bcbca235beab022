"""The real multi-rank demo (torch.distributed, gloo): one /metrics endpoint per rank, port fallback,
per-rank files, and a real Prometheus scraping both ranks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from otel_ml.cli.main import endpoint_files, file_sd_targets
from otel_ml.exporters.files import read_jsonl
from tests.support.demo import demo_command, demo_env
from tests.support.metrics import parse_exposition
from tests.support.net import free_port_block, wait_until
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration


def _start_demo(processes, run_dir: Path, base_port: int, *args: str) -> subprocess.Popen:
    return processes.start(
        demo_command("--ranks", "2", *args),
        env=demo_env(run_dir, base_port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _endpoints(run_dir: Path, count: int) -> list[dict]:
    return wait_until(
        lambda: (lambda r: r if len(r) == count else None)(endpoint_files(run_dir)), 60, what="ports"
    )


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return parse_exposition(response.read().decode())


def test_two_ranks_serve_their_own_series_and_a_taken_port_moves_to_the_next(processes, tmp_path):
    base = free_port_block(4)
    run_dir = tmp_path / "mr-ports"
    with socket.socket() as squatter:  # another process already holds rank 1's port
        squatter.bind(("127.0.0.1", base + 1))
        squatter.listen()
        demo = _start_demo(processes, run_dir, base, "--steps", "300", "--linger", "6")
        records = _endpoints(run_dir, 2)
        ports = {r["rank"]: r["port"] for r in records}
        assert ports[0] == base
        assert ports[1] == base + 2
        for rank in (0, 1):
            url = f"http://127.0.0.1:{ports[rank]}/metrics"
            samples = wait_until(lambda u=url: (lambda s: s if "otel_ml_loss" in s else None)(_scrape(u)), 30)
            for name in (
                "otel_ml_loss",
                "otel_ml_learning_rate",
                "otel_ml_grad_norm",
                "otel_ml_kl",
                "otel_ml_step",
            ):
                ((labels, _),) = samples[name]
                assert labels == {"rank": str(rank), "run_id": "mr-ports"}
        out, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err[-3000:]
    moved = [line for line in err.splitlines() if "is in use" in line]
    assert len(moved) == 1 and str(base + 1) in moved[0] and str(base + 2) in moved[0]
    assert "otel_ml demo finished: 2 rank(s)" in out
    for rank in (0, 1):
        documents = list(read_jsonl(run_dir / f"rank-{rank}" / "metrics.otlp.jsonl"))
        assert documents, f"rank {rank} wrote no metrics"
        points = [
            p
            for d in documents
            for rm in d["resourceMetrics"]
            for sm in rm["scopeMetrics"]
            for m in sm["metrics"]
            if m["name"] == "otel_ml_loss"
            for p in m["gauge"]["dataPoints"]
        ]
        assert {a["value"]["stringValue"] for p in points for a in p["attributes"] if a["key"] == "rank"} == {
            str(rank)
        }


def test_real_prometheus_scrapes_both_ranks_through_file_sd(processes, tmp_path, prometheus_binary):
    base = free_port_block(2)
    run_dir = tmp_path / "mr-prom"
    demo = _start_demo(processes, run_dir, base, "--steps", "300", "--linger", "20")
    records = _endpoints(run_dir, 2)
    targets = subprocess.run(
        [sys.executable, "-m", "otel_ml.cli", "targets", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(targets.stdout) == file_sd_targets(records)
    with PrometheusServer(prometheus_binary, tmp_path / "prom", file_sd=json.loads(targets.stdout)) as prom:
        result = prom.wait_for('otel_ml_loss{run_id="mr-prom"}', lambda r: len(r) == 2, timeout=30)
        assert sorted(r["metric"]["rank"] for r in result) == ["0", "1"]
        for series in result:
            assert 0 < float(series["value"][1]) < 10
        up = prom.query('up{run_id="mr-prom"}')
        assert sorted((r["metric"]["rank"], r["value"][1]) for r in up) == [("0", "1"), ("1", "1")]
        steps = prom.query('max by (rank) (otel_ml_step{run_id="mr-prom"})')
        assert len(steps) == 2
    demo.terminate()
    demo.wait(30)
