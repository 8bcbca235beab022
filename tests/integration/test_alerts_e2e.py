"""Alerts end to end: real 2-rank training runs, the Debian Prometheus with the shipped rules, the
Debian Alertmanager with the shipped config, and a webhook receiver.

Only time is compressed for the test: every duration in the shipped rule files (``for:``, range
selectors, offsets) is divided by 20 (at least 3 s), so a 10-minute straggler condition holds
for 30 s; scrape and evaluation run every second. The expressions are the shipped ones.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from otel_ml.cli.main import endpoint_files, file_sd_targets
from tests.support.alertmanager import AlertmanagerServer, WebhookReceiver, config_for_test
from tests.support.demo import demo_command, demo_env
from tests.support.net import wait_until
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yaml"))
_DURATION = re.compile(r"(?<![\w.])(\d+)(ms|s|m|h|d)\b")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def compress(text: str, factor: float = 20.0, floor: int = 3) -> str:
    """Divide the durations of ``for:`` lines, range selectors and offsets by ``factor``."""

    def shrink(match: re.Match) -> str:
        seconds = int(match.group(1)) * _SECONDS[match.group(2)]
        return f"{max(floor, round(seconds / factor))}s"

    def in_durations(segment: str) -> str:
        return _DURATION.sub(shrink, segment)

    lines = []
    for line in text.splitlines():
        if re.match(r"\s*for:", line):
            line = in_durations(line)
        else:
            line = re.sub(r"\[[^\]]+\]", lambda m: in_durations(m.group(0)), line)
            line = re.sub(r"offset\s+\S+", lambda m: in_durations(m.group(0)), line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def compress_rules(text: str) -> str:
    """:func:`compress`, and the liveness thresholds, which are numbers rather than durations:
    600 s without a step -> 15 s, a heartbeat 60 s old -> 10 s."""
    text = compress(text).replace("> 600\n", "> 15\n")
    return text.replace(") > 60\n", ") > 10\n").replace(") < 60\n", ") < 10\n")


def test_compress_shrinks_only_durations():
    text = "    for: 10m\n    expr: rate(x[5m] offset 30m) > 600 and y[1m:10s]\n"
    assert compress(text) == "    for: 30s\n    expr: rate(x[15s] offset 90s) > 600 and y[3s:3s]\n"


@pytest.fixture
def stack(tmp_path, prometheus_binary, alertmanager_binary):
    """Webhook <- Alertmanager (shipped config) <- Prometheus (shipped rules, compressed time)."""
    rules = []
    for path in RULES:
        target = tmp_path / "rules" / path.name
        target.parent.mkdir(exist_ok=True)
        target.write_text(compress_rules(path.read_text()))
        rules.append(target)
    with WebhookReceiver() as hook:
        config = config_for_test(DEPLOY / "alertmanager" / "alertmanager.yml", hook.url)
        with (
            AlertmanagerServer(alertmanager_binary, tmp_path / "am", config) as am,
            PrometheusServer(
                prometheus_binary, tmp_path / "prom", rule_files=rules, alertmanager_url=am.url
            ) as prom,
        ):
            yield prom, hook


def _demo(processes, run_dir: Path, *args: str) -> subprocess.Popen:
    command = demo_command("--ranks", "2", "--files", "0", *args)
    env = demo_env(run_dir, OTEL_ML_PROGRESS_VIEW="off")
    return processes.start(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _scrape_run(prom: PrometheusServer, run_dir: Path) -> list[dict]:
    records = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(endpoint_files(run_dir)), 60)
    prom.set_targets(file_sd_targets(records))
    return records


def _named(alert: dict, name: str, run_id: str, rank: str) -> bool:
    labels = alert["labels"]
    return (labels.get("alertname"), labels.get("run_id"), labels.get("rank")) == (name, run_id, rank)


def test_nan_on_rank_one_reaches_the_webhook_naming_rank_one(stack, processes, tmp_path):
    prom, hook = stack
    run = tmp_path / "nan-run"
    _demo(processes, run, "--steps", "3000", "--nan", "1:150")
    _scrape_run(prom, run)
    (alert,) = hook.wait_for(lambda a: _named(a, "TrainingLossNaN", run.name, "1"), timeout=90)
    assert alert["status"] == "firing"
    assert alert["labels"]["severity"] == "critical"
    description = alert["annotations"]["description"]
    assert "rank 1" in description.lower() and run.name in description
    assert alert["annotations"]["runbook_url"].endswith("#traininglossnan")
    assert not [
        a
        for a in hook.alerts()
        if a["labels"].get("alertname") == "TrainingLossNaN" and a["labels"]["rank"] == "0"
    ]


def test_a_slow_rank_is_a_straggler_and_a_frozen_rank_is_down(stack, processes, tmp_path):
    prom, hook = stack
    run = tmp_path / "slow-run"
    _demo(processes, run, "--steps", "100000", "--slow", "0:30")
    records = _scrape_run(prom, run)
    (straggler,) = hook.wait_for(lambda a: _named(a, "TrainingStraggler", run.name, "0"), timeout=150)
    assert straggler["labels"]["severity"] == "warning"
    others = [a for a in hook.alerts() if a["labels"].get("alertname") == "TrainingStraggler"]
    assert [a["labels"]["rank"] for a in others] == ["0"]

    # A hung rank (a stuck collective, a frozen node): its target stops answering while rank 0,
    # blocked in the all-reduce, still serves /metrics. (With gloo, a *killed* peer makes the
    # others fail at once, which ends the whole run: see the next test for a kill.)
    rank1 = next(r for r in records if r["rank"] == 1)
    os.kill(rank1["pid"], signal.SIGSTOP)
    (down,) = hook.wait_for(lambda a: _named(a, "TrainingRankDown", run.name, "1"), timeout=90)
    assert down["labels"]["severity"] == "critical" and down["status"] == "firing"
    down_ranks = [
        a["labels"]["rank"] for a in hook.alerts() if a["labels"].get("alertname") == "TrainingRankDown"
    ]
    assert down_ranks == ["1"]


def test_a_killed_rank_is_down_while_its_peer_lives(stack, processes, tmp_path):
    prom, hook = stack
    run = tmp_path / "kill-run"
    _demo(processes, run, "--steps", "200", "--linger", "120")
    records = _scrape_run(prom, run)
    # both ranks finished training (no collective in flight) and stay up, like an evaluation phase
    prom.wait_for(
        f'otel_ml_progress_active{{run_id="{run.name}",task="train"}} == 0', lambda r: len(r) == 2, 90
    )
    rank1 = next(r for r in records if r["rank"] == 1)
    os.kill(rank1["pid"], signal.SIGKILL)
    (down,) = hook.wait_for(lambda a: _named(a, "TrainingRankDown", run.name, "1"), timeout=90)
    assert down["status"] == "firing"
    assert "rank 1" in down["annotations"]["description"].lower()


def test_static_targets_without_rank_labels_get_stalled_and_rank_down(tmp_path, prometheus_binary, processes):
    """A plain static target list (``up`` has only job/instance): a SIGSTOPped rank is down and
    its peer, blocked in the all-reduce while its /metrics still answers, is stalled."""
    rules = []
    for path in RULES:
        target = tmp_path / "rules" / path.name
        target.parent.mkdir(exist_ok=True)
        target.write_text(compress_rules(path.read_text()))
        rules.append(target)
    run = tmp_path / "static-run"
    _demo(processes, run, "--steps", "100000")
    records = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(endpoint_files(run)), 60)
    targets = [group["targets"][0] for group in file_sd_targets(records)]
    with PrometheusServer(
        prometheus_binary, tmp_path / "prom", static_targets=targets, rule_files=rules
    ) as prom:
        prom.wait_for(
            f'count(otel_ml_heartbeat_timestamp_seconds{{run_id="{run.name}"}})',
            lambda r: r and r[0]["value"][1] == "2",
            60,
        )
        assert prom.query('up{rank!=""}') == [] and len(prom.query("up")) == 2
        rank1 = next(r for r in records if r["rank"] == 1)
        os.kill(rank1["pid"], signal.SIGSTOP)

        def firing(name: str) -> str:
            return f'ALERTS{{alertname="{name}", alertstate="firing", run_id="{run.name}"}}'

        (stalled,) = prom.wait_for(firing("TrainingStalled"), lambda r: len(r) == 1, 120)
        assert stalled["metric"]["rank"] == "0"
        (down,) = prom.wait_for(firing("TrainingRankDown"), lambda r: len(r) == 1, 120)
        assert down["metric"]["rank"] == "1"
