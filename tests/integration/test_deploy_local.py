"""The no-Docker stack for real: deploy/local/run.sh starts the Debian Prometheus with the shipped
prometheus.yml (paths rewritten for loopback) and the Debian Alertmanager with the shipped config;
a real otel_ml process is found through file_sd JSON written by ``otel-ml targets``, scraped, and
queried. Also ``promtool check config`` on the shipped prometheus.yml and ``promtool check rules``
on the rules inside the Kubernetes PrometheusRule.

The shipped scrape interval (15 s) is kept, so finding the rank takes up to about 20 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Processes
from tests.support.net import free_port, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RUN_SH = DEPLOY / "local" / "run.sh"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yaml"))
RUN_ID = "deploy-local-test"

TRAINER = textwrap.dedent(
    """
    import sys, time
    import otel_ml
    otel_ml.init(service_name="deploy-local-test", prometheus_port=0)
    for step in range(20):
        otel_ml.log(step, loss=1.0 / (step + 1), lr=1e-3, samples=8)
        time.sleep(0.01)
    print("ready", flush=True)
    sys.stdin.readline()  # stay up until the test has queried Prometheus
    otel_ml.shutdown()
    """
)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()


def _api(base: str, path: str, **params: str) -> Any:
    payload = _get(f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}")
    assert payload["status"] == "success", payload
    return payload["data"]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left for its (already exited) parent's reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@pytest.fixture
def local_stack(tmp_path, prometheus_binary, alertmanager_binary):
    """deploy/local/run.sh on free ports with temporary targets and data dirs; always stopped."""
    prom_port, am_port = free_port(), free_port()
    while am_port == prom_port:
        am_port = free_port()
    targets, data = tmp_path / "targets", tmp_path / "data"
    env = {
        **os.environ,
        "PROMETHEUS_PORT": str(prom_port),
        "ALERTMANAGER_PORT": str(am_port),
        "TARGETS_DIR": str(targets),
        "DATA_DIR": str(data),
        "PROMETHEUS_BIN": prometheus_binary,
        "ALERTMANAGER_BIN": alertmanager_binary,
    }
    processes = Processes()
    log = open(tmp_path / "run.sh.log", "w")  # noqa: SIM115 - closed below
    try:
        proc = processes.start(["bash", str(RUN_SH)], env=env, stdout=log, stderr=subprocess.STDOUT)
        stack = {
            "proc": proc,
            "prometheus": f"http://127.0.0.1:{prom_port}",
            "alertmanager": f"http://127.0.0.1:{am_port}",
            "alertmanager_port": am_port,
            "targets": targets,
            "data": data,
            "log": tmp_path / "run.sh.log",
        }

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"run.sh exited {proc.returncode}: {stack['log'].read_text()}")
            return _ready(stack["prometheus"]) and _ready(stack["alertmanager"])

        wait_until(up, 60, 0.2, "run.sh: both /-/ready")
        yield stack
    finally:
        processes.stop_all()
        log.close()


def test_run_sh_is_executable_bash():
    assert os.access(RUN_SH, os.X_OK)
    assert RUN_SH.read_text().startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(RUN_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_local_stack_end_to_end(local_stack, processes, tmp_path):
    prom, am = local_stack["prometheus"], local_stack["alertmanager"]
    data: Path = local_stack["data"]

    # The generated config is the shipped one with only the addresses and paths rewritten.
    generated = yaml.safe_load((data / "prometheus.yml").read_text())
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert generated["global"] == shipped["global"]
    assert [j["job_name"] for j in generated["scrape_configs"]] == ["otel_ml", "otel_ml_collector"]
    assert all(j["honor_labels"] for j in generated["scrape_configs"])
    assert generated["scrape_configs"][0]["file_sd_configs"][0]["files"] == [
        f"{local_stack['targets']}/*.json"
    ]

    # Prometheus loaded exactly the shipped rule groups, healthy, and knows the Alertmanager.
    shipped_groups = [g["name"] for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    loaded = _api(prom, "rules")["groups"]
    assert sorted(g["name"] for g in loaded) == sorted(shipped_groups)
    shipped_rules = sum(len(g["rules"]) for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"])
    assert sum(len(g["rules"]) for g in loaded) == shipped_rules
    assert {Path(g["file"]).resolve() for g in loaded} == {p.resolve() for p in RULE_FILES}
    alertmanagers = wait_until(
        lambda: _api(prom, "alertmanagers")["activeAlertmanagers"], 30, 0.5, "active alertmanagers"
    )
    assert [a["url"] for a in alertmanagers] == [
        f"http://127.0.0.1:{local_stack['alertmanager_port']}/api/v2/alerts"
    ]
    status = _get(f"{am}/api/v2/status")
    assert "otel-ml-webhook" in status["config"]["original"]

    # A real rank, found through `otel-ml targets RUN_DIR` -> file_sd JSON in the targets dir.
    run_root = tmp_path / "runs"
    trainer = processes.python(
        TRAINER,
        env={"OTEL_ML_RUN_ID": RUN_ID, "OTEL_ML_RUN_DIR": str(run_root / "{run_id}"), "RANK": "0"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert trainer.stdout.readline().strip() == "ready"
    run_dir = run_root / RUN_ID
    wait_until(lambda: list(run_dir.glob("rank-*/endpoint.json")), 30, 0.1, "endpoint.json")
    result = subprocess.run(
        [sys.executable, "-m", "otel_ml.cli", "targets", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)
    assert [g["labels"] for g in groups] == [{"run_id": RUN_ID, "rank": "0"}]
    staging = local_stack["targets"] / f"{RUN_ID}.tmp"
    staging.write_text(result.stdout)
    staging.replace(local_stack["targets"] / f"{RUN_ID}.json")

    def loss() -> list[dict[str, Any]]:
        return _api(prom, "query", query=f'otel_ml_loss{{run_id="{RUN_ID}"}}')["result"]

    (series,) = wait_until(loss, 60, 0.5, "otel_ml_loss in Prometheus")
    assert series["metric"]["rank"] == "0"
    assert series["metric"]["run_id"] == RUN_ID
    assert series["metric"]["job"] == "otel_ml"
    assert float(series["value"][1]) == pytest.approx(1.0 / 20)
    (up,) = _api(prom, "query", query=f'up{{job="otel_ml", run_id="{RUN_ID}", rank="0"}}')["result"]
    assert up["value"][1] == "1"  # the target labels the up-based alerts need

    trainer.stdin.write("\n")
    trainer.stdin.close()
    assert trainer.wait(15) == 0

    # Stop the script as Ctrl-C would; both servers must go.
    pids = [int((data / f"{name}.pid").read_text()) for name in ("prometheus", "alertmanager")]
    proc = local_stack["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130, local_stack["log"].read_text()
    for pid in pids:
        wait_until(lambda pid=pid: _gone(pid), 10, 0.1, f"server pid {pid} gone")
    assert not _ready(prom) and not _ready(am)
    assert "stopped Prometheus and Alertmanager" in local_stack["log"].read_text()


def _run_sh_env(tmp_path: Path, prometheus: str, alertmanager: str, **overrides: str) -> dict[str, str]:
    return {
        **os.environ,
        "PROMETHEUS_PORT": str(free_port()),
        "ALERTMANAGER_PORT": str(free_port()),
        "TARGETS_DIR": str(tmp_path / "targets"),
        "DATA_DIR": str(tmp_path / "data"),
        "PROMETHEUS_BIN": prometheus,
        "ALERTMANAGER_BIN": alertmanager,
        **overrides,
    }


def _run_to_end(env: dict[str, str]) -> subprocess.CompletedProcess:
    processes = Processes()
    try:
        proc = processes.start(
            ["bash", str(RUN_SH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        output = proc.communicate(timeout=60)[0]
    finally:
        processes.stop_all()
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def test_run_sh_refuses_a_taken_port(tmp_path, prometheus_binary, alertmanager_binary):
    """Something (e.g. Debian's own prometheus service) already listens: fail before starting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = _run_sh_env(tmp_path, prometheus_binary, alertmanager_binary, PROMETHEUS_PORT=port)
        result = _run_to_end(env)
    assert result.returncode == 1, result.stdout
    assert f"port {port} on 127.0.0.1 is already in use" in result.stdout
    assert not (tmp_path / "data" / "prometheus.pid").exists()


def test_run_sh_stops_the_other_server_when_one_exits(tmp_path, alertmanager_binary):
    """A server that dies at start: run.sh shows its log, stops the other one and exits 1."""
    fake = tmp_path / "fake-prometheus"
    fake.write_text("#!/bin/sh\necho 'fake prometheus: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    env = _run_sh_env(tmp_path, str(fake), alertmanager_binary)
    result = _run_to_end(env)
    assert result.returncode == 1, result.stdout
    assert "Prometheus exited" in result.stdout and "fake prometheus: cannot start" in result.stdout
    assert "stopped Prometheus and Alertmanager" in result.stdout
    assert not _ready(f"http://127.0.0.1:{env['ALERTMANAGER_PORT']}")


def test_promtool_check_config_on_shipped_prometheus_yml(promtool_binary):
    result = subprocess.run(
        [promtool_binary, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in output
    for path in RULE_FILES:  # rule_files are relative to the config: the shipped rules are checked
        assert f"Checking {path}" in output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    # only the Docker path of the targets dir does not exist on this machine
    assert all("/etc/prometheus/targets/*.json" in line for line in warnings), warnings


def test_promtool_check_rules_on_prometheusrule(promtool_binary, tmp_path):
    docs = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    rules = tmp_path / "prometheusrule-spec.yaml"
    rules.write_text(yaml.safe_dump({"groups": docs["spec"]["groups"]}))
    result = subprocess.run(
        [promtool_binary, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
