"""Every rank stops at the same step: a real 4-rank gloo torchrun job with a NaN on rank 2.

With ``agree_stop(every=10)`` the four ranks leave the loop together at step 40 (the NaN is at
step 37), each knowing the cause, run a collective "checkpoint" and exit 0. Without the agreement
``stop_on`` raises on rank 2 alone, the job fails, and torchrun's teardown leaves no rank behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.child import clean_env
from tests.support.net import free_port

pytestmark = pytest.mark.integration

JOB = """
import json, os, sys, time
import torch
import torch.distributed as dist
import otel_ml

agree = sys.argv[1] == "agree"
rank = int(os.environ["RANK"])
out = os.path.join(os.environ["JOB_OUT"], f"rank-{rank}.json")
with open(out + ".pid", "w") as f:
    f.write(str(os.getpid()))
dist.init_process_group("gloo")
otel_ml.init(stop_on=["nonfinite"], prometheus=False, files="off", summary=False)
grads = torch.ones(4)
for step in range(1, 101):
    dist.all_reduce(grads)  # the step's gradient sync: a rank that left alone would hang the others
    grads.fill_(1.0)
    otel_ml.log(step, loss=float("nan") if (rank == 2 and step == 37) else 1.0 / step)
    if agree and otel_ml.agree_stop(every=10):
        break
    time.sleep(0.005)
reason = otel_ml.stop_reason()
checkpoint = torch.tensor([float(rank)])
dist.all_reduce(checkpoint)  # every rank saves together: a collective after the stop
with open(out, "w") as f:
    json.dump({"rank": rank, "step": step, "checkpoint": checkpoint.item(),
               "reason": None if reason is None else [reason.rank, reason.type, reason.step],
               "mine": reason is not None and reason.anomaly is not None}, f)
otel_ml.shutdown()
dist.destroy_process_group()
"""


def _torchrun(tmp_path: Path, mode: str, processes) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "job.py"
    script.write_text(JOB, encoding="utf-8")
    out = tmp_path / f"out-{mode}"
    out.mkdir()
    env = clean_env(tmp_path, JOB_OUT=str(out), OTEL_ML_RUN_DIR=str(tmp_path / "run"), OTEL_ML_RUN_ID=mode)
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(script), mode,
    ]  # fmt: skip
    log = (tmp_path / f"{mode}.log").open("w", encoding="utf-8")
    return processes.start(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT), out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_agree_stop_stops_every_rank_at_the_same_step_with_the_cause(processes, tmp_path):
    proc, out = _torchrun(tmp_path, "agree", processes)
    assert proc.wait(180) == 0, (tmp_path / "agree.log").read_text()[-4000:]
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(4)]
    assert [r["step"] for r in results] == [40, 40, 40, 40]
    assert all(r["reason"] == [2, "nonfinite", 37] for r in results)
    assert [r["mine"] for r in results] == [False, False, True, False]  # the full Anomaly on rank 2
    assert all(r["checkpoint"] == 6.0 for r in results)  # 0+1+2+3: all four joined the collective


def test_without_the_agreement_the_raise_on_rank_2_ends_the_whole_job(processes, tmp_path):
    proc, out = _torchrun(tmp_path, "raise", processes)
    started = time.monotonic()
    code = proc.wait(180)
    log = (tmp_path / "raise.log").read_text()
    assert code != 0 and "AnomalyError" in log, log[-4000:]
    assert time.monotonic() - started < 120
    assert not list(out.glob("rank-*.json"))  # no rank got past the loop
    pids = [int(p.read_text()) for p in out.glob("rank-*.json.pid")]
    assert len(pids) == 4
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a rank outlived torchrun's teardown"
