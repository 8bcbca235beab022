"""``otel-ml inspect``: reports from status files and, without them, from the metrics files."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest

import otel_ml
from otel_ml import runtime
from otel_ml.cli import inspect
from otel_ml.cli.main import main
from otel_ml.config import Config
from otel_ml.rundir import rank_dir
from otel_ml.status import STATUS_FILE, Sample, StatusBuilder


def status_doc(rank: int, *, state="running", step=99, loss=0.5, rate=10.0, timing=None, episodes=(),
               error=None, signal=None, bar=None) -> dict:  # fmt: skip
    builder = StatusBuilder(rank, "r", pid=1, host="h", clock=lambda: 50.0)
    if state == "failed":
        builder.end("failed", error_type=error[0], message=error[1])
    elif state == "terminated":
        builder.end("terminated", signal=signal)
    elif state == "completed":
        builder.end("completed")
    doc = builder.document(Sample(step=step, loss=loss, episodes=list(episodes), timing=timing,
                                  bars=[bar] if bar else []))  # fmt: skip
    doc["steps_per_second"] = rate
    return doc


def write_run(tmp_path: Path, docs: list[dict]) -> Path:
    for doc in docs:
        directory = rank_dir(tmp_path, doc["rank"])
        directory.mkdir(parents=True)
        (directory / STATUS_FILE).write_text(json.dumps(doc))
    return tmp_path


NAN_EPISODE = {"type": "nonfinite", "key": "loss", "first_step": 300, "last_step": 599, "count": 300,
               "start_time": 1.0, "end_time": None, "message": "loss is nan", "active": True}  # fmt: skip


def test_each_rank_shows_state_steps_loss_throughput_and_anomalies_with_their_steps(tmp_path):
    bar = {"task": "train", "unit": "step", "parent": "", "completed": 600.0, "total": 600.0,
           "rate": 9.0, "eta": 0.0, "elapsed": 60.0}  # fmt: skip
    run = write_run(
        tmp_path,
        [
            status_doc(0, state="completed", step=599, bar=bar),
            status_doc(1, state="failed", error=("ValueError", "bad batch"), step=120),
            status_doc(2, state="terminated", signal="SIGTERM", episodes=[NAN_EPISODE], loss=None),
        ],
    )
    lines = inspect.render(inspect.report(run))
    assert lines[0] == "rank 0: completed; step 599, 600/600 step; loss 0.5; 10 step/s"
    assert lines[1] == "  anomalies: none"
    assert lines[2].startswith("rank 1: failed (ValueError: bad batch); step 120;")
    assert lines[4].startswith("rank 2: terminated (SIGTERM); step 99; loss -;")
    assert lines[5] == "  anomalies: nonfinite (loss) steps 300-599, 300x, active"


def test_json_names_the_anomaly_with_its_first_step(tmp_path, capsys):
    run = write_run(tmp_path, [status_doc(0), status_doc(2, episodes=[NAN_EPISODE])])
    assert main(["inspect", "--json", str(run)]) == 0
    document = json.loads(capsys.readouterr().out)
    (episode,) = document["ranks"][1]["anomalies"]
    assert (document["ranks"][1]["rank"], episode["type"], episode["first_step"]) == (2, "nonfinite", 300)
    assert document["ranks"][0]["state"] == "running" and document["problems"] == []


def test_the_slowest_rank_is_the_one_whose_region_takes_longest_above_the_median():
    timing = {"step_ms": 100.0, "regions_ms": {"forward": 30.0, "backward": 60.0}}
    slow = {"step_ms": 100.0, "regions_ms": {"forward": 45.0, "backward": 45.0}}
    ranks = [inspect.from_status(r, status_doc(r, timing=t)) for r, t in enumerate([timing, slow, timing])]
    assert inspect.slowest(ranks) == {"rank": 1, "reason": "forward +15.0 ms/step"}


def test_without_timing_the_slowest_rank_is_the_lowest_throughput_well_below_the_median():
    ranks = [inspect.from_status(r, status_doc(r, rate=rate)) for r, rate in enumerate([10.0, 7.0, 10.1])]
    assert inspect.slowest(ranks)["rank"] == 1
    close = [inspect.from_status(r, status_doc(r, rate=rate)) for r, rate in enumerate([10.0, 9.8, 10.1])]
    assert inspect.slowest(close) is None  # noise, not a straggler
    assert inspect.slowest(close[:1]) is None


def test_the_text_report_names_the_slowest_rank(tmp_path, capsys):
    run = write_run(tmp_path, [status_doc(r, rate=rate) for r, rate in enumerate([10.0, 5.0])])
    assert main(["inspect", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "slowest: rank 1 (5 step/s, median 7.5)"


def test_a_run_without_status_files_is_read_from_its_metrics_files(tmp_path, capsys):
    opts = {"prometheus_port": 0, "run_dir": str(tmp_path / "{run_id}"), "run_id": "old", "files": "on",
            "status_interval": 0, "set_global_providers": False, "handle_signals": False}  # fmt: skip
    t = runtime.Telemetry(Config.resolve(env={}, **opts))
    for step in range(20):
        t.log(step, loss=float("nan") if step >= 15 else 2.0 - step / 10, samples=8)
    t.shutdown()
    assert main(["inspect", "--json", str(t.run_dir)]) == 0
    (rank,) = json.loads(capsys.readouterr().out)["ranks"]
    assert (rank["source"], rank["state"], rank["step"]) == ("metrics", None, 19)
    assert rank["loss"] == pytest.approx(0.6)
    assert [(a["type"], a["count"], a["active"], a["first_step"]) for a in rank["anomalies"]] == [
        ("nonfinite", 1, True, None)
    ]
    assert main(["inspect", str(t.run_dir)]) == 0
    assert capsys.readouterr().out.startswith("rank 0: no status file; step 19; loss 0.6;")


def test_an_unreadable_status_file_is_reported_and_the_metrics_files_used(tmp_path, capsys):
    directory = rank_dir(tmp_path, 0)
    directory.mkdir(parents=True)
    (directory / STATUS_FILE).write_text('{"state": "runn')
    assert main(["inspect", "--json", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ranks"][0]["source"] == "none"
    assert "status.json unreadable" in captured.err


def test_a_folder_without_ranks_is_an_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no rank-* directories" in capsys.readouterr().err


def test_a_real_run_reports_completed_with_its_bar(tmp_path, capsys):
    opts = {"prometheus_port": 0, "run_dir": str(tmp_path / "{run_id}"), "run_id": "live",
            "set_global_providers": False, "handle_signals": False}  # fmt: skip
    t = runtime.Telemetry(Config.resolve(env={}, **opts))
    bar = otel_ml.tqdm(total=10, desc="train", file=io.StringIO())
    for step in range(4):
        bar.update()
        t.log(step, loss=1.0)
    t.pump._run_jobs(t.pump._jobs)
    bar.close()
    t.shutdown()
    assert main(["inspect", "--json", str(t.run_dir)]) == 0
    (rank,) = json.loads(capsys.readouterr().out)["ranks"]
    assert (rank["state"], rank["step"], rank["completed"], rank["total"]) == ("completed", 3, 4.0, 10.0)
    assert rank["bar_open"] is False
    assert main(["inspect", str(t.run_dir)]) == 0
    assert "step 3 (bar closed, last seen at 4/10 it);" in capsys.readouterr().out


def test_a_running_rank_whose_process_is_gone_or_silent_is_shown_as_running_with_a_question(tmp_path):
    host = socket.gethostname()
    gone = {**status_doc(0), "host": host, "pid": 111, "updated_time": 1000.0}
    silent = {**status_doc(1), "host": host, "pid": 222, "updated_time": 900.0}
    elsewhere = {**status_doc(2), "host": "other-node", "pid": 333, "updated_time": 999.0}
    done = {**status_doc(3, state="completed"), "host": host, "pid": 111, "updated_time": 10.0}
    run = write_run(tmp_path, [gone, silent, elsewhere, done])
    document = inspect.report(run, now=1030.0, alive=lambda pid: pid != 111)
    ranks = document["ranks"]
    assert [(r["stale_seconds"], r["process_alive"]) for r in ranks] == [
        (30.0, False), (130.0, True), (31.0, None), (None, None)
    ]  # fmt: skip
    lines = inspect.render(document)
    assert lines[0].startswith("rank 0: running? (its process is gone, last update 30 s ago")
    assert lines[2].startswith("rank 1: running? (no update for 130 s);")
    assert lines[4].startswith("rank 2: running;") and lines[6].startswith("rank 3: completed;")
