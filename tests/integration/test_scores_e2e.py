"""otel_ml.scores() in a real 2-rank scoring job (gloo): each rank's terminal lines, its scores.jsonl and
its live /metrics agree on the same numbers, while the job runs and after its summary."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from pathlib import Path

import pytest

from otel_ml.rundir import ENDPOINT_FILE, rank_dir
from otel_ml.scores import SCORES_FILE
from tests.support.child import LiveChild, clean_env
from tests.support.metrics import parse_exposition
from tests.support.net import free_port, wait_until

pytestmark = pytest.mark.integration

RUN_ID = "scores-e2e"
#: Each rank scores three batches (sizes 4, 5, 3) of seeded scores; rank 1's second batch has a NaN.
#: After each batch it prints a line and waits for one on stdin, so the test scrapes between batches.
JOB = r"""
import random, sys
import torch.distributed as dist
import otel_ml

dist.init_process_group("gloo")
rank = dist.get_rank()
otel_ml.init(service_name="scores-e2e")
rng = random.Random(100 + rank)
with otel_ml.scores("score", total=12, desc="scoring", show="sample", width=24) as scorer:
    index = 0
    for number, size in enumerate((4, 5, 3), start=1):
        scores = [round(rng.uniform(0, 10), 4) for _ in range(size)]
        if rank == 1 and number == 2:
            scores[1] = float("nan")
        ids = [f"r{rank}-{index + i}" for i in range(size)]
        texts = [f"response {index + i} of rank {rank}, " + "long " * 10 for i in range(size)]
        scorer.add(scores, ids=ids, texts=texts)
        index += size
        print(f"BATCH {number}", flush=True)
        sys.stdin.readline()
print("SCORED", flush=True)
sys.stdin.readline()
dist.barrier()
otel_ml.shutdown()
dist.destroy_process_group()
"""

SAMPLE = re.compile(r"^\[Sample (\d+)\] id=(\S+) Score: (\S+) \| Response: (.*)$")
BATCH = re.compile(r"^\[Batch (\d+)\] samples (\d+)-(\d+) done, avg_score=(\S+)(?:, nonfinite=(\d+))?$")
SUMMARY = re.compile(
    r"^\[Summary\] score \(scoring\): count=(?P<count>\d+) nonfinite=(?P<nonfinite>\d+) "
    r"mean=(?P<mean>\S+) min=(?P<min>\S+) max=(?P<max>\S+) std=(?P<std>\S+)$"
)


def _start(processes, tmp_path: Path) -> list[LiveChild]:
    master = str(free_port())
    children = []
    for rank in (0, 1):
        env = clean_env(
            tmp_path,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=master,
            OTEL_ML_RUN_ID=RUN_ID,
        )
        children.append(LiveChild.start(processes, JOB, env=env, cwd=tmp_path))
    return children


def _scrape(run_dir: Path, rank: int) -> dict:
    path = rank_dir(run_dir, rank) / ENDPOINT_FILE
    url = wait_until(lambda: path.exists() and json.loads(path.read_text()).get("url"), 30, what=str(path))
    with urllib.request.urlopen(url, timeout=5) as response:
        return parse_exposition(response.read().decode())


def _one(samples: dict, name: str, rank: int, **labels: str) -> float:
    want = {"rank": str(rank), "run_id": RUN_ID, **labels}
    got = [v for attrs, v in samples.get(name, []) if all(attrs.get(k) == x for k, x in want.items())]
    assert len(got) == 1, (name, want, samples.get(name))
    return got[0]


def _matches(child: LiveChild, pattern: re.Pattern) -> list[re.Match]:
    return [m for m in map(pattern.match, child.stdout_lines) if m]


def _records(path: Path) -> list[dict]:
    return [json.loads(line, parse_constant=pytest.fail) for line in path.read_text().splitlines()]


def _shown(value: float) -> str:
    """A number as the terminal lines print it (``digits=3``)."""
    return f"{value:.3f}"


def _check_batch(child: LiveChild, samples: dict, rank: int, number: int) -> None:
    """The batch line just printed and the rank's last-batch gauges and progress describe one batch."""
    line = _matches(child, BATCH)[-1]
    assert int(line[1]) == number, child.output
    first, last = int(line[2]), int(line[3])
    scores = [float(m[3]) for m in _matches(child, SAMPLE)[first : last + 1]]
    finite = [s for s in scores if not math.isnan(s)]
    gauges = {
        f: _one(samples, f"otel_ml_distribution_last_{f}", rank, metric="score")
        for f in ("mean", "min", "max")
    }
    assert _shown(gauges["mean"]) == line[4]
    assert (_shown(gauges["min"]), _shown(gauges["max"])) == (_shown(min(finite)), _shown(max(finite)))
    assert _one(samples, "otel_ml_distribution_last_size", rank, metric="score") == len(finite)
    assert _one(samples, "otel_ml_progress_completed", rank, task="scoring") == last + 1
    assert _one(samples, "otel_ml_progress_total", rank, task="scoring") == 12


def test_each_rank_prints_writes_and_exports_the_same_scores(processes, tmp_path):
    run_dir = tmp_path / "run"
    children = _start(processes, tmp_path)
    for number in (1, 2, 3):
        for rank, child in enumerate(children):
            child.wait_prefix(f"BATCH {number}", 60)
            _check_batch(child, _scrape(run_dir, rank), rank, number)
            child.send()
    for rank, child in enumerate(children):
        child.wait_prefix("SCORED", 30)
        samples = _scrape(run_dir, rank)
        (summary,) = _matches(child, SUMMARY)
        count, nonfinite = int(summary["count"]), int(summary["nonfinite"])
        records = _records(rank_dir(run_dir, rank) / SCORES_FILE)
        finite = [r["score"] for r in records if isinstance(r["score"], float)]
        lines = _matches(child, SAMPLE)

        # terminal and file: every sample, the same id, score and (cut) text
        assert len(lines) == len(records) == 12, child.output
        for line, record in zip(lines, records, strict=True):
            assert (int(line[1]), line[2]) == (record["index"], record["id"])
            assert line[4] == record["text"][:21] + "..."
            assert line[3] == ("nan" if record["score"] == "NaN" else _shown(record["score"]))
        assert (count, nonfinite) == (len(finite), 12 - len(finite)) == ((12, 0) if rank == 0 else (11, 1))
        assert summary["mean"] == _shown(sum(finite) / count)
        assert (summary["min"], summary["max"]) == (_shown(min(finite)), _shown(max(finite)))

        # terminal and series: the summary's count, mean and nonfinite count on this rank's /metrics
        assert _one(samples, "otel_ml_distribution_count", rank, metric="score") == count
        series_mean = _one(samples, "otel_ml_distribution_sum", rank, metric="score") / count
        assert _shown(series_mean) == summary["mean"]
        assert series_mean == pytest.approx(sum(finite) / count)
        # (the counter of a key appears with its first NaN when the scores are its only input)
        nonfinite_series = [
            v for a, v in samples.get("otel_ml_nonfinite_total", []) if a.get("metric") == "score"
        ]
        assert sum(nonfinite_series) == nonfinite and len(nonfinite_series) <= 1
        assert _one(samples, "otel_ml_progress_active", rank, task="scoring") == 0
        assert not [r for r in samples.get("otel_ml_distribution_count", []) if r[0]["rank"] != str(rank)]
    for child in children:
        child.send()
    for child in children:
        assert child.wait_exit(30) == 0, child.output
