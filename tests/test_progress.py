"""otel_ml.tqdm: exported rows and series, nesting, many short-lived bars, disable, ranks."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.sdk.metrics import MeterProvider

import otel_ml
from otel_ml.collection import Collection, PullReader
from otel_ml.progress import board as progress
from otel_ml.progress.board import (
    OVERFLOW,
    BarSnapshot,
    rate_and_eta,
)
from otel_ml.progress.metrics import ProgressGauges
from tests.support.clock import FakeClock
from tests.support.metrics import points, value


@pytest.fixture
def board():
    """The process board (fresh: the suite resets process state) with a budget of 5 tasks."""
    progress.board.max_tasks = 5
    return progress.board


def _bar(clock: FakeClock, **kwargs) -> progress.tqdm:
    bar = otel_ml.tqdm(file=io.StringIO(), mininterval=0, smoothing=0, **kwargs)
    bar._time = clock  # tqdm reads time through this attribute; the test owns the clock
    bar.start_t = bar.last_print_t = clock()
    return bar


def test_rate_and_eta():
    assert rate_and_eta(40, 100, 10.0, None) == (4.0, 15.0)
    assert rate_and_eta(40, 100, 10.0, 8.0) == (8.0, 7.5)  # tqdm's smoothed rate wins
    assert rate_and_eta(40, None, 10.0, None) == (4.0, None)  # no total: no ETA
    assert rate_and_eta(0, 100, 0.0, None) == (None, None)
    assert rate_and_eta(120, 100, 10.0, None) == (12.0, 0.0)


def test_a_bar_exports_done_total_rate_eta_and_elapsed(board):
    clock = FakeClock(100.0)
    bar = _bar(clock, total=100, desc="train", unit="batch")
    clock.now += 10
    bar.update(40)
    (row,) = board.snapshot()
    assert row == BarSnapshot("train", "batch", "", 40.0, 100.0, 4.0, 15.0, 10.0)
    bar.close()
    assert board.snapshot() == []
    assert board.active == {"train": 0}


def test_series_carry_rank_run_id_task_unit_and_parent(board):
    clock = FakeClock(100.0)
    collection = Collection()
    reader = PullReader(collection)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    gauges = ProgressGauges(provider.get_meter("t"), {"rank": "2", "run_id": "r"}, board)
    collection.register(prepare=gauges.prepare)
    bar = _bar(clock, total=50, desc="train:", unit="step")
    clock.now += 5
    bar.update(10)
    got = points(reader)
    labels = {"rank": "2", "run_id": "r", "task": "train", "unit": "step", "parent": ""}
    assert value(got, "otel_ml_progress_completed", **labels) == 10
    assert value(got, "otel_ml_progress_total", **labels) == 50
    assert value(got, "otel_ml_progress_rate_per_second", **labels) == 2.0
    assert value(got, "otel_ml_progress_eta_seconds", **labels) == 20.0
    assert value(got, "otel_ml_progress_elapsed_seconds", **labels) == 5.0
    assert value(got, "otel_ml_progress_active", rank="2", run_id="r", task="train") == 1
    bar.close()
    got = points(reader)
    assert not got.get("otel_ml_progress_completed")  # closed bars stop exporting
    assert value(got, "otel_ml_progress_active", task="train") == 0


def test_nested_bars_report_files_and_rows_per_file_and_overall(board):
    clock = FakeClock(100.0)
    outer = _bar(clock, total=4, desc="inference", unit="file")
    for name in ("a.parquet", "b.parquet"):
        inner = _bar(clock, total=100, desc=name, unit="row", leave=False)
        clock.now += 1
        inner.update(100)
        inner.close()
        outer.update(1)
    inner = _bar(clock, total=100, desc="c.parquet", unit="row", leave=False)
    clock.now += 1
    inner.update(75)
    rows = {(r.task, r.unit): r for r in board.snapshot()}
    assert rows[("inference", "file")].completed == 2 and rows[("inference", "file")].total == 4
    overall = rows[("inference", "row")]
    assert overall.completed == 275 and overall.total is None and overall.parent == ""
    assert overall.rate == pytest.approx(275 / 3)
    current = rows[("c.parquet", "row")]
    assert (current.completed, current.total, current.parent) == (75, 100, "inference")
    inner.close()
    outer.close()


def test_many_short_lived_bars_are_capped_with_one_warning(board, caplog):
    caplog.set_level(logging.WARNING, logger="otel_ml")
    clock = FakeClock(100.0)
    for i in range(20):
        bar = _bar(clock, total=10, desc=f"file-{i:03d}.parquet", unit="row", leave=False)
        bar.update(10)
        bar.close()
    assert len(board.active) == 6  # 5 tasks + the overflow bucket
    assert OVERFLOW in board.active and set(board.active.values()) == {0}
    assert caplog.text.count("distinct progress tasks") == 1
    assert board.snapshot() == []


def test_disabled_bars_are_not_tracked(board):
    bar = otel_ml.tqdm(range(3), disable=True)
    assert list(bar) == [0, 1, 2]
    assert board.snapshot() == [] and board.active == {}


def test_iteration_updates_reach_the_snapshot_and_trange_works(board):
    bar = otel_ml.trange(5, desc="loop", file=io.StringIO(), mininterval=0, miniters=1)
    seen = []
    for _ in bar:
        seen.append(board.snapshot()[0].completed)
    assert seen == [0.0, 1.0, 2.0, 3.0, 4.0]  # tqdm updates n at its own cadence (every step here)
    assert board.active == {"loop": 0}


def test_other_ranks_print_nothing_but_still_export(board, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    bar = otel_ml.tqdm(total=10, desc="train", mininterval=0)
    bar.update(5)
    bar.close()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert board.active == {"train": 0}


def test_rank_zero_output_is_plain_tqdm(board, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    ours, theirs = io.StringIO(), io.StringIO()
    from tqdm import tqdm as plain

    for target, cls in ((ours, otel_ml.tqdm), (theirs, plain)):
        bar = cls(total=4, desc="x", file=target, bar_format="{desc} {n}/{total}", mininterval=0)
        bar.update(2)
        bar.close()
    assert ours.getvalue() == theirs.getvalue()


def test_progress_endpoint_serves_the_open_bars(board, tmp_path):
    import urllib.request

    t = otel_ml.init(
        prometheus_port=0, run_dir=str(tmp_path), run_id="p", set_global_providers=False, summary=False
    )
    try:
        bar = otel_ml.tqdm(total=8, desc="train", file=io.StringIO())
        bar.update(3)
        otel_ml.log(7, loss=0.5)
        url = t.metrics_url.replace("/metrics", "/progress")
        payload = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert (payload["rank"], payload["run_id"], payload["step"], payload["loss"]) == (0, "p", 7, 0.5)
        assert [(b["task"], b["completed"], b["total"]) for b in payload["bars"]] == [("train", 3.0, 8.0)]
        bar.close()
    finally:
        t.shutdown()
