"""The alerting kit in deploy/: Prometheus rules, their promtool unit tests, the Alertmanager
config and the runbook, checked with the real promtool/amtool/Alertmanager binaries and
structurally (every alert documented, linked, labelled and tested both ways)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_ml.cli.main import endpoint_files, file_sd_targets
from tests.integration.conftest import Processes
from tests.support.child import LiveChild, clean_env
from tests.support.net import free_port, wait_until
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERT_RULES = DEPLOY / "prometheus" / "rules" / "otel-ml-alerts.yaml"
RECORDING_RULES = DEPLOY / "prometheus" / "rules" / "otel-ml-recording.yaml"
RULE_FILES = [RECORDING_RULES, ALERT_RULES]
ALERT_TESTS = DEPLOY / "prometheus" / "tests" / "otel-ml-alerts-test.yaml"
TEST_FILES = sorted((DEPLOY / "prometheus" / "tests").glob("*.yaml"))
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
RUNBOOK_BASE = "https://github.com/otel-ml/otel-ml/blob/main/deploy/RUNBOOK.md#"
WEBHOOK_PLACEHOLDER = "http://127.0.0.1:9099/otel-ml"

REQUIRED_ALERTS = {
    "TrainingLossNaN",
    "TrainingKLSpike",
    "TrainingLossSpike",
    "TrainingLossPlateau",
    "TrainingDistributionDrift",
    "TrainingRewardSpreadCollapse",
    "TrainingStalled",
    "TrainingRankDown",
    "TrainingStraggler",
    "TrainingThroughputDrop",
    "GPUMemoryNearLimit",
    "TelemetryExportFailing",
}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules(ALERT_RULES) if "alert" in rule]


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lowercase, punctuation dropped, spaces to '-'."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


# --- the binaries --------------------------------------------------------------------------------


def test_promtool_check_rules(promtool_binary: str) -> None:
    result = _run([promtool_binary, "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests(promtool_binary: str) -> None:
    assert ALERT_TESTS in TEST_FILES and len(TEST_FILES) >= 2
    result = _run([promtool_binary, "test", "rules", *map(str, TEST_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


def test_amtool_check_config(amtool_binary: str) -> None:
    result = _run([amtool_binary, "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("severity", ["critical", "warning"])
def test_amtool_routes_every_severity_to_the_webhook(amtool_binary: str, severity: str) -> None:
    result = _run(
        [
            amtool_binary,
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_CONFIG}",
            f"severity={severity}",
            "alertname=TrainingLossNaN",
            "run_id=r1",
            "rank=0",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "otel-ml-webhook"


# --- structure of the rules ----------------------------------------------------------------------


def test_required_alerts_exist_once() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names)), names
    assert set(names) >= REQUIRED_ALERTS


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_alert_is_labelled_and_documented(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{rule['alert']} has no {key}"
    assert "{{ $labels.run_id }}" in annotations["description"]
    assert "{{ $labels.rank }}" in annotations["description"]
    assert annotations["runbook_url"] == RUNBOOK_BASE + rule["alert"].lower()
    # any job name works: nothing may select or group on it
    assert not re.search(r"\bjob\b", rule["expr"]), rule["expr"]


def test_every_runbook_anchor_is_a_heading() -> None:
    headings = re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    anchors = {_github_anchor(h) for h in headings}
    for rule in _alerts():
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in {RUNBOOK.name}"


def test_recording_rules_used_by_alerts_exist() -> None:
    recorded = {rule["record"] for rule in _rules(RECORDING_RULES)}
    assert all(name.startswith("otel_ml:") for name in recorded)
    used = {name for rule in _alerts() for name in re.findall(r"otel_ml:[a-z0-9_:]+", rule["expr"])}
    assert used, "the alerts should go through the recording rules"
    assert used <= recorded, used - recorded


def test_every_alert_has_firing_and_quiet_test_cases() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text()).get("tests", []):
            for check in case.get("alert_rule_test", []) or []:
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), f"alerts never tested firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never tested quiet: {sorted(names - quiet)}"


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda path: path.name)
def test_every_alert_test_case_is_named(path: Path) -> None:
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s+alertname: ", line):
            comment = lines[number - 2].strip()
            assert comment.startswith("# CASE "), f"line {number - 1}: unnamed case before {line.strip()}"
            assert line.split(":", 1)[1].strip() in comment


# --- a real Alertmanager with the config ---------------------------------------------------------


class _Webhook:
    """A local HTTP endpoint that records the JSON bodies Alertmanager posts."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/otel-ml"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def alertnames(self) -> list[str]:
        return [body["groupLabels"]["alertname"] for body in self.bodies]


@pytest.fixture
def webhook() -> Iterator[_Webhook]:
    hook = _Webhook()
    hook.thread.start()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def _api(url: str, body: Any | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def test_alertmanager_groups_by_run_and_inhibits(
    alertmanager_binary: str, processes: Processes, webhook: _Webhook, tmp_path: Path
) -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    urls = [hook for receiver in config["receivers"] for hook in receiver.get("webhook_configs", [])]
    assert [hook["url"] for hook in urls] == [WEBHOOK_PLACEHOLDER]
    for hook in urls:
        hook["url"] = webhook.url
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "alertmanager.log").open("wb") as log:
        processes.start(
            [
                alertmanager_binary,
                f"--config.file={config_file}",
                f"--storage.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # no gossip port: a single, isolated instance
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_until(lambda: _api(f"{base}/api/v2/status"), timeout=30, what="alertmanager API")

    def alert(name: str, severity: str, rank: str, run_id: str = "e2e") -> dict[str, Any]:
        labels = {"alertname": name, "severity": severity, "run_id": run_id, "rank": rank}
        return {"labels": labels, "annotations": {"summary": f"{name} on rank {rank}"}}

    _api(
        f"{base}/api/v2/alerts",
        [
            alert("TrainingLossNaN", "critical", "3"),
            alert("TrainingLossNaN", "critical", "5"),
            alert("TrainingLossSpike", "warning", "3"),  # inhibited: NaN on the same run and rank
            alert("TrainingRankDown", "critical", "1"),
            alert("TrainingStalled", "critical", "0"),  # inhibited: a rank of the same run is down
            alert("TrainingStalled", "critical", "0", run_id="other"),  # another run: not inhibited
        ],
    )

    inhibited = [("TrainingLossSpike", "e2e", "3"), ("TrainingStalled", "e2e", "0")]

    def statuses() -> dict[tuple[str, str, str], dict[str, Any]] | None:
        got = {
            (a["labels"]["alertname"], a["labels"]["run_id"], a["labels"]["rank"]): a["status"]
            for a in _api(f"{base}/api/v2/alerts")
        }
        # Alertmanager marks inhibition when its pipeline next evaluates the alerts, not on receipt:
        # an alert can be listed before its inhibitedBy is filled in.
        settled = len(got) == 6 and all(got[key]["inhibitedBy"] for key in inhibited)
        return got if settled else None

    state = wait_until(statuses, timeout=15, what="six alerts in alertmanager, two of them inhibited")
    assert state[("TrainingLossSpike", "e2e", "3")]["inhibitedBy"]
    assert state[("TrainingStalled", "e2e", "0")]["inhibitedBy"]
    for key in [
        ("TrainingLossNaN", "e2e", "3"),
        ("TrainingRankDown", "e2e", "1"),
        ("TrainingStalled", "other", "0"),
    ]:
        assert state[key]["state"] == "active" and not state[key]["inhibitedBy"], (key, state[key])

    # critical groups go out after the short group_wait; grouped by alertname and run_id
    wait_until(lambda: len(webhook.bodies) >= 3, timeout=40, interval=0.2, what="three notifications")
    by_group = {(b["groupLabels"]["alertname"], b["groupLabels"]["run_id"]): b for b in webhook.bodies}
    assert set(by_group) == {
        ("TrainingLossNaN", "e2e"),
        ("TrainingRankDown", "e2e"),
        ("TrainingStalled", "other"),
    }, webhook.alertnames()
    nan = by_group[("TrainingLossNaN", "e2e")]
    assert sorted(a["labels"]["rank"] for a in nan["alerts"]) == ["3", "5"]
    assert nan["groupLabels"] == {"alertname": "TrainingLossNaN", "run_id": "e2e"}
    assert by_group[("TrainingRankDown", "e2e")]["alerts"][0]["labels"]["rank"] == "1"


# --- a real job whose reward spread collapses, the shipped rules in a real Prometheus --------------

#: Logs a spread-out reward distribution per step, waits, then one where every rollout gets the
#: same reward (the spread goes to zero: mode collapse), waits, ends. The drift check is on for
#: reward through OTEL_ML_DRIFT_KEYS.
COLLAPSING_REWARD_JOB = """
import json, random, sys
import otel_ml
telemetry = otel_ml.init()
print(json.dumps({"run_id": telemetry.run_id}), flush=True)
rng = random.Random(0)
step = 0
for phase, spread in enumerate((0.3, 0.0)):
    for _ in range(60):
        otel_ml.log(step, reward=[0.5 + spread * rng.gauss(0, 1) for _ in range(32)])
        step += 1
    print(f"phase {phase} done", flush=True)
    sys.stdin.readline()
otel_ml.shutdown()
"""


def _drift_alerts(prom: PrometheusServer, run_id: str) -> list[dict[str, Any]]:
    return prom.query(f'ALERTS{{alertname="TrainingDistributionDrift", run_id="{run_id}"}}')


def test_distribution_drift_alert_fires_for_a_real_collapsing_reward(
    processes: Processes, prometheus_binary: str, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, OTEL_ML_DRIFT_KEYS="reward", OTEL_ML_RUN_ID="drift-e2e")
    child = LiveChild.start(processes, COLLAPSING_REWARD_JOB, env=env, cwd=tmp_path)
    run_id = json.loads(child.wait_prefix("{", 60))["run_id"]
    child.wait_prefix("phase 0 done", 60)
    # The endpoint file is written by a background thread: the 60 steps can finish before it exists.
    records = wait_until(lambda: [r for r in endpoint_files(tmp_path / "run") if r.get("url")], 30)
    targets = file_sd_targets(records)
    reward = f'metric="reward", run_id="{run_id}"'
    drift = f'type="distribution_drift", run_id="{run_id}"'
    with PrometheusServer(
        prometheus_binary, tmp_path / "prom", file_sd=targets, rule_files=RULE_FILES
    ) as prom:
        # Healthy spread: scraped, detector on and quiet, the rule evaluated a few times, no alert.
        prom.wait_for(f"otel_ml_distribution_last_stddev{{{reward}}} > 0.1", bool, timeout=30)
        prom.wait_for(f"count_over_time(otel_ml_anomaly_active{{{drift}}}[1m]) >= 3", bool, timeout=30)
        assert prom.query(f"otel_ml_anomaly_active{{{drift}}} == 1") == []
        assert _drift_alerts(prom, run_id) == []

        child.send()  # every rollout now gets the same reward
        child.wait_prefix("phase 1 done", 60)
        firing = prom.wait_for(
            f'ALERTS{{alertname="TrainingDistributionDrift", alertstate="firing", run_id="{run_id}"}}',
            bool,
            timeout=30,
        )
        assert [(a["metric"]["rank"], a["metric"]["severity"]) for a in firing] == [("0", "warning")]
        labels = {"__name__", "alertname", "alertstate", "run_id", "rank", "severity"}
        assert set(firing[0]["metric"]) == labels
        (spread,) = prom.query(f"otel_ml_distribution_last_stddev{{{reward}}}")
        assert float(spread["value"][1]) == 0.0
    child.send()
    assert child.wait_exit(30) == 0, child.output
