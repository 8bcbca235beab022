"""log() semantics: values, NaN as data, tensors, bad input, rates and durations under a fake clock."""

from __future__ import annotations

import logging

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_ml import semconv
from otel_ml.collection import Collection, PullReader
from otel_ml.health import TelemetryHealth
from otel_ml.training import MAX_PENDING, TrainingMetrics, window_rate
from otel_ml.values import Deferred
from tests.support.clock import FakeClock
from tests.support.metrics import points, value

ATTRS = {"rank": "3", "run_id": "run-a"}


@pytest.fixture
def setup():
    """Training metrics read as otel_ml reads them: each collection refreshes them first."""
    collection = Collection()
    reader = PullReader(collection)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    clock = FakeClock(1_000.0)
    health = TelemetryHealth()
    tm = TrainingMetrics(
        provider.get_meter("test"),
        ATTRS,
        collection=collection,
        window=4,
        health=health,
        wall=clock,
        mono=clock,
    )
    collection.register(prepare=tm.refresh)
    yield tm, reader, clock, health
    provider.shutdown()


def test_logged_scalars_become_gauges_with_rank_and_run_id(setup):
    tm, reader, _, _ = setup
    tm.log(7, {"loss": 2.5, "lr": 3e-4, "grad_norm": 1.25, "kl": 0.02})
    got = points(reader)
    assert value(got, "otel_ml_loss", **ATTRS) == 2.5
    assert value(got, "otel_ml_learning_rate", **ATTRS) == 3e-4
    assert value(got, "otel_ml_grad_norm", **ATTRS) == 1.25
    assert value(got, "otel_ml_kl", **ATTRS) == 0.02
    assert value(got, "otel_ml_step", **ATTRS) == 7
    assert value(got, "otel_ml_last_step_timestamp_seconds", **ATTRS) == 1_000.0


def test_nan_is_counted_per_key_and_gauge_keeps_last_finite_value(setup):
    tm, reader, _, _ = setup
    tm.log(1, {"loss": 1.5, "grad_norm": 2.0})
    tm.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
    tm.log(3, {"loss": float("-inf"), "grad_norm": 3.0})
    got = points(reader)
    assert value(got, "otel_ml_nonfinite", metric="loss") == 2
    assert value(got, "otel_ml_nonfinite", metric="grad_norm") == 1
    assert value(got, "otel_ml_loss") == 1.5
    assert value(got, "otel_ml_grad_norm") == 3.0


def test_nonfinite_series_exists_at_zero_once_a_key_is_logged(setup):
    tm, reader, _, _ = setup
    tm.log(1, {"loss": 1.0, "kl": 0.1})
    got = points(reader)
    assert value(got, "otel_ml_nonfinite", metric="loss", **ATTRS) == 0
    assert value(got, "otel_ml_nonfinite", metric="kl", **ATTRS) == 0


def test_zero_dim_and_one_element_cpu_tensors_are_read(setup):
    tm, reader, _, _ = setup
    tm.log(1, {"loss": torch.tensor(0.75, requires_grad=True) * 1, "grad_norm": torch.tensor([4.0])})
    tm.log(2, {"kl": torch.tensor(float("nan")), "samples": torch.tensor(16)})
    got = points(reader)
    assert value(got, "otel_ml_loss") == 0.75
    assert value(got, "otel_ml_grad_norm") == 4.0
    assert value(got, "otel_ml_nonfinite", metric="kl") == 1
    assert value(got, "otel_ml_samples") == 16


def test_bad_values_warn_once_naming_the_key_and_are_dropped(setup, caplog):
    tm, reader, _, health = setup
    caplog.set_level(logging.WARNING, logger="otel_ml")
    for step in range(3):
        tm.log(
            step,
            {
                "loss": 1.0,
                "note": "hello",
                "vec": torch.ones(3, dtype=torch.complex64),
                "nothing": None,
                "z": 1j,
            },
        )
    got = points(reader)
    assert value(got, "otel_ml_loss") == 1.0
    messages = [r.getMessage() for r in caplog.records]
    for key in ("'note'", "'vec'", "'nothing'", "'z'"):
        assert sum(key in m for m in messages) == 1, messages
    assert "complex tensor" in " ".join(messages)  # several elements are a distribution, not complex ones
    assert health.drops["values"] == 12
    assert not got.get("otel_ml_note"), "no value may be exported for a string"


def test_integers_bools_and_huge_ints(setup, caplog):
    tm, reader, _, _ = setup
    tm.log(1, {"flag": True, "big": 2**60 + 1, "huge": 10**400, "count": 12})
    got = points(reader)
    assert value(got, "otel_ml_flag") == 1.0
    assert value(got, "otel_ml_big") == float(2**60)
    assert value(got, "otel_ml_count") == 12.0
    assert "too large" in caplog.text and "'huge'" in caplog.text


def test_samples_and_tokens_are_summed_and_rated_over_the_window(setup):
    tm, reader, clock, _ = setup
    for step in range(10):
        tm.log(step, {"samples": 8, "tokens": 800})
        clock.now += 0.5
    got = points(reader)
    assert value(got, "otel_ml_samples") == 80
    assert value(got, "otel_ml_tokens") == 8000
    # window of 4 steps + 1 entries: 4 intervals of 0.5 s carrying 4 x 8 samples
    assert value(got, "otel_ml_samples_per_second") == pytest.approx(16.0)
    assert value(got, "otel_ml_tokens_per_second") == pytest.approx(1600.0)


def test_rates_and_counters_are_absent_when_never_logged(setup):
    tm, reader, _, _ = setup
    tm.log(1, {"loss": 1.0})
    got = points(reader)
    for name in ("otel_ml_samples", "otel_ml_samples_per_second", "otel_ml_tokens_per_second"):
        assert not got.get(name)


def test_negative_counts_are_ignored_with_a_warning(setup, caplog):
    tm, reader, _, _ = setup
    tm.log(1, {"samples": 8})
    tm.log(2, {"samples": -3})
    assert value(points(reader), "otel_ml_samples") == 8
    assert "negative samples" in caplog.text


def _step_histogram(tm):
    (metric,) = tm.metrics()
    assert metric.name == "otel_ml_step_duration_seconds" and metric.unit == "s"
    (point,) = metric.data.data_points
    assert point.attributes == ATTRS
    return point


def test_step_duration_histogram_measures_time_between_steps(setup):
    tm, _, clock, _ = setup
    tm.log(0, {"loss": 1.0})
    clock.now += 0.02
    tm.log(1, {"loss": 1.0})
    clock.now += 0.01
    tm.log(1, {"lr": 0.1})  # same step again: not a new step
    clock.now += 0.3
    tm.log(4, {"loss": 1.0})  # 3 steps in 0.31 s since step 1 began: per-step mean 0.1033 s
    hist = _step_histogram(tm)
    assert hist.count == 2
    assert hist.sum == pytest.approx(0.02 + 0.31 / 3)
    bounds = list(hist.explicit_bounds)
    assert bounds == list(semconv.STEP_DURATION_BUCKETS)
    assert hist.bucket_counts[bounds.index(0.025)] == 1  # 0.02 in (0.01, 0.025]
    assert hist.bucket_counts[bounds.index(0.25)] == 1  # 0.103 in (0.1, 0.25]


def test_step_going_backwards_restarts_timing_without_a_sample(setup):
    tm, _, clock, _ = setup
    tm.log(5, {})
    clock.now += 1
    tm.log(0, {})
    clock.now += 0.5
    tm.log(1, {})
    hist = _step_histogram(tm)
    assert (hist.count, hist.sum) == (1, pytest.approx(0.5))


def test_unusable_step_counts_up_with_one_warning(setup, caplog):
    tm, reader, _, _ = setup
    tm.log(None, {"loss": 1.0})
    tm.log("x", {"loss": 1.0})
    tm.log(torch.tensor(9), {"loss": 1.0})
    tm.log(4.0, {"loss": 1.0})
    assert value(points(reader), "otel_ml_step") == 4
    assert caplog.text.count("step 'x' unusable") == 1


def test_every_step_change_is_reported_with_its_values():
    clock = FakeClock(1_000.0)
    seen = []
    tm = TrainingMetrics(
        MeterProvider(shutdown_on_exit=False).get_meter("t"),
        ATTRS,
        on_step=lambda step, mono, values: seen.append((step, mono, dict(values))),
        wall=clock,
        mono=clock,
    )
    tm.log(0, {"loss": 1.0})
    clock.now += 1.0
    tm.log(0, {"lr": 0.1})  # same step: no boundary
    tm.log(1, {"loss": 0.5})
    assert seen == [(0, 1000.0, {"loss": 1.0}), (1, 1001.0, {"loss": 0.5})]


def test_learning_rate_alias_feeds_the_same_gauge(setup):
    tm, reader, _, _ = setup
    tm.log(1, {"learning_rate": 0.5})
    assert value(points(reader), "otel_ml_learning_rate") == 0.5


def test_user_keys_are_sanitized_and_do_not_shadow_builtin_metrics(setup):
    tm, reader, _, _ = setup
    tm.log(1, {"loss/val top-1": 0.5, "step": 3.0, "损失": 2.0})
    got = points(reader)
    assert value(got, "otel_ml_loss_val_top_1") == 0.5
    assert value(got, "otel_ml_user_step") == 3.0
    assert value(got, "otel_ml_step") == 1
    chinese = tm.exported_name("损失")
    assert chinese and chinese.startswith("otel_ml_key_")
    assert value(got, chinese) == 2.0


def test_distinct_keys_that_sanitize_alike_get_distinct_metrics(setup):
    tm, reader, _, _ = setup
    tm.log(1, {"a.b": 1.0, "a-b": 2.0})
    assert tm.exported_name("a.b") != tm.exported_name("a-b")
    got = points(reader)
    assert value(got, tm.exported_name("a.b")) == 1.0
    assert value(got, tm.exported_name("a-b")) == 2.0


def test_key_cap_drops_new_keys_with_one_warning():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    health = TelemetryHealth()
    tm = TrainingMetrics(provider.get_meter("t"), ATTRS, max_keys=4, health=health)
    tm.log(1, {f"k{i}": float(i) for i in range(6)})
    got = points(reader)
    assert "otel_ml_k1" in got and "otel_ml_k2" not in got  # samples/tokens count towards the cap
    assert health.drops["values"] == 4


class ManualDeferred(Deferred):
    """A deferred value the test resolves by hand (stands in for a CUDA event on this CPU machine)."""

    def __init__(self, number: float) -> None:
        self.number = number
        self.done = False

    def ready(self, calls=None) -> bool:
        return self.done

    def value(self) -> float:
        return self.number


def test_deferred_values_are_resolved_in_order_at_collection(setup, monkeypatch):
    tm, reader, _, _ = setup
    first, second = ManualDeferred(1.0), ManualDeferred(float("nan"))
    made = iter([first, second])
    monkeypatch.setattr("otel_ml.training.coerce", lambda v, cuda=None: next(made))
    tm.log(1, {"loss": object()})
    tm.log(2, {"loss": object()})
    assert not points(reader).get("otel_ml_loss")
    second.done = True  # ready out of order: must wait for the first
    assert not points(reader).get("otel_ml_loss")
    first.done = True
    got = points(reader)
    assert value(got, "otel_ml_loss") == 1.0
    assert value(got, "otel_ml_nonfinite", metric="loss") == 1


def test_pending_deferred_values_are_bounded(setup, monkeypatch):
    tm, _, _, health = setup
    monkeypatch.setattr("otel_ml.training.coerce", lambda v, cuda=None: ManualDeferred(1.0))
    for step in range(MAX_PENDING + 10):
        tm.log(step, {"loss": object()})
    assert len(tm._pending) == MAX_PENDING
    assert health.drops["values"] == 10


def test_window_rate_needs_two_points_and_elapsed_time():
    assert window_rate((), 1) is None
    assert window_rate(((1.0, 5.0, 0.0),), 1) is None
    assert window_rate(((1.0, 5.0, 0.0), (1.0, 9.0, 0.0)), 1) is None
    assert window_rate(((1.0, 5.0, 0.0), (3.0, 9.0, 10.0)), 1) == 2.0
