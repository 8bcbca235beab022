"""``otel-ml replay`` into the project's OTLP test receiver (gRPC and HTTP/protobuf): every data
point and span of the checked-in run dir arrives once, with its original time, in order per
series; a collector that refuses everything is reported as refused (exit status 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from otel_ml.cli.main import main
from otel_ml.offline.runfiles import read_run
from tests.support.otlp_receiver import GRPC, HTTP, OtlpReceiver, attributes
from tests.test_offline import GOLDEN_RUN

pytestmark = pytest.mark.integration


def _file_points(run_dir: Path) -> list[tuple[str, tuple, int]]:
    """(metric, sorted attributes, timeUnixNano) of every data point in the files, in file order."""
    found = []
    for rank in read_run(run_dir, "metrics").ranks:
        for document in rank.documents:
            for rm in document["resourceMetrics"]:
                for sm in rm["scopeMetrics"]:
                    for metric in sm["metrics"]:
                        kind = next(k for k in ("gauge", "sum", "histogram") if k in metric)
                        for point in metric[kind]["dataPoints"]:
                            labels = tuple(
                                sorted(
                                    (a["key"], str(next(iter(a["value"].values()))))
                                    for a in point["attributes"]
                                )
                            )
                            found.append((metric["name"], labels, int(point["timeUnixNano"])))
    return found


def _received_points(receiver: OtlpReceiver) -> list[tuple[str, tuple, int]]:
    found = []
    for _, metric in receiver.metrics():
        kind = metric.WhichOneof("data")
        for point in getattr(metric, kind).data_points:
            labels = tuple(sorted((k, str(v)) for k, v in attributes(point.attributes).items()))
            found.append((metric.name, labels, point.time_unix_nano))
    return found


def _file_spans(run_dir: Path) -> list[tuple[str, str]]:
    return [
        (span["spanId"], span["name"])
        for rank in read_run(run_dir, "spans").ranks
        for document in rank.documents
        for rs in document["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
    ]


def _series_order(points: list[tuple[str, tuple, int]]) -> dict[tuple[str, tuple], list[int]]:
    series: dict[tuple[str, tuple], list[int]] = {}
    for name, labels, at in points:
        series.setdefault((name, labels), []).append(at)
    return series


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_every_point_and_span_arrives_once_in_order(
    protocol: str, otlp_receiver: OtlpReceiver, capsys: pytest.CaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer t0k")
    endpoint = otlp_receiver.endpoint(protocol)
    argv = ["replay", str(GOLDEN_RUN), "--otlp", endpoint, "--protocol", protocol, "--batch", "2"]
    assert main([*argv, "--no-progress"]) == 0
    expected = _file_points(GOLDEN_RUN)
    received = _received_points(otlp_receiver)
    assert sorted(received) == sorted(expected)  # each once, with its original time
    assert len(set(received)) == len(received)
    for times in _series_order(received).values():
        assert times == sorted(times)
    spans = [(span.span_id.hex(), span.name) for _, span in otlp_receiver.spans()]
    assert sorted(spans) == sorted(_file_spans(GOLDEN_RUN))
    # Two ranks x (metrics in 2-line batches, one spans line): never two ranks in one request.
    ranks = [
        {attributes(rm.resource.attributes)["otel_ml.rank"] for rm in item.message.resource_metrics}
        for item in otlp_receiver.received("metrics")
    ]
    assert all(len(r) == 1 for r in ranks) and len(ranks) == 4
    assert {h.get("authorization") for h in otlp_receiver.headers()} == {"Bearer t0k"}
    out = capsys.readouterr().out
    assert f"sent {len(expected)} data points and {len(spans)} spans in 6 requests" in out
    assert "refused 0 data points and 0 spans" in out


def test_a_collector_that_refuses_is_reported(
    otlp_receiver_factory: Any, capsys: pytest.CaptureFixture
) -> None:
    receiver = otlp_receiver_factory(mode="unavailable")
    argv = ["replay", str(GOLDEN_RUN), "--otlp", receiver.endpoint(HTTP), "--protocol", HTTP]
    assert main([*argv, "--retries", "1", "--no-progress", "--batch", "10"]) == 1
    captured = capsys.readouterr()
    points = len(_file_points(GOLDEN_RUN))
    assert "sent 0 data points and 0 spans in 4 requests" in captured.out
    assert f"refused {points} data points and 8 spans" in captured.out
    assert "refused: HTTP 503" in captured.err
    assert len(receiver.attempts) == 8  # each request tried twice


def test_a_folder_that_is_not_a_run_dir_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["replay", str(tmp_path), "--otlp", "http://127.0.0.1:9"]) == 2
    assert "not a run dir" in capsys.readouterr().err
