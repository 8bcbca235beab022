"""The Grafana dashboards in ``grafana/dashboards``: load them, walk their panels and turn every
Prometheus target into a plain PromQL expression with the dashboard variables substituted.

Example::

    for query in panel_queries(variables={"run_id": "demo-1", "rank": "0|1"}):
        prom.query(query.expr)          # query.dashboard["uid"], query.panel["title"], query.target
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"

#: Values for Grafana's built-in variables (as Grafana would compute them for a 15s scrape).
BUILTIN_VARIABLES: dict[str, str] = {
    "__rate_interval": "30s",
    "__interval": "15s",
    "__range": "5m",
}

#: Values for the dashboards' own variables when nothing better is known.
DEFAULT_VARIABLES: dict[str, str] = {
    "datasource": "prometheus",
    "tempo": "tempo",
    "run_id": "demo",
    "rank": ".*",  # the All value (allValue) of the multi-value rank variable
    "path": "forward",
    "task": "inference",
    "distribution": "reward",
    "score": "score",
}

# ${name}, ${name:format}, $name, [[name]] (the last is legacy, but Grafana still expands it)
_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::[^}]*)?\}|\$(?P<plain>\w+)|\[\[(?P<legacy>\w+)(?::[^\]]*)?\]\]"
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


@dataclass(frozen=True)
class PanelQuery:
    """One Prometheus target of one panel, with its expression ready for the HTTP API."""

    dashboard: dict[str, Any]
    panel: dict[str, Any]
    target: dict[str, Any]
    expr: str

    @property
    def key(self) -> tuple[str, str]:
        """(dashboard uid, panel title): how tests name a panel."""
        return self.dashboard["uid"], self.panel["title"]

    def __str__(self) -> str:
        return f"{self.dashboard['uid']} / {self.panel['title']} [{self.target.get('refId')}]: {self.expr}"


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def load_dashboards() -> list[tuple[Path, dict[str, Any]]]:
    """Every dashboard file with its parsed JSON."""
    return [(path, json.loads(path.read_text(encoding="utf-8"))) for path in dashboard_files()]


def iter_panels(dashboard: Mapping[str, Any], *, rows: bool = False) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in (collapsed) rows; row panels only with ``rows=True``."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            if panel.get("type") != "row" or rows:
                yield panel
            yield from walk(panel.get("panels") or [])

    yield from walk(list(dashboard.get("panels") or []))


def variables_of(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The dashboard's templating variables by name."""
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: Mapping[str, Any]) -> str:
    """The query string of a query variable (stored as a string or as ``{"query": ...}``)."""
    query = variable.get("query")
    if isinstance(query, Mapping):
        query = query.get("query")
    return str(query or variable.get("definition") or "")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """``label_values(selector, label)`` -> (selector or None, label)."""
    match = _LABEL_VALUES.match(query)
    if not match:
        raise ValueError(f"not a label_values() query: {query!r}")
    return match.group("selector"), match.group("label")


def referenced_variables(text: str) -> set[str]:
    """Names of the variables ``text`` refers to (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``)."""
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(text)}


def substitute(text: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace every variable reference in ``text``; an unknown name raises ``KeyError``.

    ``variables`` wins over :data:`DEFAULT_VARIABLES`, which wins over :data:`BUILTIN_VARIABLES`.
    Values are inserted as they are: a multi-value rank selection is passed as a regex (``0|1``).
    """
    values = {**BUILTIN_VARIABLES, **DEFAULT_VARIABLES, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {text!r}")
        return values[name]

    return _VARIABLE.sub(replace, text)


def is_prometheus_target(panel: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    datasource = target.get("datasource") or panel.get("datasource") or {}
    kind = datasource.get("type") if isinstance(datasource, Mapping) else None
    return kind == "prometheus" and bool(target.get("expr"))


def panel_queries(
    variables: Mapping[str, str] | None = None,
    dashboards: list[tuple[Path, dict[str, Any]]] | None = None,
) -> Iterator[PanelQuery]:
    """Every Prometheus target expression of every panel, variables substituted."""
    for _, dashboard in dashboards if dashboards is not None else load_dashboards():
        for panel in iter_panels(dashboard):
            for target in panel.get("targets") or []:
                if target.get("hide") or not is_prometheus_target(panel, target):
                    continue
                yield PanelQuery(dashboard, panel, target, substitute(target["expr"], variables))


def non_prometheus_targets(
    dashboards: list[tuple[Path, dict[str, Any]]] | None = None,
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(dashboard, panel, target) for targets that are not PromQL (e.g. TraceQL on Tempo)."""
    for _, dashboard in dashboards if dashboards is not None else load_dashboards():
        for panel in iter_panels(dashboard):
            for target in panel.get("targets") or []:
                if not is_prometheus_target(panel, target):
                    yield dashboard, panel, target
