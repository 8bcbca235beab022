"""``otel-ml backfill`` without Prometheus: the OpenMetrics it writes and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from otel_ml.cli.main import main
from tests.test_offline import GOLDEN_OPENMETRICS, GOLDEN_RUN


def test_openmetrics_alone_is_the_golden_conversion(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run.om"
    assert main(["backfill", str(GOLDEN_RUN), "--openmetrics", str(out)]) == 0
    assert out.read_text() == GOLDEN_OPENMETRICS.read_text()
    assert f"2 rank(s), 8 exports: 56 points in 22 series -> {out}" in capsys.readouterr().out


def test_a_missing_promtool_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["backfill", str(GOLDEN_RUN), "--out", str(tmp_path / "blocks")]) == 2
    error = capsys.readouterr().err
    assert "promtool not found on PATH" in error and "--promtool PATH" in error
    assert not (tmp_path / "blocks").exists()


def test_a_folder_that_is_not_a_run_dir_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["backfill", str(tmp_path), "--openmetrics", str(tmp_path / "x.om")]) == 2
    assert f"otel-ml: {tmp_path}: not a run dir (no rank-<N> folders in it)" in capsys.readouterr().err


def test_without_out_or_openmetrics_it_says_what_to_give(capsys: pytest.CaptureFixture) -> None:
    assert main(["backfill", str(GOLDEN_RUN)]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_bad_lines_are_reported_and_the_rest_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(GOLDEN_RUN, run)
    (run / "rank-3").mkdir()
    rotated = run / "rank-0" / "metrics.otlp.jsonl.1"
    rotated.write_text(rotated.read_text() + "{not json\n")
    live = run / "rank-1" / "metrics.otlp.jsonl"
    live.write_bytes(live.read_bytes()[:-40])
    out = tmp_path / "run.om"
    assert main(["backfill", str(run), "--openmetrics", str(out)]) == 0
    error = capsys.readouterr().err
    assert f"{rotated}:2: corrupt line" in error
    assert f"{live}:4: truncated last line" in error
    assert f"{run / 'rank-3'}: no metrics.otlp.jsonl files; rank skipped" in error
    assert "3 problem(s) above were skipped" in error
    text = out.read_text()
    assert 'otel_ml_loss{rank="0",run_id="golden"} 1.5412135124206543 1796309548.833' in text
    assert 'otel_ml_loss{rank="1",run_id="golden"} 2.976665496826172 1796309548.176' in text
    assert 'otel_ml_loss{rank="1",run_id="golden"} 1.5883395671844482' not in text  # the cut line


def test_several_run_dirs_go_into_one_openmetrics_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    second = tmp_path / "second"
    shutil.copytree(GOLDEN_RUN, second)
    for path in second.rglob("*.jsonl*"):
        path.write_text(path.read_text().replace('"golden"', '"second"'))
    out = tmp_path / "both.om"
    assert main(["backfill", str(GOLDEN_RUN), str(second), "--openmetrics", str(out)]) == 0
    text = out.read_text()
    for run_id in ("golden", "second"):
        assert text.count(f'otel_ml_loss{{rank="0",run_id="{run_id}"}}') == 2
    assert text.count("# TYPE otel_ml_loss gauge") == 1 and text.endswith("# EOF\n")
    assert "4 rank(s), 16 exports" in capsys.readouterr().out
