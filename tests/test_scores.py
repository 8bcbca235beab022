"""otel_ml.scores(): the terminal lines, the scores file and the exported series carry the same numbers."""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import otel_ml
from otel_ml import runtime
from otel_ml.config import Config
from otel_ml.distribution import summarize
from otel_ml.score_lines import ScoreSummary, one_line, sample_line
from otel_ml.scores import MAX_FILE_TEXT, SCORES_FILE
from tests.support.metrics import strict_exposition

SAMPLE = re.compile(r"^\[Sample (\d+)\](?: id=(\S+))? Score: (\S+)(?: \| Response: (.*))?$")
BATCH = re.compile(r"^\[Batch (\d+)\] samples (\d+)-(\d+) done, avg_(\w+)=(\S+)(?:, nonfinite=(\d+))?$")
SUMMARY = re.compile(
    r"^\[Summary\] (?P<name>\w+)(?: \((?P<title>.*)\))?: count=(?P<count>\d+) nonfinite=(?P<nonfinite>\d+) "
    r"mean=(?P<mean>\S+) min=(?P<min>\S+) max=(?P<max>\S+) std=(?P<std>\S+)$"
)


def _telemetry(tmp_path: Path, **options) -> runtime.Telemetry:
    opts = {
        "prometheus_port": 0,
        "prometheus_host": "127.0.0.1",
        "run_dir": str(tmp_path / "{run_id}"),
        "run_id": "scores-unit",
        "rank": 1,
        "files": "off",  # the OTLP files; the scores file is written anyway
        "set_global_providers": False,
        "handle_signals": False,
        **options,
    }
    return runtime.Telemetry(Config.resolve(env={}, **opts))


@pytest.fixture
def telemetry(tmp_path):
    t = _telemetry(tmp_path)
    yield t
    t.shutdown(timeout=2)


def _scrape(t: runtime.Telemetry) -> dict:
    return strict_exposition(t.prometheus_reader.render().decode())


def _one(samples: dict, name: str, **labels) -> float:
    got = [v for attrs, v in samples.get(name, []) if all(attrs.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, (name, labels, samples.get(name))
    return got[0]


def _lines(stream: io.StringIO) -> dict[str, list[re.Match]]:
    found: dict[str, list[re.Match]] = {"sample": [], "batch": [], "summary": []}
    for line in stream.getvalue().splitlines():
        for kind, pattern in (("sample", SAMPLE), ("batch", BATCH), ("summary", SUMMARY)):
            match = pattern.match(line)
            if match:
                found[kind].append(match)
    return found


def _shown(value: float) -> str:
    """A number as the lines print it (``digits=3``)."""
    return f"{value:.3f}"


def _records(path: Path) -> list[dict]:
    strict = {"parse_constant": lambda c: pytest.fail(f"non-strict JSON constant {c} in {path}")}
    return [json.loads(line, **strict) for line in path.read_text(encoding="utf-8").splitlines()]


def _finite(records: list[dict]) -> list[float]:
    return [r["score"] for r in records if isinstance(r["score"], float)]


BATCHES = [
    [6.8, 7.9, 9.1, 7.8],
    [5.0, float("nan"), 8.25],
    [3.5, 9.75, 6.0, 7.0, 4.4],
]


def test_terminal_lines_file_and_series_agree_on_count_mean_min_max(telemetry):
    out = io.StringIO()
    labels = {"metric": "score", "rank": "1", "run_id": "scores-unit"}
    last_min, last_max = [], []
    with otel_ml.scores(total=12, show="sample", telemetry=telemetry, stream=out) as scorer:
        for number, batch in enumerate(BATCHES, start=1):
            ids = [f"q{number}-{i}" for i in range(len(batch))]
            scorer.add(batch, ids=ids, texts=[f"answer {i}" for i in ids])
            samples = _scrape(telemetry)
            line = _lines(out)["batch"][-1]
            assert int(line[1]) == number
            # the batch line and the last-batch gauges: the same batch
            assert _shown(_one(samples, "otel_ml_distribution_last_mean", **labels)) == line[5]
            assert _one(samples, "otel_ml_distribution_last_size", **labels) == len(
                [v for v in batch if not math.isnan(v)]
            )
            last_min.append(_one(samples, "otel_ml_distribution_last_min", **labels))
            last_max.append(_one(samples, "otel_ml_distribution_last_max", **labels))
    samples = _scrape(telemetry)
    lines = _lines(out)
    (summary,) = lines["summary"]
    count, nonfinite = int(summary["count"]), int(summary["nonfinite"])
    records = _records(scorer.path)
    finite = _finite(records)

    assert (count, nonfinite) == (11, 1) == (len(finite), len(records) - len(finite))
    assert _one(samples, "otel_ml_distribution_count", **labels) == count
    assert _one(samples, "otel_ml_nonfinite_total", **labels) == nonfinite
    series_mean = _one(samples, "otel_ml_distribution_sum", **labels) / count
    assert _shown(series_mean) == summary["mean"] and series_mean == pytest.approx(sum(finite) / len(finite))
    assert (min(last_min), max(last_max)) == (min(finite), max(finite))
    assert tuple(map(_shown, (min(finite), max(finite)))) == (summary["min"], summary["max"])
    assert scorer.summary.mean == pytest.approx(series_mean)
    # every sample: its line and its record say the same id and score
    assert len(lines["sample"]) == len(records) == 12
    for match, record in zip(lines["sample"], records, strict=True):
        assert int(match[1]) == record["index"] and match[2] == record["id"]
        assert match[4] == record["text"] == f"answer {record['id']}"
        if record["score"] == "NaN":
            assert match[3] == "nan"
        else:
            assert match[3] == _shown(record["score"])
    # batch lines: sample ranges and means of the file's batches
    for line in lines["batch"]:
        batch_records = [r for r in records if r["batch"] == int(line[1])]
        assert (int(line[2]), int(line[3])) == (batch_records[0]["index"], batch_records[-1]["index"])
        assert line[5] == _shown(float(np.mean(_finite(batch_records))))


@pytest.mark.parametrize(
    ("show", "expected"), [("off", (0, 0, 0)), ("batch", (0, 3, 1)), ("sample", (12, 3, 1))]
)
def test_show_prints_nothing_batches_and_summary_or_every_sample(telemetry, show, expected):
    out = io.StringIO()
    with otel_ml.scores("score", show=show, telemetry=telemetry, stream=out) as scorer:
        for batch in BATCHES:
            scorer.add(batch)
    found = _lines(out)
    assert (len(found["sample"]), len(found["batch"]), len(found["summary"])) == expected
    assert len(_records(scorer.path)) == 12  # the file has every sample whatever is printed


def test_score_print_option_sets_the_default_and_show_overrides_it(tmp_path):
    t = _telemetry(tmp_path, score_print="sample")
    try:
        out = io.StringIO()
        with otel_ml.scores(telemetry=t, stream=out) as scorer:
            scorer.add([1.0, 2.0])
        assert len(_lines(out)["sample"]) == 2
        out = io.StringIO()
        with otel_ml.scores(show="off", telemetry=t, stream=out) as scorer:
            scorer.add([1.0, 2.0])
        assert out.getvalue() == ""
    finally:
        t.shutdown(timeout=2)


def test_a_bad_score_print_variable_warns_and_prints_batches(caplog):
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        cfg = Config.resolve(env={"OTEL_ML_SCORE_PRINT": "loud"})
    assert cfg.score_print == "batch"
    assert "OTEL_ML_SCORE_PRINT" in caplog.text
    with pytest.raises(ValueError, match="score_print"):
        Config.resolve(env={}, score_print="loud")


def test_nan_and_inf_scores_are_counted_excluded_printed_and_written(telemetry):
    out = io.StringIO()
    labels = {"metric": "reward", "rank": "1"}
    with otel_ml.scores("reward", show="sample", telemetry=telemetry, stream=out) as scorer:
        batch = scorer.add([float("nan"), float("inf"), float("-inf")])
        assert (batch.count, batch.nonfinite) == (0, 3)
        scorer.add(torch.tensor([2.0, float("nan")]))
    found = _lines(out)
    assert [m[3] for m in found["sample"]] == ["nan", "inf", "-inf", "2.000", "nan"]
    assert found["batch"][0][5] == "n/a" and found["batch"][0][6] == "3"
    assert found["summary"][0].groups()[2:] == ("1", "4", "2.000", "2.000", "2.000", "0.000")
    assert [r["score"] for r in _records(scorer.path)] == ["NaN", "Infinity", "-Infinity", 2.0, "NaN"]
    samples = _scrape(telemetry)
    assert _one(samples, "otel_ml_nonfinite_total", **labels) == 4
    assert _one(samples, "otel_ml_distribution_count", **labels) == 1
    assert _one(samples, "otel_ml_distribution_sum", **labels) == 2.0


def test_scores_file_rotates_at_file_max_bytes_and_keeps_file_backups(tmp_path):
    t = _telemetry(tmp_path, file_max_bytes=4096, file_backups=1)
    try:
        with otel_ml.scores(telemetry=t, show="off", stream=io.StringIO()) as scorer:
            for start in range(0, 400, 20):
                scorer.add([float(i) for i in range(start, start + 20)], texts=["x" * 100] * 20)
        directory = scorer.path.parent
        files = sorted(p.name for p in directory.glob(f"{SCORES_FILE}*"))
        assert files == [SCORES_FILE, f"{SCORES_FILE}.1"]
        assert all((directory / name).stat().st_size <= 4096 for name in files)
        assert all((directory / name).stat().st_mode & 0o077 == 0 for name in files)  # user-only
        kept = _records(directory / f"{SCORES_FILE}.1") + _records(scorer.path)
        indexes = [r["index"] for r in kept]
        assert indexes == list(range(indexes[0], 400)) and indexes[0] > 0  # the newest, whole lines
    finally:
        t.shutdown(timeout=2)


def test_texts_are_one_truncated_line_on_the_terminal_and_kept_in_the_file(telemetry):
    out = io.StringIO()
    long_text = "first line\n\tsecond " + "y" * 10_000
    with otel_ml.scores(show="sample", width=30, telemetry=telemetry, stream=out) as scorer:
        scorer.add([1.5], ids=[17], texts=[long_text])
    (match,) = _lines(out)["sample"]
    assert match[2] == "17" and match[4] == "first line second " + "y" * 9 + "..." and len(match[4]) == 30
    (record,) = _records(scorer.path)
    assert record["id"] == 17 and record["text"] == long_text[:MAX_FILE_TEXT]


def test_before_init_it_prints_and_says_once_that_nothing_is_exported(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_ML_SCORE_PRINT", "sample")  # the option still applies
    out = io.StringIO()
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        for _ in range(2):
            with otel_ml.scores(stream=out) as scorer:
                scorer.add([1.0, 3.0])
    assert scorer.path is None and list(tmp_path.iterdir()) == []
    assert [m[5] for m in _lines(out)["batch"]] == ["2.000", "2.000"] and len(_lines(out)["sample"]) == 4
    assert caplog.text.count("init() was not called") == 1
    assert scorer.summary.count == 2


def test_bad_input_is_a_clear_error(telemetry):
    with otel_ml.scores(telemetry=telemetry, stream=io.StringIO()) as scorer:
        with pytest.raises(ValueError, match="must be numbers"):
            scorer.add(["good", "bad"])
        with pytest.raises(ValueError, match="2 ids for 3 scores"):
            scorer.add([1.0, 2.0, 3.0], ids=["a", "b"])
        with pytest.raises(ValueError, match="show must be one of"):
            otel_ml.scores(show="loud", telemetry=telemetry)
        with pytest.raises(ValueError, match=r"digits 0\.\.12"):
            otel_ml.scores(digits=-1, telemetry=telemetry)
    with pytest.raises(ValueError, match="closed"):
        scorer.add([1.0])
    assert scorer.summary.samples == 0


def test_numbers_arrays_and_tensors_are_accepted_as_batches(telemetry):
    with otel_ml.scores(telemetry=telemetry, show="off", stream=io.StringIO()) as scorer:
        scorer.add(4.0, ids=torch.tensor([7]))
        scorer.add(np.array([[1.0, 2.0], [3.0, 5.0]]), ids=np.arange(4))
        scorer.add(torch.tensor([0.5, 1.5], requires_grad=True))
    assert [r["score"] for r in _records(scorer.path)] == [4.0, 1.0, 2.0, 3.0, 5.0, 0.5, 1.5]
    assert [r["id"] for r in _records(scorer.path)][:5] == [7, 0, 1, 2, 3]
    assert _one(_scrape(telemetry), "otel_ml_distribution_count", metric="score") == 7


def test_the_bar_exports_samples_done_as_progress(telemetry):
    with otel_ml.scores(total=10, desc="eval", telemetry=telemetry, show="off", stream=io.StringIO()) as s:
        s.add([1.0, 2.0, 3.0])
        samples = _scrape(telemetry)
        assert _one(samples, "otel_ml_progress_completed", task="eval") == 3
        assert _one(samples, "otel_ml_progress_total", task="eval") == 10
    assert _one(_scrape(telemetry), "otel_ml_progress_active", task="eval") == 0
    out = io.StringIO()
    otel_ml.scores(desc="part-007.tokens", telemetry=telemetry, stream=out, bar=False).close()
    (summary,) = _lines(out)["summary"]
    assert (summary["name"], summary["title"], summary["count"], summary["mean"]) == (
        "score",
        "part-007.tokens",
        "0",
        "n/a",
    )


def test_two_open_scorers_share_the_rank_file_with_whole_lines(telemetry):
    a = otel_ml.scores("score", telemetry=telemetry, show="off", stream=io.StringIO())
    b = otel_ml.scores("reward", telemetry=telemetry, show="off", stream=io.StringIO(), bar=False)
    for i in range(50):
        a.add([float(i)] * 4)
        b.add([-float(i)] * 4)
    a.close()
    b.add([99.0])
    b.close()
    records = _records(a.path)
    assert a.path == b.path and len(records) == 401
    assert sum(r["name"] == "reward" for r in records) == 201


def test_a_write_error_turns_the_file_off_with_one_warning_and_the_job_goes_on(tmp_path, caplog):
    (tmp_path / "blocker").write_text("a file where the run dir's parent should be a folder")
    t = _telemetry(tmp_path, run_dir=str(tmp_path / "blocker" / "{run_id}"))
    try:
        out = io.StringIO()
        with (
            caplog.at_level(logging.WARNING, logger="otel_ml"),
            otel_ml.scores(telemetry=t, stream=out) as scorer,
        ):
            for _ in range(3):
                scorer.add([1.0, 2.0])
        assert caplog.text.count("the scores file is off") == 1
        assert len(_lines(out)["batch"]) == 3 and scorer.summary.count == 6
        assert t.health.errors["files"] == 1 and t.health.drops["scores"] == 6
    finally:
        t.shutdown(timeout=2)


def test_merged_batch_summaries_equal_the_summary_of_all_scores():
    rng = random.Random(7)
    batches = [[rng.gauss(5, 3) for _ in range(rng.randint(1, 9))] for _ in range(30)]
    batches[3].append(float("nan"))
    summary = ScoreSummary("score")
    for batch in batches:
        summary = summary.merged(summarize(batch), len(batch))
    whole = summarize([v for batch in batches for v in batch])
    assert (summary.count, summary.nonfinite, summary.samples) == (whole.count, 1, whole.count + 1)
    assert summary.mean == pytest.approx(whole.mean) and summary.std == pytest.approx(whole.std)
    assert (summary.minimum, summary.maximum) == (whole.minimum, whole.maximum)
    assert ScoreSummary("empty").mean is None and ScoreSummary("empty").std is None


def test_lines_keep_one_sample_on_one_line():
    assert one_line("a\n  b\r\nc", 10) == "a b c"
    assert sample_line(3, 6.8, text="ok", digits=2) == "[Sample 3] Score: 6.80 | Response: ok"


def test_nonfinite_counter_of_a_score_exists_at_zero_before_any_nan(telemetry):
    with otel_ml.scores("clean", show="off", telemetry=telemetry, stream=io.StringIO()) as scorer:
        scorer.add([1.0, 2.0])
    samples = _scrape(telemetry)
    assert _one(samples, "otel_ml_nonfinite_total", metric="clean", rank="1") == 0
