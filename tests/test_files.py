"""OTLP-JSON lines in the run dir: format, round trip, rotation bounds, torn lines, write errors."""

from __future__ import annotations

import json
import os
import stat

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_ml.exporters.files import FileSink, from_otlp_json, read_jsonl

RESOURCE = Resource.create({"service.name": "files-test", "otel_ml.rank": 2})


def _metrics_data():
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader], shutdown_on_exit=False)
    provider.get_meter("t").create_counter("otel_ml_samples").add(5, {"rank": "2", "run_id": "r"})
    return reader.get_metrics_data()


def _spans(count=1):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    for i in range(count):
        with (
            tracer.start_as_current_span("otel_ml.step", attributes={"otel_ml.step": i}),
            tracer.start_as_current_span("child"),
        ):
            pass
    return exporter.get_finished_spans()


def test_metrics_and_spans_are_written_as_otlp_json_lines(tmp_path):
    sink = FileSink(tmp_path, rank=2)
    spans = _spans()
    assert sink.export_metrics(_metrics_data())
    assert sink.export_spans(spans)
    sink.close()
    (metrics,) = list(read_jsonl(sink.metrics_path))
    metric = metrics["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]
    assert metric["name"] == "otel_ml_samples"
    assert metric["sum"]["dataPoints"][0]["asInt"] == "5"
    (traces,) = list(read_jsonl(sink.spans_path))
    written = traces["resourceSpans"][0]["scopeSpans"][0]["spans"]
    child = next(s for s in written if s["name"] == "child")
    parent = next(s for s in written if s["name"] == "otel_ml.step")
    # OTLP/JSON uses hex ids, not protobuf-JSON base64
    assert child["traceId"] == format(spans[0].context.trace_id, "032x")
    assert child["parentSpanId"] == parent["spanId"] == format(spans[1].context.span_id, "016x")
    resource = {a["key"]: a["value"] for a in traces["resourceSpans"][0]["resource"]["attributes"]}
    assert resource["otel_ml.rank"] == {"intValue": "2"}


def test_json_lines_convert_back_to_protobuf_requests(tmp_path):
    sink = FileSink(tmp_path, rank=0)
    spans = _spans()
    sink.export_spans(spans)
    (document,) = list(read_jsonl(sink.spans_path))
    request = from_otlp_json(document, "spans")
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id == spans[0].context.trace_id.to_bytes(16, "big")


def test_files_are_user_only(tmp_path):
    sink = FileSink(tmp_path, rank=0)
    sink.export_metrics(_metrics_data())
    assert stat.S_IMODE(os.stat(sink.metrics_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sink.metrics_path.parent).st_mode) == 0o700


def test_rotation_bounds_disk_use(tmp_path):
    sink = FileSink(tmp_path, rank=0, max_bytes=8192, backups=2)
    for _ in range(60):
        sink.export_spans(_spans(3))
    sink.close()
    files = sorted(p.name for p in sink.spans_path.parent.iterdir())
    assert files == ["spans.otlp.jsonl", "spans.otlp.jsonl.1", "spans.otlp.jsonl.2"]
    total = sum(p.stat().st_size for p in sink.spans_path.parent.iterdir())
    assert total <= 3 * 8192
    for path in sink.spans_path.parent.iterdir():
        assert all("resourceSpans" in d for d in read_jsonl(path))


def test_a_torn_last_line_is_skipped(tmp_path, caplog):
    sink = FileSink(tmp_path, rank=0)
    sink.export_metrics(_metrics_data())
    sink.export_metrics(_metrics_data())
    sink.close()
    with open(sink.metrics_path, "ab") as handle:
        handle.write(b'{"resourceMetrics": [{"reso')  # a SIGKILL mid-write
    documents = list(read_jsonl(sink.metrics_path))
    assert len(documents) == 2


def test_unwritable_target_turns_file_export_off_with_one_warning(tmp_path, caplog):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run dir should be")
    sink = FileSink(blocker, rank=0)
    assert sink.export_metrics(_metrics_data()) is False
    assert sink.disabled
    # Still a failed export (counted by the worker, never reported as a recovery), still quiet.
    assert sink.export_metrics(_metrics_data()) is False
    assert caplog.text.count("file export is off") == 1


def test_written_lines_are_compact_json(tmp_path):
    sink = FileSink(tmp_path, rank=0)
    sink.export_metrics(_metrics_data())
    raw = sink.metrics_path.read_bytes()
    assert raw.count(b"\n") == 1
    json.loads(raw)
