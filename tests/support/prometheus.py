"""A real Prometheus server (the Debian ``prometheus`` binary) for integration tests.

Example::

    with PrometheusServer(binary, tmp_path, file_sd=targets) as prom:
        prom.wait_for('count(otel_ml_loss)', lambda r: r and float(r[0]["value"][1]) == 2)
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.binary_server import BinaryServer
from tests.support.net import wait_until


class PrometheusServer(BinaryServer):
    """Starts ``prometheus`` with a generated config on a free loopback port; always stops it."""

    name = "prometheus"

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        file_sd: list[dict[str, Any]] | None = None,
        static_targets: list[str] | None = None,
        rule_files: list[Path] | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        alertmanager_url: str | None = None,
        scrape_options: dict[str, Any] | None = None,
    ) -> None:
        """``scrape_options`` is merged into the ``otel_ml`` scrape job (e.g. ``scheme``,
        ``tls_config``, ``basic_auth``)."""
        super().__init__(binary, workdir)
        self.targets_file = self.workdir / "targets.json"
        self.targets_file.write_text(json.dumps(file_sd or []))
        scrape: dict[str, Any] = {
            "job_name": "otel_ml",
            "honor_labels": True,  # keep the rank/run_id labels the ranks expose
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}],
        }
        if static_targets:
            scrape["static_configs"] = [{"targets": static_targets}]
        scrape.update(scrape_options or {})
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "scrape_configs": [scrape],
        }
        if rule_files:
            config["rule_files"] = [str(p) for p in rule_files]
        if alertmanager_url:
            target = urllib.parse.urlparse(alertmanager_url).netloc
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [target]}]}]}
        self.config_file = self.workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))

    def set_targets(self, file_sd: list[dict[str, Any]]) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(file_sd))
        tmp.replace(self.targets_file)

    def arguments(self) -> list[str]:
        return [
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            payload = json.load(response)
        if payload.get("status") != "success":
            raise RuntimeError(f"prometheus API {path}: {payload}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; returns the result vector."""
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, predicate: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``predicate(result)`` holds."""
        return wait_until(
            lambda: (lambda r: r if predicate(r) else None)(self.query(expr)), timeout, 0.25, expr
        )
