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


def test_the_board_keeps_the_last_top_level_bar_as_it_closed(board):
    clock = FakeClock(100.0)
    assert board.last_closed is None
    outer = _bar(clock, total=3, desc="epochs", unit="epoch")
    inner = _bar(clock, total=100, desc="train", unit="batch")
    clock.now += 10
    inner.update(99)
    inner.close()  # nested: not the loop's bar
    assert board.last_closed is None
    outer.update(2)
    outer.close()
    assert (board.last_closed.task, board.last_closed.completed, board.last_closed.total) == (
        "epochs",
        2.0,
        3.0,
    )
    board.reset()
    assert board.last_closed is None


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


# ---------------------------------------------------------------- the /progress document


def _monitor(clock: FakeClock):
    from otel_ml.anomaly import AnomalyMonitor
    from otel_ml.anomaly_config import AnomalyConfig

    return AnomalyMonitor(AnomalyConfig(), rank=2, run_id="p", clock=clock)


def _episodes(monitor, clock: FakeClock, spans: list[tuple[int, int]]) -> None:
    """NaN loss on the steps of each ``(first, last)`` span, a finite one after each."""
    for first, last in spans:
        for step in range(first, last + 1):
            monitor.observations.append((step, "loss", float("nan")))
        monitor.observations.append((last + 1, "loss", 0.5))
        clock.advance(1)
        monitor.process()


def test_payload_carries_active_episodes_and_the_newest_ended_ones(board):
    from otel_ml.progress.payload import MAX_ENDED, ProgressPayload, status_from_payload

    clock = FakeClock(1000.0)
    monitor = _monitor(clock)
    _episodes(monitor, clock, [(10 * i, 10 * i + 2) for i in range(1, 9)])  # 8 ended episodes
    monitor.observations.append((300, "loss", float("inf")))
    monitor.process()
    document = ProgressPayload(board, 2, "p", anomalies=monitor).document()
    rows = json.loads(json.dumps(document))["anomalies"]
    assert [(r["first_step"], r["active"]) for r in rows] == [
        *((10 * i, False) for i in range(9 - MAX_ENDED, 9)),
        (300, True),
    ]
    assert rows[0]["last_step"] == 10 * (9 - MAX_ENDED) + 2 and rows[0]["count"] == 3
    status = status_from_payload(document)
    (active,) = status.active_anomalies()
    assert (active.type, active.key, active.first_step) == ("nonfinite", "loss", 300)
    assert active.text() == "Inf loss since step 300"  # the rank's message says which


def test_payload_messages_are_cut_and_a_document_without_sources_has_no_anomalies(board):
    from otel_ml.progress.payload import MAX_MESSAGE, ProgressPayload, bounded_episodes

    long = [{"type": "stall", "active": True, "message": "x" * 10_000}]
    assert len(bounded_episodes(long)[0]["message"]) == MAX_MESSAGE
    document = ProgressPayload(board, 0, "p").document()
    assert document["anomalies"] == [] and document["timing"] is None


class _Regions:
    """The aggregator's totals as the payload reads them (steps, step time, self time per path)."""

    def __init__(self) -> None:
        self.steps = 0
        self.step_time = 0.0
        self.totals: dict[str, float] = {}

    def self_totals(self) -> dict[str, float]:
        return dict(self.totals)

    def run(self, steps: int, per_step: dict[str, float]) -> None:
        self.steps += steps
        for path, seconds in per_step.items():
            self.totals[path] = self.totals.get(path, 0.0) + steps * seconds
            self.step_time += steps * seconds


def test_payload_timing_is_per_top_level_region_over_the_recent_window(board):
    from otel_ml.progress.payload import ProgressPayload, status_from_payload
    from otel_ml.progress.render import OUTSIDE

    clock, regions = FakeClock(0.0), _Regions()
    payload = ProgressPayload(board, 1, "p", regions=regions, clock=clock, window=20.0)
    regions.run(10, {"warmup": 5.0})  # compilation-like first steps
    assert payload.document()["timing"]["steps"] == 10  # nothing older: everything so far
    for _ in range(6):  # 30 s of steady steps: forward 20 ms (of which a module 5 ms), backward 30
        clock.advance(5)
        regions.run(100, {"forward": 0.015, "forward/layers.0": 0.005, "backward": 0.030})
        document = payload.document()
    timing = document["timing"]
    assert timing["window_s"] == pytest.approx(20.0)
    assert timing["steps"] == 400 and timing["regions_s"]["warmup"] == 0.0  # the warm-up is out
    status = status_from_payload(json.loads(json.dumps(document)))
    assert status.step_ms == pytest.approx(50.0)
    assert status.region_ms["forward"] == pytest.approx(20.0)
    assert status.region_ms["backward"] == pytest.approx(30.0)
    assert status.region_ms[OUTSIDE] == pytest.approx(0.0, abs=1e-9)


def test_an_older_document_without_anomalies_or_timing_still_reads(board):
    from otel_ml.progress.payload import status_from_payload

    status = status_from_payload({"rank": 3, "bars": [], "step": 4, "loss": 0.5})
    assert (status.rank, status.anomalies, status.step_ms, status.region_ms) == (3, [], None, {})
    bad = status_from_payload({"rank": 3, "anomalies": ["junk"], "timing": {"steps": "x"}})
    assert bad.anomalies == [] and bad.region_ms == {}


def test_progress_endpoint_names_a_rank_s_anomaly_with_its_first_step(board, tmp_path):
    import urllib.request

    t = otel_ml.init(
        prometheus_port=0, run_dir=str(tmp_path), run_id="a", set_global_providers=False, summary=False
    )
    try:
        for step in range(5):
            with otel_ml.span("forward"):
                pass
            otel_ml.log(step, loss=0.5 if step < 3 else float("nan"))
        url = t.metrics_url.replace("/metrics", "/progress")
        urllib.request.urlopen(t.metrics_url, timeout=5).read()  # a collection runs the detectors
        payload = json.loads(urllib.request.urlopen(url, timeout=5).read())
        (episode,) = payload["anomalies"]
        assert (episode["type"], episode["key"], episode["first_step"], episode["active"]) == (
            "nonfinite",
            "loss",
            3,
            True,
        )
        assert payload["timing"]["steps"] >= 3 and "forward" in payload["timing"]["regions_s"]
    finally:
        t.shutdown()
