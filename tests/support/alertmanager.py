"""A real Alertmanager (the Debian ``prometheus-alertmanager`` binary) and a webhook receiver.

Example::

    with WebhookReceiver() as hook, AlertmanagerServer(binary, tmp_path, config) as am:
        hook.wait_for(lambda alerts: any(a["labels"]["alertname"] == "TrainingLossNaN" for a in alerts))
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.support.binary_server import BinaryServer
from tests.support.net import wait_until


class WebhookReceiver:
    """Collects the alerts Alertmanager posts (webhook_config JSON, one payload per notification)."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.payloads.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/otel-ml"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def alerts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [alert for payload in self.payloads for alert in payload.get("alerts", [])]

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
        def probe() -> list[dict[str, Any]] | None:
            found = [a for a in self.alerts() if predicate(a)]
            return found or None

        return wait_until(probe, timeout, 0.25, f"webhook alert (received so far: {self.alerts()})")

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def config_for_test(shipped: Path, webhook_url: str) -> str:
    """The shipped Alertmanager config with every webhook pointed at the test receiver and the
    grouping delays shortened (Alertmanager 0.25 has no url_file, so the URL is rewritten)."""
    config = yaml.safe_load(shipped.read_text())

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("group_wait", "group_interval"):
                if key in node:
                    node[key] = "1s"
            if "repeat_interval" in node:
                node["repeat_interval"] = "1m"
            for hook in node.get("webhook_configs", []) or []:
                hook["url"] = webhook_url
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return yaml.safe_dump(config)


class AlertmanagerServer(BinaryServer):
    """Starts ``prometheus-alertmanager`` with a config on a free loopback port; always stops it."""

    name = "alertmanager"

    def __init__(self, binary: str, workdir: Path, config_text: str) -> None:
        super().__init__(binary, workdir)
        self.config_file = self.workdir / "alertmanager.yml"
        self.config_file.write_text(config_text)

    def arguments(self) -> list[str]:
        return [
            f"--config.file={self.config_file}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
        ]
