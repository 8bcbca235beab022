"""Offline runs afterwards: the run dir's OTLP/JSON files turned into what servers take.

* :mod:`otel_ml.offline.openmetrics`: metrics requests -> OpenMetrics text with the original
  timestamps (pure, no I/O), the input of ``promtool tsdb create-blocks-from openmetrics``;
* :mod:`otel_ml.offline.runfiles`: every rank's files of a run dir, rotated backups first, with
  each torn or corrupt line reported by file and line.

``otel-ml backfill`` and ``otel-ml replay`` (:mod:`otel_ml.cli`) are built on these.
"""
