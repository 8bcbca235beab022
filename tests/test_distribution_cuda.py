"""CUDA distributions against the strict stand-in: reduced on the device, read on the export thread.

The stand-in (``tests/support/fake_cuda.py``) refuses every host sync on a CUDA tensor
(``item``, ``tolist``, ``bool()``, ``float()``, a blocking copy, shape reads, ...) and every read
of a host copy before its stream ran, recording each in ``cuda.forbidden``; so a test that
logs CUDA rewards and finds ``forbidden`` empty proves the training thread never waited.
"""

from __future__ import annotations

import urllib.request

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider

import otel_ml
from otel_ml import distribution_metrics
from otel_ml.collection import Collection
from otel_ml.distribution import summarize
from otel_ml.exporters.exposition import ExpositionReader
from otel_ml.health import TelemetryHealth
from otel_ml.observables import ObservableMeter
from otel_ml.training import TrainingMetrics
from tests.support.fake_cuda import FakeCuda, on_thread
from tests.support.metrics import parse_exposition, strict_exposition

NAN, INF = float("nan"), float("inf")
REWARDS = [0.5, -2.0, NAN, 3.0, INF, 1.0, -0.25, 8.0]


class Scraped:
    """TrainingMetrics on a stand-in GPU, with a real exposition reader."""

    def __init__(self, cuda: FakeCuda, **kwargs) -> None:
        self.cuda = cuda
        self.health = TelemetryHealth()
        collection = Collection()
        self.reader = ExpositionReader(collection)
        self.provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        meter = ObservableMeter(self.provider.get_meter("test"), collection)
        self.tm = TrainingMetrics(
            meter, {"rank": "0", "run_id": "r"}, collection=collection, cuda=cuda, cudart=cuda.cudart,
            health=self.health, **kwargs,
        )  # fmt: skip
        collection.register(prepare=self.tm.refresh)

    def render(self) -> dict:
        """A scrape, on a thread of its own (current device 0), as the /metrics server does."""
        return on_thread(lambda: strict_exposition(self.reader.render().decode()))


@pytest.fixture
def gpu():
    made: list[Scraped] = []

    def make(devices: int = 2, **kwargs) -> Scraped:
        made.append(Scraped(FakeCuda(devices=devices), **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.provider.shutdown()


def _one(samples, name, **labels):
    got = [v for attrs, v in samples.get(name, []) if all(attrs.get(k) == x for k, x in labels.items())]
    assert len(got) <= 1, (name, labels, got)
    return got[0] if got else None


def test_logging_a_cuda_reward_tensor_never_syncs_and_the_export_thread_reads_the_right_numbers(gpu):
    g = gpu(devices=2)
    g.cuda.set_device(0)  # the rewards live on cuda:1, the training thread's current device is 0
    rewards = g.cuda.tensor(REWARDS, device=1)
    g.tm.log(1, {"loss": 1.0, "reward": rewards})
    assert g.cuda.forbidden == [] and g.cuda.launches[1] > 0 and g.cuda.launches[0] == 0
    before = g.render()  # the GPU has not run yet: nothing read, nothing guessed
    assert _one(before, "otel_ml_distribution_count", metric="reward") is None
    assert g.cuda.early_reads == 0 and len(g.tm.distributions._pending) == 1
    g.cuda.complete()
    samples = g.render()
    want = summarize(REWARDS)
    assert _one(samples, "otel_ml_distribution_count", metric="reward") == want.count == 6
    assert _one(samples, "otel_ml_distribution_sum", metric="reward") == pytest.approx(want.total)
    assert _one(samples, "otel_ml_distribution_bucket", le="0.0", metric="reward") == 2  # -2, -0.25
    assert _one(samples, "otel_ml_distribution_bucket", le="1.0", metric="reward") == 4  # + 0.5, 1
    assert _one(samples, "otel_ml_distribution_bucket", le="+Inf", metric="reward") == 6
    assert _one(samples, "otel_ml_distribution_last_size", metric="reward") == 6
    assert _one(samples, "otel_ml_distribution_last_mean", metric="reward") == pytest.approx(want.mean)
    assert _one(samples, "otel_ml_distribution_last_min", metric="reward") == -2.0
    assert _one(samples, "otel_ml_distribution_last_max", metric="reward") == 8.0
    assert _one(samples, "otel_ml_distribution_last_stddev", metric="reward") == pytest.approx(want.std)
    assert _one(samples, "otel_ml_nonfinite_total", metric="reward") == 2
    assert g.cuda.clean(), (g.cuda.forbidden, g.cuda.unguarded, g.cuda.stray_contexts)


def test_a_cuda_distribution_waits_for_the_stream_of_its_own_device(gpu):
    g = gpu(devices=2)
    g.tm.log(1, {"reward": g.cuda.tensor([1.0, 2.0, 3.0], device=1)})
    g.cuda.complete(g.cuda.default_streams[0])  # device 0 is done; cuda:1 has not run the reduction
    assert _one(g.render(), "otel_ml_distribution_count", metric="reward") is None
    g.cuda.complete()
    assert _one(g.render(), "otel_ml_distribution_last_mean", metric="reward") == 2.0
    assert g.cuda.clean() and g.cuda.early_reads == 0


def test_what_a_cuda_distribution_copies_to_the_host_is_bounded_by_its_buckets_not_its_size(gpu):
    g = gpu(distribution_buckets={"ratio": (0.5, 1.0, 2.0)})
    g.tm.log(1, {"ratio": g.cuda.tensor(torch.linspace(0.0, 3.0, 100_000))})
    ((_, _, deferred, _),) = list(g.tm.distributions._pending._queue)
    assert deferred._host._payload.numel() == 5 + 3 + 1  # count, sum, squares, min, max; 4 buckets
    g.cuda.complete()
    samples = g.render()
    assert _one(samples, "otel_ml_distribution_count", metric="ratio") == 100_000
    assert _one(samples, "otel_ml_distribution_bucket", le="2.0", metric="ratio") == pytest.approx(
        66_667, abs=1
    )


def test_cuda_and_cpu_tensors_of_the_same_values_export_the_same_summary(gpu):
    g = gpu(devices=1)
    values = torch.randn(257, generator=torch.Generator().manual_seed(7)) * 30
    values[::17] = NAN
    g.tm.log(1, {"on_gpu": g.cuda.tensor(values), "on_cpu": values.clone()})
    g.cuda.complete()
    g.render()
    on_gpu, on_cpu = g.tm.distributions.last("on_gpu"), g.tm.distributions.last("on_cpu")
    assert on_gpu.bucket_counts == on_cpu.bucket_counts and on_gpu.nonfinite == on_cpu.nonfinite == 16
    assert (on_gpu.count, on_gpu.minimum, on_gpu.maximum) == (on_cpu.count, on_cpu.minimum, on_cpu.maximum)
    assert on_gpu.mean == pytest.approx(on_cpu.mean) and on_gpu.std == pytest.approx(on_cpu.std)


def test_a_cuda_distribution_logged_during_a_capture_is_refused_and_enqueues_nothing(gpu):
    g = gpu(devices=1)
    rewards = g.cuda.tensor([1.0, 2.0])
    with g.cuda.graph():
        g.tm.log(1, {"reward": rewards})
    assert g.cuda.launches[0] == 0 and not g.tm.distributions._pending
    assert g.health.drops["values"] == 1 and g.cuda.clean()
    g.tm.log(2, {"reward": rewards})  # after the capture it flows
    g.cuda.complete()
    assert _one(g.render(), "otel_ml_distribution_count", metric="reward") == 2


def test_a_failing_device_read_is_counted_and_the_next_distribution_still_arrives(gpu):
    g = gpu(devices=1)
    g.tm.log(1, {"reward": g.cuda.tensor([1.0, 2.0])})
    g.tm.log(2, {"reward": g.cuda.tensor([5.0, 7.0])})
    g.cuda.complete()
    g.cuda.fail_next("query")
    samples = g.render()
    assert _one(samples, "otel_ml_distribution_last_mean", metric="reward") == 6.0
    assert _one(samples, "otel_ml_distribution_count", metric="reward") == 2  # the first one is lost
    assert g.health.errors["values"] == 1 and g.health.drops["values"] == 1


def test_cuda_distributions_waiting_for_a_gpu_that_never_finishes_stay_bounded(gpu, monkeypatch):
    monkeypatch.setattr(distribution_metrics, "MAX_PENDING", 3)
    g = gpu(devices=1)
    for step in range(5):
        g.tm.log(step, {"reward": g.cuda.tensor([float(step), float(step) + 1])})
    assert len(g.tm.distributions._pending) == 3 and g.health.drops["values"] == 2
    g.cuda.complete()
    assert _one(g.render(), "otel_ml_distribution_count", metric="reward") == 6  # steps 2, 3, 4


# The stand-in itself: every implicit sync on a CUDA tensor is refused and recorded -------------


@pytest.mark.parametrize(
    "sync",
    [
        lambda t: t.item(),
        lambda t: t.tolist(),
        lambda t: bool(t.sum() > 0),
        lambda t: float(t.sum()),
        lambda t: int(t.amax()),
        lambda t: t.cpu(),
        lambda t: t.to("cpu"),
        lambda t: t.numpy(),
        lambda t: t[torch.isfinite(t)],
        lambda t: torch.nonzero(t),
        lambda t: torch.bincount(t.to(torch.int64)),
        lambda t: torch.histc(t, bins=4),
        lambda t: t.shape,
        lambda t: t.dim(),
        lambda t: repr(t),
        lambda t: t + torch.ones(3),  # a CPU tensor in a CUDA op: a host-to-device copy
    ],
    ids=[
        "item", "tolist", "bool", "float", "int", "cpu", "blocking-to", "numpy", "mask-index", "nonzero",
        "bincount", "histc", "shape", "dim", "repr", "cpu-operand",
    ],
)  # fmt: skip
def test_the_stand_in_refuses_and_records_every_host_sync_on_a_cuda_tensor(sync):
    cuda = FakeCuda(devices=1)
    with pytest.raises(AssertionError):
        sync(cuda.tensor([1.0, 2.0, 3.0]))
    assert cuda.forbidden and not cuda.clean()


def test_the_stand_in_refuses_a_host_copy_read_before_an_event_behind_it_was_seen_complete():
    cuda = FakeCuda(devices=1)
    host = cuda.tensor([1.0, 2.0]).sum().to("cpu", non_blocking=True)
    with pytest.raises(AssertionError, match="not written yet"):
        host.tolist()
    cuda.complete()
    with pytest.raises(AssertionError, match="seen complete"):
        host.item()  # the copy landed, but nothing told the reader so
    assert cuda.early_reads == 2 and len(cuda.forbidden) == 2
    late = cuda.tensor([4.0, 5.0]).sum().to("cpu", non_blocking=True)
    behind = cuda.Event()
    behind.record()
    assert not behind.query()
    cuda.complete()
    assert behind.query() and late.item() == 9.0


def test_a_whole_run_logging_cuda_rewards_exports_them_from_the_export_thread(tmp_path):
    cuda = FakeCuda(devices=1)
    cuda.set_device(0)
    t = otel_ml.Telemetry(
        otel_ml.Config.resolve(
            prometheus_port=0, run_dir=str(tmp_path), files="off", summary=False, set_global_providers=False
        ),
        cuda=cuda,
        cudart=cuda.cudart,
    )
    try:
        for step in range(10):
            t.log(step, reward=cuda.tensor([step, step + 1.0, NAN]), loss=cuda.tensor(1.0))
            cuda.complete()
        t.flush(timeout=5)
        samples = parse_exposition(urllib.request.urlopen(t.metrics_url, timeout=10).read().decode())
    finally:
        t.shutdown(timeout=5)
    assert cuda.forbidden == [] and cuda.clean()
    assert _one(samples, "otel_ml_distribution_count", metric="reward") == 20
    assert _one(samples, "otel_ml_distribution_sum", metric="reward") == sum(2 * s + 1.0 for s in range(10))
    assert _one(samples, "otel_ml_distribution_last_mean", metric="reward") == 9.5
    assert _one(samples, "otel_ml_nonfinite_total", metric="reward") == 10
