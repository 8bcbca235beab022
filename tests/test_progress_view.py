"""Rendering every rank's progress (shared by rank 0's view and otel-ml top), and top's parsing."""

from __future__ import annotations

import io
import subprocess
import sys
import urllib.request

import otel_ml
from otel_ml.cli.top import from_exposition, from_targets, render_frame, slowest_rank
from otel_ml.progress.board import BarSnapshot
from otel_ml.progress.render import RankStatus, bar, compact_line, global_line, render_lines

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
    assert lines[1] == "[rank 1] train  80% ████████░░ 24/30 step [3 step/s, ETA 00:02]"
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
