"""The Grafana dashboards and provisioning files in grafana/: structure, units, descriptions,
variables, data source references, and the queries' use of the variables (no Grafana needed).
``tests/integration/test_dashboards_live.py`` runs every query against a real Prometheus."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboards import (
    BUILTIN_VARIABLES,
    GRAFANA,
    iter_panels,
    load_dashboards,
    panel_queries,
    parse_label_values,
    referenced_variables,
    substitute,
    variable_query,
    variables_of,
)

EXPECTED_UIDS = {
    "training-overview.json": "otel-ml-training",
    "where-does-the-step-go.json": "otel-ml-step",
    "inference.json": "otel-ml-inference",
}
#: Current panel types only: no legacy graph/singlestat/table-old.
ALLOWED_PANEL_TYPES = {"timeseries", "stat", "bargauge", "gauge", "table", "heatmap", "text", "row"}
LEGACY_PANEL_TYPES = {"graph", "singlestat", "table-old", "grafana-piechart-panel"}
#: Data source variables a reference may use, by plugin type (never a literal uid).
DATASOURCE_VARIABLES = {"prometheus": "${datasource}", "tempo": "${tempo}"}

DASHBOARDS = load_dashboards()
IDS = [path.name for path, _ in DASHBOARDS]


def _by_uid(uid: str) -> dict[str, Any]:
    return next(d for _, d in DASHBOARDS if d["uid"] == uid)


def _datasource_refs(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every value of a ``datasource`` key anywhere in the JSON, with a path for messages."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{where}.datasource", value
            yield from _datasource_refs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _datasource_refs(value, f"{where}[{index}]")


def test_the_three_dashboards_exist_with_stable_unique_uids() -> None:
    assert {path.name: d["uid"] for path, d in DASHBOARDS} == EXPECTED_UIDS
    uids = [d["uid"] for _, d in DASHBOARDS]
    assert len(set(uids)) == len(uids)
    titles = [d["title"] for _, d in DASHBOARDS]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize(("path", "dashboard"), DASHBOARDS, ids=IDS)
def test_current_schema_and_tags(path: Path, dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36
    assert "otel-ml" in dashboard["tags"]
    assert dashboard.get("id") is None, "an exported numeric id breaks import into another Grafana"
    assert dashboard["title"] and dashboard["description"]


@pytest.mark.parametrize(("path", "dashboard"), DASHBOARDS, ids=IDS)
def test_panel_ids_are_unique_including_panels_nested_in_rows(path: Path, dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in iter_panels(dashboard, rows=True)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), sorted(ids)


@pytest.mark.parametrize(("path", "dashboard"), DASHBOARDS, ids=IDS)
def test_every_panel_has_a_current_type_a_unit_and_a_description(
    path: Path, dashboard: dict[str, Any]
) -> None:
    panels = list(iter_panels(dashboard))
    assert len(panels) >= 8
    for panel in iter_panels(dashboard, rows=True):
        assert panel["type"] not in LEGACY_PANEL_TYPES, panel["title"]
        assert panel["type"] in ALLOWED_PANEL_TYPES, (panel["title"], panel["type"])
    for panel in panels:
        title = panel["title"]
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert isinstance(unit, str) and unit.strip(), f"{title}: fieldConfig.defaults.unit missing"
        assert isinstance(panel.get("description"), str) and panel["description"].strip(), (
            f"{title}: no description"
        )
        assert panel.get("targets"), f"{title}: no query"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title


@pytest.mark.parametrize(("path", "dashboard"), DASHBOARDS, ids=IDS)
def test_panels_do_not_overlap(path: Path, dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard, rows=True):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize(("path", "dashboard"), DASHBOARDS, ids=IDS)
def test_datasource_run_id_and_rank_variables(path: Path, dashboard: dict[str, Any]) -> None:
    variables = variables_of(dashboard)
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    run_id = variables["run_id"]
    assert run_id["type"] == "query"
    assert variable_query(run_id).replace(" ", "") == "label_values(otel_ml_step,run_id)"
    rank = variables["rank"]
    assert rank["type"] == "query"
    assert variable_query(rank).replace(" ", "") == 'label_values(otel_ml_step{run_id="$run_id"},rank)'
    assert rank["multi"] is True and rank["includeAll"] is True
    assert rank.get("allValue") == ".*"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, variable["name"]
            parse_label_values(variable_query(variable))  # every query variable is label_values(...)
            assert variable.get("refresh") in (1, 2), variable["name"]


@pytest.mark.parametrize(("path", "dashboard"), DASHBOARDS, ids=IDS)
def test_every_datasource_reference_is_a_variable_never_a_literal_uid(
    path: Path, dashboard: dict[str, Any]
) -> None:
    refs = list(_datasource_refs(dashboard))
    assert refs
    variables = variables_of(dashboard)
    for where, ref in refs:
        assert isinstance(ref, dict), f"{where}: legacy string data source reference {ref!r}"
        assert ref.get("type") in DATASOURCE_VARIABLES, f"{where}: {ref}"
        expected = DATASOURCE_VARIABLES[ref["type"]]
        assert ref.get("uid") == expected, f"{where}: {ref} (use {expected})"
        name = expected.strip("${}")
        assert variables[name]["type"] == "datasource" and variables[name]["query"] == ref["type"]


@pytest.mark.parametrize(("path", "dashboard"), DASHBOARDS, ids=IDS)
def test_queries_use_only_defined_variables_and_filter_by_run(path: Path, dashboard: dict[str, Any]) -> None:
    defined = set(variables_of(dashboard)) | set(BUILTIN_VARIABLES)
    queries = list(panel_queries(dashboards=[(path, dashboard)]))
    assert queries
    for query in queries:
        raw = query.target["expr"]
        assert referenced_variables(raw) <= defined, (
            f"{query}: undefined {referenced_variables(raw) - defined}"
        )
        assert "$run_id" in raw or "${run_id}" in raw, f"{query}: not restricted to the selected run"
        # a multi-value variable expands to a regex alternation: it needs =~, never =
        assert not re.search(r'rank\s*=\s*"\$\{?rank', raw), f'{query}: use rank=~"$rank"'
        assert "$" not in query.expr, query.expr
        assert query.target.get("refId"), query
    for variable in variables_of(dashboard).values():
        if variable["type"] == "query":
            assert referenced_variables(variable_query(variable)) <= defined - {variable["name"]}


def test_substitution_of_variables() -> None:
    expr = 'rate(x{run_id="$run_id", rank=~"${rank}", p="${path:regex}"}[$__rate_interval]) + y[$__interval]'
    assert substitute(expr, {"run_id": "r1", "rank": "0|1"}) == (
        'rate(x{run_id="r1", rank=~"0|1", p="forward"}[30s]) + y[15s]'
    )
    with pytest.raises(KeyError):
        substitute('x{a="$nope"}')


def test_training_overview_content() -> None:
    board = _by_uid("otel-ml-training")
    exprs = "\n".join(q.target["expr"] for q in panel_queries(dashboards=[(Path(), board)]))
    for needle in (
        "otel_ml_progress_completed",
        "otel_ml_progress_total",
        'parent=""',
        "otel_ml_progress_eta_seconds",
        "otel_ml_loss",
        "otel_ml_kl",
        "otel_ml_learning_rate",
        "otel_ml_grad_norm",
        "otel_ml_samples_per_second",
        "otel_ml_tokens_per_second",
        "otel_ml:samples_per_second:sum",
        "rate(otel_ml_step_duration_seconds_sum",
        "rate(otel_ml_step_duration_seconds_count",
        "otel_ml:work_seconds_per_step:ratio_to_median",
        "otel_ml_gpu_memory_allocated_bytes",
        "otel_ml_gpu_memory_reserved_bytes",
        "otel_ml_gpu_memory_peak_bytes",
        "otel_ml_anomaly_active",
        'ALERTS{alertstate="firing", run_id="$run_id"}',
    ):
        assert needle in exprs, needle
    panels = {p["title"]: p for p in iter_panels(board)}
    assert panels["Progress per rank"]["type"] == "bargauge"
    assert panels["Progress per rank"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    straggler = [p for p in panels.values() if "ratio_to_median" in str(p["targets"])]
    assert straggler
    for panel in straggler:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert {"color": "red", "value": 1.3} in steps, panel["title"]
    for title in (
        "KL divergence",
        "Reward",
        "GPU memory per rank and device",
        "Active anomalies",
        "Firing alerts",
    ):
        assert panels[title]["fieldConfig"]["defaults"].get("noValue"), f"{title}: say why it can be empty"


def _fills_max_down_to_min(panel: dict[str, Any]) -> bool:
    """The min..max band: the series named max is filled down to the one named min."""
    for override in panel["fieldConfig"]["overrides"]:
        if override["matcher"] == {"id": "byName", "options": "max"}:
            return {"id": "custom.fillBelowTo", "value": "min"} in override["properties"]
    return False


def _distribution_heatmap_is_a_share_per_bucket(panel: dict[str, Any], selector: str) -> None:
    (target,) = panel["targets"]
    assert target["format"] == "heatmap" and panel["options"]["calculate"] is False
    expr = target["expr"]
    # buckets over the elements logged in the same interval: each column sums to 1
    bucket, count = expr.split("/ on () group_left ()")
    assert "sum by (le)" in bucket and f"otel_ml_distribution_bucket{{{selector}}}" in bucket
    assert f"otel_ml_distribution_count{{{selector}}}" in count and "> 0" in count
    assert panel["options"]["cellValues"]["unit"] == "percentunit"


def test_training_overview_distribution_row() -> None:
    board = _by_uid("otel-ml-training")
    variable = variables_of(board)["distribution"]
    assert variable_query(variable).replace(" ", "") == (
        'label_values(otel_ml_distribution_last_size{run_id="$run_id"},metric)'
    )
    assert variable["current"]["value"] == "reward" and variable["multi"] is False
    selector = 'run_id="$run_id", rank=~"$rank", metric="$distribution"'
    panels = [p for p in iter_panels(board) if "otel_ml_distribution" in str(p["targets"])]
    assert len(panels) >= 4
    for panel in panels:
        assert all(selector in t["expr"] for t in panel["targets"]), panel["title"]
        assert "$distribution" in panel["title"]
        assert panel["fieldConfig"]["defaults"].get("noValue"), panel["title"]
    (heatmap,) = [p for p in panels if p["type"] == "heatmap"]
    _distribution_heatmap_is_a_share_per_bucket(heatmap, selector)
    (band,) = [p for p in panels if "last_mean" in str(p["targets"])]
    assert {t["legendFormat"] for t in band["targets"]} == {"min", "mean", "max"}
    assert _fills_max_down_to_min(band)
    for panel in (heatmap, band):  # one per rank: side by side
        assert panel["repeat"] == "rank" and panel["repeatDirection"] == "h", panel["title"]
    queried = " ".join(str(p["targets"]) for p in panels)
    gauges = set(re.findall(r"otel_ml_distribution_last_\w+", queried))
    assert gauges == {f"otel_ml_distribution_last_{s}" for s in ("size", "mean", "min", "max", "stddev")}


def test_inference_score_distributions() -> None:
    board = _by_uid("otel-ml-inference")
    variable = variables_of(board)["score"]
    assert variable_query(variable).replace(" ", "") == (
        'label_values(otel_ml_distribution_last_size{run_id="$run_id"},metric)'
    )
    assert variable["current"]["value"] == ["score"] and variable["multi"] is True
    assert variable["allValue"] == ".*"
    selector = 'run_id="$run_id", rank=~"$rank", metric=~"$score"'
    panels = [p for p in iter_panels(board) if "otel_ml_distribution" in str(p["targets"])]
    assert len(panels) >= 3
    for panel in panels:
        assert all(selector in t["expr"] for t in panel["targets"]), panel["title"]
    (heatmap,) = [p for p in panels if p["type"] == "heatmap"]
    _distribution_heatmap_is_a_share_per_bucket(heatmap, selector)
    (band,) = [p for p in panels if p["type"] == "timeseries"]
    assert _fills_max_down_to_min(band)
    assert heatmap["repeat"] == band["repeat"] == "score"
    (summary,) = [p for p in panels if p["type"] == "table"]
    renamed = summary["transformations"][1]["options"]["renameByName"]
    assert set(renamed.values()) == {"score", "scores", "mean", "median", "min", "max"}


def test_where_does_the_step_go_content() -> None:
    board = _by_uid("otel-ml-step")
    panels = list(iter_panels(board))
    share = next(
        p
        for p in panels
        if "otel_ml_span_self_seconds_total" in str(p["targets"]) and p["type"] == "timeseries"
    )
    assert share["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert share["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "otel_ml_step_duration_seconds_sum" in share["targets"][0]["expr"]
    slow = next(p for p in panels if p["type"] == "table" and "topk(" in str(p["targets"]))
    assert "otel_ml_span_duration_seconds_sum" in slow["targets"][0]["expr"]
    assert "otel_ml_span_duration_seconds_count" in slow["targets"][0]["expr"]
    assert any('path="$path"' in str(p["targets"]) for p in panels)
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "otel_ml_step_duration_seconds_bucket" in heatmap["targets"][0]["expr"]
    assert heatmap["options"]["calculate"] is False
    traces = [p for p in panels if "otel_ml.step" in str(p) and "sampled_by" in str(p)]
    assert traces, "a panel links slow steps to their traces"
    assert all("exemplar" in p["description"].lower() for p in traces)
    assert "path" in variables_of(board) and "tempo" in variables_of(board)


def test_inference_content() -> None:
    board = _by_uid("otel-ml-inference")
    exprs = [q.target["expr"] for q in panel_queries(dashboards=[(Path(), board)])]
    assert any("otel_ml_progress_completed" in e and 'unit="file"' in e for e in exprs)
    assert any(
        "otel_ml_progress_rate_per_second" in e and 'unit="row"' in e and 'parent=""' in e for e in exprs
    )
    assert any(
        "otel_ml_progress_rate_per_second" in e and 'unit="row"' in e and 'parent="$task"' in e for e in exprs
    )
    assert any("otel_ml_progress_eta_seconds" in e and "by (rank)" in e for e in exprs)
    assert "task" in variables_of(board)


# --- provisioning ----------------------------------------------------------------------------------


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "otel-ml.yaml").read_text())
    assert config["apiVersion"] == 1
    sources = {d["type"]: d for d in config["datasources"]}
    assert sources["prometheus"]["url"] == "http://prometheus:9090"
    assert sources["prometheus"]["uid"] == "prometheus"
    assert sources["prometheus"].get("isDefault") is True
    assert sources["alertmanager"]["url"] == "http://alertmanager:9093"
    assert sources["alertmanager"]["jsonData"]["implementation"] == "prometheus"
    assert sources["tempo"]["url"] == "http://tempo:3200"
    assert sources["tempo"]["uid"] == "tempo"
    assert all(d.get("access", "proxy") == "proxy" for d in config["datasources"])
    assert len({d["uid"] for d in config["datasources"]}) == len(config["datasources"])


def test_dashboard_provisioning() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "otel-ml.yaml").read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/otel-ml"
    readme = (GRAFANA / "README.md").read_text(encoding="utf-8")
    assert "/var/lib/grafana/dashboards/otel-ml" in readme and "/etc/grafana/provisioning" in readme
