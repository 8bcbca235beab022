"""The HTTP server behind ``/metrics``: small, bounded, and safe to expose.

* **Connections are capped** (``max_connections``). A connection that has not sent a complete
  request yet is *idle*; when a new one arrives at the cap, the oldest idle connection is closed
  to make room, so a crowd of idle or slow clients can never lock Prometheus out.
* **Every connection has deadlines**: the TLS handshake and each request must complete within
  ``request_timeout`` seconds, and the handshake happens on the connection's own thread, not
  on the accept loop (prometheus_client's server does it in ``accept``, so one client that
  never finishes the handshake blocks every scrape).
* **TLS** (certificate and key files) and **HTTP basic auth** (compared in constant time) are
  optional; without credentials or with wrong ones the answer is 401.

Example::

    server = HardenedServer(("127.0.0.1", 0), Handler, tls=make_tls_context(cert, key),
                            credentials=b"prom:secret", max_connections=16)
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from otel_ml._logging import warn_once
from otel_ml.threads import name_native

#: Seconds a client may take for the TLS handshake and for each request.
REQUEST_TIMEOUT = 5.0
#: Simultaneous connections at most (Prometheus uses one or two per target).
MAX_CONNECTIONS = 16


def make_tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+) from PEM certificate and key files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


class _Connection:
    __slots__ = ("idle", "since", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle = True
        self.since = time.monotonic()


class HardenedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap, idle eviction, handshake off the accept loop,
    optional TLS and optional basic auth (see module docstring)."""

    daemon_threads = True
    allow_reuse_address = True
    #: listen() backlog. socketserver's default, 5, makes a burst of connections (a flood, or just
    #: several scrapers at once) wait for 1 s SYN retransmits even while accept() keeps up.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        tls: ssl.SSLContext | None = None,
        credentials: bytes | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(address, handler)
        self.tls = tls
        self.credentials = credentials
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._connections: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self.evicted = 0
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._connections) >= self.max_connections and not self._evict_idle():
                self.refused += 1
                self.shutdown_request(request)
                return
            self._connections[id(request)] = _Connection(request)
        try:
            super().process_request(request, client_address)
        except Exception:  # noqa: BLE001 - e.g. no thread could be started: drop this client
            self._forget(request)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that broke off, timed out or failed the TLS handshake (an evicted or idle
        connection, a port scan, plaintext on the TLS port) is routine: no traceback on the
        training process's stderr, which is what socketserver prints by default."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # ssl.SSLError and socket timeouts included
            return
        warn_once("metrics-http-error", "otel_ml: /metrics request failed: %r", error)

    def _evict_idle(self) -> bool:
        idle = [c for c in self._connections.values() if c.idle]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.since)
        self.evicted += 1
        with contextlib.suppress(OSError):
            oldest.sock.shutdown(socket.SHUT_RDWR)  # its thread's read fails and it ends
        for key, connection in list(self._connections.items()):
            if connection is oldest:
                del self._connections[key]
        return True

    def replace_socket(self, request: Any, sock: socket.socket) -> None:
        """The connection accepted as ``request`` now talks through ``sock`` (TLS)."""
        with self._lock:
            connection = self._connections.get(id(request))
            if connection is not None:
                connection.sock = sock

    def mark(self, request: Any, idle: bool) -> None:
        with self._lock:
            connection = self._connections.get(id(request))
            if connection is not None:
                connection.idle = idle
                connection.since = time.monotonic()

    def _forget(self, request: Any) -> None:
        with self._lock:
            self._connections.pop(id(request), None)

    def shutdown_request(self, request: Any) -> None:
        self._forget(request)
        super().shutdown_request(request)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def authorized(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(given, self.credentials)


class HardenedHandler(BaseHTTPRequestHandler):
    """Base handler: TLS handshake with a deadline, idle tracking, auth check, quiet logs.

    Subclasses implement ``handle_get(path)`` and call :meth:`send`.
    """

    server: HardenedServer
    protocol_version = "HTTP/1.1"
    #: Paths served without credentials (health checks).
    public_paths = frozenset({"/healthz"})

    def setup(self) -> None:
        name_native("otel-ml-scrape")  # one thread per connection (ThreadingHTTPServer)
        self.timeout = self.server.request_timeout
        self._key = self.request  # the accepted socket: the server tracks the connection by it
        if self.server.tls is not None:
            self.request.settimeout(self.server.request_timeout)
            self.request = self.server.tls.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False
            )
            self.server.replace_socket(self._key, self.request)
            self.request.do_handshake()  # here, on this connection's thread, with a deadline
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.request is not self._key:
                self.request.close()  # the TLS socket; the server closes the accepted one

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError):
            self.close_connection = True  # a client that broke off or timed out

    def handle_one_request(self) -> None:
        self.server.mark(self._key, idle=True)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.mark(self._key, idle=False)
        return ok

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in self.public_paths and not self.server.authorized(self.headers.get("Authorization")):
            self.send(
                401,
                b"unauthorized\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Basic realm="otel_ml"'},
            )
            return
        self.handle_get(path)

    do_HEAD = do_GET  # noqa: N815

    def handle_get(self, path: str) -> None:
        raise NotImplementedError

    def send(
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
        return


def server_class(family: socket.AddressFamily) -> Callable[..., HardenedServer]:
    """:class:`HardenedServer` bound to an address family (IPv4 or IPv6)."""
    return type("BoundServer", (HardenedServer,), {"address_family": family})
