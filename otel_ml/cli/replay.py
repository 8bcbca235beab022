"""``otel-ml replay RUN_DIR --otlp URL``: an offline run's metrics and spans sent to a collector.

Each rank's recorded requests (rotated backups first, so in time order) are sent as they were
written, original timestamps and resource included, ``--batch`` lines merged into one request
and never two ranks in one request. A request the collector cannot take now (HTTP 429/502/503/
504, gRPC UNAVAILABLE, RESOURCE_EXHAUSTED, ...; a connection error) is retried with back-off; one
it refuses, or partially refuses (OTLP ``partial_success``), is counted as refused. The summary
says what was sent and what was refused; the exit status is 1 when anything was refused.

The endpoint, protocol, headers, timeout and TLS settings are otel_ml's OTLP settings (the
standard ``OTEL_EXPORTER_OTLP_*`` variables, see :mod:`otel_ml.exporters.otlp`); ``--otlp`` and
``--protocol`` override the endpoint and the protocol. Bad lines are reported and skipped, as by
``otel-ml backfill``.

Example::

    otel-ml replay otel-ml-runs/demo-20261122-101500 --otlp http://localhost:4318
    OTEL_EXPORTER_OTLP_PROTOCOL=grpc otel-ml replay RUN_DIR --otlp localhost:4317
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from otel_ml.config import Config
from otel_ml.exporters.files import from_otlp_json
from otel_ml.exporters.otlp import signal_endpoints
from otel_ml.offline.runfiles import NotARunDirError, Problem, read_run

RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
RETRYABLE_GRPC = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED"})
SIGNALS = {
    "metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse, "resource_metrics"),
    "spans": (ExportTraceServiceRequest, ExportTraceServiceResponse, "resource_spans"),
}


class Retryable(Exception):  # noqa: N818 - a signal between two functions, not an error shown
    """The collector may take this request later."""


@dataclass
class Tally:
    """Items (data points or spans) sent and refused, and why the last refusal happened."""

    sent: int = 0
    refused: int = 0
    requests: int = 0
    last_error: str = ""


def items(request: Any, signal: str) -> int:
    """Data points (or spans) in one request."""
    if signal == "spans":
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    count = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind:
                    count += len(getattr(metric, kind).data_points)
    return count


def batches(
    documents: list[dict[str, Any]], signal: str, size: int, problems: list[Problem], where: Path
) -> Iterator[Any]:
    """Requests of up to ``size`` documents each, in file order; unparsable ones reported."""
    request_type, _, field = SIGNALS[signal]
    batch = request_type()
    used = 0
    for number, document in enumerate(documents, start=1):
        try:
            request = from_otlp_json(document, signal)
        except Exception as exc:  # noqa: BLE001 - protobuf's ParseError and bad hex ids alike
            problems.append(Problem(where, 0, f"{signal} document {number} skipped: {exc}"))
            continue
        getattr(batch, field).extend(getattr(request, field))
        used += 1
        if used == size:
            yield batch
            batch, used = request_type(), 0
    if used:
        yield batch


def http_sender(url: str, cfg: Config, signal: str) -> Callable[[Any], Any]:
    """POST one protobuf request; the parsed response, or :class:`Retryable`, or an error."""
    _, response_type, _ = SIGNALS[signal]
    context = None
    if cfg.otlp_certificate and urlparse(url).scheme == "https":
        import ssl

        context = ssl.create_default_context(cafile=cfg.otlp_certificate)

    def send(request: Any) -> Any:
        body = request.SerializeToString()
        headers = {**cfg.otlp_headers, "Content-Type": "application/x-protobuf"}
        message = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(message, timeout=cfg.otlp_timeout, context=context) as reply:
                return response_type.FromString(reply.read())
        except urllib.error.HTTPError as exc:
            if exc.code in RETRYABLE_HTTP:
                raise Retryable(f"HTTP {exc.code}") from None
            raise RuntimeError(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Retryable(str(getattr(exc, "reason", exc))) from None

    return send


def grpc_sender(url: str, cfg: Config, signal: str) -> Callable[[Any], Any]:
    """Call the collector's Export; the response, or :class:`Retryable`, or an error."""
    import grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    parsed = urlparse(url if "://" in url else f"//{url}")
    target = parsed.netloc or url
    insecure = cfg.otlp_insecure if cfg.otlp_insecure is not None else parsed.scheme != "https"
    if insecure:
        channel = grpc.insecure_channel(target)
    else:
        roots = open(cfg.otlp_certificate, "rb").read() if cfg.otlp_certificate else None  # noqa: SIM115
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))
    if signal == "spans":
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
    else:
        stub = metrics_service_pb2_grpc.MetricsServiceStub(channel)
    metadata = [(k.lower(), v) for k, v in cfg.otlp_headers.items()]

    def send(request: Any) -> Any:
        try:
            return stub.Export(request, metadata=metadata, timeout=cfg.otlp_timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            if code in RETRYABLE_GRPC:
                raise Retryable(f"gRPC {code}") from None
            raise RuntimeError(f"gRPC {code}: {exc.details()}") from None

    return send


def deliver(send: Callable[[Any], Any], request: Any, signal: str, tally: Tally, retries: int,
            sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
    """Send one request with retries and add the outcome to ``tally``."""
    count = items(request, signal)
    tally.requests += 1
    for attempt in range(retries + 1):
        try:
            response = send(request)
        except Retryable as exc:
            tally.last_error = str(exc)
            if attempt < retries:
                sleep(min(8.0, 0.5 * 2**attempt))
            continue
        except Exception as exc:  # noqa: BLE001 - a refusal is counted and reported, not raised
            tally.last_error = str(exc)
            break
        partial = response.partial_success
        rejected = partial.rejected_spans if signal == "spans" else partial.rejected_data_points
        if partial.error_message:
            tally.last_error = partial.error_message
        tally.sent += count - rejected
        tally.refused += rejected
        return
    tally.refused += count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run dir to send")
    parser.add_argument(
        "--otlp", metavar="URL", help="collector endpoint (default OTEL_EXPORTER_OTLP_ENDPOINT)"
    )
    parser.add_argument(
        "--protocol", choices=("grpc", "http/protobuf"), help="default OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    parser.add_argument("--batch", type=int, default=20, help="recorded lines per request (default 20)")
    parser.add_argument("--retries", type=int, default=5, help="retries of a request (default 5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        cfg = Config.resolve(otlp_endpoint=args.otlp, otlp_protocol=args.protocol)
    except (TypeError, ValueError) as exc:
        print(f"otel-ml: {exc}", file=sys.stderr)
        return 2
    traces_url, metrics_url = signal_endpoints(cfg)
    if not (traces_url or metrics_url):
        print("otel-ml: no collector: give --otlp URL or set OTEL_EXPORTER_OTLP_ENDPOINT", file=sys.stderr)
        return 2
    try:
        runs = {signal: read_run(args.run_dir, signal) for signal in SIGNALS}
    except NotARunDirError as exc:
        print(f"otel-ml: {exc}", file=sys.stderr)
        return 2
    make = grpc_sender if cfg.otlp_protocol == "grpc" else http_sender
    tallies = {signal: Tally() for signal in SIGNALS}
    problems = [p for found in runs.values() for p in found.problems]
    total = sum(
        -(-len(rank.documents) // max(1, args.batch)) for found in runs.values() for rank in found.ranks
    )
    with tqdm(
        total=total, unit="request", desc="replay", disable=args.no_progress or None, file=sys.stderr
    ) as bar:
        for signal, url in (("metrics", metrics_url), ("spans", traces_url)):
            if not url:
                continue
            send = make(url, cfg, signal)
            for rank in runs[signal].ranks:
                for request in batches(rank.documents, signal, max(1, args.batch), problems, rank.directory):
                    deliver(send, request, signal, tallies[signal], args.retries)
                    bar.update(1)
    for problem in problems:
        print(f"otel-ml: {problem}", file=sys.stderr)
    points, spans = tallies["metrics"], tallies["spans"]
    print(
        f"otel-ml: sent {points.sent} data points and {spans.sent} spans in "
        f"{points.requests + spans.requests} requests to {metrics_url or traces_url}; "
        f"refused {points.refused} data points and {spans.refused} spans"
    )
    reasons = {t.last_error for t in tallies.values() if t.refused and t.last_error}
    for reason in sorted(reasons):
        print(f"otel-ml: refused: {reason}", file=sys.stderr)
    return 1 if points.refused or spans.refused else 0
