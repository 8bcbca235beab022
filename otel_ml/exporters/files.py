"""The embedded default: OTLP-JSON lines per rank in the run dir, size-bounded.

Each line is one ``ExportMetricsServiceRequest`` or ``ExportTraceServiceRequest`` in the OTLP/JSON
encoding (lowerCamelCase keys, hex trace and span ids, as the OTLP spec and the collector's
``otlpjsonfile`` receiver expect), so a run without any server can be inspected or replayed
later. Files rotate at ``max_bytes`` keeping ``backups`` older files; files are created with
user-only permissions. A write error (disk full, read-only directory) turns file export off
with one warning; training continues.

Layout: :mod:`otel_ml.rundir` (``<run_dir>/rank-<rank>/metrics.otlp.jsonl``, ``spans.otlp.jsonl``,
``.1`` and ``.2`` after rotation).

Example::

    for request in read_jsonl(Path("otel-ml-runs/r1/rank-0/metrics.otlp.jsonl")):
        print(request["resourceMetrics"][0]["resource"])
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ml._logging import logger, warn_once
from otel_ml.rundir import FILE_MODE, METRICS_FILE, SPANS_FILE, make_dirs, rank_dir

_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId"})


def _convert_ids(node: Any, convert: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: convert(v) if k in _ID_KEYS and isinstance(v, str) else _convert_ids(v, convert)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_convert_ids(v, convert) for v in node]
    return node


def to_otlp_json(message: Any) -> dict[str, Any]:
    """Protobuf OTLP request -> OTLP/JSON dict (hex ids, integer enums)."""
    raw = json_format.MessageToDict(message, use_integers_for_enums=True)
    return _convert_ids(raw, lambda v: base64.b64decode(v).hex())


def from_otlp_json(document: dict[str, Any], kind: str) -> Any:
    """OTLP/JSON dict -> protobuf request; ``kind`` is ``metrics`` or ``spans``."""
    message = ExportMetricsServiceRequest() if kind == "metrics" else ExportTraceServiceRequest()
    fixed = _convert_ids(document, lambda v: base64.b64encode(bytes.fromhex(v)).decode())
    return json_format.ParseDict(fixed, message, ignore_unknown_fields=True)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each JSON document of a run-dir file, skipping a torn or corrupt line."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                logger.info("otel_ml: %s line %d is incomplete or corrupt; skipped", path, number)


class _RotatingFile:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max = max_bytes
        self._backups = backups
        self._handle: Any = None
        self._size = 0

    def _open(self) -> None:
        make_dirs(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        self._handle = os.fdopen(fd, "ab")
        self._size = self._handle.tell()

    def _rotate(self) -> None:
        self._handle.close()
        self._handle = None
        if self._backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def write(self, line: bytes) -> None:
        if self._handle is None:
            self._open()
        if self._size and self._size + len(line) > self._max:
            self._rotate()
            self._open()
        self._handle.write(line)
        self._handle.flush()
        self._size += len(line)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class FileSink:
    """Writes metrics and spans as OTLP-JSON lines (see module docstring).

    Example::

        sink = FileSink(Path("otel-ml-runs/r1"), rank=0)
        sink.export_metrics(reader_data)
    """

    name = "files"

    def __init__(self, run_dir: Path, rank: int, max_bytes: int = 64 << 20, backups: int = 2) -> None:
        directory = rank_dir(run_dir, rank)
        self.metrics_path = directory / METRICS_FILE
        self.spans_path = directory / SPANS_FILE
        self._metrics = _RotatingFile(self.metrics_path, max_bytes, backups)
        self._spans = _RotatingFile(self.spans_path, max_bytes, backups)
        self._lock = threading.Lock()
        self._disabled = False

    @property
    def disabled(self) -> bool:
        """True once a write error turned file export off (the warning was logged then)."""
        return self._disabled

    def _write(self, target: _RotatingFile, message: Any) -> bool:
        if self._disabled:
            # Off after a write error: each export is still a failed (counted) one, so the worker
            # neither reports a "recovery" nor stops counting the data that is lost.
            return False
        line = json.dumps(to_otlp_json(message), separators=(",", ":")).encode() + b"\n"
        with self._lock:
            try:
                target.write(line)
            except OSError as exc:
                self._disabled = True
                warn_once(
                    "files-disabled",
                    "otel_ml: writing %s failed (%s); file export is off for the rest of the run",
                    target.path,
                    exc.strerror or exc,
                )
                return False
        return True

    def export_metrics(self, data: Any) -> bool:
        if data is None:
            return True
        return self._write(self._metrics, encode_metrics(data))

    def export_spans(self, spans: Sequence[Any]) -> bool:
        if not spans:
            return True
        return self._write(self._spans, encode_spans(spans))

    def close(self, timeout: float = 0.0) -> None:
        with self._lock:
            self._metrics.close()
            self._spans.close()
