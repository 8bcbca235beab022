"""A real 2-rank gloo job logging a reward tensor per step: each rank's /metrics, scraped mid-run.

Rank ``r`` logs ``[10r + s, 10r + s + 1, 10r + s + 2, 10r + s + 3, NaN]`` at step ``s``, so every
number on its ``/metrics`` is known: the histogram's count, sum and buckets, the last step's size,
mean, min, max and standard deviation, and the NaN elements counted in
``otel_ml_nonfinite_total{metric="reward"}`` and kept out of everything else. From step
``COLLAPSE`` on, rank 1 scores every rollout alike; the drift check (``OTEL_ML_DRIFT_KEYS=reward``)
flags ``distribution_drift`` on rank 1 only.
"""

from __future__ import annotations

import math
import textwrap

import pytest

from otel_ml.distribution import DEFAULT_BUCKETS, summarize
from tests.support.torchrun import TorchrunJob, value, wait_for

pytestmark = pytest.mark.integration

TOTAL, PAUSE, COLLAPSE = 28, 25, 24

REWARDS = textwrap.dedent(
    f"""
    def rewards(rank, step):
        if rank == 1 and step >= {COLLAPSE}:
            return [7.0, 7.0, 7.0, 7.0, float("nan")]  # every rollout scored alike
        return [10.0 * rank + step + k for k in range(4)] + [float("nan")]
    """
)

SCRIPT = (
    REWARDS
    + """
import torch
import torch.distributed as dist
import otel_ml

dist.init_process_group("gloo")
otel_ml.init()
for step in range(TOTAL):
    ones = torch.ones(1)
    dist.all_reduce(ones)  # the ranks step together, as in training
    otel_ml.log(step, loss=1.0 / (step + 1), reward=torch.tensor(rewards(RANK, step)))
    pause(step)
otel_ml.shutdown()
dist.destroy_process_group()
"""
)

namespace: dict = {}
exec(REWARDS, namespace)  # the job's own reward function, to compute what to expect
rewards = namespace["rewards"]


def test_two_ranks_export_their_reward_distribution_with_known_counts_extrema_and_nans(processes, tmp_path):
    job = TorchrunJob.start(
        processes, tmp_path, SCRIPT, total=TOTAL, pause_at=PAUSE, nan_at=-1, OTEL_ML_DRIFT_KEYS="reward"
    )
    scraped = job.wait_paused(PAUSE)
    # The drift check runs before each collection; give rank 1's scrape one more round if needed.
    scraped[1] = wait_for(
        lambda: (lambda s: s if value(s, "otel_ml_anomaly_active", type="distribution_drift") else None)(
            job.scrape(job.urls()[1])
        ),
        30,
        "rank 1's distribution_drift",
        job,
    )
    for rank in (0, 1):
        samples = scraped[rank]
        labels = {"rank": str(rank), "metric": "reward"}
        logged = [v for step in range(PAUSE + 1) for v in rewards(rank, step)]
        finite = [v for v in logged if not math.isnan(v)]
        whole = summarize(logged)
        assert value(samples, "otel_ml_distribution_count", **labels) == len(finite) == 4 * (PAUSE + 1)
        assert value(samples, "otel_ml_distribution_sum", **labels) == pytest.approx(sum(finite))
        assert value(samples, "otel_ml_nonfinite_total", **labels) == PAUSE + 1  # one NaN per step
        running = 0
        for bound, count in zip((*DEFAULT_BUCKETS, "+Inf"), whole.bucket_counts, strict=True):
            running += count
            le = bound if isinstance(bound, str) else repr(float(bound))
            assert value(samples, "otel_ml_distribution_bucket", le=le, **labels) == running, le
        last = summarize(rewards(rank, PAUSE))
        assert value(samples, "otel_ml_distribution_last_size", **labels) == last.count == 4
        assert value(samples, "otel_ml_distribution_last_mean", **labels) == pytest.approx(last.mean)
        assert value(samples, "otel_ml_distribution_last_min", **labels) == last.minimum
        assert value(samples, "otel_ml_distribution_last_max", **labels) == last.maximum
        assert value(samples, "otel_ml_distribution_last_stddev", **labels) == pytest.approx(last.std)
        assert value(samples, "otel_ml_step", rank=str(rank)) == PAUSE
    assert value(scraped[0], "otel_ml_distribution_last_min", metric="reward") == PAUSE  # 10*0 + 25
    assert value(scraped[1], "otel_ml_distribution_last_max", metric="reward") == 7.0  # collapsed
    assert value(scraped[1], "otel_ml_distribution_last_stddev", metric="reward") == 0.0
    assert value(scraped[1], "otel_ml_anomaly_active", type="distribution_drift") == 1
    assert value(scraped[1], "otel_ml_anomalies_total", type="distribution_drift") == 1
    assert value(scraped[0], "otel_ml_anomaly_active", type="distribution_drift") == 0
    assert value(scraped[0], "otel_ml_anomalies_total", type="distribution_drift") == 0
    job.release()
    output = job.finish()
    assert "distribution_drift on rank 1" in output and "distribution_drift on rank 0" not in output
