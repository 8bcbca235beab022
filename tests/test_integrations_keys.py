"""The pure key handling of the integrations: flattening, scalars, aliases, verl and torchelastic maps."""

from __future__ import annotations

import math

import pytest

from otel_ml.integrations import _keys
from otel_ml.integrations.verl import split


def test_flatten_joins_nested_keys_with_slashes():
    assert _keys.flatten({"actor": {"pg_loss": 0.1, "kl": {"mean": 0.2}}, "step": 3}) == {
        "actor/pg_loss": 0.1,
        "actor/kl/mean": 0.2,
        "step": 3,
    }


def test_log_values_keeps_scalars_and_renames_aliases_without_overriding_the_builtin():
    values = _keys.log_values({"train_loss": 0.5, "loss": 0.4, "Train/LR": 1e-3, "note": "x", "hist": [1, 2]})
    assert values == {"loss": 0.4, "lr": 1e-3}


def test_builtin_key_is_case_insensitive_and_none_for_other_tags():
    assert _keys.builtin_key("Loss/train") == "loss"
    assert _keys.builtin_key("train/grad_norm") == "grad_norm"
    assert _keys.builtin_key("eval/loss") is None


def test_is_scalar_accepts_numbers_and_one_element_tensors_only():
    torch = pytest.importorskip("torch")
    assert _keys.is_scalar(1) and _keys.is_scalar(2.5) and _keys.is_scalar(torch.tensor(1.0))
    assert not _keys.is_scalar(torch.ones(2)) and not _keys.is_scalar("1") and not _keys.is_scalar([1])
    assert math.isnan(_keys.to_float(torch.tensor(float("nan"))))


def test_verl_keys_map_onto_builtins_and_timers_onto_step_regions():
    values, step, children = split(
        {
            "actor/pg_loss": 0.1,
            "actor/ppo_kl": 0.01,
            "actor/grad_norm": 1.5,
            "actor/lr": 1e-6,
            "critic/score/mean": 0.7,
            "perf/total_num_tokens": 4096,
            "perf/throughput": 1234.0,
            "timing_s/step": 3.0,
            "timing_s/gen": 1.5,
            "timing_s/update_actor": 1.0,
            "training/global_step": 7,
            "val/generations": "a table",
        }
    )
    assert values == {
        "loss": 0.1,
        "kl": 0.01,
        "grad_norm": 1.5,
        "lr": 1e-6,
        "reward": 0.7,
        "tokens": 4096,
        "perf/throughput": 1234.0,
    }
    assert step == 3.0
    assert children == {"gen": 1.5, "update_actor": 1.0}


def test_torchelastic_metric_names_parse_into_operations_durations_and_states():
    pytest.importorskip("torch")
    from otel_ml.integrations.torchelastic import ElasticSeries, parse

    assert parse("SimpleElasticAgent._restart_workers.success", 1) == (
        "operation",
        "restart_workers",
        "success",
    )
    assert parse("SimpleElasticAgent._rendezvous.duration.ms", 250) == ("duration", "rendezvous", 0.25)
    assert parse("workers.default.remaining_restarts", 2) == ("remaining", "default", 2.0)
    assert parse("workers.default.healthy", 1) == ("state", "default", "healthy")
    assert parse("workers.default.run_total", 1) is None
    series = ElasticSeries(max_operations=2)
    for name in (
        "A._rendezvous.success",
        "A._rendezvous.success",
        "A._start_workers.failure",
        "A.run.success",
    ):
        series.update(name, 1)
    series.update("workers.default.healthy", 1)
    series.update("workers.default.failed", 1)
    assert series.operations == {
        ("rendezvous", "success"): 2,
        ("rendezvous", "failure"): 0,
        ("start_workers", "success"): 0,
        ("start_workers", "failure"): 1,
    }  # "run" is over the cap of two operations
    assert series.states == {("default", "healthy"): 0, ("default", "failed"): 1}
