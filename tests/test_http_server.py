"""The /metrics HTTP server's contract, over real sockets: keep-alive, HEAD, gzip, auth, refusals
of what it does not serve, the per-request deadline and the connection cap.

TLS and hostile crowds are in tests/integration/test_security.py; here the server is plain HTTP
on a free 127.0.0.1 port, talked to with raw bytes (so that every byte it sends is checked) and
with ``http.client``.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from otel_ml.exporters.prometheus import MetricsServer

BODY = b"".join(b'otel_ml_up{path="layer.%d"} %d\n' % (i, i) for i in range(500))
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def start(**options: Any) -> MetricsServer:
    server = MetricsServer(
        options.pop("render", lambda: BODY),
        "127.0.0.1",
        0,
        routes={"/progress": lambda: (b'{"step": 3}', "application/json")},
        **options,
    )
    assert server.start() is not None
    return server


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    server = start()
    yield server
    server.close()


class Client:
    """A raw connection that reads whole responses (status, lower-case headers, body)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.pending = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.pending += chunk
        return bool(chunk)

    def response(self, head: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        while b"\r\n\r\n" not in self.pending:
            assert self._fill(), f"connection closed mid-response: {self.pending!r}"
        top, self.pending = self.pending.split(b"\r\n\r\n", 1)
        lines = top.split(b"\r\n")
        version, status, _ = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1"
        headers = {}
        for line in lines[1:]:
            name, value = line.split(b":", 1)
            assert name.lower() not in headers, f"duplicate header {name!r}"
            headers[name.lower()] = value.strip()
        length = 0 if head else int(headers[b"content-length"])
        while len(self.pending) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.pending = self.pending[:length], self.pending[length:]
        return int(status), headers, body

    def ask(self, raw: bytes, head: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        self.sock.sendall(raw)
        return self.response(head)

    def closed(self, wait: float = 0.5) -> bool:
        """True when the server closed the connection within ``wait`` seconds, with nothing more
        to read; False when it is still open then."""
        self.sock.settimeout(wait)
        try:
            return not self._fill() and not self.pending
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def one(port: int, raw: bytes, wait: float = 0.05) -> tuple[int, dict[bytes, bytes], bytes, bool]:
    """One request on a fresh connection: status, headers, body, whether the server closed it
    within ``wait`` seconds (a closing server's end arrives with the response, so a short wait
    suffices for "still open"; tests that expect the close give it longer)."""
    client = Client(port)
    try:
        status, headers, body = client.ask(raw)
        return status, headers, body, client.closed(wait)
    finally:
        client.close()


def test_http_1_1_keeps_the_connection_for_many_and_pipelined_requests(server: MetricsServer) -> None:
    client = Client(server.port)
    try:
        for _ in range(3):
            status, headers, body = client.ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (status, headers[b"content-type"], body) == (200, METRICS_TYPE, BODY)
            assert headers[b"content-length"] == str(len(BODY)).encode()
            assert b"connection" not in headers
            assert headers[b"date"].endswith(b" GMT")
        client.sock.sendall(b"GET /progress HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        assert client.response()[2] == b'{"step": 3}'
        assert client.response()[2] == b"otel_ml: see /metrics\n"
        status, headers, _ = client.ask(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status == 200 and headers[b"connection"] == b"close"
        assert client.closed()
    finally:
        client.close()


def test_http_1_0_closes_unless_asked_to_keep_alive(server: MetricsServer) -> None:
    status, headers, body, closed = one(server.port, b"GET /metrics HTTP/1.0\r\n\r\n", wait=5)
    assert (status, body, closed) == (200, BODY, True)
    assert headers[b"connection"] == b"close"
    client = Client(server.port)
    try:
        for _ in range(2):
            status, headers, body = client.ask(b"GET /metrics HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            assert (status, body, headers[b"connection"]) == (200, BODY, b"keep-alive")
    finally:
        client.close()


def test_head_gives_the_get_headers_without_a_body(server: MetricsServer) -> None:
    client = Client(server.port)
    try:
        status, headers, body = client.ask(b"HEAD /metrics HTTP/1.1\r\n\r\n", head=True)
        assert (status, headers[b"content-length"], body) == (200, str(len(BODY)).encode(), b"")
        # Nothing of a body followed: the next response starts right after the head.
        assert client.ask(b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 200
    finally:
        client.close()


def test_gzip_is_served_when_asked_and_decompresses_to_the_same_bytes(server: MetricsServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        response = connection.getresponse()
        assert response.getheader("Content-Encoding") == "gzip"
        assert gzip.decompress(response.read()) == BODY
        connection.request("GET", "/metrics")  # the same connection, kept alive
        response = connection.getresponse()
        assert response.getheader("Content-Encoding") is None
        assert response.read() == BODY
    finally:
        connection.close()


def test_paths_query_strings_and_unknown_paths(server: MetricsServer) -> None:
    assert one(server.port, b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n")[2] == BODY
    assert one(server.port, b"GET //metrics HTTP/1.1\r\n\r\n")[2] == BODY  # never scheme-relative
    assert one(server.port, b"GET /metrics HTTP/1.1\nHost: x\n\n")[2] == BODY  # bare LF lines
    status, _headers, body, closed = one(server.port, b"GET /nope HTTP/1.1\r\n\r\n")
    assert (status, body, closed) == (404, b"not found\n", False)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501, id="post"),
        pytest.param(b"DELETE /metrics HTTP/1.1\r\n\r\n", 501, id="delete"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 413, id="body"),
        pytest.param(
            b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413, id="chunked"
        ),
        pytest.param(  # a second length that disagrees: refused, never read as the next request
            b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 30\r\n\r\n", 413, id="two-lengths"
        ),
        pytest.param(b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, id="bad-length"),
        pytest.param(b"GET /metrics HTTP/2.0\r\n\r\n", 505, id="http2"),
        pytest.param(b"GET /metrics FTP/1.1\r\n\r\n", 400, id="bad-version"),
        pytest.param(b"GET /metrics HTTP/1.x\r\n\r\n", 400, id="bad-version-number"),
        pytest.param(b"GET /metrics HTTP/1.1 more\r\n\r\n", 400, id="four-words"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400, id="bad-header"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400, id="folded-header"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nX-A : 1\r\n\r\n", 400, id="space-before-colon"),
        pytest.param(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, id="long-line"),
        pytest.param(b"GET /metrics HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431, id="many-headers"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 431, id="long-header"),
    ],
)
def test_what_is_not_served_is_refused_with_its_status_and_the_connection_closed(
    server: MetricsServer, raw: bytes, status: int
) -> None:
    got, headers, body, closed = one(server.port, raw, wait=5)
    assert (got, closed) == (status, True), body
    assert headers[b"connection"] == b"close"
    assert b"otel_ml_up" not in body
    assert one(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")[2] == BODY  # and it keeps serving


def test_an_empty_request_line_or_an_early_hang_up_closes_without_an_answer(server: MetricsServer) -> None:
    client = Client(server.port)
    try:
        client.sock.sendall(b"\r\n")
        assert client.closed()
    finally:
        client.close()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost")  # and hangs up mid-head
    assert one(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")[2] == BODY


def test_http_0_9_gets_the_body_alone() -> None:
    server = start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics\r\n\r\n")
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        assert got == BODY
    finally:
        server.close()


def test_basic_auth_guards_every_path_but_healthz() -> None:
    server = start(credentials=b"prom:s3cret")
    good = base64.b64encode(b"prom:s3cret")
    try:
        for path in (b"/metrics", b"/progress", b"/", b"/nope"):
            status, headers, _body, closed = one(server.port, b"GET %s HTTP/1.1\r\n\r\n" % path)
            assert (status, headers[b"www-authenticate"], closed) == (401, b'Basic realm="otel_ml"', False)
        for wrong in (base64.b64encode(b"prom:s3cre"), b"!!!", b""):
            raw = b"GET /metrics HTTP/1.1\r\nAuthorization: Basic %s\r\n\r\n" % wrong
            assert one(server.port, raw)[0] == 401
        assert one(server.port, b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n")[0] == 401
        assert one(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 200
        raw = b"GET /metrics HTTP/1.1\r\nauthorization:Basic %s\r\n\r\n" % good  # any case, no space
        assert one(server.port, raw)[:3:2] == (200, BODY)
    finally:
        server.close()


def test_a_failing_render_answers_500_and_the_server_keeps_serving() -> None:
    calls = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("collection broke")
        return BODY

    server = start(render=render)
    try:
        assert one(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")[0] == 500
        assert one(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")[2] == BODY
        assert server.health.errors["prometheus"] == 1
    finally:
        server.close()


def test_a_client_that_drips_its_request_is_cut_off_at_the_request_deadline() -> None:
    timeout = 0.6
    server = start(request_timeout=timeout)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            started = time.monotonic()
            cut_off = None
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"z" * 100:
                try:
                    sock.sendall(bytes([byte]))  # each byte well inside the timeout
                except OSError:
                    cut_off = time.monotonic() - started
                    break
                sock.settimeout(0.1)
                try:
                    if sock.recv(1) == b"":
                        cut_off = time.monotonic() - started
                        break
                except TimeoutError:
                    pass
        assert cut_off is not None, "a dripping client kept the connection past its deadline"
        assert timeout * 0.8 <= cut_off <= timeout + 1.0, cut_off
    finally:
        server.close()


def test_at_the_cap_the_oldest_idle_connection_makes_room_for_a_new_one() -> None:
    server = start(max_connections=2)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        deadline = time.monotonic() + 5
        while server._server.open_connections < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, _, body, _ = one(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, BODY)
        assert server._server.evicted >= 1
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""  # the oldest was closed to make room
        for sock in idle:
            sock.close()
    finally:
        server.close()
