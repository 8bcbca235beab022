"""Rendering every rank's progress (shared by rank 0's view and otel-ml top), and top's parsing."""

from __future__ import annotations

import io
import subprocess
import sys
import urllib.request

import pytest

import otel_ml
from otel_ml.cli.top import from_exposition, from_targets, render_frame, slowest_rank
from otel_ml.progress.board import BarSnapshot
from otel_ml.progress.render import (
    OUTSIDE,
    Flag,
    RankStatus,
    Slowest,
    anomaly_summary,
    bar,
    compact_line,
    episode_changes,
    global_line,
    region_times,
    render_lines,
    slowest,
    top_level_totals,
)

TRAIN = "train"


def _rank(rank, done, eta, rate=3.0, total=30):
    return RankStatus(rank, bars=[BarSnapshot(TRAIN, "step", "", done, total, rate, eta, 8.0)])


def test_bar_uses_eighths_and_fills_the_width():
    assert bar(0.0, 8) == "░" * 8
    assert bar(0.5, 8) == "████░░░░"
    assert bar(0.5625, 8) == "████▌░░░"
    assert bar(1.2, 8) == "█" * 8


def test_one_line_per_rank_and_a_global_line_with_the_slowest_eta():
    lines = render_lines([_rank(1, 24, 2.0), _rank(0, 26, 1.3), RankStatus(2, up=False, error="refused")])
    assert lines[0] == "[rank 0] train  87% ████████▋░ 26/30 step [3 step/s, ETA 00:01]"
    assert lines[1] == "[rank 1] train  80% ████████░░ 24/30 step [3 step/s, ETA 00:02]  ◀ slowest"
    assert lines[2] == "[rank 2] down: refused"
    assert lines[3] == "[all 2/3] train  83% ████████▎░ 50/60 step [6 step/s, ETA 00:02 (slowest: rank 1)]"


def test_nested_bars_are_indented_under_their_rank():
    status = RankStatus(
        3,
        bars=[
            BarSnapshot("inference", "file", "", 5, 10, 0.5, 10.0, 9.0),
            BarSnapshot("inference", "row", "", 500_000, None, 12_500, None, 9.0),
            BarSnapshot("data_202401.parquet", "row", "inference", 75_000, 100_000, 12_500, 2.0, 6.0),
        ],
    )
    lines = render_lines([status])
    assert (
        lines[0]
        == "[rank 3] inference  50% █████░░░░░ 5/10 file [0.5 file/s, ETA 00:10] | 500k row [12.5k row/s]"
    )
    assert (
        lines[1] == "         └ data_202401.parquet  75% ███████▌░░ 75.0k/100k row [12.5k row/s, ETA 00:02]"
    )


def test_compact_line_for_logs():
    line = compact_line([_rank(0, 26, 1.3), _rank(1, 24, 2.0)])
    assert line.startswith(
        "otel_ml ranks: 0 train 87% 26/30 ETA 00:01 | 1 train 80% 24/30 ETA 00:02 || [all 2/2]"
    )


def test_no_global_line_without_bars_that_have_a_total():
    assert global_line([RankStatus(0)]) is None
    assert render_lines([RankStatus(0)]) == ["[rank 0] no open progress bar"]


def test_slowest_rank_is_the_longest_eta():
    assert slowest_rank([_rank(0, 26, 1.3), _rank(1, 10, 9.0), _rank(2, 20, 4.0)]) == 1


def test_top_reads_a_real_exposition(monkeypatch, tmp_path):
    t = otel_ml.init(
        prometheus_port=0, run_dir=str(tmp_path), run_id="top", rank=5, set_global_providers=False
    )
    try:
        bar_ = otel_ml.tqdm(total=40, desc=TRAIN, unit="step", file=io.StringIO(), mininterval=0)
        bar_.update(10)
        otel_ml.log(10, loss=0.25, samples=64)
        otel_ml.log(11, loss=0.125, samples=64)
        text = urllib.request.urlopen(t.metrics_url, timeout=5).read().decode()
        (status,) = from_exposition(text).values()
        assert (status.rank, status.step, status.loss) == (5, 11, 0.125)
        assert status.samples_per_second is not None
        (main,) = status.bars
        assert (main.task, main.completed, main.total) == (TRAIN, 10.0, 40.0)
        frame = render_frame([status], "title")
        assert frame[2].startswith("[rank 5] train  25%")
        assert "loss 0.125" in frame[3] and "anomalies: -" in frame[3]
        bar_.close()
    finally:
        t.shutdown()


def test_unreachable_targets_are_down_rows_not_errors():
    from tests.support.net import free_port

    port = free_port()
    (status,) = from_targets([f"127.0.0.1:{port}"], timeout=1.0)
    assert not status.up and status.name == f"127.0.0.1:{port}"
    frame = render_frame([status], "title")
    assert frame[2].startswith(f"[127.0.0.1:{port}] down:")


def test_top_once_command_prints_a_frame_for_down_targets():
    from tests.support.net import free_port

    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "otel_ml.cli", "top", "--once", "--targets", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "0/1 ranks up" in out.stdout and "down" in out.stdout


def test_large_worlds_show_the_slowest_ranks_and_count_the_rest():
    from otel_ml.progress.render import slowest_first

    statuses = [_rank(r, 20, float(r)) for r in range(40)] + [RankStatus(40, up=False, error="gone")]
    shown = slowest_first(statuses, 5)
    assert [s.rank for s in shown] == [40, 39, 38, 37, 36]
    lines = render_lines(shown, total=statuses)
    assert lines[-2] == "... 36 more rank(s) on time (otel-ml top shows them all)"
    assert lines[-1].startswith("[all 40/41] train")
    assert compact_line(shown, total=statuses).count("+36 more") == 1


def test_rank_view_polls_a_bounded_rotating_subset(tmp_path):
    from otel_ml.console import Console
    from otel_ml.progress.poller import RankView

    view = RankView(
        tmp_path, 50, local=lambda: {"rank": 0, "bars": []}, console=Console(tty=False), per_cycle=16
    )
    fetched = []
    view._fetch = lambda rank: (fetched.append(rank), RankStatus(rank))[1]
    first = view.poll()
    assert len(first) == 50 and fetched == list(range(1, 17))
    view.poll()
    assert fetched[16:] == list(range(17, 33))
    assert sum(s.up for s in view.poll()) == 49  # all known after three cycles, plus the local rank


# ---------------------------------------------------------------- anomalies and the slowest rank


def _timed(rank, forward, backward, outside=5.0, **kw):
    status = _rank(rank, 15, 5.0)
    status.region_ms = {"forward": forward, "backward": backward, OUTSIDE: outside}
    status.step_ms = forward + backward + outside
    for name, value in kw.items():
        setattr(status, name, value)
    return status


NAN_LOSS = Flag("nonfinite", "loss", first_step=300, last_step=310, count=11)


def test_a_rank_s_anomaly_shows_on_its_line_and_the_global_line_counts_the_ranks():
    statuses = [_rank(0, 15, 5.0), _rank(1, 15, 5.0), _rank(2, 15, 5.0), _rank(3, 15, 5.0)]
    statuses[2].anomalies = [NAN_LOSS, Flag("loss_spike", "loss", 20, 21, 2, active=False)]
    lines = render_lines(statuses)
    assert (
        lines[2]
        == "[rank 2] train  50% █████░░░░░ 15/30 step [3 step/s, ETA 00:05]  ⚠ NaN/Inf loss since step 300"
    )
    assert "⚠" not in lines[0] + lines[1] + lines[3]  # the ended spike is not flagged
    assert lines[-1].endswith("] | 1 rank with anomalies: 2 (nonfinite)")
    statuses[0].anomalies = [Flag("stall", "step", None, None, 3)]
    assert lines != render_lines(statuses)
    assert render_lines(statuses)[-1].endswith(" | 2 ranks with anomalies: 0 (stall), 2 (nonfinite)")
    assert "0 train 50% 15/30 ETA 00:05 ⚠ stalled (no step) |" in compact_line(statuses)


def test_anomaly_texts_say_what_and_since_when():
    assert Flag("nonfinite", "grad_norm", 7).text() == "NaN/Inf grad_norm since step 7"
    assert Flag("nonfinite", "loss", 7, message="loss is nan at step 7").text() == "NaN loss since step 7"
    assert Flag("loss_plateau", "loss", 900).text() == "loss plateau since step 900"
    assert Flag("grad_explosion", "grad_norm", 5).text() == "grad explosion since step 5"
    assert Flag("kl_spike", "kl").text() == "kl spike"  # from /metrics: no step known
    assert (
        Flag.from_dict({"type": "nonfinite", "key": "loss", "first_step": 3, "active": False}).active is False
    )


def test_many_ranks_with_anomalies_are_counted_and_the_first_ones_named():
    statuses = [_rank(r, 15, 5.0) for r in range(12)]
    for status in statuses[1:]:
        status.anomalies = [NAN_LOSS]
    summary = anomaly_summary(statuses)
    assert (
        summary
        == "11 ranks with anomalies: " + ", ".join(f"{r} (nonfinite)" for r in range(1, 9)) + ", +3 more"
    )


def test_the_straggler_is_the_rank_whose_region_exceeds_the_median_not_the_ranks_waiting_for_it():
    # rank 1's forward is 20 ms slower; the others wait that long in backward's all-reduce
    statuses = [_timed(0, 7.0, 34.0), _timed(1, 27.0, 14.0), _timed(2, 7.4, 33.6), _timed(3, 7.0, 34.0)]
    assert slowest(statuses) == Slowest(1, "forward +19.8 ms/step")
    lines = render_lines(statuses)
    assert lines[1].endswith("  ◀ slowest: forward +19.8 ms/step")
    assert lines[-1].endswith("ETA 00:05 (slowest: rank 1, forward +19.8 ms/step)]")
    assert slowest_rank(statuses) == 1


def test_small_region_differences_fall_back_to_the_longest_eta():
    statuses = [_timed(0, 7.0, 34.0), _timed(1, 9.0, 32.0), _timed(2, 7.5, 33.5)]  # 2 ms of 46
    statuses[2].bars[0].eta = 9.0
    assert slowest(statuses) == Slowest(2)
    two = [_timed(0, 7.0, 34.0), _timed(1, 27.0, 14.0)]  # two ranks cannot tell who waits
    two[0].bars[0].eta = 6.0
    assert slowest(two) == Slowest(0)
    assert render_lines(two)[-1].endswith("(slowest: rank 0)]")


def test_the_time_outside_regions_counts_as_a_region():
    assert region_times({"forward": 0.2, "backward": 0.3}, 10, 0.6) == (
        pytest.approx(60.0),
        {"forward": pytest.approx(20.0), "backward": pytest.approx(30.0), OUTSIDE: pytest.approx(10.0)},
    )
    assert region_times({}, 0, 0.0) == (None, {})
    assert top_level_totals({"forward": 1.0, "forward/layers.0": 0.5, "data": 0.25}) == {
        "forward": 1.5,
        "data": 0.25,
    }


def test_ranks_with_anomalies_are_shown_before_ranks_on_time():
    from otel_ml.progress.render import slowest_first

    statuses = [_rank(r, 20, float(r)) for r in range(10)]
    statuses[0].anomalies = [NAN_LOSS]
    assert [s.rank for s in slowest_first(statuses, 3)] == [0, 9, 8]


def test_episode_changes_log_each_start_and_end_once():
    seen: dict = {}
    status = _rank(2, 15, 5.0)
    status.anomalies = [Flag("nonfinite", "loss", 300, 300, 1, start_time=100.0)]
    assert episode_changes(seen, [status]) == [
        "otel_ml: rank 2 anomaly: NaN/Inf loss since step 300 (nonfinite)"
    ]
    status.anomalies = [Flag("nonfinite", "loss", 300, 350, 51, start_time=100.0)]
    assert episode_changes(seen, [status]) == []  # still going: nothing new
    status.anomalies = [Flag("nonfinite", "loss", 300, 420, 121, active=False, start_time=100.0)]
    assert episode_changes(seen, [status]) == [
        "otel_ml: rank 2 anomaly ended: nonfinite on loss, steps 300-420, 121 value(s)"
    ]
    assert episode_changes(seen, [status]) == []
    # started and ended between two polls: both lines; a down rank keeps what was seen
    status.anomalies.append(Flag("loss_spike", "loss", 500, 501, 2, active=False, start_time=200.0))
    assert episode_changes(seen, [RankStatus(2, up=False)]) == []
    assert episode_changes(seen, [status]) == [
        "otel_ml: rank 2 anomaly: loss spike since step 500 (loss_spike)",
        "otel_ml: rank 2 anomaly ended: loss_spike on loss, steps 500-501, 2 value(s)",
    ]


def _view(tmp_path, tty: bool, document: dict):
    from otel_ml.console import Console
    from otel_ml.progress.poller import RankView

    out = io.StringIO()
    return RankView(tmp_path, 1, local=lambda: document, console=Console(out, tty=tty)), out


def test_off_a_terminal_the_view_writes_one_line_when_an_anomaly_starts_and_one_when_it_ends(tmp_path):
    episode = {"type": "nonfinite", "key": "loss", "first_step": 3, "last_step": 3, "count": 1}
    document = {"rank": 0, "bars": [], "anomalies": [{**episode, "start_time": 5.0, "active": True}]}
    view, out = _view(tmp_path, False, document)
    for _ in range(3):
        view.log_changes(view.poll())
    assert out.getvalue() == "otel_ml: rank 0 anomaly: NaN/Inf loss since step 3 (nonfinite)\n"
    document["anomalies"] = [
        {**episode, "last_step": 9, "count": 7, "start_time": 5.0, "end_time": 8.0, "active": False}
    ]
    view.log_changes(view.poll())
    view.log_changes(view.poll())
    assert out.getvalue().splitlines()[1:] == [
        "otel_ml: rank 0 anomaly ended: nonfinite on loss, steps 3-9, 7 value(s)"
    ]
    terminal, screen = _view(tmp_path, True, document)
    terminal.log_changes(terminal.poll())
    assert screen.getvalue() == ""  # a terminal shows it on the redrawn rank line instead


def test_top_flags_a_rank_s_anomaly_read_from_its_metrics(tmp_path):
    t = otel_ml.init(
        prometheus_port=0,
        run_dir=str(tmp_path),
        run_id="topa",
        rank=2,
        set_global_providers=False,
        summary=False,
    )
    try:
        bar_ = otel_ml.tqdm(total=40, desc=TRAIN, unit="step", file=io.StringIO(), mininterval=0)
        for step in range(4):
            with otel_ml.span("forward"):
                bar_.update(1)
            otel_ml.log(step, loss=float("nan") if step >= 2 else 0.5)
        urllib.request.urlopen(t.metrics_url, timeout=5).read()  # the detectors run at collection
        (status,) = from_exposition(urllib.request.urlopen(t.metrics_url, timeout=5).read().decode()).values()
        assert [f.type for f in status.active_anomalies()] == ["nonfinite"]
        assert "forward" in status.region_ms and status.step_ms is not None
        frame = render_frame([status], "title")
        assert frame[2].endswith("⚠ NaN/Inf values") and "anomalies: nonfinite" in frame[3]
        assert frame[-1].endswith(" | 1 rank with anomalies: 2 (nonfinite)")
        bar_.close()
    finally:
        t.shutdown()
