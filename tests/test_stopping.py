"""otel_ml.should_stop / agree_stop / stop_reason on one process, and the cause's encoding."""

from __future__ import annotations

import pytest

import otel_ml
from otel_ml._testing import reset
from otel_ml.anomaly import Anomaly
from otel_ml.stopping import StopReason, decode, encode


def _anomaly(kind: str, step: int | None, rank: int) -> Anomaly:
    return Anomaly(kind, step, "loss", float("nan"), rank, "r", "m")


def _anomaly_of(kind: str, step: int | None, rank: int, key: str) -> Anomaly:
    return Anomaly(kind, step, key, float("nan"), rank, "r", "m")


def test_the_maximum_of_the_encoded_causes_is_the_earliest_step_then_the_lowest_rank():
    keys = [
        encode(None, 0),
        encode(_anomaly("loss_spike", 41, 1), 1),
        encode(_anomaly("nonfinite", 37, 3), 3),
        encode(_anomaly("nonfinite", 37, 2), 2),
    ]
    assert keys[0] == 0 and all(k > 0 for k in keys[1:])
    assert decode(max(keys)) == StopReason(rank=2, type="nonfinite", step=37)
    # On one step the rank whose loss went bad wins over lower ranks whose grad norm it spoiled.
    spread = [encode(_anomaly_of("nonfinite", 3, 0, "grad_norm"), 0), encode(_anomaly("nonfinite", 3, 1), 1)]
    assert decode(max(spread)) == StopReason(rank=1, type="nonfinite", step=3)
    assert decode(0) is None
    assert decode(encode(_anomaly("stall", None, 5), 5)).type == "stall"  # no step: latest possible


@pytest.fixture
def run(tmp_path):
    reset()
    otel_ml.init(prometheus=False, files="off", summary=False, run_dir=str(tmp_path), stop_on=["nonfinite"])
    yield
    otel_ml.shutdown()
    reset()


def test_agree_stop_answers_on_every_nth_call_with_the_cause_and_log_stops_raising(run):
    stopped_at = None
    for step in range(1, 100):
        otel_ml.log(step, loss=float("nan") if step == 37 else 1.0)  # never raises: agreement in use
        if otel_ml.agree_stop(every=10):
            stopped_at = step
            break
    assert stopped_at == 40
    reason = otel_ml.stop_reason()
    assert (reason.rank, reason.type, reason.step) == (0, "nonfinite", 37)
    assert reason.anomaly is not None and reason.anomaly.key == "loss"
    assert otel_ml.should_stop() is True
    assert otel_ml.agree_stop(every=10) is True  # stays agreed, no further collective


def test_should_stop_is_local_and_false_until_a_stop_on_anomaly(run):
    otel_ml.log(1, loss=1.0)
    assert otel_ml.should_stop() is False
    otel_ml.log(2, loss=float("inf"))
    assert otel_ml.should_stop() is True
    otel_ml.log(3, loss=1.0)  # flagging, not raising, once should_stop() is in use
    assert otel_ml.stop_reason() is None  # only agree_stop() agrees


def test_without_the_agreement_log_still_raises(run):
    otel_ml.log(1, loss=float("nan"))
    otel_ml.get_telemetry().anomalies.process()
    with pytest.raises(otel_ml.AnomalyError):
        otel_ml.log(2, loss=1.0)


def test_before_init_nothing_stops_and_a_bad_interval_is_refused(tmp_path):
    reset()
    assert otel_ml.agree_stop() is False and otel_ml.should_stop() is False
    assert otel_ml.stop_reason() is None
    otel_ml.init(prometheus=False, files="off", summary=False, run_dir=str(tmp_path))
    try:
        with pytest.raises(ValueError, match="every"):
            otel_ml.agree_stop(every=0)
    finally:
        otel_ml.shutdown()
        reset()
