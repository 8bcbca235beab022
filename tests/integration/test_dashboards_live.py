"""Every Grafana panel query against a real run: a 2-rank demo (training, then inference over
nested file bars) scraped every second by the real Prometheus with the shipped rule files.

Grafana is not needed: each panel's PromQL, with the dashboard variables substituted as Grafana
would (the rank multi-select as a regex), goes through Prometheus' HTTP API as a range query over
the run, which is what a time series panel asks; instant panels (tables, "now" stats) are
evaluated at every step of that range too, so "has data" means "showed data at some moment of
the run". The variable queries themselves (label_values) are checked to offer the run's values.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from otel_ml.cli.main import endpoint_files, file_sd_targets
from tests.support.dashboards import (
    PanelQuery,
    iter_panels,
    load_dashboards,
    non_prometheus_targets,
    panel_queries,
    parse_label_values,
    substitute,
    variable_query,
    variables_of,
)
from tests.support.demo import demo_command, demo_env
from tests.support.net import wait_until
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yaml"))
#: About 10 s of training (a reward distribution every step), then about 6 s of inference (120
#: files per rank, scored with otel_ml.scores), then lingering.
DEMO_ARGS = ["--ranks", "2", "--steps", "1000", "--files", "240", "--linger", "30"]
#: Seconds from the start of the demo until every panel must have shown data. The wait ends as soon
#: as they all have; the margin is for a loaded machine (4x slower steps, 30 s to import torch).
DEADLINE = 150.0

#: Panels that cannot show data in this run, and why. Their queries must still be valid PromQL.
NO_DATA_EXPECTED: dict[tuple[str, str], str] = {
    ("otel-ml-training", "GPU memory per rank and device"): (
        "CPU-only machine: otel_ml_gpu_memory_* are absent without CUDA"
    ),
    ("otel-ml-training", "GPUs of this run"): "CPU-only machine: otel_ml_gpu_info is absent without CUDA",
    ("otel-ml-training", "GPU memory reserved / capacity"): (
        "CPU-only machine: otel_ml:gpu_memory_reserved:ratio has no input without CUDA"
    ),
    ("otel-ml-training", "Reward"): (
        "the demo logs reward= as a distribution (one value per sequence; the Distribution row must have "
        "data), not as a scalar, so otel_ml_reward does not exist ('KL divergence' covers scalar keys)"
    ),
    ("otel-ml-training", "Active anomalies"): (
        "healthy run: no anomaly episode is expected (a rare loss spike may show one; not required)"
    ),
    ("otel-ml-training", "Firing alerts"): (
        "healthy run: no alert should fire (a rare loss spike could fire TrainingLossSpike; not required)"
    ),
}
#: Panels whose queries are not PromQL, and why they are not evaluated here.
NOT_PROMQL: dict[tuple[str, str], str] = {
    ("otel-ml-step", "Slow steps in Tempo"): (
        "TraceQL on the Tempo data source; there is no Tempo here (the demo writes its spans to the run dir)"
    ),
}
#: The value each selectable variable is set to, and the values its query must offer.
VARIABLE_CHOICES = {"path": "forward", "task": "inference", "distribution": "reward", "score": "score"}


def _start_demo(processes, run_dir: Path, log: Path) -> subprocess.Popen:
    env = demo_env(run_dir, OTEL_ML_TIMING_TABLE="0")
    command = demo_command(*DEMO_ARGS)
    with open(log, "wb") as stderr:  # a file, not a pipe: tqdm output must never block the demo
        return processes.start(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(series.get("values") for series in result)


def _range(prom: PrometheusServer, expr: str, start: float) -> list[dict[str, Any]]:
    end = time.time()
    return prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]


def _label_values(prom: PrometheusServer, query: str, variables: dict[str, str], start: float) -> list[str]:
    selector, label = parse_label_values(query)
    params = {"start": f"{start:.3f}", "end": f"{time.time():.3f}"}
    if selector:
        params["match[]"] = substitute(selector, variables)
    return prom.api(f"label/{label}/values", **params)


def _check_heatmap_shares(query: PanelQuery, result: list[dict[str, Any]]) -> None:
    """A distribution heatmap's series are cumulative shares per bucket bound: between 0 and 1,
    growing with the bound, and 1 for +Inf at every moment (every element is in some bucket)."""
    by_time: dict[float, dict[float, float]] = {}
    for series in result:
        bound = float(series["metric"]["le"])
        for at, value in series["values"]:
            by_time.setdefault(float(at), {})[bound] = float(value)
    assert by_time, str(query)
    for at, shares in by_time.items():
        ordered = [shares[b] for b in sorted(shares)]
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in ordered), (str(query), at, shares)
        # rate() extrapolates each bucket on its own at a series' start: allow a rounding's worth
        assert all(b >= a - 1e-6 for a, b in itertools.pairwise(ordered)), (str(query), at, shares)
        assert abs(shares[float("inf")] - 1.0) < 1e-9, (str(query), at, shares)


def _check_band_order(band: dict[str, list[dict[str, Any]]]) -> None:
    """min <= mean <= max for each rank at each moment all three were scraped."""
    points = {
        legend: {(s["metric"].get("rank"), at): float(v) for s in result for at, v in s["values"]}
        for legend, result in band.items()
    }
    common = set(points["min"]) & set(points["mean"]) & set(points["max"])
    assert common, sorted(points)
    for key in common:
        assert points["min"][key] <= points["mean"][key] <= points["max"][key], (key, points)


def test_panel_lists_name_real_panels() -> None:
    """The exemptions below name panels that exist, so they cannot silently go stale."""
    dashboards = load_dashboards()
    panels = {(d["uid"], p["title"]): p for _, d in dashboards for p in iter_panels(d)}
    for key in [*NO_DATA_EXPECTED, *NOT_PROMQL]:
        assert key in panels, key
    assert {(d["uid"], p["title"]) for d, p, _ in non_prometheus_targets(dashboards)} == set(NOT_PROMQL)


def test_every_panel_query_has_data_from_a_real_two_rank_run(processes, tmp_path, prometheus_binary) -> None:
    dashboards = load_dashboards()
    run_dir = tmp_path / "dash-live"
    run_id = run_dir.name
    started = time.time()
    log = tmp_path / "demo.log"
    demo = _start_demo(processes, run_dir, log)
    records = wait_until(
        lambda: (lambda r: r if len(r) == 2 else None)(endpoint_files(run_dir)), 60, what="two endpoint files"
    )
    with PrometheusServer(
        prometheus_binary, tmp_path / "prom", file_sd=file_sd_targets(records), rule_files=RULE_FILES
    ) as prom:
        window_start = time.time() - 5
        # Grafana sends a multi-value selection of both ranks as a regex alternation.
        variables = {"run_id": run_id, "rank": "(0|1)", **VARIABLE_CHOICES}
        queries = list(panel_queries(variables, dashboards))
        required = [q for q in queries if q.key not in NO_DATA_EXPECTED]
        assert {q.key for q in queries} >= set(NO_DATA_EXPECTED)

        # The variable queries must offer this run, both ranks and the values chosen above.
        wanted = {"run_id": {run_id}, "rank": {"0", "1"}, **{k: {v} for k, v in VARIABLE_CHOICES.items()}}
        variable_checks = [
            (dashboard["uid"], name, variable_query(variable))
            for _, dashboard in dashboards
            for name, variable in variables_of(dashboard).items()
            if variable["type"] == "query"
        ]
        assert {name for _, name, _ in variable_checks} == set(wanted)

        pending: list[PanelQuery] = list(required)
        pending_variables = list(variable_checks)
        offered: dict[tuple[str, str], list[str]] = {}
        while True:
            still: list[PanelQuery] = []
            for query in pending:
                if not _has_data(_range(prom, query.expr, window_start)):
                    still.append(query)
            pending = still
            left = []
            for uid, name, query in pending_variables:
                offered[(uid, name)] = _label_values(prom, query, variables, window_start)
                if not wanted[name] <= set(offered[(uid, name)]):
                    left.append((uid, name, query))
            pending_variables = left
            if (not pending and not pending_variables) or time.time() - started > DEADLINE:
                break
            if demo.poll() is not None and demo.returncode != 0:
                pytest.fail(f"demo failed ({demo.returncode}): {log.read_text(errors='replace')[-3000:]}")
            time.sleep(2)

        assert not pending_variables, "\n".join(
            f"{uid} ${name} = {query}: offers {offered[(uid, name)]}, wanted {sorted(wanted[name])}"
            for uid, name, query in pending_variables
        )
        missing = "\n".join(str(q) for q in pending)
        assert not pending, f"panels without data after {time.time() - started:.0f}s:\n{missing}"
        # Exempt panels: no data is allowed, an invalid query is not (the API raises on errors).
        for query in queries:
            if query.key in NO_DATA_EXPECTED:
                _range(prom, query.expr, window_start)

        # A few values that must make sense whatever the timing, over the whole run so far.
        final = {id(q): _range(prom, q.expr, window_start) for q in required}
        for query in required:
            values = [float(v) for series in final[id(query)] for _, v in series["values"]]
            if query.panel["title"] in (
                "Progress per rank",
                "Run progress (all ranks)",
                "Share of files done per rank",
            ):
                assert all(0.0 <= v <= 1.0 for v in values), (str(query), values[:20])
            if "ratio_to_median" in query.expr:
                assert all(0.0 < v < 10.0 for v in values), (str(query), values[:20])
        distributions = [q for q in required if "otel_ml_distribution" in q.expr]
        assert {q.key[0] for q in distributions} == {"otel-ml-training", "otel-ml-inference"}
        for query in distributions:
            if query.target["format"] == "heatmap":
                _check_heatmap_shares(query, final[id(query)])
        for query in distributions:
            if query.key == ("otel-ml-training", "$distribution min / mean / max, rank $rank"):
                # the demo's reward is a share of tokens predicted right, one per sequence
                values = [float(v) for series in final[id(query)] for _, v in series["values"]]
                assert values and all(0.0 <= v <= 1.0 for v in values), (str(query), values[:20])
        band = ("otel-ml-training", "$distribution min / mean / max, rank $rank")
        _check_band_order({q.target["legendFormat"]: final[id(q)] for q in distributions if q.key == band})
        tasks = {
            series["metric"].get("task")
            for query in required
            if query.panel["title"] == "Progress per rank"
            for series in final[id(query)]
        }
        assert {"train", "inference"} <= tasks, tasks
    demo.terminate()
    demo.wait(30)
