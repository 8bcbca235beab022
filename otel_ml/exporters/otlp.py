"""OTLP push to a collector over gRPC or HTTP/protobuf, built from :class:`otel_ml.Config`.

Everything is passed to the OTel exporters explicitly (endpoint, headers, timeout, TLS) so that
otel_ml's own parsing of the environment (warn and default on bad values, never log header
values) is what counts.

Example::

    sink = build_otlp_sink(Config.resolve(otlp_endpoint="http://collector:4318"))
    sink.export_spans(spans)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

from opentelemetry.sdk.metrics.export import MetricExportResult
from opentelemetry.sdk.trace.export import SpanExportResult

from otel_ml._logging import logger, warn_once
from otel_ml.config import Config


def signal_endpoints(cfg: Config) -> tuple[str | None, str | None]:
    """(traces URL, metrics URL) for the configured protocol, as the OTel spec defines them."""
    base = cfg.otlp_endpoint
    if cfg.otlp_protocol == "grpc":
        return cfg.otlp_traces_endpoint or base, cfg.otlp_metrics_endpoint or base
    if base:
        base = base.rstrip("/")
        traces, metrics = f"{base}/v1/traces", f"{base}/v1/metrics"
    else:
        traces = metrics = None
    return cfg.otlp_traces_endpoint or traces, cfg.otlp_metrics_endpoint or metrics


def _warn_plaintext(cfg: Config, url: str) -> None:
    scheme = urlparse(url if "://" in url else f"//{url}").scheme
    insecure = cfg.otlp_insecure if cfg.otlp_insecure is not None else scheme != "https"
    if cfg.otlp_headers and insecure:
        warn_once(
            "otlp-plaintext",
            "otel_ml: OTLP headers (credentials?) are configured but %s is not TLS; "
            "they travel in plain text",
            urlparse(url).netloc or url.split("/")[0],
        )


def _grpc_exporters(cfg: Config, traces: str | None, metrics: str | None) -> tuple[Any, Any]:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    def options(url: str) -> dict[str, Any]:
        scheme = urlparse(url).scheme if "://" in url else ""
        insecure = cfg.otlp_insecure if cfg.otlp_insecure is not None else scheme != "https"
        opts: dict[str, Any] = {
            "endpoint": url,
            "insecure": insecure,
            "headers": dict(cfg.otlp_headers),
            "timeout": cfg.otlp_timeout,
        }
        if cfg.otlp_certificate and not insecure:
            import grpc

            with open(cfg.otlp_certificate, "rb") as handle:
                opts["credentials"] = grpc.ssl_channel_credentials(root_certificates=handle.read())
        return opts

    span = OTLPSpanExporter(**options(traces)) if traces else None
    metric = OTLPMetricExporter(**options(metrics)) if metrics else None
    return span, metric


def _http_exporters(cfg: Config, traces: str | None, metrics: str | None) -> tuple[Any, Any]:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    common: dict[str, Any] = {"headers": dict(cfg.otlp_headers), "timeout": cfg.otlp_timeout}
    if cfg.otlp_certificate:
        common["certificate_file"] = cfg.otlp_certificate
    span = OTLPSpanExporter(endpoint=traces, **common) if traces else None
    metric = OTLPMetricExporter(endpoint=metrics, **common) if metrics else None
    return span, metric


class OtlpSink:
    """Wraps an OTLP span exporter and metric exporter (either may be None).

    Example::

        sink = OtlpSink(span_exporter, metric_exporter)
        ok = sink.export_metrics(metrics_data)
    """

    name = "otlp"

    def __init__(self, span_exporter: Any, metric_exporter: Any) -> None:
        self.span_exporter = span_exporter
        self.metric_exporter = metric_exporter

    def export_metrics(self, data: Any) -> bool:
        if self.metric_exporter is None or data is None:
            return True
        return self.metric_exporter.export(data) == MetricExportResult.SUCCESS

    def export_spans(self, spans: Sequence[Any]) -> bool:
        if self.span_exporter is None or not spans:
            return True
        return self.span_exporter.export(spans) == SpanExportResult.SUCCESS

    def close(self, timeout: float = 1.0) -> None:
        for exporter in (self.span_exporter, self.metric_exporter):
            if exporter is None:
                continue
            try:
                # Interrupts retry back-off; the caller bounds how long it waits for this thread.
                exporter.shutdown()
            except Exception as exc:  # noqa: BLE001
                logger.debug("otel_ml: OTLP exporter shutdown failed: %s", exc)


#: The variable otel_ml parses into ``Config.otlp_headers``.
HEADERS_ENV = "OTEL_EXPORTER_OTLP_HEADERS"


@contextlib.contextmanager
def _headers_env_hidden() -> Iterator[None]:
    """Hide ``OTEL_EXPORTER_OTLP_HEADERS`` from the OTel exporters while they are built.

    They read it themselves even when given ``headers=`` (the HTTP exporter always merges it in;
    the gRPC one uses it when ``headers`` is empty) and log a malformed entry verbatim, secret
    included, then send the entries they could parse. otel_ml has parsed it already (one warning
    naming the variable, never a value; all or nothing): that decision must be the only one.
    """
    saved = os.environ.pop(HEADERS_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[HEADERS_ENV] = saved


def build_otlp_sink(cfg: Config) -> OtlpSink | None:
    """Create the OTLP sink, or return None (with one warning) when it cannot be built."""
    traces, metrics = signal_endpoints(cfg)
    if not (traces or metrics):
        return None
    for url in (traces, metrics):
        if url:
            _warn_plaintext(cfg, url)
    try:
        with _headers_env_hidden():
            if cfg.otlp_protocol == "grpc":
                span, metric = _grpc_exporters(cfg, traces, metrics)
            else:
                span, metric = _http_exporters(cfg, traces, metrics)
    except Exception as exc:  # noqa: BLE001 - e.g. a bad OTEL_EXPORTER_OTLP_* value read by the SDK
        warn_once(
            "otlp-build",
            "otel_ml: OTLP export disabled: the exporter could not be created (%s); "
            "check the OTEL_EXPORTER_OTLP_* settings",
            type(exc).__name__,
        )
        return None
    return OtlpSink(span, metric)
