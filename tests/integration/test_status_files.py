"""``status.json`` from real processes: how each one ended, and ``otel-ml inspect`` reading it.

Each test runs a small training script with the venv's Python (as a user would), configured
through the environment, and reads the rank's status file while it runs and after it ended: a
normal run, an uncaught exception, SIGTERM, SIGINT, SIGKILL, a NaN loss from step K, and a torchrun job
whose rank 1 raises out of its ``@record`` main while rank 0 goes on until torchrun stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from otel_ml.status import STATUS_FILE
from tests.integration.conftest import Processes
from tests.support.child import LiveChild, clean_env
from tests.support.net import free_port, wait_until

pytestmark = pytest.mark.integration

#: Time for a child to import otel_ml (and torch, for torchrun) on a loaded 2-core machine.
START_TIMEOUT = 60.0

# TEST_MODE: "complete" runs TEST_STEPS steps and exits; "raise" raises ValueError at step
# TEST_RAISE_AT; "wait" prints "ready" after a few steps and keeps stepping until a signal.
# TEST_NAN_AT (optional): the loss is NaN from that step on.
TRAINER = textwrap.dedent(
    """
    import os, time
    import otel_ml

    mode = os.environ["TEST_MODE"]
    nan_at = int(os.environ.get("TEST_NAN_AT", "-1"))
    otel_ml.init()
    steps = int(os.environ.get("TEST_STEPS", "1000000000"))
    bar = otel_ml.tqdm(total=steps if mode != "wait" else None, desc="train")
    step = 0
    while step < steps:
        loss = float("nan") if 0 <= nan_at <= step else 1.0 / (step + 1)
        otel_ml.log(step, loss=loss, samples=8)
        bar.update()
        if mode == "raise" and step == int(os.environ["TEST_RAISE_AT"]):
            raise ValueError(f"bad batch at step {step}")
        if mode == "wait" and step == 20:
            print("ready", flush=True)
        step += 1
        time.sleep(0.01)
    bar.close()
    """
)


def env_for(tmp_path: Path, rank: int = 0, **extra: str) -> dict[str, str]:
    return clean_env(
        tmp_path,
        OTEL_ML_STATUS_INTERVAL="0.2",
        OTEL_ML_PROGRESS_VIEW="off",
        RANK=str(rank),
        WORLD_SIZE=extra.pop("WORLD_SIZE", "1"),
        **extra,
    )


def status_of(tmp_path: Path, rank: int = 0) -> dict:
    return json.loads((tmp_path / "run" / f"rank-{rank}" / STATUS_FILE).read_text())


def run_trainer(processes: Processes, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    proc = processes.start(
        [sys.executable, "-c", TRAINER],
        env=env_for(tmp_path, **env),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=START_TIMEOUT + 60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_normal_run_ends_completed_with_its_last_step_and_bar(processes, tmp_path):
    done = run_trainer(processes, tmp_path, TEST_MODE="complete", TEST_STEPS="150")
    assert done.returncode == 0, done.stderr
    status = status_of(tmp_path)
    assert (status["state"], status["error"], status["signal"]) == ("completed", None, None)
    assert status["step"] == 149 and status["loss"] == pytest.approx(1 / 150)
    assert status["progress"]["task"] == "train" and status["progress"]["total"] == 150
    assert status["start_time"] <= status["last_step_time"] <= status["end_time"]
    assert status["anomalies"] == []


def test_an_uncaught_exception_ends_failed_with_its_type_and_the_traceback_is_still_printed(
    processes, tmp_path
):
    done = run_trainer(processes, tmp_path, TEST_MODE="raise", TEST_RAISE_AT="30")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: bad batch at step 30" in done.stderr
    status = status_of(tmp_path)
    assert status["state"] == "failed", status
    assert status["error"] == {"type": "ValueError", "message": "bad batch at step 30"}
    assert status["step"] == 30


def _waiting_child(processes: Processes, tmp_path: Path) -> LiveChild:
    child = LiveChild.start(processes, TRAINER, env=env_for(tmp_path, TEST_MODE="wait"), cwd=tmp_path)
    child.wait_line(lambda line: line == "ready", START_TIMEOUT, "the child's first steps")
    # While it runs, the pump rewrites the file: it says running, at a step that moves on.
    first = wait_until(lambda: _running_step(tmp_path), 10, what="a running status")
    wait_until(lambda: (_running_step(tmp_path) or 0) > first, 10, what="a newer running status")
    return child


def _running_step(tmp_path: Path) -> int | None:
    try:
        status = status_of(tmp_path)
    except (OSError, ValueError):
        return None
    return status["step"] if status["state"] == "running" else None


def test_a_sigtermed_rank_ends_terminated_and_still_dies_by_the_signal(processes, tmp_path):
    child = _waiting_child(processes, tmp_path)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait_exit(30) == -signal.SIGTERM, child.output
    status = status_of(tmp_path)
    assert (status["state"], status["signal"], status["error"]) == ("terminated", "SIGTERM", None)
    assert status["step"] > 20


def test_sigint_still_raises_keyboard_interrupt_and_ends_terminated(processes, tmp_path):
    child = _waiting_child(processes, tmp_path)
    os.kill(child.pid, signal.SIGINT)
    assert child.wait_exit(30) in (-signal.SIGINT, 130), child.output
    assert "KeyboardInterrupt" in child.output
    status = status_of(tmp_path)
    assert (status["state"], status["signal"]) == ("terminated", "SIGINT")


def test_a_sigkilled_rank_stays_running_and_inspect_says_its_process_is_gone(processes, tmp_path):
    child = _waiting_child(processes, tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait_exit(30) == -signal.SIGKILL
    assert status_of(tmp_path)["state"] == "running"  # nothing runs after SIGKILL
    report = subprocess.run(
        [sys.executable, "-m", "otel_ml.cli", "inspect", "--json", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (rank,) = json.loads(report.stdout)["ranks"]
    assert (rank["state"], rank["process_alive"]) == ("running", False)


def test_inspect_json_names_the_nonfinite_anomaly_with_its_first_step(processes, tmp_path):
    nan_at = 40
    ranks = [
        processes.start(
            [sys.executable, "-c", TRAINER],
            env=env_for(tmp_path, rank, WORLD_SIZE="2", TEST_MODE="complete", TEST_STEPS="100",
                        **({"TEST_NAN_AT": str(nan_at)} if rank == 1 else {})),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    assert [proc.wait(START_TIMEOUT + 60) for proc in ranks] == [0, 0]
    inspect = subprocess.run(
        [sys.executable, "-m", "otel_ml.cli", "inspect", "--json", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = {rank["rank"]: rank for rank in json.loads(inspect.stdout)["ranks"]}
    assert report[0]["anomalies"] == [] and report[0]["state"] == "completed"
    (episode,) = report[1]["anomalies"]
    assert (episode["type"], episode["key"], episode["first_step"]) == ("nonfinite", "loss", nan_at)
    assert episode["last_step"] == 99 and episode["active"] is True
    text = subprocess.run(
        [sys.executable, "-m", "otel_ml.cli", "inspect", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"nonfinite (loss) steps {nan_at}-99" in text


TORCHRUN_JOB = textwrap.dedent(
    """
    import os, time
    from torch.distributed.elastic.multiprocessing.errors import record
    import otel_ml

    @record
    def main():
        otel_ml.init()
        rank = int(os.environ["RANK"])
        for step in range(100000):
            otel_ml.log(step, loss=1.0 / (step + 1))
            if rank == 1 and step == 30:
                raise RuntimeError("rank 1 lost its data shard")
            time.sleep(0.01)  # rank 0 goes on until torchrun stops it

    main()
    """
)


def test_a_torchrun_worker_raising_out_of_main_fails_and_the_other_rank_is_terminated(processes, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_JOB, encoding="utf-8")
    env = env_for(tmp_path, OTEL_EXPORTER_PROMETHEUS_PORT="0", TORCHELASTIC_ERROR_FILE="")
    env.pop("RANK"), env.pop("WORLD_SIZE"), env.pop("TORCHELASTIC_ERROR_FILE")
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(script),
    ]  # fmt: skip
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w", encoding="utf-8") as log:
        proc = processes.start(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        code = proc.wait(180)
    log_text = log_path.read_text()
    assert code != 0 and "rank 1 lost its data shard" in log_text, log_text[-4000:]
    failed = status_of(tmp_path, 1)
    assert failed["state"] == "failed", failed
    assert failed["error"] == {"type": "RuntimeError", "message": "rank 1 lost its data shard"}
    assert failed["step"] == 30
    # torchrun's agent stops the rank still running with SIGTERM.
    stopped = status_of(tmp_path, 0)
    assert (stopped["state"], stopped["signal"]) == ("terminated", "SIGTERM"), stopped
