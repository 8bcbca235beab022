"""Run dir files -> OpenMetrics (the input of ``promtool tsdb create-blocks-from openmetrics``):
the same series as ``/metrics``, original timestamps, and every bad line reported, not fatal."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from otel_ml.exporters.exposition import Encoder
from otel_ml.exporters.files import FileSink, read_jsonl
from otel_ml.offline.openmetrics import OpenMetricsConverter
from otel_ml.offline.runfiles import NotARunDirError, read_run, signal_files

DATA = Path(__file__).parent / "data"
GOLDEN_RUN = DATA / "golden-run"
GOLDEN_OPENMETRICS = DATA / "golden-run.om"
SAMPLE = re.compile(r"^(?P<series>[^ ]+) (?P<value>[^ ]+) (?P<at>\d+\.\d{3})$")


def convert(run_dir: Path) -> str:
    converter = OpenMetricsConverter()
    for rank in read_run(run_dir, "metrics").ranks:
        for document in rank.documents:
            converter.add(document)
    return converter.text()


def samples(text: str) -> list[tuple[str, str, float]]:
    found = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        found.append((match["series"], match["value"], float(match["at"])))
    return found


def test_the_checked_in_run_dir_converts_to_the_checked_in_openmetrics() -> None:
    # The run dir is a real 2-rank demo run (NaN loss on rank 1 from step 30, rank 0's first
    # export rotated into .1), trimmed to a few metrics: a change of the writer or the names
    # that breaks backfill shows here. Regenerate both files together if the change is meant.
    assert convert(GOLDEN_RUN) == GOLDEN_OPENMETRICS.read_text()


def test_golden_output_is_sorted_per_series_and_ends_with_eof() -> None:
    text = GOLDEN_OPENMETRICS.read_text()
    assert text.endswith("\n# EOF\n")
    times: dict[str, list[float]] = {}
    for series, _, at in samples(text):
        times.setdefault(series, []).append(at)
    assert all(t == sorted(set(t)) for t in times.values())
    assert 'otel_ml_nonfinite_total{metric="loss",rank="1",run_id="golden"} 10.0' in text
    assert text.count("# TYPE otel_ml_samples counter") == 1
    assert len({s for s in times if s.startswith("target_info{")}) == 2  # one series per rank


def _provider(tmp_path: Path, rank: int = 0) -> tuple[MeterProvider, InMemoryMetricReader, FileSink]:
    reader = InMemoryMetricReader()
    resource = Resource.create({"service.name": "svc", "otel_ml.rank": rank, "odd key/é": 'q"\\'})
    provider = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
    return provider, reader, FileSink(tmp_path, rank)


def test_series_are_exactly_those_of_a_scrape_of_the_same_data(tmp_path: Path) -> None:
    provider, reader, sink = _provider(tmp_path)
    meter = provider.get_meter("t")
    labels = {"rank": "0", "run_id": "r", "path": 'forward/"x"\\y\nz'}
    meter.create_counter("otel_ml_samples", unit="{sample}").add(5, labels)
    meter.create_counter("requests_total", unit="s").add(2, {"a": "b"})
    meter.create_up_down_counter("queue.depth").add(-3, {"q": "1"})
    meter.create_observable_gauge("otel_ml_loss", [lambda _: [Observation(1.5, labels)]], unit="1")
    hist = meter.create_histogram("lat", unit="ms", explicit_bucket_boundaries_advisory=[1.0, 10.0])
    for value in (0.5, 5.0, 50.0, 500.0):
        hist.record(value, labels)
    data = reader.get_metrics_data()
    assert sink.export_metrics(data)
    sink.close()
    scraped = Encoder().encode(data)
    converted = convert(tmp_path)
    expected = sorted(line for line in scraped.splitlines() if not line.startswith("#"))
    assert sorted(f"{series} {value}" for series, value, _ in samples(converted)) == expected
    assert 'otel_ml_loss{path="forward/\\"x\\"\\\\y\\nz",rank="0",run_id="r"} 1.5 ' in converted
    # OpenMetrics names the counter family without _total; /metrics' TYPE line has it.
    assert "# TYPE otel_ml_samples counter" in converted and "# TYPE lat_milliseconds histogram" in converted
    provider.shutdown()


def test_points_keep_their_time_in_order_and_one_per_millisecond(tmp_path: Path) -> None:
    provider, reader, sink = _provider(tmp_path)
    counter = provider.get_meter("t").create_counter("otel_ml_samples", unit="{sample}")
    for _ in range(3):
        counter.add(1, {"rank": "0"})
        assert sink.export_metrics(reader.get_metrics_data())
    sink.close()
    documents = list(read_jsonl(sink.metrics_path))
    first = int(
        documents[0]["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"][0][
            "timeUnixNano"
        ]
    )
    stamps = [first + i * 5_000_000 for i in range(3)]  # 5 ms apart, whatever the machine's speed
    for document, stamp in zip(documents, stamps, strict=True):
        document["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"][0][
            "timeUnixNano"
        ] = str(stamp)
    converter = OpenMetricsConverter()
    for document in reversed(documents):  # the order of the files must not matter
        converter.add(document)
    found = [(v, at) for s, v, at in samples(converter.text()) if s.startswith("otel_ml_samples_total")]
    assert [v for v, _ in found] == ["1.0", "2.0", "3.0"]
    assert [at for _, at in found] == [s // 1_000_000 / 1000 for s in stamps]
    # A second point of a series in the same millisecond replaces the first (no duplicate sample).
    again = json.loads(json.dumps(documents[0]))
    point = again["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"][0]
    point["timeUnixNano"] = str(stamps[0] + 1)
    point["asInt"] = "7"
    converter.add(again)
    found = [v for s, v, _ in samples(converter.text()) if s.startswith("otel_ml_samples_total")]
    assert found == ["7.0", "2.0", "3.0"]
    provider.shutdown()


@pytest.mark.parametrize(("written", "shown"), [("NaN", "NaN"), ("Infinity", "+Inf"), ("-Infinity", "-Inf")])
def test_non_finite_values_are_kept(written: str, shown: str) -> None:
    # The SDK drops a non-finite gauge observation, but a histogram sum or another writer's
    # file can hold one: OTLP/JSON writes them as strings.
    point = {"timeUnixNano": "1500000000", "asDouble": written, "attributes": []}
    metric = {"name": "otel_ml_loss", "unit": "1", "gauge": {"dataPoints": [point]}}
    converter = OpenMetricsConverter()
    converter.add({"resourceMetrics": [{"scopeMetrics": [{"metrics": [metric]}]}]})
    assert f"otel_ml_loss {shown} 1.500" in converter.text()


def test_delta_sums_and_histograms_are_accumulated_as_a_scrape_shows_them() -> None:
    def document(ms: int, value: int, buckets: list[str]) -> dict:
        point = {"timeUnixNano": str(ms * 1_000_000), "attributes": []}
        return {
            "resourceMetrics": [
                {
                    "scopeMetrics": [
                        {
                            "metrics": [
                                {
                                    "name": "hits",
                                    "sum": {
                                        "dataPoints": [{**point, "asInt": str(value)}],
                                        "aggregationTemporality": 1,
                                        "isMonotonic": True,
                                    },
                                },
                                {
                                    "name": "lat",
                                    "unit": "s",
                                    "histogram": {
                                        "dataPoints": [
                                            {
                                                **point,
                                                "count": str(value),
                                                "sum": float(value),
                                                "bucketCounts": buckets,
                                                "explicitBounds": [1.0],
                                            }
                                        ],
                                        "aggregationTemporality": 1,
                                    },
                                },
                            ]
                        }
                    ]
                }
            ]
        }

    converter = OpenMetricsConverter()
    converter.add(document(1000, 2, ["2", "0"]))
    converter.add(document(2000, 3, ["1", "2"]))
    text = converter.text()
    assert "hits_total 5.0 2.000" in text
    assert 'lat_seconds_bucket{le="1.0"} 3.0 2.000' in text
    assert 'lat_seconds_bucket{le="+Inf"} 5.0 2.000' in text
    assert "lat_seconds_count 5.0 2.000" in text and "lat_seconds_sum 5.0 2.000" in text


def test_a_document_that_is_not_a_metrics_request_is_refused() -> None:
    with pytest.raises(ValueError):
        OpenMetricsConverter().add({"resourceMetrics": "nope"})


def _copy_golden(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(GOLDEN_RUN, run)
    return run


def test_a_truncated_last_line_is_reported_and_the_rest_is_read(tmp_path: Path) -> None:
    run = _copy_golden(tmp_path)
    path = run / "rank-1" / "metrics.otlp.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2 - 1])
    found = read_run(run, "metrics")
    assert [str(p) for p in found.problems] == [f"{path}:4: truncated last line (the process was "
                                                "probably killed while writing); skipped"]  # fmt: skip
    assert [len(rank.documents) for rank in found.ranks] == [4, 3]


def test_a_corrupt_line_is_reported_by_file_and_line_and_skipped(tmp_path: Path) -> None:
    run = _copy_golden(tmp_path)
    path = run / "rank-0" / "metrics.otlp.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(1, '{"resourceMetrics": [ garbage\n')
    path.write_text("".join(lines))
    found = read_run(run, "metrics")
    assert [(p.path, p.line, p.reason.split(" (")[0]) for p in found.problems] == [(path, 2, "corrupt line")]
    assert [len(rank.documents) for rank in found.ranks] == [4, 4]


def test_an_empty_rank_folder_is_reported_and_the_other_ranks_are_read(tmp_path: Path) -> None:
    run = _copy_golden(tmp_path)
    (run / "rank-2").mkdir()
    found = read_run(run, "metrics")
    assert [(p.path.name, p.reason) for p in found.problems] == [
        ("rank-2", "no metrics.otlp.jsonl files; rank skipped")
    ]
    assert [rank.rank for rank in found.ranks] == [0, 1]


def test_files_rotated_twice_are_read_oldest_first(tmp_path: Path) -> None:
    provider, reader, _ = _provider(tmp_path)
    sink = FileSink(tmp_path, 0, max_bytes=1, backups=2)  # every export rotates
    gauge_value = [0.0]
    provider.get_meter("t").create_observable_gauge(
        "otel_ml_step", [lambda _: [Observation(gauge_value[0], {"rank": "0"})]]
    )
    for step in range(3):
        gauge_value[0] = float(step)
        assert sink.export_metrics(reader.get_metrics_data())
    sink.close()
    directory = tmp_path / "rank-0"
    assert [p.name for p in signal_files(directory, "metrics.otlp.jsonl")] == [
        "metrics.otlp.jsonl.2",
        "metrics.otlp.jsonl.1",
        "metrics.otlp.jsonl",
    ]
    (rank,) = read_run(tmp_path, "metrics").ranks
    values = [
        d["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["gauge"]["dataPoints"][0]["asDouble"]
        for d in rank.documents
    ]
    assert values == [0.0, 1.0, 2.0]
    provider.shutdown()


@pytest.mark.parametrize("make", ["missing", "file", "no ranks"])
def test_a_folder_that_is_not_a_run_dir_is_refused(tmp_path: Path, make: str) -> None:
    target = tmp_path / "x"
    if make == "file":
        target.write_text("")
    elif make == "no ranks":
        (target / "something").mkdir(parents=True)
    with pytest.raises(NotARunDirError, match="x"):
        read_run(target, "metrics")
