"""The HTTP server behind ``/metrics``: small, bounded, and safe to expose.

* **Connections are capped** (``max_connections``). A connection that has not sent a complete
  request yet is *idle*; when a new one arrives at the cap, the oldest idle connection is closed
  to make room, so a crowd of idle or slow clients can never lock Prometheus out.
* **Every connection has deadlines**: the TLS handshake must complete within ``request_timeout``
  seconds, and so must the wait for each request and its whole head (a client that drips one
  byte at a time is cut off at the deadline, not kept alive by each byte). The handshake
  happens on the connection's own thread, not on the accept loop (prometheus_client's server
  does it in ``accept``, so one client that never finishes the handshake blocks every scrape).
* **TLS** (certificate and key files) and **HTTP basic auth** (compared in constant time) are
  optional; without credentials or with wrong ones the answer is 401.
* **A lean HTTP/1.1 reader** for a few GET routes: the request line and the header lines are
  split from the received bytes directly (``http.server`` parses them with ``email.parser``,
  most of its cost per request), and status line, headers and body leave in one ``sendall``.
  HTTP/1.1 keeps the connection alive unless told ``Connection: close``; HTTP/1.0 closes
  it unless told ``keep-alive``. GET and HEAD are served; other methods get 501, a request
  with a body 413 (nothing here takes one), a malformed one 400, a version from 2.0 on 505, a
  head over 64 KiB or 100 header lines 414/431; each of these closes the connection.

Example::

    server = HardenedServer(("127.0.0.1", 0), Handler, tls=make_tls_context(cert, key),
                            credentials=b"prom:secret", max_connections=16)
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from otel_ml._logging import warn_once
from otel_ml.threads import name_native

#: Seconds a client may take for the TLS handshake and for each request.
REQUEST_TIMEOUT = 5.0
#: Simultaneous connections at most (Prometheus uses one or two per target).
MAX_CONNECTIONS = 16
#: Bytes a request's head (request line and headers) may have at most, and its header lines.
MAX_HEAD = 65536
MAX_HEADERS = 100

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"


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


class HardenedServer(socketserver.ThreadingTCPServer):
    """A threading TCP server with a connection cap, idle eviction, handshake off the accept
    loop, optional TLS and optional basic auth (see module docstring)."""

    daemon_threads = True
    allow_reuse_address = True
    #: listen() backlog. socketserver's default, 5, makes a burst of connections (a flood, or just
    #: several scrapers at once) wait for 1 s SYN retransmits even while accept() keeps up.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[HardenedHandler],
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


class _RefusedError(Exception):
    """A request answered with an error status, after which the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _date(now: float, cache: list[Any] = [0, b""]) -> bytes:  # noqa: B006 - a one-slot cache
    """The ``Date`` header line for ``now`` (formatted once a second)."""
    second = int(now)
    if cache[0] != second:
        cache[1] = f"Date: {formatdate(second, usegmt=True)}\r\n".encode()
        cache[0] = second
    return cache[1]


class HardenedHandler(socketserver.BaseRequestHandler):
    """One connection: TLS handshake with a deadline, a keep-alive request loop with idle
    tracking and per-request deadlines, the auth check, and :meth:`send`.

    Subclasses implement ``handle_get(path)`` and call :meth:`send`. ``self.headers`` maps
    lower-case header names to their (first) values; ``self.command`` is ``GET`` or ``HEAD``.
    """

    server: HardenedServer
    #: Paths served without credentials (health checks).
    public_paths = frozenset({"/healthz"})

    def setup(self) -> None:
        name_native("otel-ml-scrape")  # one thread per connection (ThreadingTCPServer)
        self._key = self.request  # the accepted socket: the server tracks the connection by it
        self.request.settimeout(self.server.request_timeout)
        with contextlib.suppress(OSError):  # one sendall per response: never wait on Nagle
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.server.tls is not None:
            self.request = self.server.tls.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False
            )
            self.server.replace_socket(self._key, self.request)
            try:
                self.request.do_handshake()  # here, on this connection's thread, with a deadline
            except BaseException:
                self.request.close()
                raise
        self.headers: dict[str, str] = {}
        self.command = "GET"
        self._version = (1, 1)
        self._close = False

    def finish(self) -> None:
        if self.request is not self._key:
            self.request.close()  # the TLS socket; the server closes the accepted one

    def handle(self) -> None:
        pending = b""
        with contextlib.suppress(OSError):  # a client that broke off, timed out or was evicted
            while True:
                self.server.mark(self._key, idle=True)
                try:
                    head, pending = self._read_head(pending)
                    if head is None:
                        return
                    self.server.mark(self._key, idle=False)
                    path = self._parse(head)
                except _RefusedError as refused:
                    self._close = True
                    body = f"{refused}\n".encode()
                    self.command = "GET"
                    self.send(refused.status, body, "text/plain; charset=utf-8")
                    return
                self._dispatch(path)
                if self._close:
                    return

    def _read_head(self, pending: bytes) -> tuple[bytes | None, bytes]:
        """(the request's head, the bytes after it); (None, b"") when the client closed first."""
        sock = self.request
        deadline = time.monotonic() + self.server.request_timeout
        while True:
            if pending[:2] == b"\r\n" or pending[:1] == b"\n":
                return None, b""  # an empty request line: close, as http.server does
            end = pending.find(b"\r\n\r\n")
            bare = pending.find(b"\n\n", 0, None if end < 0 else end)  # LF-only lines, as http.server
            if 0 <= bare <= MAX_HEAD:
                return pending[:bare], pending[bare + 2 :]
            if 0 <= end <= MAX_HEAD:
                return pending[:end], pending[end + 4 :]
            if len(pending) > MAX_HEAD:
                if b"\n" not in pending[: MAX_HEAD + 1]:
                    raise _RefusedError(414, "request line too long")
                raise _RefusedError(431, "request header fields too large")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request deadline")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                return None, b""
            pending += chunk

    def _parse(self, head: bytes) -> str:
        """Request line and headers into ``command``, ``headers``, the keep-alive decision; the path."""
        lines = head.decode("iso-8859-1").split("\n")
        words = lines[0].rstrip("\r").split()
        self.headers = headers = {}
        self._close = True
        self._version = (1, 0)
        if len(words) == 3:
            method, target, version = words
            number = version[5:].split(".") if version.startswith("HTTP/") else ()
            if len(number) != 2 or not all(n.isdigit() and len(n) <= 10 for n in number):
                raise _RefusedError(400, f"bad request version {version!r}")
            self._version = (int(number[0]), int(number[1]))
            if self._version >= (2, 0):
                raise _RefusedError(505, f"invalid HTTP version {version}")
            self._close = self._version < (1, 1)
        elif len(words) == 2 and words[0] == "GET":
            method, target = words  # HTTP/0.9: the body alone, then close
            self._version = (0, 9)
        else:
            raise _RefusedError(400, "bad request syntax")
        if len(lines) > MAX_HEADERS + 1:
            raise _RefusedError(431, "too many headers")
        body = False
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _RefusedError(400, "bad header line")  # also folded (obsolete) continuation lines
            name, value = name.lower(), value.strip()
            if name == "content-length":  # every one of them: no smuggled second length
                if not value.isdigit():
                    raise _RefusedError(400, "bad content-length")
                body = body or int(value) > 0
            elif name == "transfer-encoding":
                body = True
            headers.setdefault(name, value)
        connection = headers.get("connection", "").lower()
        if connection == "close":
            self._close = True
        elif connection == "keep-alive" and self._version >= (1, 0):
            self._close = False
        if body:
            raise _RefusedError(413, "this server takes no request bodies")
        if method not in ("GET", "HEAD"):
            raise _RefusedError(501, f"unsupported method ({method!r})")
        self.command = method
        if target.startswith("//"):
            target = "/" + target.lstrip("/")  # as http.server: never a scheme-relative path
        return target.split("?", 1)[0]

    def _dispatch(self, path: str) -> None:
        if path not in self.public_paths and not self.server.authorized(self.headers.get("authorization")):
            self.send(
                401,
                b"unauthorized\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Basic realm="otel_ml"'},
            )
            return
        self.handle_get(path)

    def handle_get(self, path: str) -> None:
        raise NotImplementedError

    def send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """Status line, headers and body (none for HEAD) in one ``sendall``."""
        if self._version == (0, 9):
            self.request.sendall(body)  # HTTP/0.9 has no status line or headers
            return
        parts = [
            _STATUS_LINES[status],
            _date(time.time()),
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode(),
        ]
        for key, value in (headers or {}).items():
            parts.append(f"{key}: {value}\r\n".encode("latin-1"))
        if self._close:
            parts.append(_CLOSE)
        elif self._version < (1, 1):
            parts.append(_KEEP_ALIVE)
        parts.append(b"\r\n")
        if self.command != "HEAD":
            parts.append(body)
        self.request.settimeout(self.server.request_timeout)  # a client that never reads is cut off
        self.request.sendall(b"".join(parts))


def server_class(family: socket.AddressFamily) -> Callable[..., HardenedServer]:
    """:class:`HardenedServer` bound to an address family (IPv4 or IPv6)."""
    return type("BoundServer", (HardenedServer,), {"address_family": family})
