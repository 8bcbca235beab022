"""An in-test OTLP receiver: gRPC and/or OTLP/HTTP, built on the official opentelemetry-proto messages.

It stands in for an OpenTelemetry Collector in integration tests: the product exports real OTLP
over the network, the receiver parses the requests with the generated protobuf classes and
stores them (thread-safely) with the headers / gRPC metadata they carried.

Faults for reliability tests are selected with :attr:`OtlpReceiver.mode`, switchable at runtime:

* ``"ok"``: store the request and answer with the (empty) protobuf response;
* ``"unavailable"``: answer gRPC ``UNAVAILABLE`` / HTTP ``503`` without storing the request;
* ``"hang"``: accept the request and never answer; the handler is released when the receiver
  stops or the client gives up (gRPC deadline / cancellation, HTTP connection closed).

Every request, whatever the mode, is counted in :attr:`OtlpReceiver.attempts`.

Example::

    receiver = OtlpReceiver().start()
    try:
        ...  # point OTEL_EXPORTER_OTLP_ENDPOINT at receiver.endpoint("grpc")
        receiver.wait_for(lambda: "otel_ml_loss" in receiver.metric_names(), timeout=10)
    finally:
        receiver.stop()
"""

from __future__ import annotations

import contextlib
import gzip
import select
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

MODES = ("ok", "unavailable", "hang")
TRACES, METRICS = "traces", "metrics"
GRPC, HTTP = "grpc", "http/protobuf"
#: How often blocked handlers and :meth:`OtlpReceiver.wait_for` re-check their condition, seconds.
POLL = 0.02

T = TypeVar("T")


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a plain Python value (str, bool, int, float, bytes, list, dict)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    """A repeated ``KeyValue`` field as a dict."""
    return {kv.key: any_value(kv.value) for kv in pairs}


def _lower_keys(pairs: Any) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in pairs:
        headers[key.lower()] = value if isinstance(value, str) else value.decode("latin-1")
    return headers


@dataclass(frozen=True)
class Received:
    """One stored export request."""

    signal: str  # "traces" | "metrics"
    transport: str  # "grpc" | "http/protobuf"
    headers: dict[str, str]  # lower-case keys: HTTP headers or gRPC invocation metadata
    message: Any  # ExportTraceServiceRequest | ExportMetricsServiceRequest
    #: ``time.monotonic()`` when the request was stored.
    at: float = field(default_factory=time.monotonic, compare=False)


@dataclass(frozen=True)
class Attempt:
    """One incoming request, whatever the mode answered."""

    signal: str
    transport: str
    mode: str
    headers: dict[str, str] = field(repr=False)
    #: ``time.monotonic()`` when the request reached the handler.
    at: float = field(default_factory=time.monotonic, compare=False)


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC API
        return self._receiver._handle_grpc(TRACES, request, context)


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC API
        return self._receiver._handle_grpc(METRICS, request, context)


_HTTP_PATHS = {
    "/v1/traces": (TRACES, trace_service_pb2.ExportTraceServiceRequest),
    "/v1/metrics": (METRICS, metrics_service_pb2.ExportMetricsServiceRequest),
}
_RESPONSES = {
    TRACES: trace_service_pb2.ExportTraceServiceResponse,
    METRICS: metrics_service_pb2.ExportMetricsServiceResponse,
}


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks stop(); handlers end on the stop event
    allow_reuse_address = False
    receiver: OtlpReceiver


class _HttpHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no idle keep-alive thread outlives a request.
    protocol_version = "HTTP/1.0"
    server: _HttpServer
    timeout = 10  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return None

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(405, b"POST only\n")

    def do_POST(self) -> None:
        receiver = self.server.receiver
        route = _HTTP_PATHS.get(self.path.split("?", 1)[0])
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if route is None:
            self._reply(404, b"unknown OTLP path\n")
            return
        signal, request_type = route
        headers = _lower_keys(self.headers.items())
        mode = receiver._attempt(signal, HTTP, headers)
        if mode == "hang":
            receiver._hang(self._client_gone)
            return
        if mode == "unavailable":
            self._reply(503, b"simulated outage\n")
            return
        content_type = headers.get("content-type", "").split(";", 1)[0].strip()
        if content_type != "application/x-protobuf":
            self._reply(415, b"only application/x-protobuf\n")
            return
        try:
            encoding = headers.get("content-encoding", "").strip().lower()
            if encoding == "gzip":
                raw = gzip.decompress(raw)
            elif encoding == "deflate":
                raw = zlib.decompress(raw)
            elif encoding not in ("", "identity"):
                self._reply(415, b"unsupported content-encoding\n")
                return
            message = request_type.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - a malformed body is a 400 for the client
            receiver._error(f"{signal} over HTTP: {type(exc).__name__}: {exc}")
            self._reply(400, b"malformed request\n")
            return
        receiver._store(Received(signal, HTTP, headers, message))
        self._reply(200, _RESPONSES[signal]().SerializeToString(), "application/x-protobuf")

    def _client_gone(self) -> bool:
        """True once the client closed its end of the connection."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class OtlpReceiver:
    """OTLP receiver on 127.0.0.1: gRPC (``grpc=True``) and/or OTLP/HTTP (``http=True``).

    Ports are chosen by the OS at :meth:`start`. :meth:`stop` is bounded and idempotent.

    Example::

        with OtlpReceiver(http=False) as receiver:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.grpc_endpoint
    """

    def __init__(self, *, grpc: bool = True, http: bool = True, mode: str = "ok") -> None:
        if not (grpc or http):
            raise ValueError("enable at least one of grpc and http")
        self._want_grpc = grpc
        self._want_http = http
        self._cond = threading.Condition()
        self._mode = self._check_mode(mode)
        self._received: list[Received] = []
        self._attempts: list[Attempt] = []
        self._errors: list[str] = []
        self._stopped = threading.Event()
        self._grpc_server: grpc.Server | None = None
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> OtlpReceiver:
        try:
            if self._want_grpc:
                self._start_grpc()
            if self._want_http:
                self._start_http()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_grpc(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=16, thread_name_prefix="otlp-receiver-grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        if not port:
            raise RuntimeError("the gRPC receiver could not bind 127.0.0.1")
        self._grpc_server = server
        server.start()
        self.grpc_port = port

    def _start_http(self) -> None:
        server = _HttpServer(("127.0.0.1", 0), _HttpHandler)
        server.receiver = self
        self._http_server = server
        self.http_port = server.server_address[1]
        self._http_thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-receiver-http",
            daemon=True,
        )
        self._http_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Release hung requests and stop both servers; returns within about ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        grpc_server, self._grpc_server = self._grpc_server, None
        if grpc_server is not None:
            grpc_server.stop(grace=0).wait(max(0.0, deadline - time.monotonic()))
        http_server, self._http_server = self._http_server, None
        if http_server is not None:
            thread = self._http_thread
            if thread is not None and thread.is_alive():
                http_server.shutdown()  # returns within one poll interval
                thread.join(max(0.0, deadline - time.monotonic()))
            http_server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return not self._stopped.is_set() and (self._grpc_server or self._http_server) is not None

    @property
    def grpc_endpoint(self) -> str:
        """Value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``."""
        if self.grpc_port is None:
            raise RuntimeError("gRPC is not enabled or the receiver is not started")
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """Base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` with ``http/protobuf`` (no ``/v1/...``)."""
        if self.http_port is None:
            raise RuntimeError("HTTP is not enabled or the receiver is not started")
        return f"http://127.0.0.1:{self.http_port}"

    def endpoint(self, protocol: str) -> str:
        """The base endpoint for ``protocol`` (``grpc`` or ``http/protobuf``)."""
        if protocol == GRPC:
            return self.grpc_endpoint
        if protocol == HTTP:
            return self.http_endpoint
        raise ValueError(f"unknown OTLP protocol {protocol!r}")

    # ------------------------------------------------------------------ faults
    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        return mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        with self._cond:
            self._mode = self._check_mode(mode)
            self._cond.notify_all()

    # ------------------------------------------------------------------ handlers (server threads)
    def _attempt(self, signal: str, transport: str, headers: dict[str, str]) -> str:
        with self._cond:
            mode = self._mode
            self._attempts.append(Attempt(signal, transport, mode, headers))
            self._cond.notify_all()
            return mode

    def _store(self, item: Received) -> None:
        with self._cond:
            self._received.append(item)
            self._cond.notify_all()

    def _error(self, text: str) -> None:
        with self._cond:
            self._errors.append(text)
            self._cond.notify_all()

    def _hang(self, client_gone: Callable[[], bool]) -> None:
        """Block until the receiver stops or the client gives up."""
        while not self._stopped.wait(POLL):
            if client_gone():
                return

    def _handle_grpc(self, signal: str, request: Any, context: grpc.ServicerContext) -> Any:
        headers = _lower_keys((md.key, md.value) for md in context.invocation_metadata())
        mode = self._attempt(signal, GRPC, headers)
        if mode == "hang":
            self._hang(lambda: not context.is_active())
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver stopped")
        if mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated outage")
        self._store(Received(signal, GRPC, headers, request))
        return _RESPONSES[signal]()

    # ------------------------------------------------------------------ queries (any thread)
    def received(self, signal: str | None = None) -> list[Received]:
        """Stored requests (answered in mode ``ok``), optionally of one signal, in arrival order."""
        with self._cond:
            return [r for r in self._received if signal is None or r.signal == signal]

    @property
    def attempts(self) -> list[Attempt]:
        """Every request that reached a handler, in arrival order, with the mode it met."""
        with self._cond:
            return list(self._attempts)

    @property
    def errors(self) -> list[str]:
        """Requests the receiver could not parse (a test usually asserts this is empty)."""
        with self._cond:
            return list(self._errors)

    def headers(self, signal: str | None = None) -> list[dict[str, str]]:
        """Headers (HTTP) or invocation metadata (gRPC) of every incoming request, lower-case keys."""
        return [a.headers for a in self.attempts if signal is None or a.signal == signal]

    def clear(self) -> None:
        with self._cond:
            self._received.clear()
            self._attempts.clear()
            self._errors.clear()

    def resource_spans(self) -> Iterator[tuple[dict[str, Any], Any]]:
        for item in self.received(TRACES):
            for rs in item.message.resource_spans:
                yield attributes(rs.resource.attributes), rs

    def spans(self, name: str | None = None) -> list[tuple[dict[str, Any], Span]]:
        """Every received span (optionally only those called ``name``) with its resource attributes."""
        found = []
        for resource, rs in self.resource_spans():
            for scope_spans in rs.scope_spans:
                for span in scope_spans.spans:
                    if name is None or span.name == name:
                        found.append((resource, span))
        return found

    def metrics(self, name: str | None = None) -> list[tuple[dict[str, Any], Metric]]:
        """Every received ``Metric`` message (optionally only ``name``) with its resource attributes."""
        found = []
        for item in self.received(METRICS):
            for rm in item.message.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for scope_metrics in rm.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if name is None or metric.name == name:
                            found.append((resource, metric))
        return found

    def metric_names(self) -> set[str]:
        return {metric.name for _, metric in self.metrics()}

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
        """(resource attributes, point attributes, value) of every data point of metric ``name``.

        The value is a number for gauges and sums, and the data point message itself
        (``count``, ``sum``, ``bucket_counts``...) for histograms and summaries.
        """
        points = []
        for resource, metric in self.metrics(name):
            kind = metric.WhichOneof("data")
            if kind is None:
                continue
            for point in getattr(metric, kind).data_points:
                if kind in ("gauge", "sum"):
                    value: Any = getattr(point, point.WhichOneof("value") or "as_double")
                else:
                    value = point
                points.append((resource, attributes(point.attributes), value))
        return points

    # ------------------------------------------------------------------ waiting
    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
        """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes.

        Wakes up as soon as a request arrives, and at least every :data:`POLL` seconds. On
        timeout, raises AssertionError with a summary of what was received.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, POLL))
        what = what or getattr(predicate, "__name__", "condition")
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; {self.summary()}")

    def summary(self) -> str:
        with self._cond:
            by_signal = {s: sum(r.signal == s for r in self._received) for s in (TRACES, METRICS)}
            modes = [a.mode for a in self._attempts]
            errors = list(self._errors)
        return (
            f"received {by_signal[TRACES]} trace and {by_signal[METRICS]} metric request(s), "
            f"{len(modes)} attempt(s) (modes {sorted(set(modes))}), metric names "
            f"{sorted(self.metric_names())}, parse errors {errors}"
        )


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A 127.0.0.1 port where nothing listens and connections are refused, reserved while in use.

    The socket is bound (so no other test can take the port) but never listens: connecting to
    it fails at once with ECONNREFUSED, like a collector that is down.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


__all__ = [
    "GRPC",
    "HTTP",
    "METRICS",
    "MODES",
    "TRACES",
    "Attempt",
    "OtlpReceiver",
    "Received",
    "any_value",
    "attributes",
    "closed_port",
]
