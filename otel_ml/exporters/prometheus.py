"""``/metrics`` for one rank: the OTel Prometheus reader behind a small HTTP server of our own.

The port is ``base + local_rank``; when it is taken the next free port is used, with one
warning naming both. The server binds to ``localhost`` unless told otherwise (OTel's default;
prometheus_client's own is all interfaces). Each scrape runs an OTel collection on the server's
thread, never on the training thread. Connections that stall are timed out.

Example::

    server = MetricsServer(registry, host="localhost", base_port=9464, local_rank=1)
    server.start()
    server.url  # 'http://localhost:9465/metrics' (or the next free port)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricsData
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from otel_ml._logging import logger, warn_once
from otel_ml.health import TelemetryHealth
from otel_ml.pipeline import MetricSources

#: Seconds a client may take to send its request before the connection is dropped.
REQUEST_TIMEOUT = 10.0


class _Reader(PrometheusMetricReader):
    def __init__(self, registry: CollectorRegistry, sources: MetricSources | None) -> None:
        super().__init__(scope_info_enabled=False, registry=registry)
        self._sources = sources

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if self._sources is not None:
            metrics_data = self._sources.augment(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


def make_reader(sources: MetricSources | None = None) -> tuple[PrometheusMetricReader, CollectorRegistry]:
    """A Prometheus reader on a private registry, without scope labels (fewer, clearer series).

    ``sources`` adds the metrics otel_ml aggregates itself to every scrape.
    """
    registry = CollectorRegistry(auto_describe=False)
    return _Reader(registry, sources), registry


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if path == "/metrics":
            self._metrics()
        elif route is not None:
            try:
                body, content_type = route()
            except Exception as exc:  # noqa: BLE001 - report, never crash the server thread
                warn_once(f"route:{path}", "otel_ml: %s failed: %s", path, exc)
                self._send(500, b"failed\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, content_type)
        elif path in ("/", "/healthz"):
            self._send(200, b"otel_ml: see /metrics\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _metrics(self) -> None:
        try:
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            body = encoder(self.server.registry)
        except Exception as exc:  # noqa: BLE001 - report, never crash the server thread
            self.server.health.error("prometheus")
            warn_once("prometheus-collect", "otel_ml: /metrics collection failed: %s", exc)
            self._send(500, b"collection failed\n", "text/plain; charset=utf-8")
            return
        headers = {}
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            import gzip

            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: CollectorRegistry
    health: TelemetryHealth
    routes: dict[str, Callable[[], tuple[bytes, str]]]


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return socket.AF_INET


class MetricsServer:
    """Serves ``registry`` on ``base_port + local_rank`` or the next free port.

    Example::

        server = MetricsServer(registry, "localhost", 9464, local_rank=0)
        port = server.start()
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "localhost",
        base_port: int = 9464,
        local_rank: int = 0,
        attempts: int = 64,
        health: TelemetryHealth | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.wanted_port = base_port + local_rank if base_port else 0
        self.attempts = attempts
        self.health = health or TelemetryHealth()
        #: Extra GET paths served beside /metrics (e.g. /progress): path -> () -> (body, content type).
        self.routes: dict[str, Callable[[], tuple[bytes, str]]] = {}
        self.port: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _bind(self) -> _Server | None:
        family = _family(self.host)
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        if self.wanted_port == 0:
            return server_class((self.host, 0), _Handler)
        last_error: OSError | None = None
        for port in range(self.wanted_port, min(self.wanted_port + self.attempts, 65536)):
            try:
                return server_class((self.host, port), _Handler)
            except OSError as exc:
                last_error = exc
        logger.warning(
            "otel_ml: /metrics disabled: no free port in %d..%d on %s (%s)",
            self.wanted_port,
            self.wanted_port + self.attempts - 1,
            self.host,
            last_error,
        )
        return None

    def start(self) -> int | None:
        """Bind and serve in a daemon thread; returns the port, or None when none was free."""
        server = self._bind()
        if server is None:
            self.health.error("prometheus")
            return None
        server.registry = self.registry
        server.health = self.health
        server.routes = self.routes
        self._server = server
        self.port = server.server_address[1]
        if self.wanted_port and self.port != self.wanted_port:
            logger.warning(
                "otel_ml: port %d is in use; serving /metrics on %s instead (see the endpoint "
                "file in the run dir)",
                self.wanted_port,
                self.url,
            )
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="otel-ml-metrics-http",
            daemon=True,
        )
        self._thread.start()
        return self.port

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (bounded: serve_forever polls every 0.2 s)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()

    def close_in_child(self) -> None:
        """After fork: close the inherited listening socket without touching the parent's server.

        A forked DataLoader worker would otherwise keep the port open after the parent dies.
        """
        server, self._server = self._server, None
        if server is not None:
            server.socket.close()
