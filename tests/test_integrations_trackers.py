"""The tracker-style integrations in-process: Accelerate's OtelMLTracker and verl's OtelMLTracking."""

from __future__ import annotations

import pytest

import otel_ml
from tests.support.integrations import by_path, options, scrape, start, value_of


def test_verl_tracking_exports_mapped_values_regions_and_progress(tmp_path):
    from otel_ml.integrations.verl import OtelMLTracking

    tracker = OtelMLTracking(total_steps=10, **options(tmp_path))
    for step in range(1, 4):
        tracker.log(
            {
                "actor/pg_loss": 0.5 / step,
                "actor/ppo_kl": 0.01,
                "critic/score/mean": 0.2 * step,
                "perf/total_num_tokens": 1000,
                "perf/throughput": 250.0,
                "timing_s/step": 0.2,
                "timing_s/gen": 0.1,
            },
            step=step,
        )
    tracker.log({"actor/pg_loss": float("nan")}, step=4)
    samples = scrape()
    assert value_of(samples, "otel_ml_loss") == pytest.approx(0.5 / 3)
    assert value_of(samples, "otel_ml_kl") == pytest.approx(0.01)
    assert value_of(samples, "otel_ml_reward") == pytest.approx(0.6)
    assert value_of(samples, "otel_ml_perf_throughput") == 250.0
    assert value_of(samples, "otel_ml_tokens_total") == 3000
    assert value_of(samples, "otel_ml_nonfinite_total", metric="loss") == 1
    assert value_of(samples, "otel_ml_progress_total", task="train") == 10
    assert value_of(samples, "otel_ml_progress_completed", task="train") == 4
    assert by_path(samples) == {"step": 3, "step/gen": 3}
    self_time = by_path(samples, "otel_ml_span_self_seconds_total")
    assert self_time["step"] == pytest.approx(3 * 0.1, rel=0.01)  # gen's time is not step's own
    tracker.finish()


def test_accelerate_tracker_logs_mapped_values_with_progress_from_the_config(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from otel_ml.integrations.accelerate import OtelMLTracker, register

    start(tmp_path)
    accelerator = Accelerator(log_with=[OtelMLTracker()], cpu=True)
    accelerator.init_trackers("unit", config={"max_train_steps": 5, "note": "x"})
    for step in range(3):
        accelerator.log({"train_loss": 1.0 / (step + 1), "lr": 1e-3, "eval": {"acc": 0.5}}, step=step)
    samples = scrape()
    assert value_of(samples, "otel_ml_loss") == pytest.approx(1 / 3)
    assert value_of(samples, "otel_ml_eval_acc") == 0.5
    assert value_of(samples, "otel_ml_progress_total", task="train") == 5
    assert accelerator.get_tracker("otel_ml").tracker is otel_ml.get_telemetry()
    accelerator.end_training()
    assert register() is True
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert LOGGER_TYPE_TO_CLASS["otel_ml"] is OtelMLTracker


def test_accelerate_log_with_the_registered_name(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from otel_ml.integrations.accelerate import register

    start(tmp_path)
    assert register()
    accelerator = Accelerator(log_with="otel_ml", cpu=True)
    accelerator.init_trackers("unit")
    accelerator.log({"loss": 0.25}, step=1)
    assert value_of(scrape(), "otel_ml_loss") == 0.25
    accelerator.end_training()
