"""What a newcomer reads from ``otel-ml demo``: no warnings, and timing that adds up.

The demo runs for real (two gloo ranks, a short run) with FutureWarning and DeprecationWarning
turned into errors in every process (``PYTHONWARNINGS`` reaches the workers), so a deprecated
call anywhere in the demo's setup or loop fails the run instead of printing a warning.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from otel_ml.regions.stats import OUTSIDE
from otel_ml.rundir import SUMMARY_JSON, rank_dir
from tests.support.demo import demo_command, demo_env

pytestmark = pytest.mark.integration

_REFRESH_ROW = re.compile(
    r"(\(outside regions\)|\(other regions\)|\S+) (\d+\.\d+)(ms/step|ms/timed step) (\d+\.\d+)%"
    r"(?: \(sampled (\d+)/(\d+)\))?"
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(return code, stdout, stderr, run dir) of a short two-rank demo run."""
    run_dir = tmp_path_factory.mktemp("demo-output") / "demo-output"
    env = demo_env(
        run_dir,
        PYTHONWARNINGS="error::FutureWarning,error::DeprecationWarning",
        OTEL_ML_TIMING_TABLE_EVERY="10",
        OTEL_ML_TRACE_EVERY="4",
    )
    command = demo_command("--ranks", "2", "--steps", "40", "--files", "1")
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    return run.returncode, run.stdout, run.stderr, run_dir


def test_the_demo_runs_with_deprecation_warnings_as_errors_and_prints_no_warning(demo_run):
    code, out, err, _ = demo_run
    assert code == 0, err[-3000:]
    assert "otel_ml demo finished: 2 rank(s)" in out
    warnings = [line for line in (out + err).splitlines() if re.search(r"\w*Warning\b", line)]
    assert warnings == []


def test_the_demo_summary_adds_up_to_all_step_time_on_every_rank(demo_run):
    code, out, err, run_dir = demo_run
    assert code == 0, err[-3000:]
    for rank in (0, 1):
        document = json.loads((rank_dir(run_dir, rank) / SUMMARY_JSON).read_text())
        top_level = sum(p["total_ms"] for p in document["paths"] if p["depth"] == 1)
        rest = document["outside_regions"]
        assert rest["covered_pct"] <= 100.0  # one thread: top-level regions never overlap
        assert top_level + rest["total_ms"] == pytest.approx(document["step_time_s"] * 1e3, rel=1e-6)
        modules = [p for p in document["paths"] if p["sampled"]]
        assert modules and all(0 < p["timed_steps"] < document["steps"] for p in modules)
    printed = out[out.index("otel_ml timing summary: rank 0") :].splitlines()
    top_level = [line for line in printed[3:] if line[:1] not in ("", " ") and "%" in line]
    assert top_level[-1].startswith(OUTSIDE)
    shares = [float(re.findall(r"(\d+\.\d)%", line)[0]) for line in top_level]
    assert sum(shares) == pytest.approx(100.0, abs=0.1 * len(shares))


def test_the_demo_timing_table_adds_up_and_shows_modules_per_timed_step(demo_run):
    code, out, err, _ = demo_run
    assert code == 0, err[-3000:]
    refreshes = [line for line in out.splitlines() if line.startswith("otel_ml timing: last 10 steps")]
    assert len(refreshes) == 4  # steps 9, 19, 29, 39
    for line in refreshes:
        rows = _REFRESH_ROW.findall(line)
        # In the demo every region that is not a module is top level, and every module is sampled.
        whole = [float(pct) for path, _, unit, pct, *_ in rows if unit == "ms/step"]
        assert rows[-1][0] == OUTSIDE
        assert sum(whole) == pytest.approx(100.0, abs=0.1 * len(whole))
        for path, _, unit, _, timed, steps in rows:
            if unit == "ms/timed step":
                assert "/" in path and steps == "10" and 0 < int(timed) < 10
    assert any("ms/timed step" in line for line in refreshes)
