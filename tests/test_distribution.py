"""Distributions passed to log(): the pure summary and what a scrape shows per key and rank."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider

from otel_ml import distribution_metrics, semconv
from otel_ml.collection import Collection
from otel_ml.distribution import DEFAULT_BUCKETS, host_values, is_distribution, summarize
from otel_ml.exporters.exposition import ExpositionReader
from otel_ml.observables import ObservableMeter
from otel_ml.tensor_summary import round_down
from otel_ml.training import TrainingMetrics
from tests.support.metrics import strict_exposition

ATTRS = {"rank": "1", "run_id": "run-d"}


def test_summary_excludes_and_counts_nonfinite_elements():
    s = summarize([1.0, float("nan"), 3.0, float("inf"), 2.0], bounds=(1.5, 2.5))
    assert (s.count, s.nonfinite, s.mean, s.minimum, s.maximum) == (3, 2, 2.0, 1.0, 3.0)
    assert s.std == pytest.approx(math.sqrt(2 / 3))
    assert s.bucket_counts == [1, 1, 1] and s.total == 6.0


def test_summary_std_survives_a_large_common_offset():
    assert summarize([1e9 + 1, 1e9 - 1]).std == pytest.approx(1.0)


def test_summary_of_nothing_finite_has_no_statistics():
    s = summarize([float("nan")])
    assert (s.count, s.nonfinite, s.mean, s.std) == (1 - 1, 1, None, None)


def test_lists_arrays_and_tensors_of_several_elements_are_distributions():
    assert is_distribution([1.0, 2.0]) and is_distribution(np.zeros(3)) and is_distribution(torch.ones(2, 2))
    assert is_distribution([]) and is_distribution(np.zeros(0))
    assert not is_distribution(1.0) and not is_distribution(torch.tensor(2.0)) and not is_distribution([1.0])
    assert not is_distribution(np.float32(1.0)) and not is_distribution(torch.tensor([3.0]))
    assert host_values(np.array([[1, 2], [3, 4]])) == [1.0, 2.0, 3.0, 4.0]
    assert host_values(torch.tensor([0.5, 1.5], requires_grad=True)) == [0.5, 1.5]
    assert host_values([[1], [2, 3]]) == [1.0, 2.0, 3.0]


@pytest.fixture
def scrape():
    collection = Collection()
    reader = ExpositionReader(collection)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    meter = ObservableMeter(provider.get_meter("test"), collection)
    tm = TrainingMetrics(meter, ATTRS, collection=collection, distribution_buckets={"score": (5.0, 7.0)})
    collection.register(prepare=tm.refresh)
    yield tm, lambda: strict_exposition(reader.render().decode())
    provider.shutdown()


def _one(samples, name, **labels):
    got = [v for attrs, v in samples[name] if all(attrs.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, (name, labels, samples.get(name))
    return got[0]


def test_reward_distribution_exports_histogram_and_last_step_gauges_per_key_and_rank(scrape):
    tm, render = scrape
    tm.log(1, {"loss": 1.0, "reward": torch.tensor([0.0, 1.0, 2.0])})
    tm.log(2, {"reward": np.array([-1.0, 4.0, float("nan"), 5.0]), "score": [6.8, 7.9, 4.0]})
    samples = render()
    reward = {"metric": "reward", **ATTRS}
    assert _one(samples, "otel_ml_distribution_count", **reward) == 6
    assert _one(samples, "otel_ml_distribution_sum", **reward) == 11.0
    assert _one(samples, "otel_ml_distribution_bucket", le="+Inf", **reward) == 6
    assert _one(samples, "otel_ml_distribution_bucket", le="0.0", **reward) == 2  # -1 and 0
    assert _one(samples, "otel_ml_distribution_last_size", **reward) == 3  # NaN excluded
    assert _one(samples, "otel_ml_distribution_last_mean", **reward) == pytest.approx(8 / 3)
    assert _one(samples, "otel_ml_distribution_last_min", **reward) == -1.0
    assert _one(samples, "otel_ml_distribution_last_max", **reward) == 5.0
    assert _one(samples, "otel_ml_distribution_last_stddev", **reward) == pytest.approx(np.std([-1, 4, 5]))
    assert _one(samples, "otel_ml_nonfinite_total", metric="reward") == 1
    assert _one(samples, "otel_ml_distribution_bucket", le="5.0", metric="score") == 1  # own buckets
    assert _one(samples, "otel_ml_distribution_bucket", le="7.0", metric="score") == 2
    assert _one(samples, "otel_ml_loss") == 1.0  # scalars unaffected
    assert "otel_ml_reward" not in samples  # no empty scalar series for a distribution key


def test_every_exported_distribution_name_is_documented(scrape):
    tm, render = scrape
    tm.log(1, {"reward": [1.0, 2.0]})
    exposed = {n for n in render() if n.startswith("otel_ml_distribution")}
    documented = {semconv.DISTRIBUTION.name + s for s in ("_bucket", "_count", "_sum")}
    documented |= {s.prometheus_name for s in semconv.DISTRIBUTION_GAUGES}
    assert exposed == documented


def test_empty_distribution_warns_once_and_loses_nothing_else(scrape, caplog):
    tm, render = scrape
    tm.log(1, {"reward": [1.0, 3.0]})
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        tm.log(2, {"reward": [], "loss": 0.5})
        tm.log(3, {"reward": np.zeros(0)})
    assert sum("'reward': empty" in r.getMessage() for r in caplog.records) == 1
    samples = render()
    assert _one(samples, "otel_ml_distribution_count", metric="reward") == 2
    assert _one(samples, "otel_ml_distribution_last_mean", metric="reward") == 2.0
    assert _one(samples, "otel_ml_loss") == 0.5


def test_default_buckets_are_sorted_and_symmetric():
    assert list(DEFAULT_BUCKETS) == sorted(DEFAULT_BUCKETS)
    assert [-b for b in reversed(DEFAULT_BUCKETS)] == list(DEFAULT_BUCKETS)


def test_bucket_option_reads_kwargs_then_env_and_bad_env_falls_back_to_default(caplog):
    from otel_ml.config import Config

    env = {"OTEL_ML_DISTRIBUTION_BUCKETS": "reward=0,0.5,1;score=1,5,10"}
    assert Config.resolve(env=env).distribution_buckets == {
        "reward": (0.0, 0.5, 1.0),
        "score": (1.0, 5.0, 10.0),
    }
    assert Config.resolve(env=env, distribution_buckets={"kl": [0.1, 1]}).distribution_buckets == {
        "kl": (0.1, 1.0)
    }
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        assert Config.resolve(env={"OTEL_ML_DISTRIBUTION_BUCKETS": "reward=1,0"}).distribution_buckets == {}
    assert "OTEL_ML_DISTRIBUTION_BUCKETS" in caplog.text
    with pytest.raises(ValueError, match="strictly increasing"):
        Config.resolve(env={}, distribution_buckets={"reward": (1.0, 1.0)})


# Tensors: reduced by torch ops (vectorised on CPU, on the device for CUDA) -------------------------

MIXED = [0.5, -3.0, float("nan"), 12.0, 0.0, float("inf"), -0.1, 7.25, float("-inf"), 100.0, 250.0, -1e6]


def _same_summary(got, want):
    assert (got.count, got.nonfinite, got.bucket_counts) == (want.count, want.nonfinite, want.bucket_counts)
    assert (got.minimum, got.maximum) == (want.minimum, want.maximum)
    assert got.mean == pytest.approx(want.mean) and got.std == pytest.approx(want.std)
    assert got.total == pytest.approx(want.total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("repeat", [1, 40], ids=["small-python", "large-torch-ops"])
def test_a_cpu_tensor_gets_the_summary_of_the_pure_calculator(scrape, dtype, repeat):
    tm, _ = scrape
    values = torch.tensor(MIXED * repeat, dtype=dtype) * torch.linspace(0.5, 1.5, 12 * repeat, dtype=dtype)
    assert (values.numel() > distribution_metrics.SMALL) == (repeat > 1)
    tm.log(1, {"reward": values.reshape(-1, 4)})
    _same_summary(tm.distributions.last("reward"), summarize([float(v) for v in values.tolist()]))


def test_an_integer_or_bool_tensor_is_a_distribution_and_a_complex_one_is_dropped(scrape, caplog):
    tm, _ = scrape
    tm.log(1, {"hits": torch.tensor([True, False, True]), "tokens_out": torch.arange(4)})
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        tm.log(2, {"phase": torch.tensor([1j, 2j])})
    assert tm.distributions.last("hits").mean == pytest.approx(2 / 3)
    assert tm.distributions.last("tokens_out").maximum == 3.0
    assert tm.distributions.last("phase") is None and "complex tensor" in caplog.text


def test_nan_and_inf_elements_of_a_tensor_are_counted_and_kept_out_of_every_series(scrape):
    tm, render = scrape
    tm.log(1, {"reward": torch.tensor([1.0, float("nan"), float("inf"), 3.0, float("-inf")])})
    tm.log(2, {"reward": torch.tensor([float("nan"), float("nan")])})  # nothing finite: counted only
    samples = render()
    assert _one(samples, "otel_ml_nonfinite_total", metric="reward") == 5
    assert _one(samples, "otel_ml_distribution_count", metric="reward") == 2
    assert _one(samples, "otel_ml_distribution_sum", metric="reward") == 4.0
    assert _one(samples, "otel_ml_distribution_bucket", le="+Inf", metric="reward") == 2
    assert _one(samples, "otel_ml_distribution_last_max", metric="reward") == 3.0  # step 1's, not Inf
    assert _one(samples, "otel_ml_distribution_last_size", metric="reward") == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_elements_at_and_next_to_every_bound_fall_in_the_buckets_of_the_pure_calculator(scrape, dtype):
    tm, _ = scrape
    at = torch.tensor(DEFAULT_BUCKETS, dtype=dtype)
    up = torch.nextafter(at, torch.tensor(math.inf, dtype=dtype))
    down = torch.nextafter(at, torch.tensor(-math.inf, dtype=dtype))
    values = torch.cat([at, up, down] * 3)  # more than SMALL: the torch reduction
    assert values.numel() > distribution_metrics.SMALL
    tm.log(1, {"edges": values})
    got = tm.distributions.last("edges")
    assert got.bucket_counts == summarize([float(v) for v in values.tolist()]).bucket_counts


def test_round_down_gives_the_largest_float32_not_above_the_bound():
    for bound in (0.1, -0.1, 0.2, 1.0, 1e-30, 3.5e38, -3.5e38):
        low = round_down(bound, torch.float32)
        above = torch.nextafter(torch.tensor(low, dtype=torch.float32), torch.tensor(math.inf))
        assert low <= bound < float(above) or (bound > 3.4e38 and math.isinf(float(above)))
    assert round_down(0.1, torch.float64) == 0.1


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_])
def test_a_large_numpy_array_is_summarised_vectorised_like_the_pure_calculator(scrape, dtype):
    tm, _ = scrape
    base = np.array(MIXED * 30) * np.linspace(0.5, 1.5, 360)
    values = (
        base.astype(dtype)
        if dtype in (np.float32, np.float64)
        else np.nan_to_num(base, posinf=0.0, neginf=0.0).astype(dtype)
    )
    tm.log(1, {"reward": values.reshape(-1, 6)})
    _same_summary(tm.distributions.last("reward"), summarize([float(v) for v in values.ravel()]))


def test_a_complex_or_non_numeric_numpy_array_is_dropped_with_a_warning(scrape, caplog):
    tm, _ = scrape
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        tm.log(1, {"phase": np.ones(200) * 1j, "names": np.array(["a"] * 200)})
    assert tm.distributions.last("phase") is None and tm.distributions.last("names") is None
    assert "complex array" in caplog.text and "'names'" in caplog.text
