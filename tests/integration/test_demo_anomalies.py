"""When something goes wrong on one rank, rank 0's terminal says so: a real 4-rank demo (gloo) with
a NaN loss on rank 2 and a slow forward on rank 1, rank 0's output captured as a log (not a tty)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.support.demo import demo_command, demo_env
from tests.support.net import free_port_block

pytestmark = pytest.mark.integration

RANKS, STEPS, NAN_STEP = 4, 200, 60


def test_rank_zero_log_names_the_nan_rank_with_its_first_step_and_the_slow_rank(tmp_path, processes):
    run_dir = tmp_path / "anomalies"
    env = demo_env(run_dir, free_port_block(RANKS), OTEL_ML_PROGRESS_LOG_INTERVAL="2")
    demo = processes.start(
        demo_command(
            *("--ranks", str(RANKS), "--steps", str(STEPS), "--files", "0"),
            *("--nan", f"2:{NAN_STEP}", "--slow", "1:20"),
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = demo.communicate(timeout=240)
    assert demo.returncode == 0, err[-3000:]
    lines = out.splitlines()
    views = [ln for ln in lines if ln.startswith("otel_ml ranks: ")]
    assert len(views) >= 3, out[-3000:]

    # the start of rank 2's episode: one line, however many polls saw it
    started = f"otel_ml: rank 2 anomaly: NaN/Inf loss since step {NAN_STEP} (nonfinite)"
    assert lines.count(started) == 1, out[-3000:]
    flagged = [ln for ln in views if "| 2 train " in ln and f"⚠ NaN/Inf loss since step {NAN_STEP}" in ln]
    assert flagged and all(ln.endswith("| 1 rank with anomalies: 2 (nonfinite)") for ln in flagged), views
    assert not any("⚠" in part for ln in views for part in ln.split(" | ") if not part.startswith("2 "))

    # rank 1 is the straggler: the others wait for it in the all-reduce, so rates alike; its forward
    # is ~20 ms longer than the ranks' median
    by_region = [re.search(r"slowest: rank (\d+), (\S+) \+([\d.]+) ms/step", ln) for ln in views]
    named = [(int(m[1]), m[2], float(m[3])) for m in by_region if m]
    assert named, views
    assert named[-1][:2] == (1, "forward") and 10 < named[-1][2] < 30, named
    assert sum(rank == 1 for rank, _, _ in named) >= 0.8 * len(named), named

    # the rank that saw it printed its own warning (its stderr is the terminal's)
    warning = f"otel_ml: anomaly nonfinite on rank 2: loss is nan at step {NAN_STEP}\n"
    assert err.count(warning) == 1, err[-3000:]
