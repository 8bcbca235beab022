"""``/metrics`` for one rank: otel_ml's exposition reader behind a small HTTP server of its own.

The port is ``base + local_rank``; when it is taken the next free port is used, with one
warning naming both. The server binds to ``localhost`` unless told otherwise (OTel's default;
prometheus_client's own is all interfaces). Each scrape runs an OTel collection on the server's
thread, never on the training thread. Connections that stall are timed out.

Example::

    server = MetricsServer(reader.render, host="localhost", base_port=9464, local_rank=1)
    server.start()
    server.url  # 'http://localhost:9465/metrics' (or the next free port)
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from otel_ml._logging import logger, warn_once
from otel_ml.collection import Collection
from otel_ml.exporters._http import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    HardenedHandler,
    HardenedServer,
    make_tls_context,
)
from otel_ml.exporters.exposition import CONTENT_TYPE, ExpositionReader
from otel_ml.health import TelemetryHealth
from otel_ml.threads import name_native

#: Seconds between the accept loop's checks for shutdown (close() does not wait for it).
POLL_INTERVAL = 5.0


def gzip_body(body: bytes) -> bytes:
    """``body`` gzip-compressed at level 1: zlib writes the gzip header and trailer itself
    (``wbits=31``), one pass over the body where ``gzip.compress`` makes a second one for its
    CRC (measured cold, as a scrape between training steps runs: 128 vs 168 µs for 64 KiB).
    Level 1 is the cheapest that still finds the exposition's repeated label text (~14x)."""
    return zlib.compress(body, 1, 31)


def make_reader(collection: Collection | None = None) -> ExpositionReader:
    """The pull reader behind ``/metrics`` (``collection`` adds otel_ml's hooks and own metrics)."""
    return ExpositionReader(collection)


class _Handler(HardenedHandler):
    server: _Server

    def handle_get(self, path: str) -> None:
        route = self.server.routes.get(path)
        if path == "/metrics":
            self._metrics()
        elif route is not None:
            try:
                body, content_type = route()
            except Exception as exc:  # noqa: BLE001 - report, never crash the server thread
                warn_once(f"route:{path}", "otel_ml: %s failed: %s", path, exc)
                self.send(500, b"failed\n", "text/plain; charset=utf-8")
                return
            self.send(200, body, content_type)
        elif path in ("/", "/healthz"):
            self.send(200, b"otel_ml: see /metrics\n", "text/plain; charset=utf-8")
        else:
            self.send(404, b"not found\n", "text/plain; charset=utf-8")

    def _metrics(self) -> None:
        try:
            body = self.server.render()
        except Exception as exc:  # noqa: BLE001 - report, never crash the server thread
            self.server.health.error("prometheus")
            warn_once("prometheus-collect", "otel_ml: /metrics collection failed: %s", exc)
            self.send(500, b"collection failed\n", "text/plain; charset=utf-8")
            return
        headers = {}
        if "gzip" in self.headers.get("accept-encoding", ""):
            body = gzip_body(body)
            headers["Content-Encoding"] = "gzip"
        self.send(200, body, CONTENT_TYPE, headers)


class _Server(HardenedServer):
    render: Callable[[], bytes]
    health: TelemetryHealth
    routes: dict[str, Callable[[], tuple[bytes, str]]]


@dataclass(frozen=True)
class ServerSecurity:
    """TLS context and basic-auth credentials for ``/metrics`` (both optional)."""

    tls: ssl.SSLContext | None
    credentials: bytes | None


def server_security(cfg: Any) -> ServerSecurity | None:
    """Build TLS/auth from the config; None (with one warning) when they were asked for but are
    unusable: then ``/metrics`` is not served at all rather than served without them."""
    tls = None
    if cfg.prometheus_tls_cert or cfg.prometheus_tls_key:
        try:
            tls = make_tls_context(cfg.prometheus_tls_cert or "", cfg.prometheus_tls_key or "")
        except (OSError, ssl.SSLError) as exc:
            logger.warning("otel_ml: /metrics disabled: TLS certificate/key unusable (%s)", exc)
            return None
    credentials = cfg.prometheus_basic_auth
    if credentials is None and cfg.prometheus_basic_auth_file:
        try:
            with open(cfg.prometheus_basic_auth_file, encoding="utf-8") as handle:
                credentials = handle.read().strip()
        except OSError as exc:
            logger.warning("otel_ml: /metrics disabled: cannot read the basic-auth file (%s)", exc.strerror)
            return None
    if credentials is not None and ":" not in credentials:
        logger.warning("otel_ml: /metrics disabled: basic auth must be user:password")
        return None
    if credentials is not None and tls is None:
        logger.warning("otel_ml: /metrics basic auth without TLS: the password travels in clear text")
    return ServerSecurity(tls, credentials.encode() if credentials is not None else None)


def _wake(address: Any) -> None:
    """Connect to a listening ``address`` and hang up, so that its accept loop's poll returns."""
    host, port = address[0], address[1]
    if host in ("0.0.0.0", "::", ""):
        host = "::1" if host == "::" else "127.0.0.1"
    with contextlib.suppress(OSError):
        socket.create_connection((host, port), timeout=0.2).close()


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return socket.AF_INET


class MetricsServer:
    """Serves ``render()`` (the exposition) on ``base_port + local_rank`` or the next free port.

    Example::

        server = MetricsServer(reader.render, "localhost", 9464, local_rank=0)
        port = server.start()
    """

    def __init__(
        self,
        render: Callable[[], bytes],
        host: str = "localhost",
        base_port: int = 9464,
        local_rank: int = 0,
        attempts: int = 64,
        health: TelemetryHealth | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        credentials: bytes | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        routes: Mapping[str, Callable[[], tuple[bytes, str]]] | None = None,
    ) -> None:
        self.render = render
        self.host = host
        self.wanted_port = base_port + local_rank if base_port else 0
        self.attempts = attempts
        self.health = health or TelemetryHealth()
        #: Extra GET paths served beside /metrics (e.g. /progress): path -> () -> (body, content type).
        self.routes: dict[str, Callable[[], tuple[bytes, str]]] = dict(routes or {})
        self.port: int | None = None
        self._options = {
            "tls": tls,
            "credentials": credentials,
            "max_connections": max_connections,
            "request_timeout": request_timeout,
        }
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _bind(self) -> _Server | None:
        bound = type("_BoundServer", (_Server,), {"address_family": _family(self.host)})
        if self.wanted_port == 0:
            return bound((self.host, 0), _Handler, **self._options)
        last_error: OSError | None = None
        for port in range(self.wanted_port, min(self.wanted_port + self.attempts, 65536)):
            try:
                return bound((self.host, port), _Handler, **self._options)
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
        server.render = self.render
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

        def serve() -> None:
            name_native("otel-ml-http")
            # A long poll: every wake-up costs ~0.1 ms of CPU on a VM; close() wakes it at once.
            server.serve_forever(poll_interval=POLL_INTERVAL)

        self._thread = threading.Thread(target=serve, name="otel-ml-http", daemon=True)
        self._thread.start()
        return self.port

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self._options["tls"] is not None else "http"
        return f"{scheme}://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (bounded: the accept loop is woken by connecting to
        it, and polls every ``POLL_INTERVAL`` seconds anyway)."""
        server, self._server = self._server, None
        if server is None:
            return
        closer = threading.Thread(target=server.shutdown, name="otel-ml-http-close", daemon=True)
        closer.start()
        deadline = time.monotonic() + POLL_INTERVAL + 1.0
        while closer.is_alive() and time.monotonic() < deadline:
            _wake(server.server_address)  # until the loop has seen the shutdown request
            closer.join(0.05)
        server.server_close()

    def close_in_child(self) -> None:
        """After fork: close the inherited listening socket without touching the parent's server.

        A forked DataLoader worker would otherwise keep the port open after the parent dies.
        """
        server, self._server = self._server, None
        if server is not None:
            server.socket.close()
