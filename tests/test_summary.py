"""Summary statistics, tree order and rendering, checked against exact fake-clock numbers."""

from __future__ import annotations

import io
import json
import re
import threading

import pytest
from opentelemetry.sdk.trace import TracerProvider

import otel_ml
from otel_ml.console import Console
from otel_ml.regions import recorder as timing
from otel_ml.regions.aggregator import Aggregator
from otel_ml.regions.pathtree import PathTree
from otel_ml.regions.render import (
    OTHER,
    FirstStep,
    TimingTable,
    WindowShare,
    render_line,
    render_table,
    render_text,
)
from otel_ml.regions.sampling import TraceSampler
from otel_ml.regions.stats import OUTSIDE, RESERVOIR, PathStats, outside, percentile, summary_document
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
    assert not document["paths"][0]["sampled"] and document["paths"][0]["timed_steps"] == 3
    rest = document["outside_regions"]
    assert rest["steps"] == 3
    assert document["paths"][0]["total_ms"] + rest["total_ms"] == pytest.approx(document["step_time_s"] * 1e3)
    text = (tmp_path / "sum" / "rank-0" / "timing-summary.txt").read_text()
    assert "forward" in text
    assert f"{rest['share_pct']:.1f}%" in text.splitlines()[-1] and text.splitlines()[-1].startswith(OUTSIDE)
    assert "otel_ml timing summary: rank 0" in capsys.readouterr().out


def test_live_table_shows_bars_milliseconds_and_percent_indented_by_hierarchy():
    shares = [
        WindowShare("forward", "forward", 1, 6.0, 60.0),
        WindowShare("forward/layers.1", "layers.1", 2, 6.02, 30.1, sampled=True, timed_steps=2, steps=16),
        WindowShare(OUTSIDE, OUTSIDE, 1, 4.0, 40.0),
    ]
    lines = render_table(shares, "title", bar_width=10)
    assert lines[0] == "title"
    assert lines[1].startswith("forward ") and "██████····" in lines[1] and "6.00 ms/step" in lines[1]
    assert "60.0%" in lines[1]
    assert lines[2].startswith("  layers.1 ") and lines[2].endswith(
        "6.02 ms/timed step  30.1% (sampled 2/16)"
    )
    assert lines[3].startswith(OUTSIDE) and "40.0%" in lines[3]
    line = render_line(shares, "title")
    assert "forward/layers.1 6.02ms/timed step 30.1% (sampled 2/16)" in line


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
    assert row.sampled and row.timed_steps == 2 and row.ms_per_step == pytest.approx(2.0)  # not 1.0
    rest = outside([row], agg.step_time, agg.steps)
    assert rest.total_ms == pytest.approx(36.0)  # the module's untimed steps are outside any region
    assert "sampled 2/4" in render_text([row], "title", rest).splitlines()[3]
    (path,) = summary_document([row], {}, rest)["paths"]
    assert (path["sampled"], path["timed_steps"], path["ms_per_step"]) == (True, 2, pytest.approx(2.0))


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


def _printed_shares(text: str) -> dict[str, float]:
    """Share column of the top-level rows (no indentation) of a printed summary, by name."""
    shares = {}
    for line in text.splitlines()[3:]:
        match = re.match(r"(\(outside regions\)|\S+)\s.*?(-?\d+\.\d)%", line)
        if match and not line.startswith(" "):
            shares[match.group(1)] = float(match.group(2))
    return shares


def test_top_level_rows_and_the_outside_row_add_up_to_all_step_time(timed_run):
    rows = timed_run.summary_rows()
    rest = outside(rows, timed_run.step_time, timed_run.steps)
    assert rest.total_ms == pytest.approx(4.0) and rest.ms_per_step == pytest.approx(1.0)
    assert rest.share_pct == pytest.approx(10.0) and rest.covered_pct == pytest.approx(90.0)
    text = render_text(rows, "title", rest)
    assert text.splitlines()[-1].startswith(OUTSIDE)
    assert _printed_shares(text) == {"forward": 60.0, "backward": 30.0, OUTSIDE: 10.0}
    document = summary_document(rows, {"step_time_s": timed_run.step_time}, rest)
    top_level = sum(p["total_ms"] for p in document["paths"] if p["depth"] == 1)
    assert top_level + document["outside_regions"]["total_ms"] == pytest.approx(40.0)
    assert document["outside_regions"]["share_pct"] == pytest.approx(10.0)


def test_shares_add_up_when_a_region_spans_a_step_boundary_and_a_step_has_no_regions(clocked):
    clock, recorder, agg = clocked
    with otel_ml.span("load"):  # 3 ms in step 0, 2 ms in step 1
        clock.advance(3)
        recorder.step_end(0)
        clock.advance(2)
    with otel_ml.span("forward"):
        clock.advance(4)
    clock.advance(1)
    recorder.step_end(1)
    clock.advance(10)  # step 2: no region at all
    recorder.step_end(2)
    with otel_ml.span("backward"):
        clock.advance(5)
    clock.advance(5)
    recorder.step_end(3)
    agg.process()
    rows = agg.summary_rows()
    rest = outside(rows, agg.step_time, agg.steps)
    assert agg.step_time == pytest.approx(0.030)
    assert rest.total_ms == pytest.approx(16.0)  # 30 ms of steps, 14 in load, forward, backward
    shares = _printed_shares(render_text(rows, "title", rest))
    assert set(shares) == {"load", "forward", "backward", OUTSIDE}
    assert sum(shares.values()) == pytest.approx(100.0, abs=0.2)


def test_overlapping_top_level_regions_are_reported_not_hidden(clocked):
    clock, recorder, agg = clocked
    entered, forward_closed = threading.Event(), threading.Event()

    def loader():  # another thread: 8 ms of loading while the main thread runs 5 ms of forward
        with otel_ml.span("loader"):
            entered.set()
            forward_closed.wait(5)
            clock.advance(3)

    forward = otel_ml.span("forward")
    forward.__enter__()
    thread = threading.Thread(target=loader)
    thread.start()
    entered.wait(5)
    clock.advance(5)
    forward.__exit__(None, None, None)
    forward_closed.set()
    thread.join(5)
    clock.advance(2)
    recorder.step_end(0)
    agg.process()
    rows = agg.summary_rows()
    rest = outside(rows, agg.step_time, agg.steps)
    assert rest.total_ms == 0.0 and rest.covered_pct == pytest.approx(130.0)
    assert "top-level regions overlap (several threads): they cover 130.0% of step time" in render_text(
        rows, "title", rest
    )


def _refreshes(stream: io.StringIO) -> list[dict[str, tuple[float, str, float, str | None]]]:
    """The live table's one-line refreshes: path -> (ms, unit, percent, 'timed/steps' or None)."""
    row = re.compile(
        r"(\(outside regions\)|\(other regions\)|\S+) (\d+\.\d+)(ms/step|ms/timed step) (\d+\.\d+)%"
        r"(?: \(sampled (\d+/\d+)\))?"
    )
    return [
        {m[0]: (float(m[1]), m[2], float(m[3]), m[4] or None) for m in row.findall(line)}
        for line in stream.getvalue().splitlines()
        if line.startswith("otel_ml timing:")
    ]


@pytest.fixture
def table(clocked):
    """(clock, recorder, aggregator, console stream, make): ``make(every, top)`` adds a live table."""
    clock, recorder, _ = clocked
    stream = io.StringIO()
    made = {}

    def make(every: int, top: int = 10) -> Aggregator:
        made["agg"] = Aggregator(
            recorder,
            TracerProvider(shutdown_on_exit=False).get_tracer("t"),
            {},
            sampler=TraceSampler(0, 0),
            on_window=[TimingTable(Console(stream, tty=False), every=every, top=top)],
        )
        return made["agg"]

    return clock, recorder, stream, make


def _top_level_sum(refresh: dict) -> float:
    return sum(pct for path, (_, unit, pct, _) in refresh.items() if "/" not in path and unit == "ms/step")


def test_live_table_shows_each_refresh_its_own_steps_when_one_drain_closes_many(table):
    clock, recorder, stream, make = table
    agg = make(every=2)
    for step, forward_ms in enumerate([5, 5, 1, 1]):  # 10 ms steps; the pump drains them all at once
        with otel_ml.span("forward"):
            clock.advance(forward_ms)
        clock.advance(10 - forward_ms)
        recorder.step_end(step)
    agg.process()
    first, second = _refreshes(stream)
    titles = [line for line in stream.getvalue().splitlines() if line.startswith("otel_ml timing:")]
    assert "the first step counts from init()" in titles[0] and "init()" not in titles[1]
    assert first == {"forward": (5.0, "ms/step", 50.0, None), OUTSIDE: (5.0, "ms/step", 50.0, None)}
    assert second == {"forward": (1.0, "ms/step", 10.0, None), OUTSIDE: (9.0, "ms/step", 90.0, None)}


def test_live_table_shows_sampled_module_rows_per_timed_step(table):
    clock, recorder, stream, make = table
    agg = make(every=4)
    module = timing.Region("layers.1", sampled=True)  # as trace_modules(every=2) makes it
    for step in range(4):  # 10 ms steps: forward 5 ms, with the 2 ms module timed on steps 0 and 2
        with otel_ml.span("forward"):
            if step % 2 == 0:
                with module:
                    clock.advance(2)
                clock.advance(3)
            else:
                clock.advance(5)
        clock.advance(5)
        recorder.step_end(step)
    agg.process()
    (refresh,) = _refreshes(stream)
    assert refresh["forward/layers.1"] == (2.0, "ms/timed step", 20.0, "2/4")  # not 1.0 ms, 10%
    assert refresh["forward"] == (5.0, "ms/step", 50.0, None)
    assert refresh[OUTSIDE] == (5.0, "ms/step", 50.0, None)
    assert _top_level_sum(refresh) == pytest.approx(100.0, abs=0.2)


def test_live_table_adds_up_with_regions_across_steps_and_steps_without_regions(table):
    clock, recorder, stream, make = table
    agg = make(every=4)
    with otel_ml.span("load"):  # across the boundary of steps 0 and 1
        clock.advance(3)
        recorder.step_end(0)
        clock.advance(4)
    clock.advance(3)
    recorder.step_end(1)
    clock.advance(10)  # no regions
    recorder.step_end(2)
    with otel_ml.span("optimizer"):
        clock.advance(1)
    clock.advance(9)
    recorder.step_end(3)
    agg.process()
    (refresh,) = _refreshes(stream)
    assert set(refresh) == {"load", "optimizer", OUTSIDE}
    assert refresh[OUTSIDE][2] == pytest.approx(73.3)  # 8 of the 30 ms in regions
    assert _top_level_sum(refresh) == pytest.approx(100.0, abs=0.2)


def test_live_table_merges_top_level_paths_past_top_so_the_shares_still_add_up(table):
    clock, recorder, stream, make = table
    agg = make(every=1, top=2)
    for name, ms in (("a", 4), ("b", 3), ("c", 2), ("d", 1)):
        with otel_ml.span(name):
            clock.advance(ms)
    clock.advance(10)
    recorder.step_end(0)
    agg.process()
    (refresh,) = _refreshes(stream)
    assert list(refresh) == ["a", "b", OTHER, OUTSIDE]
    assert refresh[OTHER] == (3.0, "ms/step", 15.0, None)
    assert _top_level_sum(refresh) == pytest.approx(100.0, abs=0.2)


def test_the_setup_before_the_first_step_is_shown_apart_in_the_outside_row(clocked):
    clock, recorder, _ = clocked
    first = FirstStep()
    agg = Aggregator(
        recorder,
        TracerProvider(shutdown_on_exit=False).get_tracer("t"),
        {},
        sampler=TraceSampler(0, 0),
        on_window=[first],
    )
    clock.advance(25)  # init() to the loop: building the model, the process group
    for step in range(3):  # 10 ms steps: forward 6 ms, 4 ms outside
        with otel_ml.span("forward"):
            clock.advance(6)
        clock.advance(4)
        recorder.step_end(step)
    agg.process()
    assert first.outside == pytest.approx(0.029)  # the 25 ms of setup and the step's own 4 ms
    rows = agg.summary_rows()
    rest = outside(rows, agg.step_time, agg.steps, first.outside)
    assert rest.total_ms == pytest.approx(37.0) and rest.first_step_ms == pytest.approx(29.0)
    last = render_text(rows, "title", rest).splitlines()[-1]
    assert last.startswith(OUTSIDE) and last.endswith(
        "67.3%  52.7% in the first step, which counts from init()"
    )
    assert summary_document(rows, {}, rest)["outside_regions"]["first_step_ms"] == pytest.approx(29.0)


def test_live_table_says_so_when_a_region_from_an_earlier_refresh_makes_the_rows_overlap(table):
    clock, recorder, stream, make = table
    agg = make(every=1)
    with otel_ml.span("load"):  # 3 ms in step 0, 4 ms in step 1: counted where it ends
        clock.advance(3)
        recorder.step_end(0)
        clock.advance(4)
    clock.advance(1)
    recorder.step_end(1)
    agg.process()
    first, second = _refreshes(stream)
    assert first == {OUTSIDE: (3.0, "ms/step", 100.0, None)}
    assert second == {"load": (7.0, "ms/step", 140.0, None), OUTSIDE: (0.0, "ms/step", 0.0, None)}
    title = stream.getvalue().splitlines()[1]
    assert title.startswith(
        "otel_ml timing: last 1 steps (to step 1), 5.00 ms/step; top-level regions cover 140%"
    )
