"""Summary statistics, tree order and rendering, checked against exact fake-clock numbers."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider

import otel_ml
from otel_ml.regions import recorder as timing
from otel_ml.regions.aggregator import Aggregator
from otel_ml.regions.pathtree import PathTree
from otel_ml.regions.render import render_table, render_text
from otel_ml.regions.sampling import TraceSampler
from otel_ml.regions.stats import RESERVOIR, PathStats, percentile
from tests.support.clock import FakeClock


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(8.8)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([5.0], 95) == 5.0


def test_reservoir_keeps_a_bounded_sample_but_exact_moments():
    stats = PathStats()
    for i in range(RESERVOIR * 3):
        stats.add(float(i), 0.0, float(i))
    assert len(stats.samples) == RESERVOIR
    assert stats.count == RESERVOIR * 3 and stats.min == 0.0 and stats.max == RESERVOIR * 3 - 1


@pytest.fixture
def clocked():
    """(fake clock, installed recorder on it, aggregator without tracing); uninstalled after."""
    clock = FakeClock(0, tick=1_000_000)
    recorder = timing.Recorder(PathTree(), clock=clock)
    agg = Aggregator(
        recorder, TracerProvider(shutdown_on_exit=False).get_tracer("t"), {}, sampler=TraceSampler(0, 0)
    )
    timing.install(recorder)
    yield clock, recorder, agg
    timing.install(None)


@pytest.fixture
def timed_run(clocked):
    clock, recorder, agg = clocked
    # four steps of 10 ms: forward 6 ms (encoder 1, 2, 3, 4 ms), backward 3 ms, 1 ms untimed
    for step, encoder_ms in enumerate([1, 2, 3, 4]):
        with otel_ml.span("forward"):
            with otel_ml.span("encoder"):
                clock.advance(encoder_ms)
            clock.advance(6 - encoder_ms)
        with otel_ml.span("backward"):
            clock.advance(3)
        clock.advance(1)
        recorder.step_end(step)
    agg.process()
    return agg


def test_summary_numbers_match_the_fake_clock_exactly(timed_run):
    rows = {r.path: r for r in timed_run.summary_rows()}
    assert timed_run.steps == 4 and timed_run.step_time == pytest.approx(0.040)
    enc = rows["forward/encoder"]
    assert (enc.count, enc.min_ms, enc.max_ms) == (4, pytest.approx(1.0), pytest.approx(4.0))
    assert enc.mean_ms == pytest.approx(2.5)
    assert enc.p50_ms == pytest.approx(2.5) and enc.p95_ms == pytest.approx(3.85)
    assert enc.share_pct == pytest.approx(25.0)
    fwd = rows["forward"]
    assert fwd.mean_ms == pytest.approx(6.0) and fwd.share_pct == pytest.approx(60.0)
    assert fwd.self_share_pct == pytest.approx(35.0)
    assert rows["backward"].share_pct == pytest.approx(30.0)


def test_summary_rows_are_in_tree_order_largest_first(timed_run):
    assert [r.path for r in timed_run.summary_rows()] == ["forward", "forward/encoder", "backward"]


def test_text_summary_is_indented_by_hierarchy(timed_run):
    text = render_text(timed_run.summary_rows(), "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[3].startswith("forward ") and lines[4].startswith("  encoder ")
    assert "60.0%" in lines[3]


def test_summary_files_are_written_at_shutdown(tmp_path, capsys):

    t = otel_ml.init(
        prometheus_port=0, run_dir=str(tmp_path / "{run_id}"), run_id="sum", set_global_providers=False
    )
    for step in range(3):
        with otel_ml.span("forward"):
            pass
        otel_ml.log(step, loss=1.0)
    t.shutdown()
    document = json.loads((tmp_path / "sum" / "rank-0" / "timing-summary.json").read_text())
    assert document["run_id"] == "sum" and document["steps"] == 3
    assert [p["path"] for p in document["paths"]] == ["forward"]
    assert document["paths"][0]["count"] == 3
    text = (tmp_path / "sum" / "rank-0" / "timing-summary.txt").read_text()
    assert "forward" in text
    assert "otel_ml timing summary: rank 0" in capsys.readouterr().out


def test_live_table_shows_bars_milliseconds_and_percent():
    lines = render_table([("forward", 6.0, 60.0), ("backward", 3.0, 30.0)], "title", top=5, bar_width=10)
    assert lines[0] == "title"
    assert lines[1].startswith("forward ") and "██████····" in lines[1] and "6.00 ms" in lines[1]
    assert "60.0%" in lines[1] and "30.0%" in lines[2]


def test_a_path_timed_on_some_steps_only_is_shared_against_those_steps(clocked):
    clock, recorder, agg = clocked
    module = timing.Region("module", sampled=True)  # as trace_modules(every=2) makes it
    for step in range(4):  # 10 ms steps; "module" (2 ms) is timed on steps 0 and 2 only
        if step % 2 == 0:
            with module:
                clock.advance(2)
            clock.advance(8)
        else:
            clock.advance(10)
        recorder.step_end(step)
    agg.process()
    (row,) = agg.summary_rows()
    assert row.count == 2 and row.share_pct == pytest.approx(20.0)  # not 10%: it ran in half the steps


def test_a_phase_in_one_long_window_is_shared_against_all_step_time(clocked):
    clock, recorder, agg = clocked
    for step in range(3):  # three 10 ms training steps
        with otel_ml.span("train"):
            clock.advance(10)
        recorder.step_end(step)
    for _ in range(8):  # then an evaluation of 8 x 5 ms batches, no step boundary: 50 ms in all
        with otel_ml.span("eval/batch"):
            clock.advance(5)
    clock.advance(10)
    agg.close_last_window()
    rows = {r.path: r for r in agg.summary_rows()}
    assert rows["eval/batch"].count == 8
    # Not sampled: shares of all 80 ms of step time, whichever windows they ran in.
    assert rows["eval/batch"].share_pct == pytest.approx(50.0)
    assert rows["train"].share_pct == pytest.approx(37.5)
