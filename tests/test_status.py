"""The run status file: the pure builder (fake clock), the atomic writer, the exit hooks and the
wiring in init()/shutdown()."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

import otel_ml
from otel_ml import runtime
from otel_ml.config import Config
from otel_ml.health import TelemetryHealth
from otel_ml.progress.board import BarSnapshot
from otel_ml.rundir import rank_dir
from otel_ml.signals import chained_excepthook, exception_name, install_sigterm_flush, watch_uncaught
from otel_ml.status import (
    COMPLETED,
    FAILED,
    RUNNING,
    STATUS_FILE,
    TERMINATED,
    Sample,
    StatusBuilder,
    StatusWriter,
    read_status,
    top_bar,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def bar(task="train", parent="", completed=10.0, total=100.0, rate=2.0, eta=45.0, unit="step") -> dict:
    return BarSnapshot(task, unit, parent, completed, total, rate, eta, 5.0).as_dict()


def builder(clock: Clock | None = None, **kwargs) -> StatusBuilder:
    return StatusBuilder(3, "run-a", pid=42, host="node", clock=clock or Clock(), **kwargs)


# ------------------------------------------------------------------------------ builder


def test_a_running_document_carries_identity_times_and_the_top_level_bar():
    clock = Clock(1000.0)
    b = builder(clock)
    clock.now = 1010.0
    rows = [bar("epoch-files", parent="train", total=5.0), bar("train"), bar("train", unit="row", total=None)]
    doc = b.document(Sample(bars=rows, step=9, last_step_time=1009.5, loss=0.25))
    assert (doc["rank"], doc["run_id"], doc["pid"], doc["host"]) == (3, "run-a", 42, "node")
    assert doc["state"] == RUNNING and doc["error"] is None and doc["signal"] is None
    assert (doc["start_time"], doc["updated_time"], doc["end_time"]) == (1000.0, 1010.0, None)
    assert (doc["step"], doc["last_step_time"], doc["loss"]) == (9, 1009.5, 0.25)
    assert doc["progress"] == {
        "task": "train",
        "unit": "step",
        "completed": 10.0,
        "total": 100.0,
        "rate": 2.0,
        "eta_seconds": 45.0,
        "open": True,
    }


def test_top_bar_is_the_first_row_without_parent_preferring_one_with_a_total():
    rows = [bar("inner", parent="outer"), bar("outer", unit="row", total=None), bar("outer", total=7.0)]
    assert top_bar(rows)["total"] == 7.0
    assert top_bar([bar("inner", parent="outer")]) is None
    assert top_bar([]) is None


def test_a_closed_bar_keeps_its_last_counts_without_an_eta():
    b = builder()
    b.document(Sample(bars=[bar(completed=99.0)]))
    progress = b.document(Sample(bars=[]))["progress"]
    assert progress["completed"] == 99.0 and progress["total"] == 100.0
    assert progress["open"] is False and progress["eta_seconds"] is None


def test_steps_per_second_is_the_rate_of_logged_steps_over_the_window():
    b = builder(rate_window=10.0)
    assert b.document(Sample(step=0, last_step_time=100.0))["steps_per_second"] is None
    assert b.document(Sample(step=20, last_step_time=104.0))["steps_per_second"] == pytest.approx(5.0)
    # Old samples leave the window: the rate follows the recent pace (1 step/s from t=104).
    for t in range(105, 130):
        doc = b.document(Sample(step=20 + (t - 104), last_step_time=float(t)))
    assert doc["steps_per_second"] == pytest.approx(1.0)
    # A restarted step counter (a new loop) starts the window again instead of a negative rate.
    assert b.document(Sample(step=0, last_step_time=131.0))["steps_per_second"] is None


def test_non_finite_numbers_become_null_so_the_file_stays_strict_json():
    b = builder()
    doc = b.document(Sample(loss=float("nan"), bars=[bar(rate=float("inf"))]))
    assert doc["loss"] is None and doc["progress"]["rate"] is None
    json.dumps(doc, allow_nan=False)


def test_anomaly_episodes_are_carried_with_their_steps_and_long_messages_cut():
    episode = {"type": "nonfinite", "key": "loss", "first_step": 300, "last_step": 310, "count": 11,
               "start_time": 1.0, "end_time": None, "message": "x" * 2000, "active": True}  # fmt: skip
    (row,) = builder().document(Sample(episodes=[episode]))["anomalies"]
    assert (row["type"], row["first_step"], row["last_step"], row["count"]) == ("nonfinite", 300, 310, 11)
    assert len(row["message"]) == 500


def test_failed_keeps_the_exception_and_completed_does_not_replace_it():
    clock = Clock(5.0)
    b = builder(clock)
    assert b.end(FAILED, error_type="ValueError", message="bad batch")
    clock.now = 9.0
    assert not b.end(COMPLETED)
    doc = b.document(Sample())
    assert doc["state"] == FAILED and doc["error"] == {"type": "ValueError", "message": "bad batch"}
    assert doc["end_time"] == 5.0


def test_an_exception_after_completed_replaces_it_and_the_first_abnormal_ending_wins():
    b = builder()
    b.end(COMPLETED)
    assert b.end(TERMINATED, signal="SIGTERM")
    assert not b.end(FAILED, error_type="ValueError")
    doc = b.document(Sample())
    assert (doc["state"], doc["signal"], doc["error"]) == (TERMINATED, "SIGTERM", None)
    with pytest.raises(ValueError):
        b.end(RUNNING)


# ------------------------------------------------------------------------------ writer


class Training:
    def __init__(self) -> None:
        self.step: int | None = 7
        self.last_log_time: float | None = 123.0
        self.values = {"loss": 0.5}

    def latest(self, key: str) -> float | None:
        return self.values.get(key)


def make_writer(tmp_path: Path, **kwargs) -> StatusWriter:
    kwargs.setdefault("training", Training())
    return StatusWriter(tmp_path / "rank-3", builder(), **kwargs)


def test_tick_writes_at_once_then_only_after_the_interval(tmp_path):
    mono = Clock(0.0)
    writer = make_writer(tmp_path, interval=5.0, mono=mono)
    writer.tick()
    assert read_status(tmp_path / "rank-3")["step"] == 7
    writer._training.step = 8  # type: ignore[union-attr]
    mono.now = 4.9
    writer.tick()
    assert read_status(tmp_path / "rank-3")["step"] == 7 and writer.writes == 1
    mono.now = 5.0
    writer.tick()
    assert read_status(tmp_path / "rank-3")["step"] == 8 and writer.writes == 2


class Board:
    def __init__(self) -> None:
        self.rows: list[BarSnapshot] = []
        self.last_closed: BarSnapshot | None = None
        self.snapshots = 0

    def snapshot(self) -> list[BarSnapshot]:
        self.snapshots += 1
        return list(self.rows)


def test_a_bar_closed_before_exit_shows_its_count_at_close_from_the_board(tmp_path):
    mono, board = Clock(0.0), Board()
    writer = make_writer(tmp_path, interval=5.0, mono=mono, board=board)
    board.rows = [BarSnapshot("train", "step", "", 10.0, 100.0, 2.0, 45.0, 5.0)]
    writer.tick()
    assert read_status(tmp_path / "rank-3")["progress"]["completed"] == 10.0
    mono.now = 4.0
    board.rows = []  # the loop closed its bar at 99, then the process shuts down
    board.last_closed = BarSnapshot("train", "step", "", 99.0, 100.0, 2.0, 0.5, 5.0)
    writer.finish()
    progress = read_status(tmp_path / "rank-3")["progress"]
    assert (progress["completed"], progress["open"], progress["eta_seconds"]) == (99.0, False, None)


def test_an_open_bar_wins_over_an_earlier_closed_one(tmp_path):
    board = Board()
    writer = make_writer(tmp_path, board=board)
    board.last_closed = BarSnapshot("epoch 1", "step", "", 100.0, 100.0, 2.0, 0.0, 50.0)
    board.rows = [BarSnapshot("epoch 2", "step", "", 3.0, 100.0, 2.0, 48.5, 1.5)]
    writer.write()
    progress = read_status(tmp_path / "rank-3")["progress"]
    assert (progress["task"], progress["completed"], progress["open"]) == ("epoch 2", 3.0, True)


def test_ticks_between_writes_read_the_step_only_not_the_bars(tmp_path):
    mono, board = Clock(0.0), Board()
    writer = make_writer(tmp_path, interval=5.0, mono=mono, board=board)
    board.rows = [BarSnapshot("train", "step", "", 10.0, 100.0, 2.0, 45.0, 5.0)]
    writer.tick()  # due: one write, one snapshot
    training = writer._training
    for second in (1, 2, 3, 4):
        mono.now = float(second)
        training.step, training.last_log_time = 7 + 2 * second, 123.0 + second  # type: ignore[union-attr]
        writer.tick()
    assert board.snapshots == 1 and writer.writes == 1
    mono.now = 5.0
    writer.tick()
    assert read_status(tmp_path / "rank-3")["steps_per_second"] == pytest.approx(2.0)  # from the ticks


def test_the_file_is_user_only_and_a_reader_never_sees_half_a_document(tmp_path):
    writer = make_writer(tmp_path)
    episodes = [{"type": "loss_spike", "message": "m" * 400, "first_step": i} for i in range(100)]
    writer._anomalies = type("A", (), {"episodes": lambda self: episodes})()
    writer.write()
    path = tmp_path / "rank-3" / STATUS_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    stop, bad = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except ValueError as exc:
                bad.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(200):
        writer.write()
    stop.set()
    reader.join()
    assert bad == [] and writer.writes == 201
    assert [p.name for p in path.parent.iterdir()] == [STATUS_FILE]  # no temporary file left


def test_a_failed_write_is_counted_and_warned_once_and_never_raises(tmp_path, caplog):
    (tmp_path / "rank-3").write_text("a file where the folder should be")
    health = TelemetryHealth()
    writer = make_writer(tmp_path, health=health)
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        assert writer.write() is False
        assert writer.write() is False
    assert health.errors["status"] == 2 and writer.failures == 2
    assert len([r for r in caplog.records if "status.json" in r.getMessage()]) == 1


def test_a_source_that_raises_leaves_the_previous_file_intact(tmp_path):
    writer = make_writer(tmp_path, health=TelemetryHealth())
    writer.write()

    class Broken:
        def episodes(self):
            raise RuntimeError("boom")

    writer._anomalies = Broken()
    assert writer.write() is False
    assert read_status(tmp_path / "rank-3")["step"] == 7


def test_finish_gives_up_on_a_write_stuck_on_a_hung_file_system(tmp_path, monkeypatch):
    from otel_ml import status

    release, entered = threading.Event(), threading.Event()
    real = status.write_private

    def hung(path, text):
        entered.set()
        release.wait(10)
        real(path, text)

    monkeypatch.setattr(status, "LOCK_TIMEOUT", 0.1)
    monkeypatch.setattr(status, "write_private", hung)
    health = TelemetryHealth()
    writer = make_writer(tmp_path, health=health)
    pump = threading.Thread(target=writer.write)  # the pump's periodic write, stuck
    pump.start()
    assert entered.wait(5)
    writer.finish()  # returns after LOCK_TIMEOUT instead of waiting for the stuck write
    assert writer.failures == 1 and health.errors["status"] == 1
    release.set()
    pump.join(5)
    assert read_status(tmp_path / "rank-3")["state"] == RUNNING  # what the stuck write had built


def test_finish_writes_completed_and_a_later_uncaught_exception_rewrites_failed(tmp_path):
    writer = make_writer(tmp_path)
    writer.finish()
    assert read_status(tmp_path / "rank-3")["state"] == COMPLETED
    writer.tick()  # the pump's last tick after the final write changes nothing
    writer.failed(ValueError, ValueError("bad batch"))
    status = read_status(tmp_path / "rank-3")
    assert status["state"] == FAILED and status["error"] == {"type": "ValueError", "message": "bad batch"}


def test_keyboard_interrupt_ends_as_terminated_by_sigint_and_sigterm_by_name(tmp_path):
    writer = make_writer(tmp_path)
    writer.failed(KeyboardInterrupt, KeyboardInterrupt())
    writer.finish()
    assert read_status(tmp_path / "rank-3")["signal"] == "SIGINT"
    other = StatusWriter(tmp_path / "rank-4", builder())
    other.terminated(signal.SIGTERM)
    other.finish()
    status = read_status(tmp_path / "rank-4")
    assert (status["state"], status["signal"]) == (TERMINATED, "SIGTERM")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_writes_nothing(tmp_path):
    writer = make_writer(tmp_path)
    pid = os.fork()
    if pid == 0:  # the child: a DataLoader worker, say
        os._exit(0 if writer.write() is False else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not (tmp_path / "rank-3").exists()


def test_read_status_refuses_a_file_that_is_not_a_status_document(tmp_path):
    assert read_status(tmp_path) is None
    (tmp_path / STATUS_FILE).write_text('{"state": "sleeping"}')
    with pytest.raises(ValueError):
        read_status(tmp_path)


# ------------------------------------------------------------------------------ exit hooks


def test_the_chained_excepthook_reports_then_runs_the_previous_hook_even_if_reporting_fails():
    calls = []

    def previous(*args):
        calls.append(("previous", args[0]))

    def report(exc_type, exc):
        calls.append(("report", exc_type))
        raise RuntimeError("reporting broke")

    hook = chained_excepthook(lambda: report, previous)
    hook(ValueError, ValueError("x"), None)
    assert calls == [("report", ValueError), ("previous", ValueError)]
    chained_excepthook(lambda: None, previous)(KeyError, KeyError("k"), None)
    assert calls[-1] == ("previous", KeyError)


def test_watch_uncaught_chains_sys_excepthook_once_and_swaps_the_callback(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append("previous"))
    watch_uncaught(lambda t, e: seen.append("first"))
    hook = sys.excepthook
    watch_uncaught(lambda t, e: seen.append("second"))
    assert sys.excepthook is hook
    sys.excepthook(ValueError, ValueError(), None)
    assert seen == ["second", "previous"]


def test_exception_names_are_qualified_outside_builtins():
    assert exception_name(ValueError) == "ValueError"
    assert exception_name(otel_ml.AnomalyError) == "otel_ml.anomaly.AnomalyError"


def test_sigterm_calls_on_signal_before_the_flush_then_the_previous_handler():
    order = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: order.append("previous"))
    try:
        restore = install_sigterm_flush(lambda: order.append("flush"), lambda s: order.append(("on", s)))
        os.kill(os.getpid(), signal.SIGTERM)
        assert order == [("on", signal.SIGTERM), "flush", "previous"]
        restore()
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------ init()/shutdown()


def _opts(tmp_path: Path, **extra) -> dict:
    return {"prometheus_port": 0, "run_dir": str(tmp_path / "{run_id}"), "run_id": "unit",
            "set_global_providers": False, "handle_signals": False, **extra}  # fmt: skip


def test_init_writes_running_and_shutdown_writes_completed_with_the_last_step(tmp_path):
    t = runtime.Telemetry(Config.resolve(env={}, **_opts(tmp_path, status_interval=0.5)))
    path = rank_dir(t.run_dir, t.rank) / STATUS_FILE
    for step in otel_ml.trange(5, desc="train"):
        t.log(step, loss=1.0 / (step + 1))
    t.pump._run_jobs(t.pump._jobs)  # one pump tick, as the thread runs it
    running = json.loads(path.read_text())
    assert running["state"] == RUNNING and running["step"] == 4
    t.shutdown()
    done = read_status(path.parent)
    assert done["state"] == COMPLETED and done["step"] == 4 and done["loss"] == pytest.approx(0.2)
    assert done["end_time"] >= done["start_time"]


def test_status_interval_zero_writes_no_file(tmp_path):
    t = runtime.Telemetry(Config.resolve(env={}, **_opts(tmp_path, status_interval=0)))
    t.log(0, loss=1.0)
    t.shutdown()
    assert t.status is None
    assert not (rank_dir(t.run_dir, t.rank) / STATUS_FILE).exists()


def test_status_interval_comes_from_the_environment_and_a_bad_value_falls_back(caplog):
    assert Config.resolve(env={"OTEL_ML_STATUS_INTERVAL": "0"}).status_interval == 0
    assert Config.resolve(env={"OTEL_ML_STATUS_INTERVAL": "2.5"}).status_interval == 2.5
    assert Config.resolve(env={"OTEL_ML_STATUS_INTERVAL": "2.5"}, status_interval=9).status_interval == 9
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        assert Config.resolve(env={"OTEL_ML_STATUS_INTERVAL": "-1"}).status_interval == 10.0
    assert "OTEL_ML_STATUS_INTERVAL" in caplog.text
    with pytest.raises(ValueError):
        Config(status_interval=float("inf"))
