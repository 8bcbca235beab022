"""Name sanitizing: every user key becomes a valid, stable, non-colliding metric name."""

from __future__ import annotations

import re

import pytest

from otel_ml import names

VALID = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,254}$")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("kl", "otel_ml_kl"),
        ("reward", "otel_ml_reward"),
        ("loss/val top-1", "otel_ml_loss_val_top_1"),
        ("Policy.Entropy", "otel_ml_policy_entropy"),
        ("__x__", "otel_ml_x"),
        ("9lives", "otel_ml_9lives"),
        ("step", "otel_ml_user_step"),
        ("samples", "otel_ml_user_samples"),  # otel_ml_samples is otel_ml's own counter
        ("nonfinite_total", "otel_ml_user_nonfinite_total"),
    ],
)
def test_metric_name_examples(key, expected):
    assert names.metric_name(key) == expected


@pytest.mark.parametrize("key", ["前向传播总耗时", "", "   ", "!!!", "a" * 1000, "损失_loss", "emoji🔥"])
def test_any_key_gives_a_valid_otel_and_prometheus_name(key):
    name = names.metric_name(key)
    assert VALID.match(name), name
    assert len(name) <= names.MAX_NAME_LENGTH


def test_non_ascii_keys_are_stable_and_distinct():
    a, b = names.metric_name("前向传播"), names.metric_name("反向传播")
    assert a != b
    assert a == names.metric_name("前向传播")
    assert names.metric_name("loss_验证") != names.metric_name("loss_训练")


def test_label_values_are_bounded_and_keep_unicode():
    assert names.label_value("前向") == "前向"
    long = names.label_value("x" * 500)
    assert len(long) == names.MAX_LABEL_VALUE_LENGTH
    assert long != names.label_value("x" * 499 + "y")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("exp-7", "exp-7"), ("my run/2", "my-run-2"), ("../etc", "etc"), ("a" * 100, None)],
)
def test_run_id_is_safe_for_labels_and_paths(raw, expected):
    cleaned = names.run_id(raw)
    assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", cleaned)
    if expected:
        assert cleaned == expected
