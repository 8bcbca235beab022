"""``otel-ml backfill`` end to end: a 2-rank demo (NaN loss on rank 1) scraped live by the real
Prometheus while it writes its run dir, then the run dir backfilled with the real promtool and
served by a second Prometheus from the blocks alone. The two must tell the same story: the
loss values are the files', the final step-time quantiles and sample totals equal the live
scrape's, rate() agrees, every training-dashboard panel has data over the run, and the NaN shows
in otel_ml_nonfinite_total and in ALERTS (the shipped rules evaluated on the blocks).

Recording rules are backfilled with ``promtool tsdb create-blocks-from rules`` (as the README's
"After the run" section says), one pass per level of rules built on rules.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from otel_ml.cli.main import main
from otel_ml.offline.openmetrics import milliseconds
from otel_ml.offline.runfiles import read_run
from tests.support.dashboards import load_dashboards, panel_queries
from tests.support.demo import demo_command, demo_env
from tests.support.net import free_port_block
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules"
RULE_FILES = sorted(RULES.glob("*.yaml"))
DEMO_ARGS = ["--ranks", "2", "--steps", "600", "--files", "0", "--nan", "1:400", "--linger", "4"]
#: Training-dashboard panels that cannot have data in a CPU demo without reward=.
NO_DATA_EXPECTED = {
    "GPU memory per rank and device": "CPU-only machine: no otel_ml_gpu_memory_*",
    "GPUs of this run": "CPU-only machine: no otel_ml_gpu_info",
    "GPU memory reserved / capacity": "CPU-only machine: no input for otel_ml:gpu_memory_reserved:ratio",
    "Reward": "the demo logs no reward=",
}
#: Passes of the rule backfiller: ratio_to_median is a rule on a rule on a rule.
RULE_PASSES = 4


def _range(prom: PrometheusServer, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    return prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]


def _last(prom: PrometheusServer, expr: str, start: float, end: float) -> float:
    (series,) = _range(prom, expr, start, end)
    return float(series["values"][-1][1])


def _file_loss(run_dir: Path, rank: int) -> dict[int, float]:
    """rank's otel_ml_loss points in its files: millisecond -> value."""
    points: dict[int, float] = {}
    for files in read_run(run_dir, "metrics").ranks:
        for document in files.documents:
            for resource in document["resourceMetrics"]:
                for scope in resource["scopeMetrics"]:
                    for metric in scope["metrics"]:
                        if metric["name"] != "otel_ml_loss":
                            continue
                        for point in metric["gauge"]["dataPoints"]:
                            labels = {a["key"]: a["value"]["stringValue"] for a in point["attributes"]}
                            if labels["rank"] == str(rank):
                                points[milliseconds(int(point["timeUnixNano"]))] = float(point["asDouble"])
    return points


def _backfill_rules(promtool: str, prom: PrometheusServer, start: float, end: float, out: Path) -> None:
    subprocess.run(
        [
            promtool, "tsdb", "create-blocks-from", "rules", f"--start={int(start)}", f"--end={int(end) + 1}",
            f"--url={prom.url}", f"--output-dir={out}", "--eval-interval=1s",
            str(RULES / "otel-ml-recording.yaml"),
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def test_a_backfilled_run_answers_like_the_live_scrape(
    processes, tmp_path: Path, prometheus_binary: str, promtool_binary: str
) -> None:
    run_dir = tmp_path / "backfill-demo"
    run_id = run_dir.name
    base_port = free_port_block(2)
    targets = [
        {"targets": [f"127.0.0.1:{base_port + rank}"], "labels": {"run_id": run_id, "rank": str(rank)}}
        for rank in (0, 1)
    ]
    # Scraping from the demo's first second: the live series cover the whole training. Ready is
    # not scraping yet (the targets file is read, then each target at its offset): the demo starts
    # once both targets have been tried (up == 0: nothing listens yet).
    live = PrometheusServer(prometheus_binary, tmp_path / "live", file_sd=targets).start()
    live.wait_for("up", lambda rows: len(rows) == 2, timeout=60)
    env = demo_env(run_dir, base_port, OTEL_ML_TIMING_TABLE="0", OTEL_METRIC_EXPORT_INTERVAL="1000")
    log = tmp_path / "demo.log"
    with open(log, "wb") as stderr:
        demo = processes.start(demo_command(*DEMO_ARGS), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        assert demo.wait(120) == 0, log.read_text(errors="replace")[-3000:]
        time.sleep(1.5)  # the live server's last scrape of the final state landed

        blocks = tmp_path / "served" / "data"
        assert main(["backfill", str(run_dir), "--out", str(blocks)]) == 0
        loss = _file_loss(run_dir, 0)
        start, end = min(loss) / 1000 - 1, time.time()

        served = PrometheusServer(prometheus_binary, tmp_path / "served", rule_files=RULE_FILES).start()
        try:
            for number in range(RULE_PASSES):
                _backfill_rules(promtool_binary, served, start, end, tmp_path / f"rules-{number}")
                served.stop()
                for block in (tmp_path / f"rules-{number}").iterdir():
                    shutil.move(str(block), blocks / block.name)
                served.start()

            # The loss, sample by sample, at the files' times.
            (series,) = served.api("query", query='otel_ml_loss{rank="0"}[10m]', time=f"{end:.3f}")["result"]
            stored = {round(float(t) * 1000): float(v) for t, v in series["values"]}
            assert stored == loss
            assert series["metric"] == {"__name__": "otel_ml_loss", "rank": "0", "run_id": run_id}

            # What a live scrape of the same run gives.
            for expr in (
                'histogram_quantile(0.5, otel_ml_step_duration_seconds_bucket{rank="0"})',
                'histogram_quantile(0.9, otel_ml_step_duration_seconds_bucket{rank="1"})',
                'otel_ml_samples_total{rank="1"}',
                'otel_ml_nonfinite_total{rank="1",metric="loss"}',
            ):
                assert _last(served, expr, start, end) == pytest.approx(_last(live, expr, start, end)), expr
            assert (
                _last(served, 'otel_ml_nonfinite_total{rank="1",metric="loss"}', start, end) == 200
            )  # steps 400-599
            assert _last(served, 'otel_ml_nonfinite_total{rank="0",metric="loss"}', start, end) == 0
            # rate() in the middle of the training: the two sample at different moments (scrapes
            # vs exports, both about 1 s apart), so they agree on the rate, not on each value.
            (raw,) = served.api("query", query='otel_ml_samples_total{rank="0"}[10m]', time=f"{end:.3f}")[
                "result"
            ]
            counts = [(float(t), float(v)) for t, v in raw["values"]]
            began = next(t for t, v in counts if v > 0)
            done = next(t for t, v in counts if v == counts[-1][1])
            middle = f"{(began + done) / 2:.3f}"
            rates = []
            for name, prom in (("served", served), ("live", live)):
                query = 'rate(otel_ml_samples_total{rank="0"}[3s])'
                result = prom.api("query", query=query, time=middle)["result"]
                if not result:  # say when this server's scrapes or exports began
                    seen = prom.api("query", query='otel_ml_samples_total{rank="0"}[1m]', time=f"{end:.3f}")
                    training = f"training {began:.3f}-{done:.3f}"
                    raise AssertionError(f"{name}: no {query} at {middle} ({training}): {seen}")
                rates.append(float(result[0]["value"][1]))
            assert rates[0] == pytest.approx(rates[1], rel=0.25), rates

            # target_info: one series per rank, labelled as /metrics labels it.
            info = served.query(
                f'count by (otel_ml_rank) (last_over_time(target_info{{otel_ml_run_id="{run_id}"}}[1h]))'
            )
            assert sorted(s["metric"]["otel_ml_rank"] for s in info) == ["0", "1"]

            # The shipped alert rules, evaluated by Prometheus on the blocks.
            firing = served.wait_for(
                'ALERTS{alertname="TrainingLossNaN",alertstate="firing"}', lambda r: len(r) > 0, timeout=30
            )
            assert [s["metric"]["rank"] for s in firing] == ["1"]
            # A few evaluations in, so that the panel's 1 s range query steps over one of them.
            served.wait_for(
                'count_over_time(ALERTS{alertname="TrainingLossNaN"}[10s])',
                lambda r: bool(r) and float(r[0]["value"][1]) >= 3,
                timeout=30,
            )

            # Every training-dashboard panel has data over the run (the alerts one up to now).
            dashboards = [d for d in load_dashboards() if d[1]["uid"] == "otel-ml-training"]
            variables = {"run_id": run_id, "rank": "(0|1)"}
            empty = [
                str(query)
                for query in panel_queries(variables, dashboards)
                if query.panel["title"] not in NO_DATA_EXPECTED
                and not any(s.get("values") for s in _range(served, query.expr, start, time.time()))
            ]
            assert not empty, "panels without data on the backfilled run:\n" + "\n".join(empty)
        finally:
            served.stop()
    finally:
        live.stop()
