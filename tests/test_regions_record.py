"""otel_ml.regions.record(): regions timed elsewhere (a framework's timer) join the region series."""

from __future__ import annotations

import pytest

import otel_ml
from otel_ml.regions import record
from tests.support.integrations import by_path, scrape, start


def test_record_before_init_does_nothing():
    record("gen", 1.0)  # no recorder installed: no error, nothing kept
    assert otel_ml.get_telemetry() is None


def test_recorded_children_leave_the_parent_only_its_own_time(tmp_path):
    start(tmp_path)
    record("step", 2.0, {"gen": 1.5, "bad": float("nan")})
    record("step", -1.0)  # skipped
    otel_ml.log(1, loss=1.0)
    samples = scrape()
    assert by_path(samples) == {"step": 1, "step/gen": 1}
    own = by_path(samples, "otel_ml_span_self_seconds_total")
    assert own["step"] == pytest.approx(0.5)
    assert own["step/gen"] == pytest.approx(1.5)


def test_a_recorded_region_nests_under_the_open_one(tmp_path):
    start(tmp_path)
    with otel_ml.span("evaluate"):
        record("generate", 0.25)
    samples = scrape()
    assert by_path(samples)["evaluate/generate"] == 1
